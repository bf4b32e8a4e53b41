"""SAE training, features, tau calibration and decoder adaptation on planted sparse activations."""

import zlib

import pytest
import torch
from planted import paired_prompts, write_set

from safedig_core.training.collect import ActivationSet
from safedig_core.training.features import (
    FeatureConfig,
    calibrate_tau,
    choose_harmful_union,
    domain_features,
    firing_rate,
    pair_statistics,
    smd,
)
from safedig_core.training.sae_training import AdaptConfig, SAEConfig, adapt_decoder, evaluate_sae, load_sae, train_sae

D, ATOMS, POS = 16, 40, "double.0.img.mlp"
HARMFUL_ATOM, SAFE_ATOM = 0, 1


def atoms(seed: int) -> torch.Tensor:
    a = torch.randn(ATOMS, D, generator=torch.Generator().manual_seed(seed))
    return a / a.norm(dim=1, keepdim=True)


SOURCE_ATOMS = atoms(0)
# Target domain: the same concepts, each direction turned a little, and a shifted mean.
TARGET_ATOMS = SOURCE_ATOMS + 0.5 * atoms(1)
TARGET_ATOMS = TARGET_ATOMS / TARGET_ATOMS.norm(dim=1, keepdim=True)
TARGET_SHIFT = 1.5 * atoms(2)[0]


