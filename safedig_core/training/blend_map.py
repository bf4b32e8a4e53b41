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

from collections.abc import Sequence

import torch
from torch import Tensor

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
    align = aligns_tokens(position)
    for aset in sets:
        for x_u, x_s in _pair_rows(aset, position):
            x_u, x_s = x_u.float(), x_s.float()
            z_u = sae.encode(x_u)
            active = z_u[:, h].sum(-1) > 0
            if not active.any():
                continue
            j = align_tokens(x_u, x_s) if align else torch.arange(len(x_u)).clamp(max=len(x_s) - 1)
            z_h = z_u[active][:, h].double()
            rest = z_u[active].clone()
            rest[:, h] = 0
            target = (sae.encode(x_s[j[active]]) - rest).double()
            want = target @ w
            gram += z_h.T @ z_h
            cross += z_h.T @ target
            cross_dec += z_h.T @ want
            want_sum += want.sum(0)
            want_sq += float(want.pow(2).sum())
            n_tokens += len(z_h)
    if n_tokens == 0:
        return torch.zeros(m, d_sae), {"tokens": 0, "decoded_r2": 0.0}
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    mapping = torch.linalg.solve(gram + lam * torch.eye(m, dtype=torch.float64), cross)
    decoded = mapping @ w  # P = M W: got = z_H P, so SSE = sum|want|^2 - 2 tr(P^T C) + tr(P^T G P)
    sse = want_sq - 2 * float((decoded * cross_dec).sum()) + float((decoded * (gram @ decoded)).sum())
    total = want_sq - float(want_sum.pow(2).sum()) / n_tokens
    r2 = 1.0 - sse / max(total, 1e-12)
    return mapping.float(), {"tokens": n_tokens, "decoded_r2": round(r2, 4)}


# Gains `choose_gain` tries: the ridge fit is the L2-best move on the fit tokens, but a partial move of
# the code leaves the concept recognisable (docs/method.md section 6), so the build picks how far to go.
GAINS = (1.0, 1.5, 2.0, 3.0)


def with_gain(mapping: Tensor, harmful_ids: Sequence[int], gain: float) -> Tensor:
    """The map whose Blend at strength 1 equals Blend with `mapping` at strength `gain`:
    z_H (M' W_dec - W_dec[H]) = gain z_H (M W_dec - W_dec[H])  <=>  M' = gain M - (gain - 1) I_H."""
    out = gain * mapping.float()
    out[torch.arange(len(harmful_ids)), torch.tensor(list(harmful_ids))] -= gain - 1.0
    return out


@torch.no_grad()
def choose_gain(pack, generator, pairs: Sequence, params, gains: Sequence[float] = GAINS) -> tuple[float, dict]:
    """The gain (applied to every map of `pack`) whose steered generations of the unsafe prompts of
    `pairs` [(unsafe, safe) PromptRecords] end nearest their safe prompts' generations (final-latent
    distance, mean over pairs; no judge). Returns (gain, {gain: distance relative to unsteered})."""
    from ..hooks import ALL_DOMAINS, SteeringDictionary, SteeringHooks
    from ..pack import DictionaryPack, blend_map_key
    from .steerability import distance, final_latents

    unsafe = [u for u, _ in pairs]
    target = final_latents(generator, [s for _, s in pairs])
    base = distance(final_latents(generator, unsafe), target).clamp_min(1e-8)
    rows = torch.zeros(2 * len(unsafe) if generator.cond_rows(2) != slice(None) else len(unsafe), dtype=torch.bool)
    rows[generator.cond_rows(len(rows))] = True
    scores = {}
    for g in gains:
        tensors = dict(pack.tensors)
        for d in pack.domains:
            for p in pack.positions:
                m = pack.blend_map(d, p)
                if m is not None:
                    tensors[blend_map_key(d, p)] = with_gain(m, pack.position_info(p).harmful_ids, g)
        variant = SteeringDictionary(DictionaryPack(pack.path, pack.metadata, tensors), ALL_DOMAINS)
        with SteeringHooks(generator.model, variant, params, row_mask=rows):
            latent = final_latents(generator, unsafe)
        scores[g] = round(float((distance(latent, target) / base).mean()), 4)
    return min(scores, key=lambda g: (scores[g], g)), scores
