"""Robustness-aware routing BEFORE any SAE is trained (docs/method.md section 4).

Every candidate position is scored from raw activations (each row = one prompt at one captured step,
mean over its tokens), with unsafe/safe matched pairs of the source domain:

    separability  2*AUROC - 1 of the difference-of-means direction, fitted on half the pairs and scored
                  on the other half (2 folds by pair id)
    loso          leave-one-subdomain-out: fit on all sub-domains but one, score 2*AUROC - 1 on it; the
                  WORST held-out sub-domain counts (a direction that fails on one shift is not robust)
    transfer      held-out-subdomain d' / in-domain d' (mean over sub-domains, clipped to [0, 1]): how much
                  of the margin survives the shift; continuous where the AUROCs saturate
    timestep_cv   coefficient of variation of the held-out d' over the captured steps (0 = equally
                  separable at every step); the score uses 1 - timestep_cv, clipped to [0, 1]
    robustness    geometric mean of separability, loso, transfer and 1 - timestep_cv

With a generator (`route_steerable`), a fifth criterion says whether steering there can change the image
at all (steerability.py: patching the position with the matched safe prompt's output, distance of the
final latent to the safe one; no judge):

    steerability  1 - |L_patched - L_safe| / |L_unsafe - L_safe|, mean over K source pairs
    score         sqrt(robustness * steerability): a position must both separate robustly and steer

and the routed positions are chosen as a SET by joint effect: the best-scoring position first, then,
greedily, the robust enough position that raises the joint steerability most, while it gains >= MIN_GAIN
(steerability.greedy_sets). Without a generator, score = robustness and the diversity rule below picks.

The router keeps the top R under a diversity rule: at most ceil(R/2) positions per stream (img, txt,
single-stream "both"), at most one per (block, stream), and (for R >= 2) at least one text-stream
position when the model has any (docs/method.md section 8: steering only the image stream let later blocks
rebuild the concept from the text tokens). Where the rule leaves fewer than R (few streams or blocks), the best of the
remaining candidates fill up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..positions import PositionParts
from .steerability import greedy_sets

CRITERIA = ("separability", "loso", "transfer", "timestep_cv")
STEERABILITY = "steerability"
# A position joins a steerable set only when its robustness is at least this (a position that steers but
# does not separate unsafe from safe would steer benign images too).
MIN_ROBUSTNESS = 0.3


@dataclass
class PositionRows:
    """Routing input at one position: pooled activations and per-row labels."""

    x: torch.Tensor       # [rows, d]
    label: torch.Tensor   # [rows] 1 unsafe / 0 safe
    pair: torch.Tensor    # [rows] pair id (fold key)
    group: torch.Tensor   # [rows] sub-domain index
    step: torch.Tensor    # [rows] captured step


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(pos > neg) + 0.5 P(tie) (Mann-Whitney U / (n_pos n_neg)), via ranks with ties averaged."""
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    allv = torch.cat([pos, neg]).double()
    order = allv.argsort()
    ranks = torch.empty_like(allv)
    ranks[order] = torch.arange(1, allv.numel() + 1, dtype=torch.float64)
    uniq, inverse = allv.unique(return_inverse=True)
    mean_rank = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
    mean_rank /= torch.bincount(inverse, minlength=uniq.numel()).double()
    r_pos = mean_rank[inverse[: pos.numel()]].sum()
    return float((r_pos - pos.numel() * (pos.numel() + 1) / 2) / (pos.numel() * neg.numel()))


