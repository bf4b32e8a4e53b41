"""Steering math (docs/method.md section 6) as pure functions of tensors.

At a routed position, per token of the rows being steered:

    z = E(x),  g = sum_{j in H} w_j z_j,  gate open where g > tau   (soft: ramps 0 -> 1 over tau/2 .. tau)
    Repel:  x' = x - beta * s * sum_{j in H} z_j d_j
    Blend:  z_safe = z with z_H := 0, plus the learned target z_H M (a per-domain map, fit on matched
            pairs: training/blend_map.py) or, in packs without one, the constant safe anchor a;
            x' = x + alpha * s * (D(z_safe) - D(z));
            or, with a learned affine target (fit on the pairs' activations), x' = x + alpha * ([x, 1] A)
    Both:   Blend, then Repel on the blended activation

tau is the pack's calibrated threshold times tau_scale (or an override). With the image scope (an
addition to the paper: the per-token gate at the calibrated threshold opened on too few tokens of an
unsafe image to change it), an image whose score passes tau anywhere is latched, and from then on every
token of it with g > 0 is steered.

Tokens whose gate stays closed are returned bitwise unchanged. Because TopK only zeroes
pre-activations, g <= sum_j w_j ReLU(pre_j) for non-negative weights: that cheap bound, computed from the
|H| harmful rows of W_enc alone, rules out most tokens before the full encoder runs on the rest.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from .errors import SafeDIGError
from .sae import topk_relu

# Strengths above this push activations far off the data manifold (docs/method.md section 8: at -10 every
# image became noise); they are rejected, not clamped, so a workflow never silently means something else.
MAX_STRENGTH = 4.0
# The calibrated threshold may be scaled from 0 (every token where a harmful latent fires) to 4x stricter.
MAX_TAU_SCALE = 4.0


class Mode(str, Enum):
    OFF = "off"
    BLEND = "blend"
    REPEL = "repel"
    BOTH = "both"


class GateKind(str, Enum):
    HARD = "hard"
    SOFT = "soft"


class GateScope(str, Enum):
    TOKEN = "token"  # each token on its own score
    IMAGE = "image"  # once any token of an image passes the threshold, all its harmful-active tokens


class ApplyTo(str, Enum):
    COND = "cond"
    UNCOND = "uncond"
    BOTH = "both"


_ENUMS: dict[str, tuple[type[Enum], str]] = {
    "mode": (Mode, "mode"), "gate": (GateKind, "gate"), "scope": (GateScope, "gate scope"),
    "apply_to": (ApplyTo, "apply_to"),
}


def _enum(cls, value, what: str):
    try:
        return cls(value.lower() if isinstance(value, str) else value)
    except ValueError:
        raise SafeDIGError(f"unknown {what} {value!r}", f"use one of {[m.value for m in cls]}") from None


def _in_range(v: Any, low: float, high: float) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high


def param_problems(values: Mapping[str, Any], names: Mapping[str, str] | None = None) -> list[SafeDIGError]:
    """Every problem with SteeringParams field values, each with its fix: the one check of what a user sets.

    Fields missing from `values` are not checked (a node input fed by a link). `names` maps a field to
    what the user calls it (a node input name), so messages never show internal names.
    """
    def name(field: str) -> str:
        return (names or {}).get(field, field)

    out: list[SafeDIGError] = []
    for field, (cls, what) in _ENUMS.items():
        if field in values:
            try:
                _enum(cls, values[field], name(field) if field in (names or {}) else what)
            except SafeDIGError as exc:
                out.append(exc)
    for field in ("blend_strength", "repel_strength"):
        if field in values and not _in_range(values[field], 0.0, MAX_STRENGTH):
            out.append(SafeDIGError(f"{name(field)} {values[field]!r} is out of range",
                                    f"use a value in [0, {MAX_STRENGTH}]"))
    tau = values.get("tau_override")
    if tau is not None and not _in_range(tau, -math.inf, math.inf):
        out.append(SafeDIGError(f"{name('tau_override')} {tau!r} is not a finite number", "use a finite threshold"))
    if "tau_scale" in values and not _in_range(values["tau_scale"], 0.0, MAX_TAU_SCALE):
        out.append(SafeDIGError(f"{name('tau_scale')} {values['tau_scale']!r} is out of range",
                                f"use a value in [0, {MAX_TAU_SCALE}] (1 = the pack's calibrated threshold)"))
    ends = [f for f in ("start", "end") if f in values]
    for field in ends:
        if not _in_range(values[field], 0.0, 1.0):
            out.append(SafeDIGError(f"step range {name(field)} {values[field]!r} is outside [0, 1]",
                                    "use a fraction of the schedule between 0 and 1"))
    if len(ends) == 2 and all(_in_range(values[f], 0.0, 1.0) for f in ends) and values["start"] > values["end"]:
        out.append(SafeDIGError(f"step range {name('start')} {values['start']} is after {name('end')} "
                                f"{values['end']}", f"make {name('start')} <= {name('end')}"))
    return out


@dataclass(frozen=True)
class SteeringParams:
    """What the user sets in the node graph (or on the CLI)."""

    mode: Mode = Mode.BLEND
    blend_strength: float = 1.0
    repel_strength: float = 1.0
    gate: GateKind = GateKind.HARD
    tau_override: float | None = None
    tau_scale: float = 1.0
    scope: GateScope = GateScope.TOKEN
    apply_to: ApplyTo = ApplyTo.COND
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        problems = param_problems({f.name: getattr(self, f.name) for f in fields(self)})
        if problems:
            raise problems[0]
        for field, (cls, what) in _ENUMS.items():
            object.__setattr__(self, field, _enum(cls, getattr(self, field), what))

    def describe(self) -> str:
        """One line for people (the Report's label): mode and strengths, gate, threshold, rows, schedule."""
        tau = (f"{self.tau_override:g} (override)" if self.tau_override is not None
               else f"from pack x {self.tau_scale:g}")
        return (f"mode {self.mode.value} (blend {self.blend_strength:g}, repel {self.repel_strength:g}); gate "
                f"{self.gate.value} per {self.scope.value}, tau {tau}; applies to {self.apply_to.value}; "
                f"schedule {self.start:.0%}-{self.end:.0%}")

    def threshold(self, calibrated: float) -> float:
        """The gate threshold at a position whose pack calibrated `calibrated`: the override if set, else
        calibrated * tau_scale (below 1 the gate opens more often: more recall, more benign drift)."""
        return self.tau_override if self.tau_override is not None else calibrated * self.tau_scale

    @property
    def alpha(self) -> float:
        return self.blend_strength if self.mode in (Mode.BLEND, Mode.BOTH) else 0.0

    @property
    def beta(self) -> float:
        return self.repel_strength if self.mode in (Mode.REPEL, Mode.BOTH) else 0.0

    def in_step_range(self, fraction: float) -> bool:
        """Whether a call `fraction` of the way through the schedule (schedule.schedule_fraction) is steered."""
        return self.start <= fraction <= self.end

    @property
    def is_identity(self) -> bool:
        """True when steering cannot change anything: then no hook is installed at all."""
        return self.alpha == 0.0 and self.beta == 0.0


# At most this many examples of a bad list are named in an error (then a count): a pasted megabyte of ids
# must not become a megabyte of error text.
MAX_EXAMPLES = 5


def _examples(items: list[str]) -> str:
    shown = ", ".join(repr(i[:60]) for i in items[:MAX_EXAMPLES])
    return shown + (f" and {len(items) - MAX_EXAMPLES} more" if len(items) > MAX_EXAMPLES else "")


def parse_positions(text: str | None, id_patterns: list[re.Pattern]) -> list[str] | None:
    """'double.0.img.attn, single.1.out' -> ids; blank -> None (every routed position).

    Raises SafeDIGError for text that is not a string, ids no pattern matches, and ids listed twice
    (steering one position twice in one run is refused by the hooks anyway: say so before the run)."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise SafeDIGError(f"positions must be text, not {type(text).__name__}",
                           "write comma-separated position ids, or leave it empty for all of them")
    ids = [p.strip() for p in text.replace("\n", ",").split(",") if p.strip()]
    if not ids:
        return None
    bad = [p for p in dict.fromkeys(ids) if not any(pat.match(p) for pat in id_patterns)]
    if bad:
        raise SafeDIGError(f"positions {_examples(bad)} are not position ids",
                           "list ids of the pack's routed positions, e.g. double.3.txt.mlp, single.10.out or "
                           "joint.5.img.attn (see the pack_info output), or leave it empty for all of them")
    twice = [p for p, n in Counter(ids).items() if n > 1]
    if twice:
        raise SafeDIGError(f"positions {_examples(twice)} are listed more than once", "list each position once")
    return ids


@dataclass
class PositionWeights:
    """One position's dictionary for one target domain, on one device and dtype."""

    scale: float
    k: int
    W_enc: Tensor  # [d_sae, d_model]
    b_enc: Tensor  # [d_sae]
    b_pre: Tensor  # [d_model]
    W_dec: Tensor  # [d_sae, d_model]
    b_dec: Tensor  # [d_model]
    harmful_ids: Tensor  # [m] long
    harmful_weights: Tensor  # [m]
    anchor: Tensor  # [d_sae] dense safe anchor (zero outside the anchor ids)
    tau: float
    blend_map: Tensor | None = None  # [m, d_sae] learned Blend target z_H -> z_H M (None: blend to the anchor)
    # [d_model + 1, d_model] learned affine Blend target: the steered token moves by [x, 1] A (last row: bias)
    blend_affine: Tensor | None = None
    detects: bool = True  # False (a "steer" position): its own gate never opens; it edits latched images only
    edits: bool = True  # False (a "detect" position): its gate latches images but it changes nothing

    def __post_init__(self):
        # The harmful rows of the encoder, kept contiguous for the cheap gate bound.
        self.W_enc_h = self.W_enc[self.harmful_ids].contiguous()
        self.b_enc_h = self.b_enc[self.harmful_ids].contiguous()
        self.W_dec_h = self.W_dec[self.harmful_ids].contiguous()
        # The gate bound on raw activations in one matmul: (x/s - b_pre) W_h^T + b_h = x (W_h/s)^T + bound_b
        self.bound_W = (self.W_enc_h / self.scale).contiguous()
        self.bound_b = self.b_enc_h - self.W_enc_h @ self.b_pre
        self.anchor_decoded = self.anchor @ self.W_dec  # D(a) - b_dec, constant per position
        # With a map, D(z_safe) - D(z) = z_H (M W_dec - W_dec_H): one [m, d_model] matrix per domain.
        self.blend_decoded = None if self.blend_map is None else self.blend_map @ self.W_dec - self.W_dec_h


def gate_open_from(score: Tensor, tau: float, kind: GateKind) -> Tensor:
    """Gate weight in [0, 1] per token from the harmful score g (tau = inf: never open)."""
    if math.isinf(tau):
        return torch.zeros_like(score)
    if kind == GateKind.HARD:
        return (score > tau).to(score.dtype)
    low = tau / 2 if tau > 0 else tau - 1.0
    return ((score - low) / (tau - low)).clamp(0.0, 1.0)


def _gate_floor(tau: float, kind: GateKind) -> float:
    """Scores at or below this give a gate of exactly 0."""
    if kind == GateKind.HARD:
        return tau
    return tau / 2 if tau > 0 else tau - 1.0


def _encode(x: Tensor, w: PositionWeights) -> Tensor:
    return topk_relu((x / w.scale - w.b_pre) @ w.W_enc.T + w.b_enc, w.k)


def harmful_scores(x: Tensor, w: PositionWeights) -> Tensor:
    """g per token (exact, full TopK encode)."""
    return _encode(x, w)[..., w.harmful_ids] @ w.harmful_weights


@dataclass
class _Selection:
    """The tokens the gate may open on in one call, with their exact SAE codes and scores."""

    idx: tuple[Tensor, ...]  # indices of the candidate tokens into x[..., :]
    z: Tensor  # [n, d_sae] their TopK codes
    score: Tensor  # [n] their harmful scores g
    latched: Tensor | None  # [batch, 1...] rows latched by the image-scope gate (None: token scope)


def _select(x: Tensor, w: PositionWeights, params: SteeringParams, tau: float, row_mask: Tensor | None,
            latch: Tensor | None) -> tuple[_Selection, Tensor, Tensor]:
    """Candidates (tokens whose cheap bound passes the gate floor, or 0 in a latched row), encoded exactly.

    Returns the selection, the steerable mask [batch, tokens] and the bound. Updates `latch` in place."""
    floor = _gate_floor(tau, params.gate)
    steerable = torch.isfinite(x).all(dim=-1)
    if row_mask is not None:
        steerable &= row_mask.to(x.device).view(-1, *([1] * (x.dim() - 2)))
    # Upper bound on g from the harmful latents alone (exact pruning: TopK never raises a latent).
    bound = (x @ w.bound_W.T + w.bound_b).relu() @ w.harmful_weights
    latched = None
    if params.scope == GateScope.IMAGE:
        latched = (latch.to(x.device) if latch is not None
                   else torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))
        latched = latched.view(-1, *([1] * (x.dim() - 2)))
        candidates = steerable & (bound > torch.where(latched, 0.0 if w.edits else floor, floor))
    else:
        candidates = steerable & (bound > floor)
    idx = candidates.nonzero(as_tuple=True)
    z = _encode(x[idx], w)  # the full encoder, on candidate tokens only
    sel = _Selection(idx, z, z[:, w.harmful_ids] @ w.harmful_weights, latched)
    if latched is not None:
        _latch(x, w, sel, candidates, steerable, bound, tau, latch)
    return sel, steerable, bound


