"""The Report node's data and pictures (safedig_core.recorder): no ComfyUI needed."""

import math
import re

import numpy as np
import pytest
import torch

from safedig_core.recorder import ScoreRecorder, _ranges, colorize, render_step_heatmap, render_token_maps
from safedig_core.steering_math import GateKind, gate_open_from

POS = ["double.0.img.attn", "double.0.txt.mlp", "single.0.out"]


class Recorded(ScoreRecorder):
    """A recorder fed the token-scope gate a steering hook would have applied to the scores."""

    def __init__(self, gate="hard", taus=None):
        super().__init__(POS, taus or {p: 0.5 for p in POS}, label="test")
        self.kind = GateKind(gate)
        self.begin(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), n_images=2)
        self.set_grid((4, 4), patch=2)  # 2x2 image tokens

    def scored(self, step, rows, per_chunk):
        record = self.callback(step, rows, per_chunk)
        return lambda pos, scores: record(pos, scores, gate_open_from(scores, self.taus[pos], self.kind))


def recorder(gate="hard", taus=None):
    return Recorded(gate, taus)


def test_steps_follow_the_schedule():
    rec = recorder()
    assert rec.n_steps == 4
    assert [rec.step_of(s) for s in (1.0, 0.76, 0.5, 0.26, 0.2)] == [0, 1, 2, 3, 3]


def test_rows_map_to_images_and_gate_uses_tau():
    rec = recorder()
    # cfg > 1 with uncond first: chunks [uncond, cond], 2 images per chunk; only cond rows (2, 3) are steered.
    rows = torch.tensor([False, False, True, True])
    img_scores = torch.tensor([[9.0, 9.0, 9.0, 9.0]] * 2 + [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.6]])
    on_scores = rec.scored(step=1, rows=rows, per_chunk=2)
    on_scores("double.0.img.attn", img_scores)
    txt = torch.zeros(4, 3)
    txt[2, 0] = 2.0
    on_scores("double.0.txt.mlp", txt)
    # single-stream: 3 text tokens then the 4 image tokens
    single = torch.zeros(4, 7)
    single[3, 6] = 1.0
    on_scores("single.0.out", single)
    m = rec.step_matrix()
    assert m.shape == (3, 4)
    assert np.isnan(m[:, 0]).all() and np.isnan(m[:, 2:]).all()  # steps not steered
    assert m[0, 1] == pytest.approx(2 / 8) and m[1, 1] == pytest.approx(1 / 6) and m[2, 1] == pytest.approx(1 / 14)
    maps = rec.token_maps()
    assert maps.shape == (2, 2, 2)
    # image 0: img.attn token 0 fired (1 of 2 position-rows); image 1: token 3 fired at both positions
    assert maps[0].tolist() == [[0.5, 0.0], [0.0, 0.0]]
    assert maps[1].tolist() == [[0.0, 0.0], [0.0, 1.0]]
    assert rec.fired_steps() == {p: [1] for p in POS}
    text = rec.summary()
    assert "steps steered: 2 of 4" in text and "2 image(s), image tokens 2x2" in text
    assert re.search(r"double.0.img.attn\s+0.5\s+25.0%\s+1\s+2", text), text
    assert "verdict: the gate fired" in text


def test_soft_gate_and_quiet_generation():
    rec = recorder("soft", {p: 1.0 for p in POS})
    rec.scored(0, None, 1)("double.0.img.attn", torch.tensor([[0.75, 0.5, 2.0, 0.0]]))
    assert rec.step_matrix()[0, 0] == pytest.approx((0.5 + 0 + 1 + 0) / 4)  # soft ramp from tau/2 to tau
    quiet = recorder()
    quiet.scored(0, None, 1)("double.0.img.attn", torch.zeros(1, 4))
    assert "verdict: the gate never fired" in quiet.summary()
    assert quiet.fired_steps()["double.0.img.attn"] == []
    assert "no generation recorded yet" in ScoreRecorder(POS, {p: 0 for p in POS}).summary()


