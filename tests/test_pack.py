"""Pack format: round trip, and every loader error path with its message."""

import json
import math
import pickle
import re
import struct

import pytest
import torch
from safetensors.torch import save_file

from safedig_core import PackError, load_pack, save_pack
from safedig_core.pack import (
    MAX_HEADER_BYTES,
    METADATA_KEY,
    DomainEntry,
    DomainFeatures,
    PackSummary,
    PositionInfo,
    build_metadata,
    decoder_key,
    encoder_key,
    read_summary,
    validate_metadata,
)
from safedig_core.synthetic import random_pack

POSITIONS = ["double.0.img.attn", "single.1.out"]


@pytest.fixture
def pack_parts():
    return random_pack("flux", 16, POSITIONS, expansion=4, k=4, seed=3)


@pytest.fixture
def pack_file(tmp_path, pack_parts):
    return save_pack(tmp_path / "p.safetensors", *pack_parts)


def _write_raw(path, meta, tensors):
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    return path


def test_round_trip_is_exact(pack_file, pack_parts):
    meta, tensors = pack_parts
    pack = load_pack(pack_file)
    assert pack.architecture == "flux" and pack.d_model == 16
    assert pack.positions == POSITIONS
    assert pack.domains == ["source", "target"] and pack.source_domain == "source"
    assert set(pack.tensors) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(pack.tensors[name], t), name
    f = pack.domain_features("target", "single.1.out")
    assert f.harmful_weights == meta["domains"]["target"]["features"]["single.1.out"]["harmful_weights"]
    assert pack.position_info("double.0.img.attn").d_sae == 64


def test_half_precision_round_trip(tmp_path):
    meta, tensors = random_pack("sd3", 8, ["joint.0.img.mlp"], dtype=torch.bfloat16)
    pack = load_pack(save_pack(tmp_path / "bf16.safetensors", meta, tensors))
    assert all(t.dtype == torch.bfloat16 for t in pack.tensors.values())


def test_missing_file(tmp_path):
    with pytest.raises(PackError, match=r"nope\.safetensors: file not found\. Fix: check the path"):
        load_pack(tmp_path / "nope.safetensors")


def test_truncated_file(tmp_path, pack_file):
    data = pack_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(PackError, match=r"cut\.safetensors: tensor .* do not fit .* \(file truncated or corrupted\)"):
        load_pack(cut)
    cut.write_bytes(data[:5])
    with pytest.raises(PackError, match="file is truncated"):
        load_pack(cut)


def test_wrong_header(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 8)
    with pytest.raises(PackError, match="header is not valid JSON"):
        load_pack(bad)
    bad.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(PackError, match=r"header length 1099511627776 is impossible for a 10-byte file"):
        load_pack(bad)