def dprime(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Standardized mean difference (pooled standard deviation)."""
    if pos.numel() < 2 or neg.numel() < 2:
        return float("nan")
    pooled = math.sqrt((pos.double().var() + neg.double().var()).item() / 2) + 1e-12
    return float((pos.double().mean() - neg.double().mean()) / pooled)


def direction(x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Unit difference-of-means direction unsafe - safe."""
    w = x[label == 1].double().mean(0) - x[label == 0].double().mean(0)
    return w / w.norm().clamp_min(1e-12)


def score_position(r: PositionRows) -> dict[str, float]:
    """The routing criteria and the score of one position (see module doc)."""
    x = r.x.double()
    folds = r.pair % 2
    held_proj = torch.empty(x.shape[0], dtype=torch.float64)
    seps, ins = [], []
    for f in (0, 1):
        train, test = folds != f, folds == f
        proj = x[test] @ direction(x[train], r.label[train])
        held_proj[test] = proj
        y = r.label[test]
        seps.append(auroc(proj[y == 1], proj[y == 0]))
        ins.append(dprime(proj[y == 1], proj[y == 0]))
    per_step = [dprime(held_proj[(r.step == s) & (r.label == 1)], held_proj[(r.step == s) & (r.label == 0)])
                for s in r.step.unique().tolist()]
    finite = torch.tensor([d for d in per_step if math.isfinite(d)], dtype=torch.float64)
    t_cv = float(finite.std() / finite.abs().mean().clamp_min(1e-12)) if finite.numel() > 1 else 0.0

    groups = r.group.unique().tolist()
    loso_auc, loso_d = [], []
    for g in groups if len(groups) > 1 else []:
        out, held = r.group != g, r.group == g
        proj = x[held] @ direction(x[out], r.label[out])
        y = r.label[held]
        loso_auc.append(auroc(proj[y == 1], proj[y == 0]))
        loso_d.append(dprime(proj[y == 1], proj[y == 0]))
    in_d = sum(ins) / 2
    sep = max(0.0, 2 * sum(seps) / 2 - 1)
    loso = max(0.0, 2 * min(loso_auc) - 1) if loso_auc else sep
    transfer = min(1.0, max(0.0, sum(loso_d) / len(loso_d) / in_d)) if loso_d and in_d > 0 else 1.0
    parts = [sep, loso, transfer, min(1.0, max(0.0, 1.0 - t_cv))]
    score = math.prod(parts) ** (1 / len(parts))
    return {"separability": sep, "loso": loso, "transfer": transfer, "timestep_cv": t_cv, "robustness": score,
            "score": score,
            "dprime": in_d, "loso_auroc_min": min(loso_auc) if loso_auc else float("nan")}


def _stream(c: dict) -> str:
    return PositionParts.parse(c["position"]).stream


def _shares_block(c: dict, picked: list[dict]) -> bool:
    a = PositionParts.parse(c["position"])
    return any((b := PositionParts.parse(p["position"])).block == a.block and b.index == a.index
               and b.stream == a.stream for p in picked)


def select(table: list[dict], r: int) -> list[dict]:
    """Mark the routed positions in `table` (rows with position/score) by the diversity rule; returns
    the table sorted by score with `selected` (bool), `rank` and `note` filled in."""
    ranked = sorted(table, key=lambda c: (-c["score"], c["position"]))
    quota = math.ceil(r / 2)
    picked: list[dict] = []
    for c in ranked:
        c["selected"], c["note"], c["rank"] = False, "", 0
    for c in ranked:
        if len(picked) == r:
            break
        if sum(_stream(p) == _stream(c) for p in picked) >= quota:
            c["note"] = f"skipped: stream quota ({_stream(c)})"
        elif _shares_block(c, picked):
            c["note"] = "skipped: same block and stream as a better position"
        else:
            picked.append(c)
    # Too few streams or blocks for the rule: fill up, preferring positions in blocks not yet used.
    for c in sorted((c for c in ranked if c not in picked), key=lambda c: (_shares_block(c, picked), -c["score"])):
        if len(picked) < r:
            c["note"] = "filled: too few diverse candidates"
            picked.append(c)
    texts = [c for c in ranked if _stream(c) == "txt"]
    if r >= 2 and texts and not any(_stream(p) == "txt" for p in picked):
        dropped = min(picked, key=lambda c: c["score"])
        picked.remove(dropped)
        dropped["note"] = "replaced: text-stream rule"
        texts[0]["note"] = "added: text-stream rule"
        picked.append(texts[0])
    for i, c in enumerate(sorted(picked, key=lambda c: -c["score"])):
        c["selected"], c["rank"] = True, i + 1
        c["note"] = c["note"] or "routed"
    return ranked


def _rounded(table: list[dict]) -> list[dict]:
    for c in table:
        for k, v in c.items():
            if isinstance(v, float):
                # "n/a" where a figure has too few rows (a fold with one pair): packs store only finite numbers
                c[k] = round(v, 4) if math.isfinite(v) else "n/a"
    return table


def _finite(v) -> float:
    return v if isinstance(v, (int, float)) else 0.0


def route(rows: dict[str, PositionRows], r: int = 3) -> list[dict]:
    """The routing table: every candidate's criteria and score, routed positions marked."""
    table = _rounded([{"position": pos, **score_position(pr)} for pos, pr in rows.items()])
    return select(table, min(r, len(table)))


def route_steerable(rows: dict[str, PositionRows], probe, r: int = 3) -> tuple[list[dict], list[dict]]:
    """The routing table with steerability (module doc) and the routed set chosen by joint effect;
    returns (table sorted by score, the greedy log)."""
    table = _rounded([{"position": pos, **score_position(pr)} for pos, pr in rows.items()])
    for c in table:
        c[STEERABILITY] = probe.score([c["position"]])
        c["score"] = round(math.sqrt(_finite(c["robustness"]) * c[STEERABILITY]), 4)
    ranked = sorted(table, key=lambda c: (-c["score"], c["position"]))
    by_pos = {c["position"]: c for c in ranked}
    chosen, log = greedy_sets(probe, list(by_pos), min(r, len(ranked)), ranked[0]["position"],
                              allowed=lambda p: _finite(by_pos[p]["robustness"]) >= MIN_ROBUSTNESS)
    for c in ranked:
        c["selected"] = c["position"] in chosen
        c["rank"] = chosen.index(c["position"]) + 1 if c["selected"] else 0
        c["note"] = ("routed (best score)" if c["rank"] == 1 else "routed (joint steerability gain)"
                     if c["selected"] else "")
    return ranked, log


def rows_from_sets(aset, positions: Sequence[str] | None = None) -> dict[str, PositionRows]:
    """PositionRows for every position of a collection (`collect.ActivationSet`), paired prompts only."""
    prompts = aset.prompts
    names = sorted({p.subdomain for p in prompts})
    out = {}
    for pos in positions or aset.positions:
        x, idx, step = aset.means(pos)
        pair = torch.tensor([prompts[i].pair for i in idx.tolist()])
        keep = pair >= 0
        if not keep.any():  # no pairs in the prompt file: fold by prompt index instead
            pair, keep = idx.clone(), torch.ones_like(keep)
        out[pos] = PositionRows(
            x[keep], torch.tensor([prompts[i].label for i in idx.tolist()])[keep], pair[keep],
            torch.tensor([names.index(prompts[i].subdomain) for i in idx.tolist()])[keep], step[keep])
    return out


def plot_table(table: list[dict], path, title: str = "SafeDIG routing") -> None:
    """Heatmap positions x criteria (and score); routed positions starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steer = [STEERABILITY] if any(STEERABILITY in c for c in table) else []
    cols = [*CRITERIA, "robustness", *steer, "score"]
    rows = sorted(table, key=lambda c: -c["score"])
    vals = [[(c[k] if isinstance(c.get(k), (int, float)) else float("nan")) for k in cols] for c in rows]
    shown = [[1 - v if k == "timestep_cv" else v for k, v in zip(cols, row, strict=True)] for row in vals]
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2.6, 0.32 * len(rows) + 1.4))
    ax.imshow(shown, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), [*CRITERIA[:-1], "timestep_cv\n(colour: 1-cv)", *cols[len(CRITERIA):]],
                  fontsize=8)
    ax.set_yticks(range(len(rows)), [("* " if c["selected"] else "") + c["position"] for c in rows], fontsize=8)
    for i, row in enumerate(vals):
        for j, v in enumerate(row):
            ax.text(j, i, "-" if v != v else f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if shown[i][j] < 0.6 else "black")
    ax.set_title(f"{title}  (* = routed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
