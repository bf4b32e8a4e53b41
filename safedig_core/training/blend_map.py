"""The learned Blend target (docs/method.md section 6): where a harmful SAE code should go, fit on the
matched pairs a build already collects.

For each unsafe/safe pair (same seed, same captured step), every token of the unsafe prompt is paired
with a token of the safe prompt: the same token on image positions; on text positions, the token a
monotone alignment by activation similarity picks (`align_tokens`: the safe caption is the unsafe one with
its concept phrase swapped, so the words before and after the phrase line up and the phrase maps onto the
counterpart's phrase). On the unsafe tokens where a harmful latent fires, a ridge regression fits

    M  [|H|, d_sae]   with   z_H(x_unsafe) M  ~  E(x_safe) - z_rest(x_unsafe)

(z_rest: the unsafe token's code with its harmful latents zeroed), so that Blend replaces z_H by the code
the matched safe token has: D(z_rest + z_H M) ~ D(E(x_safe)). Tokens whose harmful latents are silent
are not touched (z_H = 0 gives no change), so background tokens stay as they are. The map is fit per
domain, on that domain's own pairs, and decoded with that domain's decoder when steering.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import SafeDIGError
from ..pack import (
    BLEND_AFFINE,
    BLEND_MAP,
    BLEND_TARGET_VERSION,
    K_BLEND_TARGET,
    K_DOMAINS,
    K_FEATURES,
    K_FORMAT_VERSION,
    DictionaryPack,
    blend_affine_key,
    blend_map_key,
)
from ..positions import PositionParts
from ..sae import TopKSAE
from .collect import ActivationSet

# Ridge strength, relative to the mean diagonal of Z_H^T Z_H: enough to keep rarely firing latents from
# taking huge weights, small next to the signal of the latents that fire.
RIDGE = 1e-2
# Largest forward jump of the text alignment per unsafe token: a shorter safe phrase skips up to this many
# of its tokens at once.
MAX_JUMP = 3


def aligns_tokens(position: str) -> bool:
    """Whether `position` holds text tokens whose order shifts between a caption and its matched one."""
    return PositionParts.parse(position).stream == "txt"  # input.txt parses as stream "txt" too


def align_tokens(x_unsafe: Tensor, x_safe: Tensor, max_jump: int = MAX_JUMP) -> Tensor:
    """For each unsafe token i, the safe token j(i) of the best monotone alignment (j(0) = 0, j(last) =
    last, 0 <= j(i+1) - j(i) <= max_jump) by cosine similarity; [T_unsafe] long."""
    a = torch.nn.functional.normalize(x_unsafe.double(), dim=-1)
    b = torch.nn.functional.normalize(x_safe.double(), dim=-1)
    cost = 1.0 - a @ b.T                                   # [T_u, T_s]
    t_u, t_s = cost.shape
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    total = torch.full((t_u, t_s), float("inf"), dtype=torch.float64)
    back = torch.zeros((t_u, t_s), dtype=torch.long)
    total[0, 0] = cost[0, 0]
    for i in range(1, t_u):
        prev = total[i - 1]
        # candidates[k, j] = total[i-1, j-k]: the previous token k places back (or inf before the start)
        candidates = torch.stack([torch.cat([inf.expand(k), prev[: t_s - k]]) for k in range(max_jump + 1)])
        best, jump = candidates.min(0)
        total[i] = cost[i] + best
        back[i] = jump
    if not torch.isfinite(total[-1, -1]):
        return torch.arange(t_u).clamp(max=t_s - 1)  # too long a gap for the jump limit: same index
    out = torch.empty(t_u, dtype=torch.long)
    j = t_s - 1
    for i in range(t_u - 1, -1, -1):
        out[i] = j
        j -= int(back[i, j])
    return out


def _pair_rows(aset: ActivationSet, position: str):
    """Yield (unsafe tokens [T, d], safe tokens [T', d]) for every matched pair and captured step, shard by
    shard; rows whose partner sits in a later shard wait for it."""
    prompts = aset.prompts
    waiting: dict[tuple[int, int, int], Tensor] = {}
    for shard in aset.shards:
        t = aset.read(shard, [f"act.{position}", "row.prompt", "row.step"])
        for x, i, step in zip(t[f"act.{position}"], t["row.prompt"].tolist(), t["row.step"].tolist(), strict=True):
            rec = prompts[i]
            if rec.pair < 0:
                continue
            partner = waiting.pop((rec.pair, step, 1 - rec.label), None)
            if partner is None:
                waiting[(rec.pair, step, rec.label)] = x
            else:
                yield (x, partner) if rec.label == 1 else (partner, x)


def _active_tokens(sae: TopKSAE, sets: Sequence[ActivationSet], position: str, harmful: Tensor):
    """Yield (codes [n, d_sae], activations [n, d_model], aligned safe activations [n, d_model]) of the unsafe
    tokens of every matched pair (and captured step) of `sets` where a harmful latent fires."""
    align = aligns_tokens(position)
    for aset in sets:
        for x_u, x_s in _pair_rows(aset, position):
            x_u, x_s = x_u.float(), x_s.float()
            z_u = sae.encode(x_u)
            active = z_u[:, harmful].sum(-1) > 0
            if active.any():
                j = align_tokens(x_u, x_s) if align else torch.arange(len(x_u)).clamp(max=len(x_s) - 1)
                yield z_u[active], x_u[active], x_s[j[active]]


def _active_rows(sae: TopKSAE, sets: Sequence[ActivationSet], position: str, harmful: Tensor):
    """Yield the activations [n, d_model] of every row (prompt and captured step) of `sets` where a harmful
    latent fires."""
    for aset in sets:
        for shard in aset.shards:
            for x in aset.read(shard, [f"act.{position}"])[f"act.{position}"]:
                x = x.float()
                active = sae.encode(x)[:, harmful].sum(-1) > 0
                if active.any():
                    yield x[active]


def _ridge_solve(gram: Tensor, cross: Tensor, ridge: float) -> Tensor:
    """argmin_W |A W - Y|^2 + lam |W|^2 from gram = A^T A and cross = A^T Y, lam relative to gram's mean diagonal."""
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    return torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=torch.float64), cross)


