"""Dictionary packs: ONE .safetensors file holding a pack's tensors and its JSON metadata.

Tensors (names built by the functions below, never by hand elsewhere):
    encoder.{position}.W_enc  [d_sae, d_model]     encoder.{position}.b_enc  [d_sae]
    encoder.{position}.b_pre  [d_model]
    decoder.{domain}.{position}.W_dec  [d_sae, d_model]   decoder.{domain}.{position}.b_dec  [d_model]

Metadata: the safetensors header's `__metadata__[METADATA_KEY]` is one JSON document (schema in
docs/pack-format.md). The header is parsed and checked by this module before any tensor is read, so a
malformed or hostile file is refused with a PackError (naming the file, the problem and the fix) and
never makes us allocate what it merely declares.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ArchitectureError, PackError
from .positions import ModelPositions, get_architecture

PACK_SUFFIX = ".safetensors"
METADATA_KEY = "safedig"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)

# Metadata keys (one place; readers and writers both use these).
K_FORMAT_VERSION = "format_version"
K_ARCHITECTURE = "architecture"
K_D_MODEL = "d_model"
K_POSITIONS = "positions"
K_ROUTING = "routing"
K_SAE = "sae"
K_SOURCE_DOMAIN = "source_domain"
K_DOMAINS = "domains"
K_PROVENANCE = "provenance"
K_CANDIDATES = "candidates"  # in routing: one entry per candidate position
K_SCORE = "score"  # in each candidate: the final routing score
# Per position
K_D_SAE = "d_sae"
K_K = "k"
K_SCALE = "scale"
K_HARMFUL_IDS = "harmful_ids"
K_METRICS = "metrics"
# Per domain
K_ROLE = "role"
K_ADAPTED_FROM = "adapted_from"
K_FEATURES = "features"
K_HARMFUL_WEIGHTS = "harmful_weights"
K_ANCHOR_IDS = "safe_anchor_ids"
K_ANCHOR_VALUES = "safe_anchor_values"
K_TAU = "tau"

ROLE_SOURCE, ROLE_TARGET = "source", "target"
STORAGE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
# A pack header is a few hundred KB at most; refuse absurd declared sizes before reading them.
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSOR_ELEMENTS = 2**34


def encoder_key(position: str, name: str) -> str:
    return f"encoder.{position}.{name}"


def decoder_key(domain: str, position: str, name: str) -> str:
    return f"decoder.{domain}.{position}.{name}"


@dataclass(frozen=True)
class DomainFeatures:
    """Per position, per domain: weights of the harmful latents, the safe anchor and the gate threshold."""

    harmful_weights: list[float]
    anchor_ids: list[int]
    anchor_values: list[float]
    tau: float


@dataclass(frozen=True)
class PositionInfo:
    d_model: int
    d_sae: int
    k: int
    scale: float
    harmful_ids: list[int]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class DictionaryPack:
    """A validated pack. Tensors stay on CPU in their stored dtype; the steering code casts them once."""

    path: str
    metadata: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def architecture(self) -> str:
        return self.metadata[K_ARCHITECTURE]

    @property
    def d_model(self) -> int:
        return self.metadata[K_D_MODEL]

    @property
    def positions(self) -> list[str]:
        return list(self.metadata[K_POSITIONS])

    @property
    def source_domain(self) -> str:
        return self.metadata[K_SOURCE_DOMAIN]

    @property
    def domains(self) -> list[str]:
        return list(self.metadata[K_DOMAINS])

    def position_info(self, position: str) -> PositionInfo:
        p = self.metadata[K_POSITIONS][position]
        return PositionInfo(p[K_D_MODEL], p[K_D_SAE], p[K_K], p[K_SCALE], list(p[K_HARMFUL_IDS]),
                            dict(p.get(K_METRICS, {})))

    def domain_features(self, domain: str, position: str) -> DomainFeatures:
        self.require_domain(domain)
        f = self.metadata[K_DOMAINS][domain][K_FEATURES][position]
        return DomainFeatures(list(f[K_HARMFUL_WEIGHTS]), list(f[K_ANCHOR_IDS]),
                              list(f[K_ANCHOR_VALUES]), float(f[K_TAU]))

    def require_domain(self, domain: str) -> None:
        if domain not in self.metadata[K_DOMAINS]:
            raise PackError(f"pack has no domain {domain!r}", f"choose one of {self.domains}", path=self.path)

    def check_compatible(self, model: ModelPositions, positions: list[str] | None = None) -> None:
        """Raise a PackError naming the mismatch if this pack cannot steer `model`."""
        if model.architecture != self.architecture or model.d_model != self.d_model:
            raise PackError(
                f"pack is for {self.architecture} (d_model {self.d_model}) but the model is "
                f"{model.architecture} (d_model {model.d_model})",
                f"load a pack trained for {model.describe()}",
                path=self.path,
            )
        missing = [p for p in (positions or self.positions) if p not in model.modules]
        if missing:
            raise PackError(
                f"positions {missing} do not exist in the model ({model.describe()})",
                "use a pack trained on this model's depth, or pick a position subset the model has",
                path=self.path,
            )


# ----------------------------------------------------------------------------------------------- save


def save_pack(path: str | os.PathLike, metadata: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Validate and write a pack atomically (temp file, then rename: a half-written pack never exists
    under its final name)."""
    path = Path(path)
    if path.suffix != PACK_SUFFIX:
        raise PackError(f"pack files must end in {PACK_SUFFIX}", f"rename to {path.stem}{PACK_SUFFIX}", path=path)
    meta = dict(metadata)
    meta.setdefault(K_FORMAT_VERSION, FORMAT_VERSION)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _validate(str(path), meta, {k: (_dtype_name(v.dtype, path), list(v.shape)) for k, v in tensors.items()})
    _check_values(str(path), meta, tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _dtype_name(dtype: torch.dtype, path) -> str:
    for name, dt in STORAGE_DTYPES.items():
        if dt == dtype:
            return name
    raise PackError(f"tensor dtype {dtype} cannot be stored", "store float32, float16 or bfloat16", path=path)


# ----------------------------------------------------------------------------------------------- load


def load_pack(path: str | os.PathLike) -> DictionaryPack:
    """Read and fully validate a pack; every problem becomes a PackError."""
    path = os.fspath(path)
    header = read_header(path)
    raw_meta = header.pop("__metadata__", None)
    if not isinstance(raw_meta, dict) or METADATA_KEY not in raw_meta:
        raise PackError("not a SafeDIG pack (no safedig metadata in the safetensors header)",
                        "load a pack written by `python -m safedig_core export`", path=path)
    try:
        meta = json.loads(raw_meta[METADATA_KEY])
    except (TypeError, ValueError) as exc:
        raise PackError(f"pack metadata is not valid JSON ({exc})", "re-export the pack", path=path) from None
    _validate(path, meta, {k: (v["dtype"], v["shape"]) for k, v in header.items()})
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in header}
    except Exception as exc:  # safetensors raises several types; the header was already checked
        raise PackError(f"tensor data cannot be read ({exc})", "re-download or re-export the pack", path=path) from None
    _check_values(path, meta, tensors)
    return DictionaryPack(path, meta, tensors)