def test_plain_safetensors_is_not_a_pack(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(PackError, match="not a SafeDIG pack"):
        load_pack(path)


def test_missing_tensor(tmp_path, pack_parts):
    meta, tensors = pack_parts
    del tensors[decoder_key("target", "single.1.out", "W_dec")]
    path = _write_raw(tmp_path / "m.safetensors", meta, tensors)
    with pytest.raises(PackError, match=r"missing tensor 'decoder\.target\.single\.1\.out\.W_dec'"):
        load_pack(path)


def test_unexpected_tensor(tmp_path, pack_parts):
    meta, tensors = pack_parts
    tensors["extra"] = torch.zeros(1)
    with pytest.raises(PackError, match="unexpected tensor 'extra'"):
        load_pack(_write_raw(tmp_path / "x.safetensors", meta, tensors))


def test_shape_mismatch(tmp_path, pack_parts):
    meta, tensors = pack_parts
    tensors[encoder_key("double.0.img.attn", "W_enc")] = torch.zeros(64, 15)
    with pytest.raises(PackError, match=r"tensor 'encoder\.double\.0\.img\.attn\.W_enc' has shape \[64, 15\] "
                                        r"but the metadata implies \[64, 16\]"):
        load_pack(_write_raw(tmp_path / "s.safetensors", meta, tensors))


def test_unknown_version(tmp_path, pack_parts):
    meta, tensors = pack_parts
    meta["format_version"] = 99
    with pytest.raises(PackError, match=r"unknown pack format version 99 .* Fix: update SafeDIG"):
        load_pack(_write_raw(tmp_path / "v.safetensors", meta, tensors))


def test_wrong_architecture(tmp_path, pack_parts):
    meta, tensors = pack_parts
    meta["architecture"] = "unet"
    with pytest.raises(PackError, match=r"unknown architecture 'unet'.*Fix: use one of \['flux', 'sd3'\]"):
        load_pack(_write_raw(tmp_path / "a.safetensors", meta, tensors))
    meta["architecture"] = "sd3"  # flux ids under an sd3 pack
    with pytest.raises(PackError, match=r"position 'double\.0\.img\.attn' is not a sd3 position id"):
        load_pack(_write_raw(tmp_path / "b.safetensors", meta, tensors))


def test_bad_metadata_values(tmp_path, pack_parts):
    meta, tensors = pack_parts
    meta["domains"]["source"]["features"]["single.1.out"]["harmful_weights"][0] = -1.0
    with pytest.raises(PackError, match=r"metadata field domains\['source'\]\.features\['single\.1\.out'\]\."
                                        r"harmful_weights\[0\] must be a finite number >= 0, got the number -1\.0"):
        load_pack(_write_raw(tmp_path / "w.safetensors", meta, tensors))
    meta["domains"]["source"]["features"]["single.1.out"]["harmful_weights"] = [1.0]
    with pytest.raises(PackError, match="harmful_weights needs 4 finite non-negative numbers"):
        load_pack(_write_raw(tmp_path / "w1.safetensors", meta, tensors))


def test_nan_tensor_rejected(tmp_path, pack_parts):
    meta, tensors = pack_parts
    tensors[encoder_key("single.1.out", "b_enc")][0] = float("nan")
    with pytest.raises(PackError, match=r"tensor 'encoder\.single\.1\.out\.b_enc' contains NaN or inf"):
        load_pack(_write_raw(tmp_path / "n.safetensors", meta, tensors))


def test_integer_dtype_rejected(tmp_path, pack_parts):
    meta, tensors = pack_parts
    tensors[encoder_key("single.1.out", "b_enc")] = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(PackError, match="has dtype 'I32'; packs store F32, F16 or BF16"):
        load_pack(_write_raw(tmp_path / "i.safetensors", meta, tensors))


def test_save_refuses_invalid_pack_and_leaves_nothing(tmp_path, pack_parts):
    meta, tensors = pack_parts
    del tensors[encoder_key("single.1.out", "b_pre")]
    target = tmp_path / "never.safetensors"
    with pytest.raises(PackError, match="missing tensor"):
        save_pack(target, meta, tensors)
    assert list(tmp_path.iterdir()) == []


def test_unknown_domain(pack_file):
    with pytest.raises(PackError, match=r"pack has no domain 'cars'.*Fix: choose one of \['source', 'target'\]"):
        load_pack(pack_file).require_domain("cars")


# ------------------------------------------------------------------------- builder, summary, schema


def test_build_metadata_lays_out_the_documented_fields():
    feats = DomainFeatures([0.5], [3], [1.0], 0.25, extra={"detection_auroc": 0.9})
    meta = build_metadata(
        architecture="flux", d_model=4, positions={"single.0.out": PositionInfo(4, 8, 2, 1.5, [1], {"fve": 0.9})},
        source_domain="a", domains={"a": DomainEntry({"single.0.out": feats}, extra={"calibration": {"n": 3}}),
                                    "b": DomainEntry({"single.0.out": feats}, adapted_from="a")},
        sae={"type": "topk"}, routing={"candidates": []}, provenance={"model": "m"})
    assert meta["format_version"] == 1 and meta["source_domain"] == "a"
    assert meta["positions"]["single.0.out"] == {"d_model": 4, "d_sae": 8, "k": 2, "scale": 1.5, "harmful_ids": [1],
                                                 "metrics": {"fve": 0.9}}
    assert meta["domains"]["a"] == {"role": "source", "calibration": {"n": 3}, "features": {"single.0.out": {
        "harmful_weights": [0.5], "safe_anchor_ids": [3], "safe_anchor_values": [1.0], "tau": 0.25,
        "detection_auroc": 0.9}}}
    assert meta["domains"]["b"]["role"] == "target" and meta["domains"]["b"]["adapted_from"] == "a"
    validate_metadata("built.safetensors", meta)
    with pytest.raises(ValueError, match=r"extra metadata keys \['tau'\] would overwrite"):
        build_metadata(architecture="flux", d_model=4, positions={}, source_domain="a",
                       domains={"a": DomainEntry({"p": DomainFeatures([], [], [], 0.0, extra={"tau": 1})})},
                       sae={}, routing={}, provenance={})


def test_read_summary_reads_the_header_only(tmp_path, pack_parts):
    meta, tensors = pack_parts
    path = save_pack(tmp_path / "p.safetensors", meta, tensors)
    assert read_summary(path) == PackSummary(str(path), "flux", 16, tuple(POSITIONS), "source", ("source", "target"))
    # Tensor values are not read: a NaN in the data passes the summary and is refused by load_pack.
    tensors[encoder_key("single.1.out", "b_enc")][0] = float("nan")
    nan_path = _write_raw(tmp_path / "nan.safetensors", meta, tensors)
    assert read_summary(nan_path).domains == ("source", "target")
    with pytest.raises(PackError, match="contains NaN or inf"):
        load_pack(nan_path)


def test_summary_refuses_shapes_that_fit_their_bytes_but_not_the_metadata(tmp_path, pack_parts):
    meta, tensors = pack_parts
    tensors[encoder_key("single.1.out", "W_enc")] = torch.zeros(32, 16)  # d_sae 64 in the metadata
    path = _write_raw(tmp_path / "narrow.safetensors", meta, tensors)
    with pytest.raises(PackError, match=r"narrow\.safetensors: tensor 'encoder\.single\.1\.out\.W_enc' has shape "
                                        r"\[32, 16\] but the metadata implies \[64, 16\].*Fix: re-export"):
        read_summary(path)


@pytest.mark.parametrize("meta,expected", [
    (None, "metadata must be a JSON object, got null"),
    ([1, 2], "metadata must be a JSON object, got a list"),
    ("pack", "metadata must be a JSON object, got the string 'pack'"),
    ({"domains": 5}, "metadata has no 'format_version' field"),
])
def test_metadata_of_the_wrong_json_type_is_refused_by_name(tmp_path, pack_parts, meta, expected):
    _, tensors = pack_parts
    path = _write_raw(tmp_path / "typed.safetensors", meta, tensors)
    with pytest.raises(PackError, match=r"typed\.safetensors: " + re.escape(expected)
                       + r".*Fix: re-export the pack .*docs/pack-format\.md"):
        read_summary(path)


def test_domains_of_the_wrong_type_name_the_field(pack_parts):
    meta, _ = pack_parts
    meta["domains"] = 5
    with pytest.raises(PackError, match="metadata field domains must be a JSON object, got the number 5"):
        validate_metadata("x.safetensors", meta)


def _json_paths(obj, prefix=()):
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield from _json_paths(value, (*prefix, key))


def _replaced(meta, path, value):
    copy = json.loads(json.dumps(meta))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return copy


WRONG_TYPES = [None, True, 7, 2.5, 10**400, "text", [], {}, [None], {"x": None}]


def test_every_field_with_every_wrong_json_type_gives_a_pack_error_naming_it(pack_parts):
    """Each metadata node replaced by each JSON type: valid, or a PackError that names the field (the
    schema's path) and the fix; never AttributeError / TypeError / OverflowError."""
    meta, _ = pack_parts
    refused = 0
    for path in (p for p in _json_paths(meta) if p):
        field = next(k for k in reversed(path) if isinstance(k, str))
        for value in WRONG_TYPES:
            try:
                validate_metadata("w.safetensors", _replaced(meta, path, value))
            except PackError as exc:
                refused += 1
                assert "Fix:" in str(exc) and "w.safetensors" in str(exc)
                if exc.problem.startswith("metadata field"):
                    assert field in exc.problem, (path, value, exc.problem)
    assert refused > 500


def test_numbers_beyond_float_range_and_out_of_range_sizes_are_refused(pack_parts):
    meta, _ = pack_parts
    for path, value, expected in [
        (("domains", "source", "features", "single.1.out", "tau"), 10**400,
         r"features\['single\.1\.out'\]\.tau must be a finite number, got the number 1000"),
        (("positions", "single.1.out", "d_sae"), 0, r"positions\['single\.1\.out'\]\.d_sae must be a whole number"),
        (("d_model", ), -16, "metadata field d_model must be a whole number in"),
        (("positions", "single.1.out", "scale"), math.inf, "scale must be a finite number > 0"),
        (("routing", "candidates", 0, "score"), None, r"routing\.candidates\[0\]\.score must be a finite number"),
    ]:
        with pytest.raises(PackError, match=expected):
            validate_metadata("r.safetensors", _replaced(meta, path, value))


def test_header_over_the_cap_names_the_cap(tmp_path):
    big = tmp_path / "big.safetensors"
    n = 20 * 2**20
    big.write_bytes(struct.pack("<Q", n) + b"{" + b" " * (n - 2) + b"}" + b"\0" * 2)
    with pytest.raises(PackError, match=rf"header is {n} bytes, over the header-size cap of {MAX_HEADER_BYTES} "
                                        r"bytes \(16 MiB\)"):
        read_summary(big)


def test_pickles_renamed_to_safetensors_are_named_and_never_loaded(tmp_path):
    zipped = tmp_path / "torch_save.safetensors"
    torch.save({"w": torch.zeros(2)}, zipped)
    with pytest.raises(PackError, match=r"is a zip archive .*torch.save.*, not a safetensors file; SafeDIG never "
                                        "loads pickles"):
        load_pack(zipped)
    legacy = tmp_path / "legacy.safetensors"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(pickle.dumps({"w": [1, 2]}, protocol=4))
    for path in (legacy, plain):
        with pytest.raises(PackError, match=r"is a Python pickle .*, not a safetensors file; SafeDIG never loads"):
            read_summary(path)


def test_learned_blend_maps_round_trip_and_need_format_version_2(tmp_path):
    from safedig_core.pack import blend_map_key

    meta, tensors = random_pack("flux", 16, POSITIONS, expansion=4, k=4, seed=3, blend_maps=True)
    assert meta["format_version"] == 2
    pack = load_pack(save_pack(tmp_path / "m.safetensors", meta, tensors))
    key = blend_map_key("target", "single.1.out")
    assert torch.equal(pack.blend_map("target", "single.1.out"), tensors[key])
    assert pack.domain_features("target", "single.1.out").blend_target == "map"
    plain = pack.without_blend_maps()
    assert plain.blend_map("target", "single.1.out") is None and not any(k.startswith("blend.") for k in plain.tensors)
    assert pack.blend_map("target", "single.1.out") is not None  # the copy left the pack as it was
    old = json.loads(json.dumps(meta))
    old["format_version"] = 1
    with pytest.raises(PackError, match=r"blend_target 'map' needs pack format version 2"):
        load_pack(_write_raw(tmp_path / "v1.safetensors", old, tensors))
    wrong = dict(tensors)
    wrong[key] = torch.zeros(3, 64)
    with pytest.raises(PackError, match=r"tensor 'blend\.target\.single\.1\.out\.map' has shape \[3, 64\] but the "
                                        r"metadata implies \[4, 64\]"):
        load_pack(_write_raw(tmp_path / "shape.safetensors", meta, wrong))
    missing = {k: v for k, v in tensors.items() if k != key}
    with pytest.raises(PackError, match=r"missing tensor 'blend\.target\.single\.1\.out\.map'"):
        load_pack(_write_raw(tmp_path / "missing.safetensors", meta, missing))
    bad = json.loads(json.dumps(meta))
    bad["domains"]["target"]["features"]["single.1.out"]["blend_target"] = "nearest"
    with pytest.raises(PackError, match=r"blend_target must be 'anchor', 'map' or 'affine'"):
        load_pack(_write_raw(tmp_path / "kind.safetensors", bad, tensors))


def test_affine_blend_targets_round_trip_and_need_format_version_4(tmp_path):
    from safedig_core.pack import blend_affine_key

    meta, tensors = random_pack("flux", 16, POSITIONS, expansion=4, k=4, seed=3, blend_maps="affine")
    assert meta["format_version"] == 4
    pack = load_pack(save_pack(tmp_path / "a.safetensors", meta, tensors))
    key = blend_affine_key("target", "single.1.out")
    assert torch.equal(pack.blend_affine("target", "single.1.out"), tensors[key])
    assert pack.blend_map("target", "single.1.out") is None  # one learned target per domain and position
    assert pack.domain_features("target", "single.1.out").blend_target == "affine"
    assert not any(k.startswith("blend.") for k in pack.without_blend_maps().tensors)
    old = json.loads(json.dumps(meta))
    old["format_version"] = 3
    with pytest.raises(PackError, match=r"blend_target 'affine' needs pack format version 4, the pack says 3"):
        load_pack(_write_raw(tmp_path / "v3.safetensors", old, tensors))
    wrong = dict(tensors)
    wrong[key] = torch.zeros(16, 16)  # the bias row missing
    with pytest.raises(PackError, match=r"tensor 'blend\.target\.single\.1\.out\.affine' has shape \[16, 16\] but "
                                        r"the metadata implies \[17, 16\]"):
        load_pack(_write_raw(tmp_path / "shape.safetensors", meta, wrong))
    nan = dict(tensors)
    nan[key] = tensors[key].clone()
    nan[key][0, 0] = float("nan")
    with pytest.raises(PackError, match=r"tensor 'blend\.target\.single\.1\.out\.affine' contains NaN"):
        load_pack(_write_raw(tmp_path / "nan.safetensors", meta, nan))


def test_packs_without_maps_stay_format_version_1(pack_parts):
    assert pack_parts[0]["format_version"] == 1
