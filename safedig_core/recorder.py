"""Where and when the gate fired: harmful-feature scores of one generation, and their pictures.

A `ScoreRecorder` belongs to one steering setup (one Steer node). The sampler integration calls
`begin()` once per generation, then, for every model call inside the step range, `add()` with the
per-token harmful scores and the gate weights the steering hook applied (`SteeringHooks(on_scores=...)`),
so the views show exactly what was steered, image-scope latch included. The views are:

    step_matrix()     [positions, steps]   mean gate weight (hard gate: share of tokens that fired)
    token_maps()      [images, h, w]       mean gate weight per image token, over steps and image-stream
                                           positions (the spatial map)
    summary()         text for people

and `render_step_heatmap` / `render_token_maps` turn them into RGB arrays (numpy + PIL only). Imports no
ComfyUI module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .positions import PositionParts
from .schedule import nearest_step, step_sigmas


@dataclass
class _Entry:
    step: int
    position: str
    images: Tensor  # [rows] long: which image of the batch each recorded row belongs to
    gate: Tensor  # [rows, tokens] float32 gate weight in [0, 1]
    row_max: Tensor  # [rows] float32 highest harmful score of each row's tokens


def _stream(position: str) -> str:
    try:
        return PositionParts.parse(position).stream
    except Exception:  # an id the parser does not know: no spatial map for it
        return "txt"


class ScoreRecorder:
    """Scores and applied gates of the latest generation for one steering setup (positions, taus)."""

    def __init__(self, positions: Sequence[str], taus: dict[str, float], label: str = ""):
        self.positions = list(positions)
        self.taus = {p: float(taus[p]) for p in self.positions}
        self.label = label
        self.generation = 0
        self._reset(None)

    def _reset(self, sample_sigmas) -> None:
        self.sigmas: list[float] = [] if sample_sigmas is None else [float(s) for s in sample_sigmas]
        self._step_sigmas = step_sigmas(self.sigmas)
        self.entries: list[_Entry] = []
        self.n_images = 0
        self.grid: tuple[int, int] | None = None  # image tokens (rows, cols)
        self.steps_seen: set[int] = set()
        self._resampled: Tensor | None = None  # [k] long: image j of a resampled batch is image _resampled[j]
        self.sampled_again: list[int] = []  # images whose gate opened late, sampled again steered from step 1

    # ------------------------------------------------------------------ recording

    def begin(self, sample_sigmas: Sequence[float] | Tensor | None, n_images: int = 0) -> None:
        """Start a new generation: forget the previous one."""
        self.generation += 1
        self._reset(sample_sigmas)
        self.n_images = int(n_images)

    def begin_resample(self, images: Tensor) -> None:
        """The images `images` [k] long of this generation are sampled again on their own (a batch of k):
        forget what was recorded for them, and record image j of that batch as image images[j]."""
        images = images.to("cpu", torch.long)
        kept = []
        for e in self.entries:
            keep = ~torch.isin(e.images, images)
            if keep.any():
                kept.append(_Entry(e.step, e.position, e.images[keep], e.gate[keep], e.row_max[keep]))
        self.entries = kept
        self._resampled = images
        self.sampled_again = images.tolist()

    @property
    def started(self) -> bool:
        return bool(self.sigmas)

    @property
    def n_steps(self) -> int:
        return len(self._step_sigmas)

    def step_of(self, sigma: float) -> int:
        """Index of the schedule step nearest to `sigma` (0 = first step), as steering counts it."""
        return nearest_step(sigma, self._step_sigmas)

    def set_grid(self, latent_hw: tuple[int, int], patch: int) -> None:
        """Image-token grid from the latent's spatial size and the model's patch size (padded up)."""
        h, w = latent_hw
        p = max(1, int(patch))
        self.grid = (math.ceil(h / p), math.ceil(w / p))

    def mark_step(self, step: int) -> None:
        """The steering was active at this step (even if no position reported a score)."""
        self.steps_seen.add(int(step))

    def add(self, step: int, position: str, scores: Tensor, gate: Tensor, rows: Tensor | None,
            per_chunk: int) -> None:
        """Record one model call at one position: harmful scores [batch, tokens] (exact where the gate may
        open) and the gate weight [batch, tokens] each token was steered with (steering_math.steer's
        `gates_out`, so an image-scope latch shows as steered). `rows` [batch] bool are the steered rows
        (None: all); batch row r shows image r % per_chunk."""
        if position not in self.taus:
            return
        scores = scores.detach().float()
        batch = scores.shape[0]
        idx = torch.arange(batch) if rows is None else rows.to("cpu").nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            return
        sel = scores[idx.to(scores.device)]
        applied = gate.detach()[idx.to(gate.device)].to("cpu", torch.float32)
        images = idx % max(1, int(per_chunk))
        if self._resampled is not None:
            images = self._resampled[images]
        self.n_images = max(self.n_images, int(images.max()) + 1)
        self.steps_seen.add(int(step))
        self.entries.append(_Entry(int(step), position, images, applied.reshape(applied.shape[0], -1),
                                   sel.flatten(1).amax(1).to("cpu", torch.float32)))

    def callback(self, step: int, rows: Tensor | None, per_chunk: int) -> Callable[[str, Tensor, Tensor], None]:
        """An `on_scores(position, scores, gate)` for SteeringHooks that records into this generation."""
        self.mark_step(step)
        return lambda position, scores, gate: self.add(step, position, scores, gate, rows, per_chunk)

    # ------------------------------------------------------------------ views

    def step_matrix(self) -> np.ndarray:
        """[positions, steps]: mean gate weight over recorded tokens; NaN where the step was not steered."""
        n = max(self.n_steps, 1 + max((e.step for e in self.entries), default=-1))
        total = np.zeros((len(self.positions), n))
        count = np.zeros((len(self.positions), n))
        for e in self.entries:
            i = self.positions.index(e.position)
            total[i, e.step] += float(e.gate.sum())
            count[i, e.step] += e.gate.numel()
        with np.errstate(invalid="ignore", divide="ignore"):
            out = total / count
        for s in self.steps_seen:  # steered, but no score (e.g. no tokens)
            if s < n:
                out[:, s] = np.where(np.isnan(out[:, s]), 0.0, out[:, s])
        return out

    def score_max(self) -> dict[str, float]:
        best: dict[str, float] = {}
        for e in self.entries:
            best[e.position] = max(best.get(e.position, -math.inf), float(e.row_max.max()))
        return best

    def token_maps(self) -> np.ndarray | None:
        """[images, h, w]: mean gate weight per image token over the steered steps and the image-stream
        positions (for single-stream blocks, the image tokens follow the text tokens). None without a grid."""
        if self.grid is None:
            return None
        h, w = self.grid
        n_img = h * w
        n = max(self.n_images, 1)
        total = torch.zeros(n, n_img)
        count = torch.zeros(n, 1)
        for e in self.entries:
            if _stream(e.position) == "txt" or e.gate.shape[1] < n_img:
                continue
            img = e.gate[:, -n_img:]
            total.index_add_(0, e.images, img)
            count.index_add_(0, e.images, torch.ones(len(e.images), 1))
        maps = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))
        return maps.view(n, h, w).numpy()

    def fired_steps(self) -> dict[str, list[int]]:
        """Per position, the steps (0-based) at which at least one token's gate opened."""
        out: dict[str, set[int]] = {p: set() for p in self.positions}
        for e in self.entries:
            if bool((e.gate > 0).any()):
                out[e.position].add(e.step)
        return {p: sorted(s) for p, s in out.items()}

    def summary(self, title: str = "") -> str:
        head = title or "SafeDIG report"
        lines = [f"{head}: {self.label}" if self.label else head]
        if not self.started and not self.entries:
            lines.append("  no generation recorded yet (run a sampler with this model first)")
            return "\n".join(lines)
        matrix = self.step_matrix()
        steered = sorted(self.steps_seen)
        grid = f", image tokens {self.grid[0]}x{self.grid[1]}" if self.grid else ""
        lines.append(f"  generation {self.generation}: {self.n_steps} steps, {max(self.n_images, 1)} image(s){grid}")
        lines.append(f"  steps steered: {_ranges([s + 1 for s in steered]) or 'none'} of {self.n_steps}")
        fired = self.fired_steps()
        smax = self.score_max()
        rows = []
        for i, pos in enumerate(self.positions):
            vals = matrix[i][~np.isnan(matrix[i])] if matrix.size else np.array([])
            share = f"{100 * vals.mean():.1f}%" if vals.size else "-"
            peak = f"{smax[pos]:.3g}" if pos in smax else "-"
            rows.append([pos, f"{self.taus[pos]:.3g}", share, peak, _ranges([s + 1 for s in fired[pos]]) or "never"])
        lines.append(_table(rows, ["position", "tau", "gate open (mean)", "max score", "steps where it fired"]))
        if self.sampled_again:
            lines.append(f"  sampled again: image(s) {_ranges([i + 1 for i in self.sampled_again])} latched after the "
                         "first step and were sampled once more, steered from the first step (what you see)")
        any_fired = any(fired.values())
        lines.append("  verdict: the gate fired; steering changed activations at the steps listed" if any_fired
                     else "  verdict: the gate never fired; this generation was not changed by steering")
        return "\n".join(lines)


