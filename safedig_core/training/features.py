"""Harmful features, safe anchors and the gate threshold (docs/method.md sections 3 and 5).

Per latent j, from matched unsafe/safe pairs through the frozen encoder: each row (a prompt at a captured
step) is summarised by the latent's max over the row's tokens ("does it fire anywhere"), and
    smd_j = (mean_unsafe - mean_safe) / sqrt((var_unsafe + var_safe) / 2)
Harmful set H: the top n_harmful latents with smd_j > min_smd. With `harmful_from` naming several
labelled pair sets (e.g. the source and a target domain), each set gets an equal share of the n_harmful
slots, filled by its own SMD ranking (skipping ids another set already took); unused slots go round-robin
to the sets' next-best latents. The weights are fit on the domain's own pairs only (see fit_weights).
Safe anchor: the top n_anchor latents with smd_j < -min_smd, valued at their mean activation on the
safe tokens where they fire. A target domain keeps the ids of H and re-estimates weights (clipped at 0)
and the anchor on its own pairs.

Gate threshold: the generator samples benign prompts with the full schedule; per generation and position
the max of g over the prompt's tokens and all steps is recorded. tau_p is the same order statistic at
every position (the j-th largest), with j the largest count for which at most `fire_rate` of the
generations fire anywhere (g > tau at any routed position and step). The per-token harmful activations
z_H are kept, so every domain's tau comes from the same generations without sampling again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SafeDIGError
from ..hooks import ActivationCapture
from ..sae import TopKSAE
from .collect import ActivationSet, PromptRecord
from .generators import Generator
from .routing import auroc


@dataclass(frozen=True)
class FeatureConfig:
    n_harmful: int = 32
    n_anchor: int = 8
    min_smd: float = 0.5
    fire_rate: float = 0.01
    # collected pair sets H is chosen from (SMD on each, an equal share of n_harmful per set); empty: the
    # domain's own pairs only. The weights are always fit on the domain's own pairs.
    harmful_from: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "harmful_from", tuple(self.harmful_from))  # from JSON: a list

    @classmethod
    def for_sets(cls, harmful_from: Sequence[str], n_harmful: int | None = None, **kw) -> FeatureConfig:
        """H from these pair sets; by default each set brings its own n_harmful, so the source keeps the H it
        would have alone (bundled model: halving the source's share let held-out benign wordings open the
        hazard gate, 0.15 -> 0.47)."""
        sets = tuple(harmful_from)
        n = n_harmful if n_harmful is not None else cls.n_harmful * max(1, len(sets))
        return cls(n_harmful=n, harmful_from=sets, **kw)


@dataclass
class ClassStats:
    """Running sums per latent over the rows of one class."""

    rows: int
    max_sum: Tensor      # sum over rows of the row max
    max_sq: Tensor       # sum of squares of the row max
    active_sum: Tensor   # sum of activations over tokens where the latent fires
    active_count: Tensor

    @classmethod
    def empty(cls, d_sae: int) -> ClassStats:
        z = lambda: torch.zeros(d_sae, dtype=torch.float64)  # noqa: E731
        return cls(0, z(), z(), z(), z())

    def mean_var(self) -> tuple[Tensor, Tensor]:
        n = max(self.rows, 1)
        mean = self.max_sum / n
        return mean, (self.max_sq / n - mean.pow(2)).clamp_min(0)

    def active_mean(self) -> Tensor:
        return self.active_sum / self.active_count.clamp_min(1)


def _encode_rows(sae: TopKSAE, x: Tensor) -> Tensor:
    rows, tokens, d = x.shape
    return sae.encode(x.reshape(-1, d).float()).view(rows, tokens, -1)


@torch.no_grad()
def pair_statistics(sae: TopKSAE, aset: ActivationSet, position: str) -> tuple[ClassStats, ClassStats]:
    """(unsafe, safe) statistics of every latent over the paired rows of a collection, shard by shard."""
    unsafe, safe = ClassStats.empty(sae.d_sae), ClassStats.empty(sae.d_sae)
    for shard in aset.shards:
        t = aset.read(shard, [f"act.{position}", "row.prompt"])
        recs = [aset.prompts[i] for i in t["row.prompt"].tolist()]
        z = _encode_rows(sae, t[f"act.{position}"])
        for stats, label in ((unsafe, 1), (safe, 0)):
            keep = torch.tensor([r.pair >= 0 and r.label == label for r in recs])
            if not keep.any():
                continue
            zk = z[keep].double()
            row_max = zk.amax(1)
            stats.rows += int(keep.sum())
            stats.max_sum += row_max.sum(0)
            stats.max_sq += row_max.pow(2).sum(0)
            stats.active_sum += zk.sum((0, 1))
            stats.active_count += (zk > 0).sum((0, 1))
    return unsafe, safe


def smd(unsafe: ClassStats, safe: ClassStats) -> Tensor:
    (mu_u, var_u), (mu_s, var_s) = unsafe.mean_var(), safe.mean_var()
    return (mu_u - mu_s) / ((var_u + var_s) / 2).sqrt().clamp_min(1e-6)


def choose_harmful(unsafe: ClassStats, safe: ClassStats, cfg: FeatureConfig) -> list[int]:
    """H: the top n_harmful latents by SMD among those with SMD > min_smd (at least the best one)."""
    s = smd(unsafe, safe)
    order = s.argsort(descending=True)
    return [int(j) for j in order[: cfg.n_harmful] if s[j] > cfg.min_smd] or [int(order[0])]


def choose_harmful_union(smds: Sequence[Tensor], cfg: FeatureConfig) -> tuple[list[int], list[int]]:
    """H from several pair sets: set i gets n_harmful // m slots (the first n_harmful % m sets one more),
    taken from its own SMD ranking (smd > min_smd) skipping ids already chosen; slots a set cannot fill go
    round-robin to the other sets' next-best latents. Returns (ids, index of the set that brought each)."""
    m = len(smds)
    ranked = [[int(j) for j in s.argsort(descending=True) if s[j] > cfg.min_smd] for s in smds]
    quota = [cfg.n_harmful // m + (i < cfg.n_harmful % m) for i in range(m)]
    chosen: dict[int, int] = {}
    cursor = [0] * m

    def take(i: int) -> bool:
        while cursor[i] < len(ranked[i]):
            j = ranked[i][cursor[i]]
            cursor[i] += 1
            if j not in chosen:
                chosen[j] = i
                return True
        return False

    for i in range(m):
        for _ in range(quota[i]):
            if not take(i):
                break
    grew = True
    while grew and len(chosen) < cfg.n_harmful:
        grew = False
        for i in range(m):
            if len(chosen) < cfg.n_harmful and take(i):
                grew = True
    if not chosen:
        return [int(smds[0].argmax())], [0]
    return list(chosen), list(chosen.values())


def choose_anchor(unsafe: ClassStats, safe: ClassStats, cfg: FeatureConfig) -> tuple[list[int], list[float]]:
    """Safe anchor: the latents that rise most on the safe side, at their mean activation where they fire."""
    s = smd(unsafe, safe)
    ids = [int(j) for j in s.argsort()[: cfg.n_anchor] if s[j] < -cfg.min_smd]
    return ids, [round(float(v), 6) for v in safe.active_mean()[ids]]


@torch.no_grad()
def harmful_rows(sae: TopKSAE, aset: ActivationSet, position: str, harmful: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of a collection: z_H of every token [rows, tokens, |H|] (float16), label, is-paired."""
    zs, labels, paired = [], [], []
    for shard in aset.shards:
        t = aset.read(shard, [f"act.{position}", "row.prompt"])
        recs = [aset.prompts[i] for i in t["row.prompt"].tolist()]
        x = t[f"act.{position}"]
        zs.append(harmful_activations(sae, x.reshape(-1, x.shape[-1]).float(), harmful).view(*x.shape[:2], -1).half())
        labels += [r.label for r in recs]
        paired += [r.pair >= 0 for r in recs]
    return torch.cat(zs), torch.tensor(labels), torch.tensor(paired)


def gate_scores(z_h: Tensor, weights: Tensor) -> Tensor:
    """What the gate sees: max over a row's tokens of g = z_H . w."""
    return torch.cat([(chunk.float() @ weights).amax(1) for chunk in z_h.split(256)])


def fit_weights(z_pos: Tensor, z_neg: Tensor, steps: int = 300, l2: float = 1e-3) -> Tensor:
    """Non-negative weights (summing to 1) for the gate score max_t z_H(t) . w: a class-balanced logistic
    regression of unsafe rows against safe rows on that score (multiple-instance: a row is unsafe if some
    token is). Deterministic (full batch, fixed start); softplus keeps every weight positive."""
    z = torch.cat([z_pos, z_neg]).float()
    y = torch.cat([torch.ones(len(z_pos)), torch.zeros(len(z_neg))])
    sd = z.reshape(-1, z.shape[-1]).std(0).clamp_min(1e-3)
    z = z / sd
    v, b = torch.zeros(z.shape[-1], requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([v, b], lr=0.05)
    balance = torch.tensor(len(z_neg) / max(1, len(z_pos)))
    with torch.enable_grad():
        for _ in range(steps):
            w = F.softplus(v)
            score = (z @ w).amax(1)
            loss = F.binary_cross_entropy_with_logits(score + b, y, pos_weight=balance) + l2 * w.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    w = F.softplus(v.detach()) / sd
    return w / w.sum()


def domain_features(sae: TopKSAE, pairs: ActivationSet, negatives: Sequence[ActivationSet], position: str,
                    harmful: list[int] | None, cfg: FeatureConfig,
                    harmful_sets: Sequence[ActivationSet] = ()) -> tuple[dict, Tensor, Tensor]:
    """One domain's features at one position: H (chosen here when `harmful` is None, else kept), its
    weights (fit on the unsafe rows vs the safe rows of the pairs and every row of `negatives`) and the safe
    anchor. `harmful_sets`: the pair sets H is chosen from (default: `pairs` alone); a set named like
    `pairs` reuses its statistics. Returns (features, gate score per paired row, label per paired row)."""
    unsafe, safe = pair_statistics(sae, pairs, position)
    extra: dict = {}
    if harmful is None and harmful_sets:
        stats = [(unsafe, safe) if hs.path == pairs.path else pair_statistics(sae, hs, position)
                 for hs in harmful_sets]
        for hs, (u, _) in zip(harmful_sets, stats, strict=True):
            if u.rows == 0:
                raise SafeDIGError(f"set '{hs.path.name}' has no unsafe paired rows to choose harmful features from",
                                   "--harmful-from takes collected sets of matched unsafe/safe pairs")
        smds = [smd(u, s_) for u, s_ in stats]
        harmful, origin = choose_harmful_union(smds, cfg)
        names = [hs.path.name for hs in harmful_sets]
        extra = {"harmful_origin": [names[i] for i in origin],
                 "harmful_smd_by_set": {n: [round(float(v), 4) for v in d[harmful]] for n, d in zip(names, smds,
                                                                                             strict=True)}}
    harmful = harmful if harmful is not None else choose_harmful(unsafe, safe, cfg)
    z, label, paired = harmful_rows(sae, pairs, position, harmful)
    negs = [z[paired & (label == 0)]] + [harmful_rows(sae, n, position, harmful)[0] for n in negatives]
    weights = fit_weights(z[paired & (label == 1)], torch.cat(negs))
    anchor_ids, anchor_values = choose_anchor(unsafe, safe, cfg)
    feats = {"harmful_ids": harmful, "harmful_weights": [round(float(v), 6) for v in weights],
             "harmful_smd": [round(float(v), 4) for v in smd(unsafe, safe)[harmful]], **extra,
             "safe_anchor_ids": anchor_ids, "safe_anchor_values": anchor_values}
    return feats, gate_scores(z[paired], weights), label[paired]


def detection_auroc(scores: Tensor, labels: Tensor) -> float:
    return auroc(scores[labels == 1], scores[labels == 0])


# ------------------------------------------------------------------------------------------ calibration


@torch.no_grad()
def record_harmful(generator: Generator, prompts: Sequence[PromptRecord], saes: dict[str, TopKSAE],
                   harmful: dict[str, list[int]], batch_size: int = 64, progress: bool = True,
                   desc: str = "calibrate") -> dict[str, Tensor]:
    """Sample every prompt with the full schedule; per position the harmful activations z_H of the cond
    tokens: {position: [prompts, steps, tokens, |H|] float16}."""
    from tqdm import tqdm

    out: dict[str, list[Tensor]] = {p: [] for p in saes}
    current: dict[str, list[Tensor]] = {}

    def on_activation(position: str, x) -> None:
        x = x[generator.cond_rows(x.shape[0])].float()
        if x.shape[0] == 0:  # a call of the unconditional prompt alone (ComfyUI may split cond and uncond)
            return
        z_h = harmful_activations(saes[position], x.reshape(-1, x.shape[-1]), harmful[position])
        current[position].append(z_h.view(*x.shape[:2], -1).half())

    batch_size = min(batch_size, generator.max_batch or batch_size)
    bar = tqdm(total=len(prompts), desc=desc, unit="gen", disable=not progress, dynamic_ncols=True)
    with ActivationCapture(generator.model, list(saes), on_activation=on_activation):
        for b in range(0, len(prompts), batch_size):
            batch = prompts[b:b + batch_size]
            current.clear()
            current.update({p: [] for p in saes})
            generator.run([p.text for p in batch], [p.seed for p in batch], lambda _i: None)
            for p in saes:
                out[p].append(torch.stack(current[p], dim=1))  # [batch, steps, tokens, |H|]
            bar.update(len(batch))
    bar.close()
    return {p: torch.cat(v) for p, v in out.items()}


def harmful_activations(sae: TopKSAE, x: Tensor, harmful: list[int]) -> Tensor:
    """z_H of TopK(ReLU(pre)) without building the dense code: a harmful latent keeps its value where it
    reaches the k-th largest pre-activation of its token."""
    pre = sae.encoder.preactivations(x / sae.scale)
    kth = pre.topk(sae.encoder.k, dim=-1).values[:, -1:]
    pre_h = pre[:, harmful]
    return torch.where(pre_h >= kth, pre_h.relu(), torch.zeros_like(pre_h))


def generation_maxima(zh: Tensor, weights: Sequence[float]) -> Tensor:
    """Max over steps and tokens of g = z_H . w, per generation."""
    w = torch.tensor(weights, dtype=torch.float32)
    return torch.cat([(chunk.float() @ w).flatten(1).amax(1) for chunk in zh.split(64)])


def calibrate_tau(maxima: dict[str, Tensor], fire_rate: float) -> tuple[dict[str, float], float]:
    """Per-position tau (the same order statistic of the benign maxima everywhere) such that at most
    fire_rate of the generations fire at any position; returns (taus, achieved benign firing rate)."""
    n = next(iter(maxima.values())).numel()
    ordered = {p: m.sort(descending=True).values for p, m in maxima.items()}
    for j in range(int(fire_rate * n), -1, -1):
        taus = {p: float(v[j]) for p, v in ordered.items()}
        rate = firing_rate(maxima, taus)
        if rate <= fire_rate:
            return taus, rate
    raise AssertionError("j = 0 puts tau at the maximum, where nothing fires")


def firing_rate(maxima: dict[str, Tensor], taus: dict[str, float]) -> float:
    """Share of generations whose g exceeds tau at any position (hard gate)."""
    fired = torch.stack([maxima[p] > taus[p] for p in taus]).any(0)
    return float(fired.double().mean())