def test_begin_forgets_the_previous_generation():
    rec = recorder()
    rec.scored(0, None, 1)("double.0.img.attn", torch.ones(1, 4))
    assert rec.entries
    rec.begin([1.0, 0.0], n_images=1)
    assert not rec.entries and rec.generation == 2 and rec.n_steps == 1


def test_pictures():
    rec = recorder()
    rec.scored(1, None, 2)("double.0.img.attn", torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))
    heat = render_step_heatmap([rec, recorder()])
    assert heat.dtype == np.uint8 and heat.ndim == 3 and heat.shape[2] == 3
    assert heat.shape[0] >= 6 * 14 and heat.shape[1] >= 4 * 14  # 2 steers x 3 positions, 4 steps
    maps = render_token_maps([rec], size=(16, 16), n_images=2)
    assert maps.shape == (2, 16, 16, 3)
    assert (maps[0, 0, 0] != maps[0, 15, 15]).any()  # token 0 fired, token 3 did not
    over = render_token_maps([rec], images=np.full((2, 8, 8, 3), 200, np.uint8))
    assert over.shape == (2, 8, 8, 3)
    unchanged = render_token_maps([], images=np.full((1, 8, 8, 3), 200, np.uint8))
    assert (unchanged == 200).all()
    assert colorize(np.array([math.nan]))[0].tolist() == [70, 70, 70]
    assert _ranges([1, 2, 3, 5, 7, 8]) == "1-3, 5, 7-8"



def test_the_node_pack_imports_without_comfyui():
    """Outside ComfyUI the top-level package defines no nodes and imports nothing of ComfyUI."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pack', {str(root / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(root)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['pack'] = m; spec.loader.exec_module(m)\n"
        "assert not hasattr(m, 'comfy_entrypoint') and m.__all__ == []\n"
        "assert not any(k == 'comfy' or k.startswith(('comfy.', 'comfy_api')) for k in sys.modules)\n"
        "import safedig_core.recorder\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_report_shows_exactly_the_tokens_the_image_scope_gate_steered():
    """Under the image scope a latched image's tokens below tau are steered too: the Report must count
    them (it records the gate the hook applied, not one re-derived from the scores)."""
    from safedig_core import ActivationCapture, SteeringDictionary, SteeringHooks, SteeringParams
    from safedig_core.pack import DictionaryPack
    from safedig_core.synthetic import random_pack

    from tiny_models import diffusers_flux, flux_inputs

    model, inputs, pos = diffusers_flux(), flux_inputs()[1], "single.1.out"
    meta, tensors = random_pack("flux", 64, [pos], expansion=4, k=8, seed=3)
    dictionary = SteeringDictionary(DictionaryPack("synthetic.safetensors", meta, tensors), "target")
    scores: list[torch.Tensor] = []
    with torch.no_grad(), ActivationCapture(model, [pos]) as before, SteeringHooks(
            model, dictionary, SteeringParams(mode="off"), on_scores=lambda p, s, g: scores.append(s)):
        model(**inputs)
    # A threshold only a few tokens of image 0 pass: the latch then opens its other tokens with g > 0.
    tau = float(scores[0][0].quantile(0.97))
    rec = ScoreRecorder([pos], {pos: tau}, label="latch")
    rec.begin(torch.tensor([1.0, 0.0]), n_images=2)
    params = SteeringParams(mode="repel", scope="image", tau_override=tau)
    with torch.no_grad(), SteeringHooks(model, dictionary, params, on_scores=rec.callback(0, None, 2)), \
            ActivationCapture(model, [pos]) as after:
        model(**inputs)
    changed = (after.activations[pos][0] != before.activations[pos][0]).any(-1)
    recorded = rec.entries[0].gate > 0
    below_tau = changed & (scores[0] <= tau)
    assert below_tau.any(), "the test needs latched tokens below tau"
    assert torch.equal(recorded, changed)
    assert rec.step_matrix()[0, 0] == pytest.approx(float(changed.float().mean()))
