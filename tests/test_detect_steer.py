"""Packs whose positions split the work: one position's gate detects, another position's Blend steers
(pack format 3, `use`), the sampling run that re-runs the call in which an image latches, the run sampled
again when an image latched after its first step, and `combine`."""

import json
from pathlib import Path

import pytest
import torch

from safedig_core import PackError, SafeDIGError, SteeringDictionary, SteeringHooks, SteeringParams
from safedig_core.cli import main as cli_main
from safedig_core.combine import combine_packs
from safedig_core.pack import (
    K_FORMAT_VERSION,
    K_POSITIONS,
    K_USE,
    USE_BOTH,
    USE_DETECT,
    USE_STEER,
    DictionaryPack,
    PositionInfo,
    load_pack,
    save_pack,
)
from safedig_core.sampling import SamplingSteering
from safedig_core.steering_math import steer
from safedig_core.synthetic import random_pack

from tiny_models import diffusers_flux, flux_inputs

DETECT, STEER_AT = "single.1.out", "input.txt"
IMAGE = SteeringParams(mode="blend", blend_strength=1.0, scope="image")


def with_uses(meta: dict, uses: dict[str, str]) -> dict:
    meta = json.loads(json.dumps(meta))
    for p, use in uses.items():
        meta[K_POSITIONS][p][K_USE] = use
    meta[K_FORMAT_VERSION] = 3
    return meta


def split_pack(tmp_path, tau=0.0, uses=None, name="split") -> DictionaryPack:
    meta, tensors = random_pack("flux", 64, [STEER_AT, DETECT], tau=tau, blend_maps=True, harmful_bias=3.0)
    meta = with_uses(meta, uses or {STEER_AT: USE_STEER, DETECT: USE_DETECT})
    return load_pack(save_pack(tmp_path / f"{name}.safetensors", meta, tensors))


def test_uses_round_trip_and_need_format_3(tmp_path):
    pack = split_pack(tmp_path)
    assert pack.metadata[K_FORMAT_VERSION] == 3
    assert pack.position_info(DETECT).use == USE_DETECT and not pack.position_info(DETECT).edits
    assert pack.position_info(STEER_AT).use == USE_STEER and not pack.position_info(STEER_AT).detects
    assert pack.positions_that(USE_DETECT) == [DETECT] and pack.positions_that(USE_STEER) == [STEER_AT]
    meta, tensors = random_pack("flux", 64, [STEER_AT, DETECT], blend_maps=True)
    bad = with_uses(meta, {DETECT: USE_DETECT})
    bad[K_FORMAT_VERSION] = 2
    with pytest.raises(PackError, match="needs pack format version 3"):
        save_pack(tmp_path / "old.safetensors", bad, tensors)
    with pytest.raises(PackError, match="only detects"):
        save_pack(tmp_path / "d.safetensors", with_uses(meta, {DETECT: USE_DETECT, STEER_AT: USE_DETECT}), tensors)
    with pytest.raises(PackError, match="only steers"):
        save_pack(tmp_path / "s.safetensors", with_uses(meta, {DETECT: USE_STEER, STEER_AT: USE_STEER}), tensors)
    plain = random_pack("flux", 64, [DETECT])[0]
    assert plain[K_FORMAT_VERSION] == 1 and K_USE not in plain[K_POSITIONS][DETECT]  # older SafeDIG reads it


def test_detect_position_latches_without_editing_and_steer_position_edits_only_latched_rows(tmp_path):
    pack = split_pack(tmp_path)
    d = SteeringDictionary(pack, "target")
    x = torch.randn(2, 5, 64)
    detect_w = d.weights(DETECT, x.device, x.dtype)
    latch = torch.zeros(2, dtype=torch.bool)
    assert steer(x, detect_w, IMAGE, latch=latch) is x  # detects only: the activation is returned as it is
    assert latch.all()  # tau 0: both rows latched
    steer_w = d.weights(STEER_AT, x.device, x.dtype)
    closed = torch.zeros(2, dtype=torch.bool)
    assert steer(x, steer_w, IMAGE, latch=closed) is x and not closed.any()  # its own gate never opens
    out = steer(x, steer_w, IMAGE, latch=torch.tensor([True, False]))
    assert not torch.equal(out[0], x[0]) and torch.equal(out[1], x[1])