@torch.no_grad()
def fit_blend_map(sae: TopKSAE, sets: Sequence[ActivationSet], position: str, harmful_ids: Sequence[int],
                  ridge: float = RIDGE, w_dec: Tensor | None = None) -> tuple[Tensor, dict]:
    """M [|H|, d_sae] (see the module doc) from the matched pairs of `sets`, and fit figures: tokens used,
    and the share of the safe-minus-unsafe change the map explains on them, decoded with `w_dec` (the
    domain's decoder; default the SAE's own) -- 1 = the safe token's reconstruction exactly."""
    h = torch.tensor(list(harmful_ids), dtype=torch.long)
    m, d_sae = len(h), sae.d_sae
    w = (sae.decoder.W_dec if w_dec is None else w_dec).double()
    # Sufficient statistics only (memory O(|H| d_sae), whatever the number of tokens): the normal equations,
    # and, for the decoded R^2, the decoded targets' cross term, sum, and sum of squares.
    gram = torch.zeros(m, m, dtype=torch.float64)
    cross = torch.zeros(m, d_sae, dtype=torch.float64)
    cross_dec = torch.zeros(m, w.shape[1], dtype=torch.float64)
    want_sum = torch.zeros(w.shape[1], dtype=torch.float64)
    want_sq, n_tokens = 0.0, 0
    for z_u, _, x_s in _active_tokens(sae, sets, position, h):
        z_h = z_u[:, h].double()
        rest = z_u.clone()
        rest[:, h] = 0
        target = (sae.encode(x_s) - rest).double()
        want = target @ w
        gram += z_h.T @ z_h
        cross += z_h.T @ target
        cross_dec += z_h.T @ want
        want_sum += want.sum(0)
        want_sq += float(want.pow(2).sum())
        n_tokens += len(z_h)
    if n_tokens == 0:
        return torch.zeros(m, d_sae), {"tokens": 0, "decoded_r2": 0.0}
    mapping = _ridge_solve(gram, cross, ridge)
    decoded = mapping @ w  # P = M W: got = z_H P, so SSE = sum|want|^2 - 2 tr(P^T C) + tr(P^T G P)
    sse = want_sq - 2 * float((decoded * cross_dec).sum()) + float((decoded * (gram @ decoded)).sum())
    total = want_sq - float(want_sum.pow(2).sum()) / n_tokens
    r2 = 1.0 - sse / max(total, 1e-12)
    return mapping.float(), {"tokens": n_tokens, "decoded_r2": round(r2, 4)}


