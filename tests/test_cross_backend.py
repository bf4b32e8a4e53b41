"""The same weights in diffusers' and ComfyUI's classes give the same activation at every position id
(the input projections and the pooled-text projection included), and the same steered output for the
same pack: one dictionary serves every backend."""

import pytest
import torch

from safedig_core import ActivationCapture, SteeringDictionary, SteeringHooks, SteeringParams, resolve
from safedig_core.pack import DictionaryPack
from safedig_core.synthetic import random_pack

from tiny_models import comfy_flux_from, comfy_sd3_from, diffusers_flux, diffusers_sd3, flux_inputs, sd3_inputs


def unpack_flux(tokens, batch, channels, h, w):
    """diffusers' packed output [B, (h/2)(w/2), C*4] back to ComfyUI's latent layout [B, C, h, w]."""
    return tokens.view(batch, h // 2, w // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, h, w)


@pytest.fixture(scope="module")
def flux_pair():
    d = diffusers_flux(seed=11)
    return d, comfy_flux_from(d)


@pytest.fixture(scope="module")
def sd3_pair():
    d = diffusers_sd3(seed=12)
    return d, comfy_sd3_from(d).model.diffusion_model


def call_pair(pair, comfy_kw, diff_kw, convert):
    d, c = pair
    with torch.no_grad():
        return convert(d(**diff_kw)[0]), c(**comfy_kw)


def test_flux_same_activation_at_every_position(flux_pair):
    d, c = flux_pair
    comfy_kw, diff_kw = flux_inputs(seed=3)
    assert resolve(d).ids == resolve(c).ids
    with ActivationCapture(d) as cap_d, ActivationCapture(c) as cap_c, torch.no_grad():
        d(**diff_kw)
        c(**comfy_kw)
    for pid in resolve(d).ids:
        a, b = cap_d.activations[pid][0], cap_c.activations[pid][0]
        assert a.shape == b.shape, pid
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=pid)


def test_sd3_same_activation_at_every_position(sd3_pair):
    d, c = sd3_pair
    comfy_kw, diff_kw = sd3_inputs(seed=4)
    with ActivationCapture(d) as cap_d, ActivationCapture(c) as cap_c, torch.no_grad():
        d(**diff_kw)
        c(**comfy_kw)
    assert len(cap_d.activations) == 6
    for pid in cap_d.activations:
        torch.testing.assert_close(cap_d.activations[pid][0], cap_c.activations[pid][0], rtol=1e-4, atol=1e-5,
                                   msg=pid)


@pytest.mark.parametrize("mode", ["blend", "repel", "both"])
def test_flux_same_steered_output(flux_pair, mode):
    meta, tensors = random_pack("flux", 64, ["double.0.txt.mlp", "double.1.img.attn", "single.1.out"], seed=5)
    dictionary = SteeringDictionary(DictionaryPack("flux-test.safetensors", meta, tensors), "target")
    comfy_kw, diff_kw = flux_inputs(seed=6)
    convert = lambda t: unpack_flux(t, 2, 4, 8, 8)  # noqa: E731
    base_d, _ = call_pair(flux_pair, comfy_kw, diff_kw, convert)
    params = SteeringParams(mode=mode, blend_strength=1.5, repel_strength=1.0)
    with SteeringHooks(flux_pair[0], dictionary, params), SteeringHooks(flux_pair[1], dictionary, params):
        out_d, out_c = call_pair(flux_pair, comfy_kw, diff_kw, convert)
    assert (out_d - base_d).abs().max() > 1e-2  # steering did something
    torch.testing.assert_close(out_d, out_c, rtol=1e-4, atol=1e-4)


def test_sd3_same_steered_output(sd3_pair):
    meta, tensors = random_pack("sd3", 128, ["joint.0.txt.attn", "joint.1.img.mlp"], seed=7)
    dictionary = SteeringDictionary(DictionaryPack("sd3-test.safetensors", meta, tensors), "source")
    comfy_kw, diff_kw = sd3_inputs(seed=8)
    base_d, _ = call_pair(sd3_pair, comfy_kw, diff_kw, lambda t: t)
    params = SteeringParams(mode="both")
    with SteeringHooks(sd3_pair[0], dictionary, params), SteeringHooks(sd3_pair[1], dictionary, params):
        out_d, out_c = call_pair(sd3_pair, comfy_kw, diff_kw, lambda t: t)
    assert (out_d - base_d).abs().max() > 1e-2
    torch.testing.assert_close(out_d, out_c, rtol=1e-4, atol=1e-4)


def _input_outputs(model, call):
    """Outputs of input.txt and of the pooled-text projection (input.vec) during one call. Copied when
    the hook runs: ComfyUI's blocks add to the text stream in place, so a kept reference would change."""
    positions = resolve(model)
    modules = {**positions.modules, **positions.pooled}
    got = {}

    def keep(pid):
        def hook(_module, _args, out):
            got[pid] = out.detach().clone()
        return hook

    handles = [modules[pid].register_forward_hook(keep(pid)) for pid in ("input.txt", "input.vec")]
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_same_input_projections_in_both_backends(flux_pair, sd3_pair, arch):
    (d, c), inputs = (flux_pair, flux_inputs(seed=9)) if arch == "flux" else (sd3_pair, sd3_inputs(seed=9))
    comfy_kw, diff_kw = inputs
    out_d = _input_outputs(d, lambda: d(**diff_kw))
    out_c = _input_outputs(c, lambda: c(**comfy_kw))
    assert out_d["input.txt"].shape == (2, diff_kw["encoder_hidden_states"].shape[1], resolve(d).d_model)
    assert out_d["input.vec"].shape == (2, resolve(d).d_model)  # pooled: no token axis
    for pid in ("input.txt", "input.vec"):
        assert out_d[pid].abs().max() > 0.1, pid  # a real activation, not zeros
        torch.testing.assert_close(out_d[pid], out_c[pid], rtol=1e-4, atol=1e-5, msg=pid)


def test_flux_same_steered_output_at_input_txt(flux_pair):
    """A pack routed to the text input projection steers both backends alike, like any block position."""
    meta, tensors = random_pack("flux", 64, ["input.txt", "single.0.out"], seed=13)
    dictionary = SteeringDictionary(DictionaryPack("flux-input.safetensors", meta, tensors), "target")
    comfy_kw, diff_kw = flux_inputs(seed=14)
    convert = lambda t: unpack_flux(t, 2, 4, 8, 8)  # noqa: E731
    base_d, _ = call_pair(flux_pair, comfy_kw, diff_kw, convert)
    only_input = SteeringDictionary(dictionary.pack, "target", positions=["input.txt"])
    params = SteeringParams(mode="both", blend_strength=1.5, repel_strength=1.0)
    for dic in (only_input, dictionary):
        with SteeringHooks(flux_pair[0], dic, params), SteeringHooks(flux_pair[1], dic, params):
            out_d, out_c = call_pair(flux_pair, comfy_kw, diff_kw, convert)
        assert (out_d - base_d).abs().max() > 1e-2, dic.positions  # steering did something
        torch.testing.assert_close(out_d, out_c, rtol=1e-4, atol=1e-4)