def test_position_choices_that_cannot_steer_are_refused(tmp_path):
    pack = split_pack(tmp_path)
    with pytest.raises(PackError, match="only steer images another position detects"):
        SteeringDictionary(pack, "target", [STEER_AT])
    with pytest.raises(PackError, match="only detect"):
        SteeringDictionary(pack, "target", [DETECT])
    d = SteeringDictionary(pack, "target")
    model = diffusers_flux()
    with pytest.raises(SafeDIGError, match="image-scope gate"), SteeringHooks(model, d, SteeringParams(mode="blend")):
        pass


def test_the_call_in_which_an_image_latches_is_run_again(tmp_path):
    """input.txt runs before single.1.out: without the second pass the image latched at single.1.out would
    keep this call's unsteered text projection. Row 0 is the cond chunk (steered), row 1 the uncond chunk."""
    model = diffusers_flux()
    inputs = flux_inputs()[1]
    d = SteeringDictionary(split_pack(tmp_path), "target")
    run = lambda: model(**inputs)[0]  # noqa: E731
    with torch.no_grad():
        plain = run()
        cond = torch.tensor([True, False])
        with SteeringHooks(model, d, IMAGE, row_mask=cond, latch=torch.tensor([True, False])):
            latched_from_start = run()
        with SteeringHooks(model, d, IMAGE, row_mask=cond, latch=torch.zeros(2, dtype=torch.bool)):
            one_pass = run()
        steering = SamplingSteering(d, IMAGE, "test")
        steering.begin_run([1.0, 0.5, 0.0], n_images=1)
        out = steering.steer_call(model, inputs["hidden_states"], 1.0, [1.0, 0.5, 0.0], [0, 1], run)
    assert not torch.equal(one_pass[0], latched_from_start[0])  # the first pass alone misses input.txt
    assert torch.equal(out[0], latched_from_start[0])
    assert torch.equal(out[1], plain[1])  # a row that did not latch keeps the first pass, bit for bit
    assert steering.latched.tolist() == [True]
    recorded = [e.position for e in steering.recorder.entries]
    assert sorted(recorded) == sorted([STEER_AT, DETECT])  # the kept pass is recorded, once per position


SHIPPED_PACK = Path(__file__).resolve().parents[1] / "dictionaries" / "bundled_hazard_to_toxic.safetensors"


def test_the_images_that_latched_late_are_sampled_again_on_their_own_latched_from_the_start():
    """The shipped pack on the bundled model: single.0.out's gate opens on some held-out target prompts only
    after the first step. `sample_run` samples just those images again (a batch of their own prompts and
    noise) latched from the start, and keeps every other image's first-run output bit for bit."""
    from safedig_core import ALL_DOMAINS
    from safedig_core.bundled import world
    from safedig_core.bundled.generator import initial_noise, load_bundled, sample, sample_steered
    from safedig_core.bundled.text_encoder import encode_prompts

    model = load_bundled()
    d = SteeringDictionary(load_pack(SHIPPED_PACK), ALL_DOMAINS)
    prompts = world.eval_prompts(4, "heldout", seed=0, concepts=["venom", "blight"])
    tokens, pooled = encode_prompts([p.text for p in prompts])
    noise, uncond, steps = initial_noise(range(len(prompts)), model.bundled_config), encode_prompts([""]), 10
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()

    def latched_from_start(rows):  # one run of the images `rows` alone, their latch open from the first step
        reference = SamplingSteering(d, IMAGE, "from the start")
        reference.begin_run(sigmas, n_images=int(rows.sum()), latched=torch.ones(int(rows.sum()), dtype=torch.bool))
        return sample(model, tokens[rows], pooled[rows], noise[rows], steps, 3.0, uncond,
                      wrap=lambda run, x, t, ts: reference.steer_call(model, x, t, ts, [0, 1], run))

    single = SamplingSteering(d, IMAGE, "once", restart_late_latches=False)
    restarted = SamplingSteering(d, IMAGE, "restart")
    with torch.no_grad():
        once = sample_steered(model, single, tokens, pooled, noise, steps, 3.0, uncond)
        late = single.late
        assert late is not None and late.any(), "no held-out target prompt latched after the first step"
        assert (single.latched & ~late).any()  # some latched at the first step: those are not sampled again
        out = sample_steered(model, restarted, tokens, pooled, noise, steps, 3.0, uncond)
        from_start = latched_from_start(late)
    assert torch.equal(out[late], from_start)
    assert not torch.allclose(out[late], once[late], atol=1e-2)  # the late images changed: steered from step 1
    assert torch.equal(out[~late], once[~late])  # the others: the first run's output, bit for bit
    assert restarted.latched.tolist() == single.latched.tolist() and torch.equal(restarted.restarted, late)
    assert torch.equal(restarted.late, late) and single.restarted is None
    # the Report: one generation, the first run's record of the others and the second run's of the late ones
    rec = restarted.recorder
    assert rec.generation == single.recorder.generation and rec.n_images == len(prompts)
    def first_step_gate(recorder, image):  # the highest gate weight recorded for `image` at the first step
        return max(float(e.gate[e.images == image].max()) for e in recorder.entries
                   if e.step == 0 and (e.images == image).any())

    for i in late.nonzero().flatten().tolist():  # steered from the first step in the record the Report shows
        assert first_step_gate(single.recorder, i) == 0 and first_step_gate(rec, i) > 0
    for i in (~late).nonzero().flatten().tolist():
        assert first_step_gate(rec, i) == first_step_gate(single.recorder, i)
    assert rec.sampled_again == late.nonzero().flatten().tolist() and "sampled again: image(s)" in rec.summary()
    assert single.recorder.sampled_again == [] and "sampled again" not in single.recorder.summary()