def _latch(x: Tensor, w: PositionWeights, sel: _Selection, candidates: Tensor, steerable: Tensor, bound: Tensor,
           tau: float, latch: Tensor | None) -> None:
    """Image scope: latch the rows where any token passed tau; add their tokens between 0 and the floor."""
    assert sel.latched is not None
    fired = torch.zeros_like(candidates)
    fired[sel.idx] = sel.score > tau
    fired = fired.flatten(1).any(1).view_as(sel.latched)
    newly = fired & ~sel.latched
    if newly.any():  # rows latched just now: their tokens between 0 and the floor need exact scores too
        extra = (steerable & newly & (bound > 0) & ~candidates).nonzero(as_tuple=True)
        z_extra = _encode(x[extra], w)
        sel.idx = tuple(torch.cat([a, b]) for a, b in zip(sel.idx, extra, strict=True))
        sel.z = torch.cat([sel.z, z_extra])
        sel.score = torch.cat([sel.score, z_extra[:, w.harmful_ids] @ w.harmful_weights])
    sel.latched = sel.latched | fired
    if latch is not None:
        latch.copy_(sel.latched.flatten().to(latch.device))


def _gate(sel: _Selection, tau: float, params: SteeringParams) -> Tensor:
    """Gate weight [n] of each selected token: in a latched row every token with g > 0 (hard), else by g."""
    by_score = gate_open_from(sel.score, tau, params.gate)
    if sel.latched is None:
        return by_score
    row_latched = sel.latched.flatten()[sel.idx[0]]
    return torch.where(row_latched, (sel.score > 0).to(sel.score.dtype), by_score)