def read_header(path: str) -> dict[str, Any]:
    """The safetensors header as a dict, checked for sane sizes, dtypes and non-overlapping offsets."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise PackError(f"file is truncated ({size} bytes, no header)", "re-download the pack", path=path)
            (n,) = struct.unpack("<Q", prefix)
            if n < 2 or n > MAX_HEADER_BYTES or n > size - 8:
                raise PackError(
                    f"header length {n} is impossible for a {size}-byte file (truncated or not safetensors)",
                    "re-download the pack; packs are .safetensors files written by SafeDIG", path=path)
            raw = f.read(n)
    except FileNotFoundError:
        raise PackError("file not found", "check the path, or put the pack in models/safedig/", path=path) from None
    except IsADirectoryError:
        raise PackError("is a directory, not a pack file", "point to a .safetensors pack", path=path) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise PackError("header is not valid JSON", "re-download the pack", path=path) from None
    if not isinstance(header, dict):
        raise PackError("header is not a JSON object", "re-download the pack", path=path)
    data_len = size - 8 - n
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise PackError("__metadata__ must map strings to strings", "re-export the pack", path=path)
            continue
        dtype, shape, offsets = _entry_fields(path, name, entry)
        numel = math.prod(shape)
        begin, end = offsets
        if not 0 <= begin <= end <= data_len or end - begin != numel * _ITEMSIZE[dtype]:
            raise PackError(f"tensor {name!r} has offsets {offsets} that do not fit its shape {shape} and the "
                            f"{data_len}-byte data section (file truncated or corrupted)", "re-download the pack",
                            path=path)
        spans.append((begin, end, name))
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise PackError(f"tensors {n0!r} and {n1!r} overlap", "re-export the pack", path=path)
    return header


def _entry_fields(path: str, name: str, entry: Any) -> tuple[str, list[int], list[int]]:
    if not isinstance(entry, dict):
        raise PackError(f"header entry {name!r} is not an object", "re-export the pack", path=path)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in STORAGE_DTYPES:
        raise PackError(f"tensor {name!r} has dtype {dtype!r}; packs store F32, F16 or BF16",
                        "re-export the pack with a float dtype", path=path)
    if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
            or math.prod(shape) > MAX_TENSOR_ELEMENTS):
        raise PackError(f"tensor {name!r} has an invalid shape {shape!r}", "re-export the pack", path=path)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise PackError(f"tensor {name!r} has invalid data_offsets {offsets!r}", "re-export the pack", path=path)
    return dtype, shape, offsets


# ------------------------------------------------------------------------------------------ validation


def _validate(path: str, meta: Any, tensors: Mapping[str, tuple[str, list[int]]]) -> None:
    """Check the metadata schema and that the tensors are exactly those it implies, with the right shapes."""

    def fail(problem: str, fix: str = "re-export the pack with `python -m safedig_core export`"):
        raise PackError(problem, fix, path=path)

    def need(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            fail(f"metadata is missing {where}{key!r}")
        value = obj[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
            fail(f"metadata {where}{key!r} has the wrong type ({type(value).__name__})")
        return value

    if not isinstance(meta, dict):
        fail("metadata is not a JSON object")
    version = need(meta, K_FORMAT_VERSION, int, "")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        fail(f"unknown pack format version {version} (this SafeDIG reads {list(SUPPORTED_FORMAT_VERSIONS)})",
             "update SafeDIG, or re-export the pack with this version")
    arch = need(meta, K_ARCHITECTURE, str, "")
    try:
        architecture = get_architecture(arch)
    except ArchitectureError as exc:
        fail(f"unknown architecture {arch!r}", exc.fix or "")
    d_model = need(meta, K_D_MODEL, int, "")
    positions = need(meta, K_POSITIONS, dict, "")
    if not positions:
        fail("pack has no positions")
    need(meta, K_SAE, dict, "")
    need(meta, K_PROVENANCE, dict, "")
    candidates = need(need(meta, K_ROUTING, dict, ""), K_CANDIDATES, list, "routing.")
    for c in candidates:
        if not (isinstance(c, dict) and isinstance(c.get("position"), str) and _finite_number(c.get(K_SCORE))
                and all(_finite_number(v) or isinstance(v, (str, bool)) for v in c.values())):
            fail(f"routing candidate {c!r:.80} needs a position, a finite score and plain values")
    domains = need(meta, K_DOMAINS, dict, "")
    source = need(meta, K_SOURCE_DOMAIN, str, "")
    if source not in domains:
        fail(f"source domain {source!r} has no entry in domains {sorted(domains)}")

    expected: dict[str, list[int]] = {}
    for pos, info in positions.items():
        where = f"positions[{pos!r}]."
        if not architecture.id_pattern.match(pos):
            fail(f"position {pos!r} is not a {arch} position id")
        pd = need(info, K_D_MODEL, int, where)
        if pd != d_model:
            fail(f"position {pos!r} has d_model {pd}, pack says {d_model}")
        d_sae = need(info, K_D_SAE, int, where)
        k = need(info, K_K, int, where)
        scale = need(info, K_SCALE, (int, float), where)
        if d_sae <= 0 or not 0 < k <= d_sae or not (math.isfinite(scale) and scale > 0):
            fail(f"position {pos!r} has invalid sizes (d_sae {d_sae}, k {k}, scale {scale})")
        metrics = info.get(K_METRICS, {})
        if not isinstance(metrics, dict) or not all(_finite_number(v) for v in metrics.values()):
            fail(f"position {pos!r} metrics must map names to finite numbers")
        ids = need(info, K_HARMFUL_IDS, list, where)
        if not ids or not all(type(i) is int and 0 <= i < d_sae for i in ids) or len(set(ids)) != len(ids):
            fail(f"position {pos!r} harmful_ids must be distinct ints in [0, {d_sae})")
        expected[encoder_key(pos, "W_enc")] = [d_sae, d_model]
        expected[encoder_key(pos, "b_enc")] = [d_sae]
        expected[encoder_key(pos, "b_pre")] = [d_model]

    for domain, entry in domains.items():
        where = f"domains[{domain!r}]."
        if not domain or "." in domain:
            fail(f"domain name {domain!r} must be non-empty and contain no '.'")
        role = need(entry, K_ROLE, str, where)
        if role != (ROLE_SOURCE if domain == source else ROLE_TARGET):
            fail(f"domain {domain!r} has role {role!r}; the source domain is {source!r}")
        if role == ROLE_TARGET and need(entry, K_ADAPTED_FROM, str, where) not in domains:
            fail(f"domain {domain!r} is adapted from an unknown domain")
        features = need(entry, K_FEATURES, dict, where)
        if set(features) != set(positions):
            fail(f"domain {domain!r} has features for {sorted(features)} but the pack routes {sorted(positions)}")
        for pos, f in features.items():
            fw = f"{where}features[{pos!r}]."
            n_harm, d_sae = len(positions[pos][K_HARMFUL_IDS]), positions[pos][K_D_SAE]
            weights = need(f, K_HARMFUL_WEIGHTS, list, fw)
            if len(weights) != n_harm or not all(_finite_number(w) and w >= 0 for w in weights):
                fail(f"{fw}harmful_weights needs {n_harm} finite non-negative numbers")
            a_ids, a_vals = need(f, K_ANCHOR_IDS, list, fw), need(f, K_ANCHOR_VALUES, list, fw)
            if (len(a_ids) != len(a_vals) or not all(type(i) is int and 0 <= i < d_sae for i in a_ids)
                    or not all(_finite_number(v) for v in a_vals)):
                fail(f"{fw}safe anchor ids/values must be equal-length lists of latent ids and finite numbers")
            tau = need(f, K_TAU, (int, float), fw)
            if not math.isfinite(tau):
                fail(f"{fw}tau must be finite")
            expected[decoder_key(domain, pos, "W_dec")] = [positions[pos][K_D_SAE], d_model]
            expected[decoder_key(domain, pos, "b_dec")] = [d_model]

    missing = sorted(set(expected) - set(tensors))
    if missing:
        fail(f"missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = sorted(set(tensors) - set(expected))
    if extra:
        fail(f"unexpected tensor {extra[0]!r} not described by the metadata")
    for name, shape in expected.items():
        if list(tensors[name][1]) != shape:
            fail(f"tensor {name!r} has shape {list(tensors[name][1])}, expected {shape}")


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_values(path: str, meta: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise PackError(f"tensor {name!r} contains NaN or inf", "re-train or re-export the pack", path=path)