def test_a_pack_that_detects_and_steers_at_one_position_runs_each_call_once(tmp_path):
    model = diffusers_flux()
    inputs = flux_inputs()[1]
    pack = split_pack(tmp_path, uses={STEER_AT: USE_BOTH, DETECT: USE_BOTH})
    calls = []

    def run():
        calls.append(1)
        return model(**inputs)[0]

    steering = SamplingSteering(SteeringDictionary(pack, "target"), IMAGE, "test")
    steering.begin_run([1.0, 0.0], n_images=1)
    with torch.no_grad():
        steering.steer_call(model, inputs["hidden_states"], 1.0, [1.0, 0.0], [0, 1], run)
    assert len(calls) == 1  # input.txt latched the image itself: nothing ran before it


def test_combine_packs_keeps_the_detector_gate_and_the_steerer_blend(tmp_path):
    meta, tensors = random_pack("flux", 64, [DETECT, "double.0.img.attn"], tau=0.3, seed=1)
    detector = load_pack(save_pack(tmp_path / "det.safetensors", meta, tensors))
    meta, tensors = random_pack("flux", 64, [STEER_AT], tau=0.1, seed=2, blend_maps=True)
    steerer = load_pack(save_pack(tmp_path / "steer.safetensors", meta, tensors))
    out = tmp_path / "combined.safetensors"
    assert cli_main(["combine", "--detect", f"{tmp_path / 'det.safetensors'}:{DETECT}",
                     "--steer", f"{tmp_path / 'steer.safetensors'}:{STEER_AT}", "--out", str(out)]) == 0
    pack = load_pack(out)
    assert pack.positions == [STEER_AT, DETECT] and pack.metadata[K_FORMAT_VERSION] == 3
    for dom in pack.domains:
        assert pack.domain_features(dom, DETECT).tau == detector.domain_features(dom, DETECT).tau
        assert pack.blend_map(dom, DETECT) is None
        assert torch.equal(pack.blend_map(dom, STEER_AT), steerer.blend_map(dom, STEER_AT))
    assert torch.equal(pack.tensors[f"encoder.{DETECT}.W_enc"], detector.tensors[f"encoder.{DETECT}.W_enc"])
    assert pack.metadata["routing"]["combined"]["detect"]["positions"] == [DETECT]
    with pytest.raises(PackError, match="both detect and steer"):
        combine_packs(detector, [DETECT], detector, [DETECT], tmp_path / "x.safetensors")
    meta, tensors = random_pack("flux", 64, [STEER_AT], domains=("source", "other"))
    other = load_pack(save_pack(tmp_path / "other.safetensors", meta, tensors))
    with pytest.raises(PackError, match="differ in domains"):
        combine_packs(detector, [DETECT], other, [STEER_AT], tmp_path / "y.safetensors")
    assert cli_main(["combine", "--detect", str(tmp_path / "det.safetensors"), "--steer", "a:b", "--out", "z"]) == 2


def test_position_info_default_use_is_both():
    info = PositionInfo(8, 32, 4, 1.0, [0])
    assert info.use == USE_BOTH and info.detects and info.edits