# Ridge strength of the affine target, relative to the mean diagonal of [x, 1]^T [x, 1]: d_model + 1 inputs
# against thousands of tokens need little.
AFFINE_RIDGE = 1e-3


@torch.no_grad()
def fit_affine_map(sae: TopKSAE, sets: Sequence[ActivationSet], position: str, harmful_ids: Sequence[int],
                   keep: Sequence[ActivationSet] = (), ridge: float = AFFINE_RIDGE) -> tuple[Tensor, dict]:
    """A [d_model + 1, d_model] (last row: bias) with  [x_unsafe, 1] A ~ x_safe - x_unsafe, fit by ridge on the
    unsafe tokens of the matched pairs of `sets` where a harmful latent fires (those the gate steers in a
    latched image), paired with their safe tokens as in `fit_blend_map`, and with [x, 1] A ~ 0 on the tokens
    of the `keep` sets (benign prompts) where a harmful latent fires: a benign image the gate opens on by
    mistake should keep its concept. Returns A and fit figures: unsafe tokens used, benign tokens kept, and
    r2, the share of the safe-minus-unsafe change it explains on the unsafe tokens.

    The second Blend design of docs/method.md section 6: it reads the whole activation, not the harmful code
    alone, so it can tell which words around the concept the safe counterpart keeps. It needs no decoder, so
    one fit on every domain's pairs serves them all (pipeline.fit_shared_affines)."""
    h = torch.tensor(list(harmful_ids), dtype=torch.long)
    d = sae.d_model
    gram = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    cross = torch.zeros(d + 1, d, dtype=torch.float64)
    want_sum = torch.zeros(d, dtype=torch.float64)
    want_sq, n_tokens = 0.0, 0
    for _, x_u, x_s in _active_tokens(sae, sets, position, h):
        inputs = torch.cat([x_u, torch.ones(len(x_u), 1)], 1).double()
        want = (x_s - x_u).double()
        gram += inputs.T @ inputs
        cross += inputs.T @ want
        want_sum += want.sum(0)
        want_sq += float(want.pow(2).sum())
        n_tokens += len(want)
    if n_tokens == 0:
        return torch.zeros(d + 1, d), {"tokens": 0, "kept_tokens": 0, "r2": 0.0}
    unsafe_gram, n_kept = gram.clone(), 0
    for x in _active_rows(sae, keep, position, h):
        inputs = torch.cat([x, torch.ones(len(x), 1)], 1).double()
        gram += inputs.T @ inputs  # their target, no move, adds nothing to `cross`
        n_kept += len(x)
    affine = _ridge_solve(gram, cross, ridge)
    gram = unsafe_gram  # r2 on the unsafe tokens
    sse = want_sq - 2 * float((affine * cross).sum()) + float((affine * (gram @ affine)).sum())
    total = want_sq - float(want_sum.pow(2).sum()) / n_tokens
    return affine.float(), {"tokens": n_tokens, "kept_tokens": n_kept, "r2": round(1.0 - sse / max(total, 1e-12), 4)}


# The learned targets `choose_blend` tries, each at these gains: the ridge fits are the L2-best move on the fit
# tokens, but a partial move leaves the concept recognisable (docs/method.md section 6), so the build picks
# the design and how far to go.
GAINS = {BLEND_MAP: (1.0, 1.5, 2.0, 3.0), BLEND_AFFINE: (1.0, 1.5)}


def with_gain(mapping: Tensor, harmful_ids: Sequence[int], gain: float) -> Tensor:
    """The map whose Blend at strength 1 equals Blend with `mapping` at strength `gain`:
    z_H (M' W_dec - W_dec[H]) = gain z_H (M W_dec - W_dec[H])  <=>  M' = gain M - (gain - 1) I_H."""
    out = gain * mapping.float()
    out[torch.arange(len(harmful_ids)), torch.tensor(list(harmful_ids))] -= gain - 1.0
    return out


