"""Mutation fuzzing of pack files: shared by the CI test and the long documented run
(benchmarks/fuzz_packs.py). A mutated file must load as a valid pack or raise PackError; nothing else.
The header pass alone (read_summary, what the nodes run before a prompt is accepted) must agree: it
refuses no pack that loads, and every pack it refuses fails to load too."""

from __future__ import annotations

import hashlib
import json
import math
import struct

import torch
from hypothesis import strategies as st

from safedig_core import PackError, SteeringDictionary, load_pack, save_pack
from safedig_core.pack import METADATA_KEY, read_summary
from safedig_core.pack_info import format_pack
from safedig_core.synthetic import random_pack

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def base_pack_bytes(tmp_dir) -> bytes:
    meta, tensors = random_pack("flux", 8, ["double.0.img.attn", "single.0.out"], expansion=2, k=2, n_harmful=2,
                                dtype=torch.float16)
    return _case("base", save_pack(tmp_dir / "base.safetensors", meta, tensors).read_bytes())[1]


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _paths(obj, prefix=()):
    """Every (path) into a JSON tree, for picking a node to mutate."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    if isinstance(obj, (dict, list)):
        obj[path[-1]] = value


def _delete(obj, path):
    for p in path[:-1]:
        obj = obj[p]
    if isinstance(obj, dict):
        obj.pop(path[-1], None)
    elif isinstance(obj, list) and obj:
        obj.pop(path[-1])


class FuzzCase(bytes):
    """Mutated file bytes that print briefly in hypothesis' failure report."""

    kind = ""

    def __repr__(self) -> str:
        return f"FuzzCase({self.kind}, {len(self)} bytes, sha256 {hashlib.sha256(self).hexdigest()[:12]})"


def _case(kind: str, data: bytes) -> tuple[str, FuzzCase]:
    case = FuzzCase(data)
    case.kind = kind
    return kind, case


# One strategy per JSON type, for "meta_type": a metadata node (or the whole document) replaced by a value
# of another JSON type than the one it has.
JSON_TYPES = {
    "null": st.none(),
    "bool": st.booleans(),
    "int": st.integers(-(2**70), 2**70),
    "float": st.floats(allow_nan=True, allow_infinity=True),
    "string": st.text(max_size=8),
    "list": st.lists(JSON_VALUES, max_size=3),
    "object": st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=3),
}


def json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    return {int: "int", float: "float", str: "string", list: "list"}.get(type(value), "object")


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


MUTATIONS = ("truncate", "flip_bytes", "header_length", "tensor_field", "meta_value", "meta_delete", "meta_json",
             "meta_type", "body_bytes")


@st.composite
def mutated_pack(draw, base: bytes) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(MUTATIONS))
    header, body = split(base)
    meta = json.loads(header["__metadata__"][METADATA_KEY])
    tensor_names = sorted(k for k in header if k != "__metadata__")
    if kind == "truncate":
        return _case(kind, base[: draw(st.integers(0, len(base) - 1))])
    if kind == "flip_bytes":
        data = bytearray(base)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return _case(kind, bytes(data))
    if kind == "header_length":
        n = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, len(base))))
        return _case(kind, struct.pack("<Q", n) + base[8:])
    if kind == "tensor_field":
        name = draw(st.sampled_from(tensor_names))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = draw(st.one_of(
            JSON_VALUES, st.sampled_from(["F64", "I64", "U8", "BOOL", "F8_E4M3"]),
            st.lists(st.integers(-5, 2**40), max_size=4)))
        return _case(kind, join(header, body))
    if kind in ("meta_value", "meta_delete"):
        path = draw(st.sampled_from([p for p in _paths(meta) if p]))
        if kind == "meta_value":
            _set(meta, path, draw(JSON_VALUES))
        else:
            _delete(meta, path)
        header["__metadata__"][METADATA_KEY] = json.dumps(meta)
        return _case(kind, join(header, body))
    if kind == "meta_type":  # structurally wrong metadata: wrong JSON types at any field, the root included
        path = draw(st.sampled_from(list(_paths(meta))))
        other = draw(st.sampled_from(sorted(set(JSON_TYPES) - {json_type(_get(meta, path))})))
        value = draw(JSON_TYPES[other])
        if path:
            _set(meta, path, value)
        else:
            meta = value
        header["__metadata__"][METADATA_KEY] = json.dumps(meta)
        return _case(kind, join(header, body))
    if kind == "meta_json":
        header["__metadata__"][METADATA_KEY] = draw(st.text(max_size=40))
        return _case(kind, join(header, body))
    data = bytearray(base)  # body_bytes: corrupt tensor data (NaN/inf patterns in fp16)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(len(base) - len(body), len(base) - 2))
        data[i : i + 2] = draw(st.sampled_from([b"\x00\x7c", b"\x00\xfe", b"\xff\x7f", b"\x01\x00"]))
    return _case(kind, bytes(data))


def check_outcome(path) -> str:
    """Read the header summary and load a (mutated) pack; return 'valid' or 'rejected'. Any other exception
    propagates (a bug), and so does a summary that disagrees with the load."""
    try:
        summary = read_summary(path)
    except PackError as exc:
        assert str(path) in str(exc) and "Fix:" in str(exc), str(exc)
        summary = None
    try:
        pack = load_pack(path)
    except PackError as exc:
        msg = str(exc)
        assert str(path) in msg and "Fix:" in msg, msg
        return "rejected"
    assert summary is not None and summary.domains == tuple(pack.domains), (summary, pack.domains)
    format_pack(pack)  # inspect must show any valid pack
    for domain in pack.domains:
        d = SteeringDictionary(pack, domain)
        for pos in pack.positions:
            w = d.weights(pos, torch.device("cpu"), torch.float32)
            assert math.isfinite(w.tau)
    return "valid"
