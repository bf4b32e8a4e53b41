"""Steering math: properties of Off / Blend / Repel / Both, gates, row masks and non-finite input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safedig_core import ALL_DOMAINS, SafeDIGError, SteeringDictionary, SteeringParams
from safedig_core.pack import DictionaryPack
from safedig_core.sae import topk_relu
from safedig_core.schedule import schedule_fraction
from safedig_core.steering_math import MAX_STRENGTH, ApplyTo, harmful_scores, rows_for_chunks, steer, steer_domains
from safedig_core.synthetic import random_pack

D = 16
POS = "double.0.img.attn"


def weights(tau=None, dtype=torch.float32, seed=0, scale=1.0):
    meta, tensors = random_pack("flux", D, [POS], expansion=4, k=6, n_harmful=4, seed=seed, scale=scale)
    pack = DictionaryPack("mem", meta, tensors)
    w = SteeringDictionary(pack, "target").weights(POS, torch.device("cpu"), dtype)
    if tau is not None:
        w.tau = tau
    return w


def activations(seed=0, batch=3, tokens=20, dtype=torch.float32):
    return torch.randn(batch, tokens, D, generator=torch.Generator().manual_seed(seed)).to(dtype) * 2


def reference(x, w, p, row_mask=None):
    """Straightforward formula of docs/method.md section 6 (no pruning), for comparison."""
    tau = w.tau * p.tau_scale if p.tau_override is None else p.tau_override
    enc = lambda v: topk_relu((v / w.scale - w.b_pre) @ w.W_enc.T + w.b_enc, w.k)  # noqa: E731
    z = enc(x)
    g = z[..., w.harmful_ids] @ w.harmful_weights
    if p.gate.value == "hard":
        gate = (g > tau).to(x.dtype)
    else:
        low = tau / 2 if tau > 0 else tau - 1
        gate = ((g - low) / (tau - low)).clamp(0, 1)
    if row_mask is not None:
        gate = gate * row_mask[:, None]
    gate = gate[..., None]
    new = x
    if p.alpha:
        z_safe = z.clone()
        z_safe[..., w.harmful_ids] = 0
        z_safe = z_safe + w.anchor
        new = new + gate * p.alpha * w.scale * ((z_safe @ w.W_dec + w.b_dec) - (z @ w.W_dec + w.b_dec))
    if p.beta:
        z2 = enc(new) if p.alpha else z
        new = new - gate * p.beta * w.scale * (z2[..., w.harmful_ids] @ w.W_dec[w.harmful_ids])
    return torch.where(gate > 0, new, x)


def median_tau(x, w):
    g = harmful_scores(x, w)
    return float(g[g > 0].median())


@pytest.mark.parametrize("mode", ["off", "blend", "repel", "both"])
def test_strength_zero_and_off_are_identity(mode):
    x = activations()
    w = weights(tau=0.0)
    p = SteeringParams(mode=mode, blend_strength=0.0, repel_strength=0.0)
    assert p.is_identity
    assert steer(x, w, p) is x
    assert steer(x, w, SteeringParams(mode="off", blend_strength=2, repel_strength=2)) is x


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(["blend", "repel", "both"]),
       gate=st.sampled_from(["hard", "soft"]), alpha=st.floats(0.1, MAX_STRENGTH), beta=st.floats(0.1, MAX_STRENGTH),
       scale=st.floats(0.5, 3.0))
def test_matches_reference_formula_and_closed_tokens_are_bitwise_unchanged(seed, mode, gate, alpha, beta, scale):
    x = activations(seed) * scale
    w = weights(seed=seed % 7, scale=scale)
    w.tau = median_tau(x, w)
    p = SteeringParams(mode=mode, gate=gate, blend_strength=alpha, repel_strength=beta)
    out = steer(x, w, p)
    expected = reference(x, w, p)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    g = harmful_scores(x, w)
    floor = w.tau if gate == "hard" else w.tau / 2
    closed = g <= floor
    assert closed.any() and (~closed).any()
    assert torch.equal(out[closed], x[closed])  # bitwise
    assert not torch.equal(out[~closed], x[~closed])


def test_repel_beta_one_removes_harmful_reconstruction():
    x = activations(4)
    w = weights(tau=-1.0, scale=1.7)  # every token gated
    out = steer(x, w, SteeringParams(mode="repel", repel_strength=1.0))
    z = topk_relu((x / w.scale - w.b_pre) @ w.W_enc.T + w.b_enc, w.k)
    harmful_part = w.scale * (z[..., w.harmful_ids] @ w.W_dec[w.harmful_ids])
    assert harmful_part.abs().max() > 0.1
    torch.testing.assert_close(out, x - harmful_part)


def test_blend_keeps_the_sae_error_term():
    x = activations(5)
    w = weights(tau=-1.0, scale=0.8)
    out = steer(x, w, SteeringParams(mode="blend", blend_strength=1.0))
    z = topk_relu((x / w.scale - w.b_pre) @ w.W_enc.T + w.b_enc, w.k)
    z_safe = z.clone()
    z_safe[..., w.harmful_ids] = 0
    z_safe += w.anchor
    decode = lambda c: w.scale * (c @ w.W_dec + w.b_dec)  # noqa: E731
    error_before = x - decode(z)
    error_after = out - decode(z_safe)
    torch.testing.assert_close(error_after, error_before, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, x)


def test_row_mask_leaves_other_rows_bitwise_unchanged():
    x = activations(6, batch=4)
    w = weights(tau=-1.0)
    rows = torch.tensor([False, True, False, True])
    out = steer(x, w, SteeringParams(mode="both"), row_mask=rows)
    assert torch.equal(out[~rows], x[~rows])
    assert not torch.equal(out[rows], x[rows])


def test_non_finite_tokens_are_left_as_they_were():
    x = activations(7)
    x[0, 3, 2] = float("nan")
    x[1, 5, 0] = float("inf")
    w = weights(tau=-1.0)
    out = steer(x, w, SteeringParams(mode="both", blend_strength=4, repel_strength=4))
    assert torch.equal(out[0, 3].isnan(), x[0, 3].isnan()) and torch.equal(out[0, 3].nan_to_num(), x[0, 3].nan_to_num())
    assert torch.equal(out[1, 5], x[1, 5])
    finite = torch.isfinite(x).all(-1)
    assert torch.isfinite(out[finite]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_never_creates_nan(dtype):
    x = activations(8, dtype=dtype) * 3000  # near fp16's range
    w = weights(tau=-1.0, dtype=dtype)
    out = steer(x, w, SteeringParams(mode="both", blend_strength=MAX_STRENGTH, repel_strength=MAX_STRENGTH))
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


def test_soft_gate_scales_between_half_tau_and_tau():
    x = activations(9)
    w = weights()
    w.tau = median_tau(x, w)
    hard = steer(x, w, SteeringParams(mode="repel", gate="hard"))
    soft = steer(x, w, SteeringParams(mode="repel", gate="soft"))
    g = harmful_scores(x, w)
    ramp = (g > w.tau / 2) & (g < w.tau)
    assert ramp.any()
    assert torch.equal(hard[ramp], x[ramp]) and not torch.equal(soft[ramp], x[ramp])
    full = g > w.tau
    torch.testing.assert_close(soft[full], hard[full])


def test_tau_override_closes_the_gate():
    x = activations(10)
    w = weights(tau=-1.0)
    assert steer(x, w, SteeringParams(mode="both", tau_override=1e9)) is x


def test_tau_scale_lowers_the_calibrated_threshold():
    x = activations(11)
    w = weights()
    w.tau = median_tau(x, w)
    g = harmful_scores(x, w)
    half = SteeringParams(mode="blend", tau_scale=0.5)
    out = steer(x, w, half)
    torch.testing.assert_close(out, reference(x, w, half))
    assert torch.equal(out, steer(x, w, SteeringParams(mode="blend", tau_override=w.tau / 2)))
    changed = (out != x).any(-1)
    assert changed[(g > w.tau / 2) & (g <= w.tau)].any()  # opened only by the scale
    assert not changed[g <= w.tau / 2].any()
    assert SteeringParams(tau_scale=0.5, tau_override=3.0).threshold(w.tau) == 3.0  # the override wins


def test_image_scope_latches_whole_rows():
    x = activations(12, batch=4)
    w = weights()
    g = harmful_scores(x, w)
    w.tau = float(g.amax(1).sort().values[1]) + 1e-4  # rows 2 and 3 pass tau somewhere, rows 0 and 1 nowhere
    fired = (g > w.tau).any(1)
    assert int(fired.sum()) == 2
    p = SteeringParams(mode="blend", scope="image")
    latch = torch.zeros(4, dtype=torch.bool)
    out = steer(x, w, p, latch=latch)
    assert latch.tolist() == fired.tolist()
    assert torch.equal(out[~fired], x[~fired])  # rows that never fired: bitwise untouched
    # a fired row is steered wherever its harmful score is positive, as with the threshold at 0
    everywhere = reference(x, w, SteeringParams(mode="blend", tau_override=0.0))
    torch.testing.assert_close(out[fired], everywhere[fired])
    assert ((out != x).any(-1) == ((g > 0) & fired[:, None])).all()
    torch.testing.assert_close(steer(x, w, SteeringParams(mode="blend")), reference(x, w, SteeringParams(mode="blend")))


def test_image_scope_latch_carries_over_calls():
    x = activations(13, batch=2)
    w = weights()
    g = harmful_scores(x, w)
    w.tau = float(g.max()) + 1.0  # nothing passes tau in this call
    p = SteeringParams(mode="repel", scope="image")
    assert steer(x, w, p, latch=torch.zeros(2, dtype=torch.bool)) is x
    latch = torch.tensor([True, False])  # row 0 fired at an earlier position or step
    out = steer(x, w, p, latch=latch)
    assert latch.tolist() == [True, False]
    assert torch.equal(out[1], x[1]) and not torch.equal(out[0], x[0])
    torch.testing.assert_close(out[0], reference(x, w, SteeringParams(mode="repel", tau_override=0.0))[0])
    scores = []
    steer(x, w, p, latch=latch, scores_out=scores)
    torch.testing.assert_close(scores[0][0], g[0])  # exact on the latched row


@pytest.mark.parametrize("kwargs,msg", [
    ({"blend_strength": MAX_STRENGTH + 1}, "blend_strength .* out of range"),
    ({"repel_strength": -0.1}, "repel_strength .* out of range"),
    ({"repel_strength": float("nan")}, "repel_strength .* out of range"),
    ({"mode": "erase"}, r"unknown mode 'erase'.*Fix: use one of \['off', 'blend', 'repel', 'both'\]"),
    ({"gate": "maybe"}, "unknown gate"),
    ({"scope": "pixel"}, r"unknown gate scope 'pixel'.*\['token', 'image'\]"),
    ({"start": 0.8, "end": 0.2}, "step range"),
    ({"tau_override": float("inf")}, "tau_override"),
    ({"tau_scale": -0.5}, r"tau_scale -0.5 is out of range.*Fix: use a value in \[0, 4.0\]"),
    ({"tau_scale": float("nan")}, "tau_scale"),
])
def test_bad_params_are_rejected(kwargs, msg):
    with pytest.raises(SafeDIGError, match=msg):
        SteeringParams(**kwargs)


def test_rows_for_chunks_follows_cond_or_uncond_order():
    assert rows_for_chunks([1, 0], 4, ApplyTo.COND).tolist() == [False, False, True, True]
    assert rows_for_chunks([0, 1], 2, "uncond").tolist() == [False, True]
    assert rows_for_chunks([0], 3, "cond").tolist() == [True, True, True]  # cfg 1: cond only
    assert rows_for_chunks([1, 0], 4, "both") is None
    with pytest.raises(SafeDIGError, match="does not split"):
        rows_for_chunks([0, 1], 3, "cond")


def test_schedule_fraction():
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    assert [schedule_fraction(s, sigmas) for s in (1.0, 0.75, 0.5, 0.25)] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert schedule_fraction(0.5, None) == 0.0


def test_reported_scores_are_exact_where_the_gate_may_open_and_a_shut_bound_elsewhere():
    x = activations(11)
    w = weights()
    w.tau = median_tau(x, w)
    exact = harmful_scores(x, w)
    rows = torch.tensor([True, False, True])
    scores = []
    out = steer(x, w, SteeringParams(mode="repel"), row_mask=rows, scores_out=scores)
    reported = scores[0]
    assert torch.equal(reported[~rows], torch.zeros_like(reported[~rows]))
    may_open = reported[rows] > w.tau
    torch.testing.assert_close(reported[rows][may_open], exact[rows][may_open])
    assert (reported[rows][~may_open] <= w.tau).all()
    assert (reported[rows][~may_open] >= exact[rows][~may_open] - 1e-5).all()
    assert torch.equal(out, steer(x, w, SteeringParams(mode="repel"), row_mask=rows))  # recording changes nothing


def two_domain_weights(tau_source: float, tau_target: float):
    meta, tensors = random_pack("flux", D, [POS], expansion=4, k=6, n_harmful=4, seed=3)
    pack = DictionaryPack("mem", meta, tensors)
    both = SteeringDictionary(pack, ALL_DOMAINS)
    ws = both.domain_weights(POS, torch.device("cpu"), torch.float32)
    ws[0].tau, ws[1].tau = tau_source, tau_target
    return both, ws


@pytest.mark.parametrize("scope", ["token", "image"])
def test_all_domains_steer_each_token_once_by_the_widest_open_gate(scope):
    both, (ws, wt) = two_domain_weights(0.0, 0.0)
    assert both.domains == ["source", "target"]
    x = activations(seed=5)
    p = SteeringParams(mode="blend", scope=scope)
    x_s, x_t = steer(x, ws, p, latch=None), steer(x, wt, p, latch=None)
    scores = []
    out = steer_domains(x, [ws, wt], p, scores_out=scores)
    g_s, g_t = harmful_scores(x, ws), harmful_scores(x, wt)
    winner_t = (g_t > g_s) if scope == "token" else (g_t > g_s) & (g_t > 0)
    changed = ~torch.isclose(out, x).all(-1)
    assert changed.any() and (changed <= ((g_s > 0) | (g_t > 0))).all()
    for mask, ref in ((winner_t & changed, x_t), (~winner_t & changed, x_s)):
        assert torch.allclose(out[mask], ref[mask], atol=1e-5)
    assert torch.equal(out[~changed], x[~changed])
    # Reported scores are margins: 1 is each domain's own threshold.
    assert scores[0].shape == x.shape[:-1]


def test_all_domains_with_one_shut_gate_is_the_other_domain_alone():
    _, (ws, wt) = two_domain_weights(1e9, 0.0)  # the source gate never opens
    x = activations(seed=6)
    p = SteeringParams(mode="both", scope="token")
    assert torch.equal(steer_domains(x, [ws, wt], p), steer(x, wt, p))
    assert torch.equal(steer_domains(x, [ws], p), steer(x, ws, p))  # one domain: exactly steer()


def test_all_domains_of_a_one_domain_pack_is_that_domain():
    meta, tensors = random_pack("flux", D, [POS], expansion=4, k=6, n_harmful=4, seed=4, domains=("violence",))
    pack = DictionaryPack("mem", meta, tensors)
    one, every = SteeringDictionary(pack, "violence"), SteeringDictionary(pack, ALL_DOMAINS)
    assert every.domain == "violence" and every.domains == ["violence"]
    assert every.thresholds(SteeringParams(mode="blend")) == one.thresholds(SteeringParams(mode="blend"))


def test_blend_with_a_learned_map_moves_harmful_codes_to_their_mapped_codes():
    meta, tensors = random_pack("flux", D, [POS], expansion=4, k=6, n_harmful=4, seed=4, blend_maps=True)
    pack = DictionaryPack("mem", meta, tensors)
    w = SteeringDictionary(pack, "target").weights(POS, torch.device("cpu"), torch.float32)
    assert w.blend_map is not None
    x = activations(seed=5)
    p = SteeringParams(mode="blend", tau_override=0.0)
    out = steer(x, w, p)
    enc = lambda v: topk_relu((v / w.scale - w.b_pre) @ w.W_enc.T + w.b_enc, w.k)  # noqa: E731
    z = enc(x)
    z_h = z[..., w.harmful_ids]
    z_safe = z.clone()
    z_safe[..., w.harmful_ids] = 0
    z_safe = z_safe + z_h @ w.blend_map  # the map replaces the anchor
    expected = x + w.scale * ((z_safe - z) @ w.W_dec)
    opened = (z_h @ w.harmful_weights > 0)[..., None]
    assert opened.any() and (~opened).any()
    torch.testing.assert_close(out, torch.where(opened, expected, x), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[~opened.squeeze(-1)], x[~opened.squeeze(-1)])  # closed tokens: bitwise unchanged
    # The same pack without its maps blends to the constant anchor instead: a different result.
    anchored = SteeringDictionary(pack.without_blend_maps(), "target").weights(POS, torch.device("cpu"), torch.float32)
    assert anchored.blend_map is None
    assert not torch.allclose(steer(x, anchored, p), out)


def test_blend_with_an_affine_target_moves_opened_tokens_by_their_affine_image():
    meta, tensors = random_pack("flux", D, [POS], expansion=4, k=6, n_harmful=4, seed=4, scale=2.5,
                                blend_maps="affine")
    pack = DictionaryPack("mem", meta, tensors)
    w = SteeringDictionary(pack, "target").weights(POS, torch.device("cpu"), torch.float32)
    assert w.blend_affine is not None and w.blend_map is None
    x = activations(seed=5)
    a = pack.blend_affine("target", POS)
    out = steer(x, w, SteeringParams(mode="blend", blend_strength=0.5, tau_override=0.0))
    expected = x + 0.5 * (x @ a[:-1] + a[-1])  # in raw activation units, whatever the SAE's scale
    z = topk_relu((x / w.scale - w.b_pre) @ w.W_enc.T + w.b_enc, w.k)
    opened = (z[..., w.harmful_ids] @ w.harmful_weights > 0)[..., None]
    assert opened.any() and (~opened).any()
    torch.testing.assert_close(out, torch.where(opened, expected, x), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[~opened.squeeze(-1)], x[~opened.squeeze(-1)])  # closed tokens: bitwise unchanged


@pytest.mark.parametrize("target", ["map", "affine"])
def test_a_learned_target_at_gain_equals_it_at_that_strength(target):
    from safedig_core.training.blend_map import blend_variant

    meta, tensors = random_pack("flux", D, [POS], expansion=4, k=6, n_harmful=4, seed=6, blend_maps=target)
    pack = DictionaryPack("mem", meta, tensors)
    affines = {(d, POS): pack.blend_affine(d, POS) for d in pack.domains} if target == "affine" else {}
    x = activations(seed=7)

    def steered(p, strength):
        w = SteeringDictionary(p, "target").weights(POS, torch.device("cpu"), torch.float32)
        return steer(x, w, SteeringParams(mode="blend", blend_strength=strength, tau_override=0.0))

    at_one = steered(blend_variant(pack, target, 1.5, affines), 1.0)
    assert not torch.equal(at_one, x)
    torch.testing.assert_close(at_one, steered(pack, 1.5), rtol=1e-5, atol=1e-5)
