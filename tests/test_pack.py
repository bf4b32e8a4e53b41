"""Pack format: round trip, and every loader error path with its message."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from safedig_core import PackError, load_pack, save_pack
from safedig_core.pack import METADATA_KEY, decoder_key, encoder_key
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
    with pytest.raises(PackError, match=r"tensor 'encoder\.double\.0\.img\.attn\.W_enc' has shape \[64, 15\], "
                                        r"expected \[64, 16\]"):
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
    with pytest.raises(PackError, match="harmful_weights needs 4 finite non-negative numbers"):
        load_pack(_write_raw(tmp_path / "w.safetensors", meta, tensors))


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
