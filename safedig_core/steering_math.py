"""Steering math (method.md section 6) as pure functions of tensors.

At a routed position, per token of the rows being steered:

    z = E(x),  g = sum_{j in H} w_j z_j,  gate open where g > tau   (soft: ramps 0 -> 1 over tau/2 .. tau)
    Repel:  x' = x - beta * s * sum_{j in H} z_j d_j
    Blend:  z_safe = z with z_H := 0, plus the safe anchor a;  x' = x + alpha * s * (D(z_safe) - D(z))
    Both:   Blend, then Repel on the blended activation

tau is the pack's calibrated threshold times tau_scale (or an override). With the image scope (an
addition to method.md: its per-token gate at the calibrated threshold opened on too few tokens of an
unsafe image to change it), an image whose score passes tau anywhere is latched, and from then on every
token of it with g > 0 is steered.

Tokens whose gate stays closed are returned bitwise unchanged. Because TopK only zeroes
pre-activations, g <= sum_j w_j ReLU(pre_j) for non-negative weights: that cheap bound, computed from the
|H| harmful rows of W_enc alone, rules out most tokens before the full encoder runs on the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from .errors import SafeDIGError
from .sae import topk_relu

# Strengths above this push activations far off the data manifold (method.md section 8: at -10 every
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


def _enum(cls, value, what: str):
    try:
        return cls(value.lower() if isinstance(value, str) else value)
    except ValueError:
        raise SafeDIGError(f"unknown {what} {value!r}", f"use one of {[m.value for m in cls]}") from None


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
        object.__setattr__(self, "mode", _enum(Mode, self.mode, "mode"))
        object.__setattr__(self, "gate", _enum(GateKind, self.gate, "gate"))
        object.__setattr__(self, "scope", _enum(GateScope, self.scope, "gate scope"))
        object.__setattr__(self, "apply_to", _enum(ApplyTo, self.apply_to, "apply_to"))
        for name in ("blend_strength", "repel_strength"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= MAX_STRENGTH):
                raise SafeDIGError(f"{name} {v!r} is out of range", f"use a value in [0, {MAX_STRENGTH}]")
        if self.tau_override is not None and not math.isfinite(self.tau_override):
            raise SafeDIGError(f"tau_override {self.tau_override!r} is not finite", "use a finite threshold")
        if not (isinstance(self.tau_scale, (int, float)) and math.isfinite(self.tau_scale)
                and 0 <= self.tau_scale <= MAX_TAU_SCALE):
            raise SafeDIGError(f"tau_scale {self.tau_scale!r} is out of range",
                               f"use a value in [0, {MAX_TAU_SCALE}] (1 = the pack's calibrated threshold)")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise SafeDIGError(f"step range start {self.start} / end {self.end} is invalid",
                               "use 0 <= start <= end <= 1 (fractions of the schedule)")

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

    @property
    def is_identity(self) -> bool:
        """True when steering cannot change anything: then no hook is installed at all."""
        return self.alpha == 0.0 and self.beta == 0.0


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

    def __post_init__(self):
        # The harmful rows of the encoder, kept contiguous for the cheap gate bound.
        self.W_enc_h = self.W_enc[self.harmful_ids].contiguous()
        self.b_enc_h = self.b_enc[self.harmful_ids].contiguous()
        self.W_dec_h = self.W_dec[self.harmful_ids].contiguous()
        # The gate bound on raw activations in one matmul: (x/s - b_pre) W_h^T + b_h = x (W_h/s)^T + bound_b
        self.bound_W = (self.W_enc_h / self.scale).contiguous()
        self.bound_b = self.b_enc_h - self.W_enc_h @ self.b_pre
        self.anchor_decoded = self.anchor @ self.W_dec  # D(a) - b_dec, constant per position


def gate_open_from(score: Tensor, tau: float, kind: GateKind) -> Tensor:
    """Gate weight in [0, 1] per token from the harmful score g."""
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


def steer(x: Tensor, w: PositionWeights, params: SteeringParams, row_mask: Tensor | None = None,
          scores_out: list | None = None, latch: Tensor | None = None) -> Tensor:
    """Steered activation x' for x [batch, tokens, d_model]; returns x itself when nothing changes.

    row_mask [batch] bool selects the batch rows to steer (e.g. the cond chunk). Tokens with any
    non-finite value are never touched. If scores_out is a list, the per-token harmful score
    [batch, tokens] is appended to it: exact where the gate may open, and the cheap upper bound (at or
    below the gate floor, so those tokens surely stay shut) elsewhere; 0 outside the steered rows.

    With params.scope IMAGE, a row whose score passes the threshold at any token is latched: from then on
    every token of it with a positive harmful score is steered (hard gate). `latch` [batch] bool carries
    the latched rows across positions and calls and is updated in place; None latches within this call.
    """
    if params.is_identity and scores_out is None:
        return x
    tau = params.threshold(w.tau)
    floor = _gate_floor(tau, params.gate)
    by_image = params.scope == GateScope.IMAGE
    steerable = torch.isfinite(x).all(dim=-1)
    if row_mask is not None:
        steerable &= row_mask.to(x.device).view(-1, *([1] * (x.dim() - 2)))
    # Upper bound on g from the harmful latents alone (exact pruning: TopK never raises a latent).
    bound = (x @ w.bound_W.T + w.bound_b).relu() @ w.harmful_weights
    latched = None
    if by_image:
        latched = (latch.to(x.device) if latch is not None else torch.zeros(x.shape[0], dtype=torch.bool,
                                                                                 device=x.device))
        latched = latched.view(-1, *([1] * (x.dim() - 2)))
        candidates = steerable & (bound > torch.where(latched, 0.0, floor))
    else:
        candidates = steerable & (bound > floor)
    reported = torch.where(steerable, bound, torch.zeros_like(bound)) if scores_out is not None else None
    idx = candidates.nonzero(as_tuple=True)
    z = _encode(x[idx], w)  # the full encoder, on candidate tokens only
    score = z[:, w.harmful_ids] @ w.harmful_weights
    if by_image:
        fired = torch.zeros_like(candidates)
        fired[idx] = score > tau
        fired = fired.flatten(1).any(1).view_as(latched)
        newly = fired & ~latched
        if newly.any():  # rows latched just now: their tokens between 0 and the floor need exact scores too
            extra = (steerable & newly & (bound > 0) & ~candidates).nonzero(as_tuple=True)
            z_extra = _encode(x[extra], w)
            idx = tuple(torch.cat([a, b]) for a, b in zip(idx, extra, strict=True))
            z = torch.cat([z, z_extra])
            score = torch.cat([score, z_extra[:, w.harmful_ids] @ w.harmful_weights])
        latched |= fired
        if latch is not None:
            latch.copy_(latched.flatten().to(latch.device))
    if reported is not None:
        reported[idx] = score.to(reported.dtype)
        scores_out.append(reported)
    if idx[0].numel() == 0 or params.is_identity:
        return x

    xc = x[idx]
    if by_image:
        row_latched = latched.flatten()[idx[0]]
        gate = torch.where(row_latched, (score > 0).to(score.dtype), gate_open_from(score, tau, params.gate))
    else:
        gate = gate_open_from(score, tau, params.gate)
    gate = gate.unsqueeze(-1)

    new = xc
    if params.alpha:
        # D(z_safe) - D(z) = (a - z_H) W_dec: the decoder bias and the SAE error term cancel out.
        blend = w.anchor_decoded - z[:, w.harmful_ids] @ w.W_dec_h
        new = new + gate * params.alpha * w.scale * blend
    if params.beta:
        z_h = z[:, w.harmful_ids] if not params.alpha else _encode(new, w)[:, w.harmful_ids]
        new = new - gate * params.beta * w.scale * (z_h @ w.W_dec_h)

    # Never introduce non-finite values (e.g. fp16 overflow): such tokens keep their input.
    new = torch.where(torch.isfinite(new).all(-1, keepdim=True), new, xc)
    changed = gate.squeeze(-1) > 0
    if not changed.any():
        return x
    out = x.clone()
    out[tuple(i[changed] for i in idx)] = new[changed].to(x.dtype)
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


def schedule_fraction(sigma: float, sample_sigmas: list[float] | Tensor | None) -> float:
    """How far through the sampling schedule the current sigma is: 0 at the first step, 1 at the last."""
    if sample_sigmas is None:
        return 0.0
    sigmas = [float(s) for s in sample_sigmas]
    steps = [s for s in sigmas if s > 0] or sigmas
    if len(steps) <= 1:
        return 0.0
    nearest = min(range(len(steps)), key=lambda i: abs(steps[i] - float(sigma)))
    return nearest / (len(steps) - 1)


def in_step_range(fraction: float, params: SteeringParams) -> bool:
    return params.start <= fraction <= params.end