def gained(target: str, tensor: Tensor, harmful_ids: Sequence[int], gain: float) -> Tensor:
    """A learned Blend target scaled so that Blend at strength 1 moves `gain` times as far (an affine target's
    move [x, 1] A is linear in A)."""
    return with_gain(tensor, harmful_ids, gain) if target == BLEND_MAP else gain * tensor.float()


def blend_variant(pack: DictionaryPack, target: str, gain: float,
                  affines: Mapping[tuple[str, str], Tensor] | None = None) -> DictionaryPack:
    """`pack` (built with its learned maps) in memory with every learned target at `gain`; for target
    BLEND_AFFINE, the positions in `affines` {(domain, position): A} blend with those instead of their maps."""
    affines = affines or {}
    meta = json.loads(json.dumps(pack.metadata))
    tensors = dict(pack.tensors)
    for d in pack.domains:
        for p in pack.positions:
            harmful = pack.position_info(p).harmful_ids
            if target == BLEND_AFFINE and (d, p) in affines:
                tensors.pop(blend_map_key(d, p), None)
                tensors[blend_affine_key(d, p)] = gained(BLEND_AFFINE, affines[(d, p)], harmful, gain)
                meta[K_DOMAINS][d][K_FEATURES][p][K_BLEND_TARGET] = BLEND_AFFINE
            elif (m := pack.blend_map(d, p)) is not None:
                tensors[blend_map_key(d, p)] = gained(BLEND_MAP, m, harmful, gain)
    meta[K_FORMAT_VERSION] = max(meta[K_FORMAT_VERSION], BLEND_TARGET_VERSION[BLEND_AFFINE]
                                 if target == BLEND_AFFINE and affines else 0)
    return DictionaryPack(pack.path, meta, tensors)


def candidate_label(target: str, gain: float) -> str:
    return f"{target} x{gain:g}"


@torch.no_grad()
def choose_blend(pack: DictionaryPack, affines: Mapping[tuple[str, str], Tensor], generator, pairs: Sequence,
                 params, gains: Mapping[str, Sequence[float]] = GAINS) -> tuple[tuple[str, float], dict[str, float]]:
    """The learned target and gain (one choice for every domain and position of `pack`) whose steered
    generations of the unsafe prompts of `pairs` [(unsafe, safe) PromptRecords] end nearest their safe prompts'
    generations (final-latent distance, mean over pairs; no judge). Returns ((target, gain),
    {candidate label: distance relative to unsteered}); ties go to the map, then the smaller gain."""
    from ..hooks import ALL_DOMAINS, SteeringDictionary, SteeringHooks
    from .steerability import distance, final_latents

    if not pairs:
        raise SafeDIGError("no matched (unsafe, safe) pair to choose the Blend target on",
                           "give prompt pairs whose members share a `pair` number, one unsafe and one safe")
    unsafe = [u for u, _ in pairs]
    target = final_latents(generator, [s for _, s in pairs])
    base = distance(final_latents(generator, unsafe), target).clamp_min(1e-8)
    step = generator.max_batch or len(unsafe)
    candidates = [(t, g) for t, gs in gains.items() if t == BLEND_MAP or affines for g in gs]
    scores: dict[tuple[str, float], float] = {}
    for t, g in candidates:
        variant = SteeringDictionary(blend_variant(pack, t, g, affines), ALL_DOMAINS)
        latents = []
        for i in range(0, len(unsafe), step):  # one hook context, so one image latch, per sampling run
            with SteeringHooks(generator.model, variant, params, row_mask=generator.cond_mask):
                latents.append(final_latents(generator, unsafe[i:i + step]))
        scores[(t, g)] = round(float((distance(torch.cat(latents), target) / base).mean()), 4)
    best = min(scores, key=lambda c: (scores[c], c[0] != BLEND_MAP, c[1]))
    return best, {candidate_label(*c): v for c, v in scores.items()}