def _edit(xc: Tensor, z: Tensor, gate: Tensor, w: PositionWeights, params: SteeringParams) -> Tensor:
    """Blend then Repel on the selected tokens xc [n, d_model]; non-finite results keep their input."""
    gate = gate.unsqueeze(-1)
    new = xc
    if params.alpha:
        # D(z_safe) - D(z): the decoder bias and the SAE error term cancel out.
        if w.blend_affine is not None:  # a move of the raw activation: undo the scale applied below
            blend = (xc @ w.blend_affine[:-1] + w.blend_affine[-1]) / w.scale
        elif w.blend_decoded is not None:
            blend = z[:, w.harmful_ids] @ w.blend_decoded
        else:
            blend = w.anchor_decoded - z[:, w.harmful_ids] @ w.W_dec_h
        new = new + gate * params.alpha * w.scale * blend
    if params.beta:
        z_h = z[:, w.harmful_ids] if not params.alpha else _encode(new, w)[:, w.harmful_ids]
        new = new - gate * params.beta * w.scale * (z_h @ w.W_dec_h)
    # Never introduce non-finite values (e.g. fp16 overflow): such tokens keep their input.
    return torch.where(torch.isfinite(new).all(-1, keepdim=True), new, xc)


def steer(x: Tensor, w: PositionWeights, params: SteeringParams, row_mask: Tensor | None = None,
          scores_out: list | None = None, latch: Tensor | None = None, gates_out: list | None = None) -> Tensor:
    """Steered activation x' for x [batch, tokens, d_model]; returns x itself when nothing changes.
    A detect-only position (w.edits False) latches rows and reports scores but returns x; a steer-only
    position (w.detects False) edits latched rows only.

    row_mask [batch] bool selects the batch rows to steer (e.g. the cond chunk). Tokens with any
    non-finite value are never touched. If scores_out is a list, the per-token harmful score
    [batch, tokens] is appended to it: exact where the gate may open, and the cheap upper bound (at or
    below the gate floor, so those tokens surely stay shut) elsewhere; 0 outside the steered rows. If
    gates_out is a list, the gate weight [batch, tokens] in [0, 1] that this call applied (or would apply,
    for mode Off) is appended: the Report shows exactly what was steered.

    With params.scope IMAGE, a row whose score passes the threshold at any token is latched: from then on
    every token of it with a positive harmful score is steered (hard gate). `latch` [batch] bool carries
    the latched rows across positions and calls and is updated in place; None latches within this call.
    """
    if params.is_identity and scores_out is None and gates_out is None:
        return x
    # a steer-only position never opens its own gate: it edits the rows another position latched
    tau = params.threshold(w.tau) if w.detects else math.inf
    sel, steerable, bound = _select(x, w, params, tau, row_mask, latch)
    gate = _gate(sel, tau, params) if w.edits else torch.zeros_like(sel.score)  # detect-only: latch, no edit
    if scores_out is not None:
        reported = torch.where(steerable, bound, torch.zeros_like(bound))
        reported[sel.idx] = sel.score.to(reported.dtype)
        scores_out.append(reported)
    if gates_out is not None:
        applied = torch.zeros(x.shape[:-1], dtype=torch.float32, device=x.device)
        applied[sel.idx] = gate.float()
        gates_out.append(applied)
    if sel.idx[0].numel() == 0 or params.is_identity:
        return x
    changed = gate > 0
    if not changed.any():
        return x
    xc = x[sel.idx]
    new = _edit(xc, sel.z, gate, w, params)
    out = x.clone()
    out[tuple(i[changed] for i in sel.idx)] = new[changed].to(x.dtype)
    return out


