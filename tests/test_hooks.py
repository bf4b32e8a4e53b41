"""Hook lifecycle: steering only inside the context, nothing left behind, bitwise identity when off."""

import pytest
import torch

from safedig_core import (
    ActivationCapture,
    PackError,
    SafeDIGError,
    SteeringDictionary,
    SteeringHooks,
    SteeringParams,
    safedig_hooks,
)
from safedig_core.pack import DictionaryPack

from tiny_models import diffusers_flux, diffusers_sd3, flux_inputs

STEERED = ["double.0.txt.mlp", "double.1.img.attn", "single.1.out"]


def flux_dictionary(tau=0.0, positions=STEERED, seed=0):
    from safedig_core.synthetic import random_pack

    meta, tensors = random_pack("flux", 64, positions, expansion=4, k=8, tau=tau, seed=seed)
    return SteeringDictionary(DictionaryPack(f"synthetic-{seed}.safetensors", meta, tensors), "target")


@pytest.fixture(scope="module")
def model():
    return diffusers_flux()


@pytest.fixture(scope="module")
def inputs():
    return flux_inputs()[1]


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def test_steering_changes_output_only_inside_the_context(model, inputs):
    base = run(model, inputs)
    d = flux_dictionary()
    with SteeringHooks(model, d, SteeringParams(mode="both")) as hooks:
        assert hooks.installed == 3 and len(safedig_hooks(model)) == 3
        steered = run(model, inputs)
    assert not torch.allclose(steered, base)
    assert safedig_hooks(model) == []
    assert torch.equal(run(model, inputs), base)


@pytest.mark.parametrize("params,active", [
    (SteeringParams(mode="off"), True),
    (SteeringParams(mode="blend", blend_strength=0.0), True),
    (SteeringParams(mode="both", blend_strength=0.0, repel_strength=0.0), True),
    (SteeringParams(mode="both"), False),
])
def test_identity_settings_install_nothing_and_are_bitwise_identical(model, inputs, params, active):
    base = run(model, inputs)
    with SteeringHooks(model, flux_dictionary(), params, active=active) as hooks:
        assert hooks.installed == 0
        assert torch.equal(run(model, inputs), base)


def test_closed_gate_everywhere_is_bitwise_identical(model, inputs):
    base = run(model, inputs)
    with SteeringHooks(model, flux_dictionary(tau=1e6), SteeringParams(mode="both")) as hooks:
        assert hooks.installed == 3
        assert torch.equal(run(model, inputs), base)


@pytest.mark.parametrize("exc", [RuntimeError("sampler crashed"), KeyboardInterrupt()])
def test_hooks_removed_on_exception_and_interrupt(model, inputs, exc):
    with pytest.raises(type(exc)), SteeringHooks(model, flux_dictionary(), SteeringParams()):
        assert len(safedig_hooks(model)) == 3
        raise exc
    assert safedig_hooks(model) == []


def test_duplicate_install_refused_but_chained_dictionaries_allowed(model, inputs):
    d = flux_dictionary()
    owner = object()
    with SteeringHooks(model, d, SteeringParams(), owner=owner):
        with pytest.raises(SafeDIGError, match=r"already installed at double\.0\.txt\.mlp"):
            with SteeringHooks(model, d, SteeringParams(), owner=owner):
                pass
        assert len(safedig_hooks(model)) == 3  # the refused install left nothing half-done
        with SteeringHooks(model, flux_dictionary(seed=1), SteeringParams()):  # a second Steer node
            assert len(safedig_hooks(model)) == 6
    assert safedig_hooks(model) == []
    session = SteeringHooks(model, d, SteeringParams())
    with session, pytest.raises(SafeDIGError, match="already active"):
        session.__enter__()


def test_row_mask_steers_only_selected_rows(model, inputs):
    base = run(model, inputs)
    rows = torch.tensor([False, True])
    with SteeringHooks(model, flux_dictionary(), SteeringParams(mode="repel"), row_mask=rows):
        out = run(model, inputs)
    assert torch.equal(out[0], base[0]) and not torch.allclose(out[1], base[1])