def sparse_tokens(dictionary: torch.Tensor, prompt, step: int, tokens: int = 8, shift=None) -> torch.Tensor:
    """Each token: 3 random atoms (ids >= 2) with positive coefficients, plus the prompt's concept atom on
    half the tokens (unsafe: atom 0, safe: atom 1)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{prompt.text}|{step}".encode()))
    ids = torch.randint(2, ATOMS, (tokens, 3), generator=g)
    coef = torch.rand(tokens, 3, generator=g) * 2 + 1
    x = (coef.unsqueeze(-1) * dictionary[ids]).sum(1)
    concept = HARMFUL_ATOM if prompt.label else SAFE_ATOM
    x[: tokens // 2] += 3 * dictionary[concept]
    x += 0.05 * torch.randn(tokens, D, generator=g)
    return x + (shift if shift is not None else 0)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    src = write_set(root / "source", paired_prompts(20), lambda _p, pr, s: sparse_tokens(SOURCE_ATOMS, pr, s),
                    positions=[POS], d=D, tokens=8)
    tgt = write_set(root / "target", paired_prompts(20, seed=500),
                    lambda _p, pr, s: sparse_tokens(TARGET_ATOMS, pr, s, shift=TARGET_SHIFT), positions=[POS], d=D,
                    tokens=8)
    return ActivationSet(src), ActivationSet(tgt)


CFG = SAEConfig(expansion=4, k=6, epochs=20, batch_size=256, lr=1e-2, checkpoint_every=5, dead_tokens=2000)


@pytest.fixture(scope="module")
def source_sae(sets, tmp_path_factory):
    return train_sae([sets[0]], POS, CFG, tmp_path_factory.mktemp("sae"), progress=False)


def test_sae_explains_planted_sparse_activations(source_sae, sets):
    sae, metrics = source_sae
    assert metrics["fve"] > 0.85
    assert metrics["l0"] <= CFG.k and metrics["dead_fraction"] < 0.5
    assert metrics["heldout_tokens"] > 0
    norms = sae.decoder.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=2e-3)  # unit rows, float16-rounded
    assert all(torch.equal(p, p.half().float()) for p in sae.parameters())  # exactly what a pack stores
    assert torch.equal(sae.encoder.b_pre, sae.decoder.b_dec)  # the encoder's frozen copy of the centring
    again = evaluate_sae(sae, [sets[0]], POS)
    for key in ("fve", "l0", "dead_fraction"):
        assert again[key] == metrics[key], key


def test_finished_training_is_loaded_not_repeated(source_sae, sets, tmp_path):
    sae, metrics = source_sae
    out = tmp_path / "again"
    steps = []
    first, _ = train_sae([sets[0]], POS, CFG, out, progress=False, on_step=steps.append)
    again, m2 = train_sae([sets[0]], POS, CFG, out, progress=False, on_step=lambda s: pytest.fail("retrained"))
    assert steps and all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(),
                                                            strict=True))
    # determinism: same data, same seed, same result as the fixture's run in another folder
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), first.state_dict().values(), strict=True))
    assert m2["fve"] == metrics["fve"]


class KilledError(Exception):
    pass


def test_killed_training_resumes_to_the_same_weights(sets, tmp_path, source_sae):
    def kill_at(n):
        def on_step(step):
            if step == n:
                raise KilledError

        return on_step

    with pytest.raises(KilledError):
        train_sae([sets[0]], POS, CFG, tmp_path, progress=False, on_step=kill_at(12))
    assert (tmp_path / "ckpt.pt").exists() and not (tmp_path / "sae.safetensors").exists()
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 10  # last checkpoint before the kill
    resumed_steps = []
    resumed, _ = train_sae([sets[0]], POS, CFG, tmp_path, progress=False, on_step=resumed_steps.append)
    assert resumed_steps[0] == 11  # continued, did not start over
    uninterrupted = source_sae[0]
    for (name, a), b in zip(resumed.state_dict().items(), uninterrupted.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_adapted_decoder_lowers_target_error_and_leaves_the_encoder_bitwise(source_sae, sets, tmp_path):
    sae, _ = source_sae
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    decoder, metrics = adapt_decoder(sae, [sets[1]], POS, AdaptConfig(epochs=6, batch_size=256, lr=3e-3, pull=0.1),
                                     tmp_path, progress=False)
    assert metrics["fve_target_adapted"] > metrics["fve_target_source_decoder"] + 0.05
    recomputed = evaluate_sae(sae, [sets[1]], POS, decoder=decoder)["fve"]
    assert recomputed == metrics["fve_target_adapted"]
    for name, value in sae.state_dict().items():  # encoder AND the source decoder untouched, bit for bit
        assert torch.equal(value, before[name]), name
    assert not torch.equal(decoder.W_dec, sae.decoder.W_dec)
    torch.testing.assert_close(decoder.W_dec.norm(dim=1), torch.ones(sae.d_sae), rtol=0, atol=2e-3)
    # the pull keeps the adapted rows near the source rows (same latent meaning)
    cos = (decoder.W_dec * sae.decoder.W_dec).sum(1)
    assert cos.median() > 0.8


def test_stronger_pull_stays_closer_to_the_source_decoder(source_sae, sets, tmp_path):
    sae, _ = source_sae
    cfg = dict(epochs=3, batch_size=256, lr=3e-3)
    loose, _ = adapt_decoder(sae, [sets[1]], POS, AdaptConfig(pull=0.0, **cfg), tmp_path / "a", progress=False)
    tight, _ = adapt_decoder(sae, [sets[1]], POS, AdaptConfig(pull=100.0, **cfg), tmp_path / "b", progress=False)
    dist = lambda dec: (dec.W_dec - sae.decoder.W_dec).norm()  # noqa: E731
    assert dist(tight) < 0.5 * dist(loose)


def test_harmful_features_and_safe_anchor_find_the_planted_concepts(source_sae, sets):
    sae, _ = source_sae
    feats, scores, labels = domain_features(sae, sets[0], [], POS, None, FeatureConfig(n_harmful=4, n_anchor=4))
    assert scores[labels == 1].mean() > scores[labels == 0].mean()
    w = torch.tensor(feats["harmful_weights"])
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0, abs=1e-5)
    W = sae.decoder.W_dec.detach()
    # The SAE spreads each planted atom over a few latents; H holds the one most aligned with the unsafe
    # atom, and the weighted harmful direction points at it (the anchor at the safe atom).
    assert int((W @ SOURCE_ATOMS[HARMFUL_ATOM]).argmax()) in feats["harmful_ids"]
    assert int((W @ SOURCE_ATOMS[SAFE_ATOM]).argmax()) in feats["safe_anchor_ids"]
    harm = (w[:, None] * W[feats["harmful_ids"]]).sum(0)
    anchor = (torch.tensor(feats["safe_anchor_values"])[:, None] * W[feats["safe_anchor_ids"]]).sum(0)
    assert harm @ SOURCE_ATOMS[HARMFUL_ATOM] / harm.norm() > 0.85
    assert anchor @ SOURCE_ATOMS[SAFE_ATOM] / anchor.norm() > 0.75
    assert harm @ SOURCE_ATOMS[SAFE_ATOM] / harm.norm() < 0.3
    assert not set(feats["harmful_ids"]) & set(feats["safe_anchor_ids"])


def test_union_of_harmful_ids_takes_an_equal_share_per_set_then_fills():
    cfg = FeatureConfig(n_harmful=5, min_smd=0.5)
    a = torch.tensor([3.0, 2.0, 1.0, 0.9, 0.0, 0.0, 0.0])
    b = torch.tensor([2.5, 0.0, 0.0, 0.0, 3.0, 0.8, 0.0])
    # a gets 3 slots (0, 1, 2), b 2: its best (4), then 0 is taken, so 5
    assert choose_harmful_union([a, b], cfg) == ([0, 1, 2, 4, 5], [0, 0, 0, 1, 1])
    # b first: its 3 slots take 4, 0, 5; a skips the taken 0
    assert choose_harmful_union([b, a], cfg) == ([4, 0, 5, 1, 2], [0, 0, 0, 1, 1])
    # fewer latents above min_smd than slots: every one of them, once
    assert choose_harmful_union([a, b], FeatureConfig(n_harmful=9)) == ([0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 1])
    # nothing above min_smd anywhere: the first set's best latent
    assert choose_harmful_union([-a, torch.zeros(7)], cfg) == ([4], [0])
    assert choose_harmful_union([a], FeatureConfig(n_harmful=2))[0] == [0, 1]


def test_harmful_ids_from_source_and_target_pairs_keep_source_weights(source_sae, sets):
    sae, _ = source_sae
    src_only, scores_src, _ = domain_features(sae, sets[0], [], POS, None, FeatureConfig(n_harmful=2))
    cfg = FeatureConfig(n_harmful=4, harmful_from=("source", "target"))
    both, scores, labels = domain_features(sae, sets[0], [], POS, None, cfg, [sets[0], sets[1]])
    ids = both["harmful_ids"]
    assert len(ids) == len(set(ids)) == 4 and ids[:2] == src_only["harmful_ids"]
    assert both["harmful_origin"] == ["source", "source", "target", "target"]
    assert set(both["harmful_smd_by_set"]) == {"source", "target"}
    u, s = pair_statistics(sae, sets[1], POS)
    target_smd = smd(u, s)
    assert int(target_smd.argmax()) in ids  # the target's most discriminative latent joins H
    assert both["harmful_smd_by_set"]["target"] == [round(float(v), 4) for v in target_smd[ids]]
    # the weights are still fit on the source pairs: the gate scores the source rows, as before
    assert len(scores) == len(scores_src) and scores[labels == 1].mean() > scores[labels == 0].mean()


def test_tau_keeps_benign_firing_at_or_below_the_target_rate():
    g = torch.Generator().manual_seed(0)
    maxima = {"a": torch.rand(300, generator=g), "b": torch.rand(300, generator=g) * 2}
    taus, rate = calibrate_tau(maxima, 0.01)
    assert rate <= 0.01 and rate == firing_rate(maxima, taus)
    # the union over positions counts: each alone would allow 3 firings, together only 3 in all
    assert sum(int((maxima[p] > taus[p]).sum()) for p in maxima) >= int(rate * 300)
    loose, _ = calibrate_tau(maxima, 0.2)
    assert all(loose[p] < taus[p] for p in maxima) and firing_rate(maxima, loose) <= 0.2
    zero, rate0 = calibrate_tau(maxima, 0.0)
    assert rate0 == 0.0 and all(zero[p] == float(maxima[p].max()) for p in maxima)


def test_sae_file_round_trip(source_sae, tmp_path):
    from safedig_core.training.sae_training import save_sae

    sae, _ = source_sae
    save_sae(sae, tmp_path / "s.safetensors")
    back = load_sae(tmp_path / "s.safetensors")
    x = torch.randn(5, D)
    assert back.encoder.k == sae.encoder.k and torch.equal(back(x)[0], sae(x)[0])


def test_harmful_activations_equal_the_full_encoding(source_sae):
    from safedig_core.training.features import harmful_activations

    sae, _ = source_sae
    x = torch.randn(200, D) * 3
    ids = [3, 7, 11, 20]
    torch.testing.assert_close(harmful_activations(sae, x, ids), sae.encode(x)[:, ids], rtol=0, atol=0)


def test_weights_are_non_negative_and_favour_the_informative_latent():
    from safedig_core.training.features import fit_weights

    g = torch.Generator().manual_seed(0)
    neg = torch.rand(300, 4, 3, generator=g)  # rows x tokens x harmful latents
    pos = torch.rand(100, 4, 3, generator=g)
    pos[:, 0, 0] += 1.0  # informative, on one token of each unsafe row (the gate takes the max over tokens)
    pos[:, :, 2] -= 0.5  # anti-informative: must get (almost) no weight, never a negative one
    w = fit_weights(pos, neg)
    assert (w > 0).all() and float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    assert w[0] > 0.8 and w[2] < 0.05