def gate_margin(score: Tensor, tau: float) -> Tensor:
    """How far a score is past its threshold, comparable across domains: score / tau for tau > 0, else
    score - tau + 1; above 1 exactly when the score passes tau."""
    return score / tau if tau > 0 else score - tau + 1.0


def steer_domains(x: Tensor, ws: Sequence[PositionWeights], params: SteeringParams, row_mask: Tensor | None = None,
                  scores_out: list | None = None, latch: Tensor | None = None,
                  gates_out: list | None = None) -> Tensor:
    """`steer` with several domains of one pack at once (they share the encoder and the harmful ids): each
    domain gates with its own weights and threshold, and each token is steered once, by the domain whose
    gate opened widest (largest `gate_margin`), with that domain's decoder and anchor. The image latch is
    shared: an image latched by any domain is latched for all. Reported scores are the largest margin (its
    threshold is 1) and the gate is the winning domain's."""
    if len(ws) == 1:
        return steer(x, ws[0], params, row_mask, scores_out, latch, gates_out)
    outs, margins, gates = [], [], []
    latched_after = None if latch is None else latch.clone()
    for w in ws:
        s_d: list[Tensor] = []
        g_d: list[Tensor] = []
        own = None if latch is None else latch.clone()
        outs.append(steer(x, w, params, row_mask, s_d, own, g_d))
        # a steer-only position has no threshold of its own: its domains compete by raw score (each domain's
        # weights sum to 1 over the same harmful latents, so the scores are comparable)
        margins.append(gate_margin(s_d[0].float(), params.threshold(w.tau)) if w.detects else s_d[0].float())
        gates.append(g_d[0])
        if own is not None and latched_after is not None:
            latched_after |= own
    if latch is not None and latched_after is not None:
        latch.copy_(latched_after)
    margin = torch.stack(margins)                      # [domains, batch, tokens]
    gate = torch.stack(gates)
    ranked = torch.where(gate > 0, margin, torch.full_like(margin, -torch.inf))
    winner = ranked.argmax(0)                          # [batch, tokens]
    if scores_out is not None:
        scores_out.append(margin.amax(0))
    if gates_out is not None:
        gates_out.append(gate.gather(0, winner.unsqueeze(0)).squeeze(0))
    out = x
    for d, steered in enumerate(outs):
        if steered is x:
            continue
        take = (winner == d) & (gate[d] > 0)
        if take.any():
            out = out.clone() if out is x else out
            out[take] = steered[take]
    return out


def rows_for_chunks(cond_or_uncond: list[int] | None, batch: int, apply_to: ApplyTo) -> Tensor | None:
    """Which batch rows to steer, given ComfyUI's per-chunk labels (0 = cond, 1 = uncond) in batch order.

    None means every row. The batch is split into len(cond_or_uncond) equal chunks, in that order.
    """
    apply_to = _enum(ApplyTo, apply_to, "apply_to")
    if apply_to == ApplyTo.BOTH or not cond_or_uncond:
        return None
    if batch % len(cond_or_uncond):
        raise SafeDIGError(f"batch {batch} does not split into {len(cond_or_uncond)} cond/uncond chunks", None)
    per = batch // len(cond_or_uncond)
    want = 0 if apply_to == ApplyTo.COND else 1
    return torch.tensor([c == want for c in cond_or_uncond for _ in range(per)], dtype=torch.bool)