def test_position_subset(model, inputs):
    d = SteeringDictionary(flux_dictionary().pack, "target", positions=["single.1.out"])
    with SteeringHooks(model, d, SteeringParams()) as hooks:
        assert hooks.installed == 1
    with pytest.raises(PackError, match=r"positions \['joint.0.img.mlp'\] are not routed in this pack"):
        SteeringDictionary(d.pack, "target", positions=["joint.0.img.mlp"])


def test_pack_for_other_architecture_is_refused_with_a_clear_message():
    sd3 = diffusers_sd3()
    with pytest.raises(PackError, match=r"pack is for flux \(d_model 64\) but the model is sd3 \(d_model 128\)"):
        with SteeringHooks(sd3, flux_dictionary(), SteeringParams()):
            pass
    assert safedig_hooks(sd3) == []


def test_pack_positions_missing_from_a_shallower_model():
    from safedig_core.synthetic import random_pack

    meta, tensors = random_pack("flux", 64, ["single.7.out"])
    d = SteeringDictionary(DictionaryPack("deep.safetensors", meta, tensors))
    with pytest.raises(PackError, match=r"positions \['single.7.out'\] do not exist in the model"):
        with SteeringHooks(diffusers_flux(), d, SteeringParams()):
            pass


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weights_follow_model_dtype_and_are_cached(dtype):
    model = diffusers_flux(dtype=dtype)
    inputs = flux_inputs(dtype=dtype)[1]
    d = flux_dictionary()
    with SteeringHooks(model, d, SteeringParams(mode="both")):
        out = run(model, inputs)
        cached = dict(d._cache)
        run(model, inputs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert {k[3] for k in cached} == {dtype} and len(cached) == 3  # (domain, position, device, dtype)
    assert all(d._cache[k] is v for k, v in cached.items())  # not rebuilt on the second call


def test_activation_capture_records_and_cleans_up(model, inputs):
    with ActivationCapture(model, ["double.0.img.attn", "single.0.out"]) as cap:
        out = run(model, inputs)
    assert cap.activations["double.0.img.attn"][0].shape == (2, 16, 64)  # 16 image tokens
    assert cap.activations["single.0.out"][0].shape == (2, 6 + 16, 64)  # text first, then image
    assert torch.equal(out, run(model, inputs))
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(SafeDIGError, match="do not exist"):
        ActivationCapture(model, ["single.9.out"])


def test_hooks_act_only_on_the_installing_threads_calls(model, inputs):
    """ComfyUI's multi-GPU cond batcher calls the model from several threads: a call from another thread while
    one thread's hooks are installed is not steered by them, and is not counted as theirs."""
    import threading

    base = run(model, inputs)
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def steering_thread():
        with SteeringHooks(model, flux_dictionary(), SteeringParams(mode="both")) as hooks:
            entered.set()
            release.wait(30)
            seen["not_run_before_own_call"] = hooks.not_run
            seen["steered"] = run(model, inputs)
            seen["not_run"] = hooks.not_run

    worker = threading.Thread(target=steering_thread)
    worker.start()
    assert entered.wait(30)
    other = run(model, inputs)  # this thread, while the worker's hooks are installed
    release.set()
    worker.join(30)
    assert torch.equal(other, base)
    assert seen["not_run_before_own_call"] == STEERED  # the other thread's call did not count
    assert seen["not_run"] == [] and not torch.allclose(seen["steered"], base)
    assert safedig_hooks(model) == []


def test_not_run_lists_positions_whose_module_was_bypassed(model, inputs):
    block = model.single_transformer_blocks[1]
    block.forward = lambda hidden_states, *args, **kwargs: hidden_states
    try:
        with SteeringHooks(model, flux_dictionary(), SteeringParams(mode="both")) as hooks:
            run(model, inputs)
        assert hooks.not_run == ["single.1.out"]
    finally:
        del block.forward