def _ranges(values: Sequence[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    out: list[str] = []
    start: int | None = None
    prev = 0
    for v in sorted(values):
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = v
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(out)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# ---------------------------------------------------------------------------------------- rendering

_RAMP = np.array([  # dark blue -> purple -> red -> orange -> yellow (readable on screens and in print)
    [13, 8, 45], [84, 15, 109], [187, 55, 84], [249, 142, 9], [252, 255, 164],
], dtype=np.float64)
_NOT_STEERED = np.array([70, 70, 70], dtype=np.float64)


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (NaN = not steered) -> RGB uint8, sqrt scale so small shares stay visible."""
    v = np.sqrt(np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0))
    pos = v * (len(_RAMP) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_RAMP) - 2)
    frac = (pos - lo)[..., None]
    rgb = _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac
    rgb = np.where(np.isnan(values)[..., None], _NOT_STEERED, rgb)
    return rgb.round().astype(np.uint8)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def render_step_heatmap(recorders: Sequence[ScoreRecorder], cell: int = 14) -> np.ndarray:
    """One RGB image [H, W, 3] uint8: a row per (steer, position), a column per step; colour = gate
    open share. Grey cells are steps outside the steer's step range."""
    from PIL import Image, ImageDraw

    font = _font()
    labels, rows = [], []
    n_steps = max([r.n_steps for r in recorders] + [1])
    for k, rec in enumerate(recorders):
        m = rec.step_matrix()
        for i, pos in enumerate(rec.positions):
            row = np.full(n_steps, np.nan)
            if m.size:
                row[: min(n_steps, m.shape[1])] = m[i, :n_steps]
            rows.append(row)
            labels.append(f"{k + 1}: {pos}" if len(recorders) > 1 else pos)
    if not rows:
        rows, labels = [np.full(n_steps, np.nan)], ["(no steering)"]
    matrix = np.stack(rows)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(probe.textlength(s, font=font)) for s in labels) + 8
    top, bottom = 16, 18
    width = label_w + cell * n_steps + 4
    height = top + cell * len(rows) + bottom
    img = Image.new("RGB", (max(width, 200), height), (255, 255, 255))
    cells = np.repeat(np.repeat(colorize(matrix), cell, axis=0), cell, axis=1)
    img.paste(Image.fromarray(cells), (label_w, top))
    draw = ImageDraw.Draw(img)
    for r, text in enumerate(labels):
        draw.text((4, top + r * cell + 1), text, fill=(0, 0, 0), font=font)
    step_every = max(1, math.ceil(24 / cell))
    for s in range(0, n_steps, step_every):
        draw.text((label_w + s * cell + 2, 2), str(s + 1), fill=(0, 0, 0), font=font)
    draw.text((4, top + cell * len(rows) + 3), "steps ->   colour: gate open share (sqrt), grey: not steered",
              fill=(0, 0, 0), font=font)
    return np.asarray(img)


def merged_token_maps(recorders: Sequence[ScoreRecorder]) -> np.ndarray | None:
    """Mean of the recorders' spatial maps (chained steers), ignoring recorders without one."""
    maps = [m for m in (r.token_maps() for r in recorders) if m is not None]
    if not maps:
        return None
    shape = maps[-1].shape
    same = [m for m in maps if m.shape == shape]
    stack = np.stack(same)
    with np.errstate(invalid="ignore"):
        total = np.nansum(stack, axis=0)
        count = np.sum(~np.isnan(stack), axis=0)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def render_token_maps(recorders: Sequence[ScoreRecorder], images: np.ndarray | None = None,
                      size: tuple[int, int] = (256, 256), n_images: int = 1) -> np.ndarray:
    """[B, H, W, 3] uint8: the spatial gate map per image, nearest-upsampled to the image size and blended
    over `images` ([B, H, W, 3] uint8) where given. Without a map (no steering recorded) the images come
    back unchanged (or grey)."""
    from PIL import Image

    NEAREST = Image.Resampling.NEAREST

    maps = merged_token_maps(recorders)
    if images is not None:
        n_images, height, width = images.shape[0], images.shape[1], images.shape[2]
    else:
        height, width = size
        n_images = max(n_images, maps.shape[0] if maps is not None else 1)
    out = np.empty((n_images, height, width, 3), dtype=np.uint8)
    for b in range(n_images):
        base = images[b].astype(np.float64) if images is not None else np.full((height, width, 3), 40.0)
        if maps is None:
            out[b] = base.round().astype(np.uint8)
            continue
        m = maps[min(b, maps.shape[0] - 1)]
        color = np.asarray(Image.fromarray(colorize(m)).resize((width, height), NEAREST), dtype=np.float64)
        alpha_src = np.sqrt(np.clip(np.nan_to_num(m, nan=0.0), 0, 1)).astype(np.float32)
        alpha = np.asarray(Image.fromarray(alpha_src).resize((width, height), NEAREST), dtype=np.float64)
        a = (0.25 + 0.6 * alpha)[..., None] if images is not None else np.ones((height, width, 1))
        out[b] = (base * (1 - a) + color * a).round().clip(0, 255).astype(np.uint8)
    return out
