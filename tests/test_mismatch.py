"""Mismatch matrix: {FLUX pack, SD3 pack} x {Flux, MMDiT, other width, unsupported model}, each with its
documented error; and lifecycle faults that must leave the shared model bitwise unchanged."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from safedig_core import ArchitectureError, PackError, SteeringDictionary, SteeringHooks, SteeringParams, safedig_hooks
from safedig_core.pack import METADATA_KEY, DictionaryPack, read_summary
from safedig_core.synthetic import random_pack

from tiny_models import comfy_flux_from, comfy_sd3_from, diffusers_flux, diffusers_sd3, flux_inputs

PACKS = {
    "flux": ("flux", 64, ["double.0.img.attn", "single.1.out"]),
    "sd3": ("sd3", 128, ["joint.0.txt.mlp", "joint.1.img.attn"]),
}


def make_dictionary(kind):
    arch, width, positions = PACKS[kind]
    return SteeringDictionary(DictionaryPack(f"{kind}.safetensors", *random_pack(arch, width, positions)))


def models():
    flux = diffusers_flux()
    return {
        "flux": flux,
        "comfy_flux": comfy_flux_from(flux),
        "sd3": diffusers_sd3(),
        "comfy_sd3": comfy_sd3_from(diffusers_sd3()),
        "flux_wide": _wide_flux(),
        "unsupported": nn.Sequential(nn.Linear(4, 4)),
    }


def _wide_flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                  attention_head_dim=24, num_attention_heads=4, joint_attention_dim=32,
                                  pooled_projection_dim=24, axes_dims_rope=(8, 8, 8))


EXPECTED = {
    ("flux", "flux"): None,
    ("flux", "comfy_flux"): None,
    ("flux", "sd3"): r"pack is for flux \(d_model 64\) but the model is sd3 \(d_model 128\)",
    ("flux", "comfy_sd3"): r"pack is for flux \(d_model 64\) but the model is sd3 \(d_model 128\)",
    ("flux", "flux_wide"): r"pack is for flux \(d_model 64\) but the model is flux \(d_model 96\)",
    ("flux", "unsupported"): r"unsupported model: found torch\.nn\.modules\.container\.Sequential",
    ("sd3", "flux"): r"pack is for sd3 \(d_model 128\) but the model is flux \(d_model 64\)",
    ("sd3", "comfy_flux"): r"pack is for sd3 \(d_model 128\) but the model is flux \(d_model 64\)",
    ("sd3", "sd3"): None,
    ("sd3", "comfy_sd3"): None,
    ("sd3", "flux_wide"): r"pack is for sd3 \(d_model 128\) but the model is flux \(d_model 96\)",
    ("sd3", "unsupported"): r"unsupported model: found torch\.nn\.modules\.container\.Sequential",
}


@pytest.fixture(scope="module")
def all_models():
    return models()


@pytest.mark.parametrize("pack_kind,model_kind", sorted(EXPECTED))
def test_mismatch_matrix(all_models, pack_kind, model_kind):
    model = all_models[model_kind]
    expected = EXPECTED[(pack_kind, model_kind)]
    dictionary = make_dictionary(pack_kind)
    if expected is None:
        with SteeringHooks(model, dictionary, SteeringParams()) as hooks:
            assert hooks.installed == 2
    else:
        error = ArchitectureError if model_kind == "unsupported" else PackError
        with pytest.raises(error, match=expected) as info:
            with SteeringHooks(model, dictionary, SteeringParams()):
                pass
        assert "Fix:" in str(info.value)
    target = model if isinstance(model, nn.Module) else model.model
    assert safedig_hooks(target) == []


@pytest.mark.parametrize("field,value,tensor,implied", [
    ("d_model", 32, "encoder.double.0.img.attn.W_enc", [256, 32]),  # metadata twice as wide as the tensors
    ("d_sae", 512, "encoder.double.0.img.attn.W_enc", [512, 64]),  # more latents in the metadata
])
def test_tensors_that_fit_their_bytes_but_not_the_metadata_fail_the_header_pass(tmp_path, field, value, tensor,
                                                                                implied):
    """The header pass (what Load Dictionary's validation runs, before a prompt is accepted) compares every
    tensor's shape with the one the metadata implies; no tensor data is needed for that."""
    meta, tensors = random_pack(*PACKS["flux"])
    if field == "d_model":
        meta["d_model"] = value
        for info in meta["positions"].values():
            info["d_model"] = value
    else:
        for info in meta["positions"].values():
            info["d_sae"] = value
    path = tmp_path / "mismatched.safetensors"
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(PackError, match=rf"mismatched\.safetensors: tensor '{tensor}' has shape \[\d+, \d+\] but "
                                        rf"the metadata implies \[{implied[0]}, {implied[1]}\]"):
        read_summary(path)


def state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def test_model_moved_between_dtypes_between_runs_and_left_unchanged():
    model = diffusers_flux()
    twin = diffusers_flux()  # the same weights, never steered, moved through the same dtypes
    inputs32 = flux_inputs()[1]
    d = make_dictionary("flux")
    with SteeringHooks(model, d, SteeringParams(mode="both")), torch.no_grad():
        model(**inputs32)
    model.to(torch.bfloat16)
    twin.to(torch.bfloat16)
    with SteeringHooks(model, d, SteeringParams(mode="both")), torch.no_grad():
        out16 = model(**flux_inputs(dtype=torch.bfloat16)[1])[0]
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()
    assert {key[3] for key in d._cache} == {torch.float32, torch.bfloat16}
    model.to(torch.float32)
    twin.to(torch.float32)
    with torch.no_grad():
        assert torch.equal(model(**inputs32)[0], twin(**inputs32)[0])
    assert state_hash(model) == state_hash(twin) and safedig_hooks(model) == []


def test_exception_inside_sampling_leaves_model_bitwise_unchanged():
    model = diffusers_flux()
    before = state_hash(model)
    inputs = flux_inputs()[1]
    with torch.no_grad():
        base = model(**inputs)[0]

    def explode(*_):
        raise RuntimeError("boom in the middle of a forward")

    handle = model.single_transformer_blocks[1].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with SteeringHooks(model, make_dictionary("flux"), SteeringParams(mode="both")), torch.no_grad():
                model(**inputs)
    finally:
        handle.remove()
    assert safedig_hooks(model) == []
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], base)
    assert state_hash(model) == before


def test_pack_reloaded_while_in_use():
    model = diffusers_flux()
    inputs = flux_inputs()[1]
    old = make_dictionary("flux")
    with SteeringHooks(model, old, SteeringParams(mode="repel")), torch.no_grad():
        first = model(**inputs)[0]
        fresh = make_dictionary("flux")  # same file loaded again mid-run: an independent object
        with SteeringHooks(model, fresh, SteeringParams(mode="off")):
            again = model(**inputs)[0]
    assert torch.equal(first, again)
    assert safedig_hooks(model) == []
