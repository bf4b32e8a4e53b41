"""Pre-SAE routing: criteria on planted directions, the diversity rule, the table and its plot."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from planted import SUBDOMAINS, paired_prompts, write_set

from safedig_core.training.collect import ActivationSet
from safedig_core.training.routing import PositionRows, auroc, plot_table, route, rows_from_sets, score_position, select

D = 16


def planted_rows(kind: str, n_pairs: int = 40, steps=(0, 1, 2, 3), seed: int = 0) -> PositionRows:
    """Pairs whose unsafe member is shifted along a planted direction:
    stable    the same direction in every sub-domain and at every step (moderate shift)
    unstable  a different direction per sub-domain (larger shift: MORE separable within the domain)
    temporal  the stable direction, but only at the first captured step
    noise     no shift at all"""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0].T  # orthonormal rows
    common, per_sub = basis[0], basis[1:1 + len(SUBDOMAINS)]
    xs, labels, pairs, groups, step_ids = [], [], [], [], []
    for p in range(n_pairs * len(SUBDOMAINS)):
        sub = p % len(SUBDOMAINS)
        for s in steps:
            base = torch.randn(D, generator=g)
            for label in (1, 0):
                x = base + 0.5 * torch.randn(D, generator=g)
                if label and kind == "stable":
                    x = x + 2.5 * common
                elif label and kind == "unstable":
                    x = x + 5.0 * per_sub[sub]
                elif label and kind == "temporal" and s == steps[0]:
                    x = x + 3.0 * common
                xs.append(x)
                labels.append(label)
                pairs.append(p)
                groups.append(sub)
                step_ids.append(s)
    t = lambda v: torch.tensor(v)  # noqa: E731
    return PositionRows(torch.stack(xs), t(labels), t(pairs), t(groups), t(step_ids))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=12), st.lists(st.integers(-3, 3), min_size=1, max_size=12))
def test_auroc_is_the_pairwise_win_rate(pos, neg):
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    assert auroc(torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64)) == pytest.approx(
        wins / (len(pos) * len(neg)))


def test_routing_prefers_the_stable_direction_over_an_unstable_one():
    stable, unstable = score_position(planted_rows("stable")), score_position(planted_rows("unstable"))
    temporal, noise = score_position(planted_rows("temporal")), score_position(planted_rows("noise"))
    # Within the domain the unstable direction separates at least as well...
    assert unstable["dprime"] > stable["dprime"]
    # ...but it does not carry over to a held-out sub-domain, so routing ranks it below the stable one.
    assert unstable["loso"] < 0.3 < 0.8 < stable["loso"]
    assert stable["score"] > unstable["score"] + 0.3
    assert temporal["timestep_cv"] > 0.8 > 0.3 > stable["timestep_cv"]
    assert stable["score"] > temporal["score"]
    assert noise["score"] < 0.3 and noise["separability"] < 0.3

    table = route({"double.0.img.attn": planted_rows("unstable"), "double.1.img.attn": planted_rows("temporal"),
                   "double.0.img.mlp": planted_rows("stable"), "double.1.img.mlp": planted_rows("noise")}, r=1)
    assert [c["position"] for c in table if c["selected"]] == ["double.0.img.mlp"]
    assert table[0]["position"] == "double.0.img.mlp" and table[0]["rank"] == 1


def test_routing_from_a_collection_folder(tmp_path):
    prompts = paired_prompts(6)
    rows = {pos: planted_rows(kind, n_pairs=6, steps=(0, 1, 2)) for pos, kind in
            (("double.0.img.attn", "stable"), ("double.0.txt.attn", "unstable"))}
    index = {}  # (prompt index, step) -> row of the planted tensors; prompts are (unsafe, safe) per pair
    for pos, r in rows.items():
        for i in range(r.x.shape[0]):
            index[(pos, 2 * int(r.pair[i]) + (1 - int(r.label[i])), int(r.step[i]))] = r.x[i]

    def make(pos, prompt, step):
        j = 2 * prompt.pair + (1 - prompt.label)
        return index[(pos, j, step)].expand(4, D)

    path = write_set(tmp_path / "source", prompts, make, positions=list(rows), steps=(0, 1, 2))
    from_files = rows_from_sets(ActivationSet(path))
    for pos in rows:
        direct, files = score_position(rows[pos]), score_position(from_files[pos])
        assert files["loso"] == pytest.approx(direct["loso"], abs=0.05), pos
    table = route(from_files, r=2)
    assert {c["position"]: c["selected"] for c in table} == {"double.0.img.attn": True, "double.0.txt.attn": True}
    assert table[0]["position"] == "double.0.img.attn"


def _candidates(scores: dict[str, float]) -> list[dict]:
    return [{"position": p, "score": s} for p, s in scores.items()]


def test_diversity_rule_limits_a_stream_and_keeps_the_text_stream():
    table = select(_candidates({"double.1.img.mlp": 0.9, "double.0.img.mlp": 0.85, "double.1.img.attn": 0.8,
                                "single.0.out": 0.7, "single.1.out": 0.65, "double.0.txt.mlp": 0.3}), r=3)
    chosen = {c["position"]: c["note"] for c in table if c["selected"]}
    # img quota ceil(3/2) = 2, then the best text-stream position replaces the weakest pick
    assert set(chosen) == {"double.1.img.mlp", "double.0.img.mlp", "double.0.txt.mlp"}
    assert chosen["double.0.txt.mlp"] == "added: text-stream rule"
    notes = {c["position"]: c["note"] for c in table}
    assert notes["double.1.img.attn"].startswith("skipped")
    assert notes["single.0.out"] == "replaced: text-stream rule"
    assert [c["rank"] for c in table if c["selected"]] == [1, 2, 3]


def test_diversity_rule_without_text_candidates_is_plain_top_r():
    table = select(_candidates({"joint.0.img.mlp": 0.2, "joint.1.img.attn": 0.9, "joint.1.img.mlp": 0.5}), r=2)
    assert [c["position"] for c in table if c["selected"]] == ["joint.1.img.attn", "joint.0.img.mlp"]


def test_plot_shows_every_candidate(tmp_path):
    table = route({"double.0.img.attn": planted_rows("stable", 10), "double.0.txt.mlp": planted_rows("noise", 10)})
    path = tmp_path / "routing.png"
    plot_table(table, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(math.isfinite(c["score"]) for c in table)


class _TableProbe:
    """Steerability of position sets from a table (the set's frozenset -> value): routing logic alone."""

    def __init__(self, values: dict):
        self.values = {frozenset(k): v for k, v in values.items()}

    def score(self, positions):
        return self.values.get(frozenset(positions), 0.0)


def test_steerable_routing_ranks_by_steerability_and_grows_the_set_only_on_a_real_gain():
    from safedig_core.training.routing import route_steerable

    rows = {"double.0.img.attn": planted_rows("stable"), "double.0.txt.mlp": planted_rows("stable", seed=1),
            "single.0.out": planted_rows("stable", seed=2)}
    probe = _TableProbe({("double.0.txt.mlp",): 0.8, ("double.0.img.attn",): 0.3, ("single.0.out",): 0.5,
                         ("double.0.txt.mlp", "single.0.out"): 0.95,  # +0.15: joins
                         ("double.0.txt.mlp", "double.0.img.attn"): 0.85,
                         ("double.0.txt.mlp", "single.0.out", "double.0.img.attn"): 0.97})  # +0.02: does not
    table, log = route_steerable(rows, probe, r=3)
    assert table[0]["position"] == "double.0.txt.mlp" and table[0]["steerability"] == 0.8
    assert {c["position"] for c in table if c["selected"]} == {"double.0.txt.mlp", "single.0.out"}
    assert "stopped" in log[-1] and log[-1]["best"] == "double.0.img.attn"
    assert all(c["score"] == round(math.sqrt(c["robustness"] * c["steerability"]), 4) for c in table)


def test_steerability_of_the_bundled_model_is_zero_unpatched_and_highest_at_the_text_input():
    from safedig_core.training.collect import world_prompts
    from safedig_core.training.generators import BundledGenerator
    from safedig_core.training.steerability import SteerabilityProbe, matched_pairs

    torch.set_num_threads(1)
    gen = BundledGenerator(steps=8)
    pairs = matched_pairs(world_prompts("source", 2, seed=0), 6)
    assert len(pairs) == 6 and len({u.subdomain for u, _ in pairs}) == 3  # spread over the sub-domains
    probe = SteerabilityProbe(gen, pairs, ["input.txt", "double.1.img.mlp"])
    assert probe.score([]) == 0.0  # nothing patched: the unsafe run itself
    text, mlp = probe.score(["input.txt"]), probe.score(["double.1.img.mlp"])
    assert 0.4 < text <= 1.0 and 0.0 <= mlp < text
