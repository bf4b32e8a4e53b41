"""One steering setup across the model calls of sampling runs: which rows, which steps, the image latch
and the Report's recorder. The ComfyUI Steer node wraps this in its APPLY_MODEL / OUTER_SAMPLE wrappers
(nodes/steer.py); anything that samples step by step can use it the same way.

Per model call: the rows to steer come from the sampler's cond/uncond chunk labels (uncond may come first;
at cfg 1 there is no uncond chunk), the schedule fraction from the current sigma among the run's sigmas
(schedule.py), and the call runs inside `SteeringHooks`, which removes its hooks in `finally`. A call in
which an image's gate first opened after an editing position had already run (a pack that detects at a block
and steers at the input projection, which runs first) is run once more with the latch open, so the image is
steered everywhere from that call on (docs/method.md section 6); the other rows keep the first pass's output.

Per sampling run (`sample_run`, ComfyUI's OUTER_SAMPLE): an image whose gate first opened after the run's
first steered step missed the steps before it, which already laid out its picture, so the images that did
are sampled again on their own (a batch of just them) latched from the start; the other images keep the
first run's output bit for bit, and the Report shows what was kept.

Fail closed: when steering is active for a call and a routed position's hook did not run (a bypassed or
renamed block, a replayed CUDA graph, a fused kernel), the call raises SteeringBypassedError instead of
returning an output that was never steered. Calls may come from several threads at once (ComfyUI's multi-GPU
cond batcher): each call's hooks act only on its own thread, and the shared per-run state (recorder, latch) is
changed under a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from .errors import SafeDIGError
from .hooks import SteeringDictionary, SteeringHooks
from .positions import resolve
from .recorder import ScoreRecorder
from .schedule import schedule_fraction
from .steering_math import GateScope, SteeringParams, rows_for_chunks

T = TypeVar("T")


class SteeringBypassedError(SafeDIGError):
    """Steering was active for a model call but a routed position's hook never ran."""


class SamplingSteering:
    """One steering setup (dictionary, parameters, label) and its per-run state (recorder, latch).
    `host` names the program running the model in errors (e.g. "ComfyUI 0.3.75"). `rerun_late_latches`: run
    a call again when an image latched after an editing position had run in it (see `_run_again`);
    `restart_late_latches`: sample a run again when an image latched after its first steered step (see
    `sample_run`). Both are off only to measure what they buy."""

    def __init__(self, dictionary: SteeringDictionary, params: SteeringParams, label: str, host: str = "this host",
                 rerun_late_latches: bool = True, restart_late_latches: bool = True):
        self.dictionary = dictionary
        self.rerun_late_latches = rerun_late_latches
        self.restart_late_latches = restart_late_latches
        self.params = params
        self.label = label
        self.host = host
        self._lock = threading.Lock()
        self.recorder = ScoreRecorder(dictionary.positions, dictionary.thresholds(params), label)
        self.latched: Tensor | None = None  # image-scope gate: images latched in this sampling run
        self.late: Tensor | None = None  # images of `latched` whose gate first opened after the first steered step
        self._first_sigma: float | None = None  # sigma of this run's first steered step
        self.restarted: Tensor | None = None  # images the last `sample_run` sampled a second time
        self._restartable = False  # inside the first run of a `sample_run` that restarts late latches

    def begin_run(self, sigmas: Sequence[float] | Tensor | None, n_images: int, latched: Tensor | None = None) -> None:
        """A new sampling run: a new Report generation, no image latched (or the images of `latched`
        [n_images] bool, latched from its first step on)."""
        with self._lock:
            self.recorder.begin(sigmas, n_images=n_images)
            self.latched = None if latched is None else latched.cpu().clone()
            self.late = None
            self._first_sigma = None

    def sample_run(self, sample_images: Callable[[Tensor | None], T], sigmas: Sequence[float] | Tensor | None,
                   n_images: int, subsets: bool = True) -> T:
        """One sampling run steered call by call: `sample_images(None)` samples every image of the run and
        returns [n_images, ...]. When an image latched after the run's first steered step, the images that
        did are sampled again, latched from the start, and their rows are taken from that run (the others
        keep the first run's, bit for bit): `sample_images(idx)` samples only the images `idx` [k] long (as
        a batch of k, their own prompts and noise) and returns [k, ...]. `subsets=False` (a sampler whose
        batch cannot be cut, e.g. conditioning with one entry per image) samples the whole batch again
        instead. The sampler must be deterministic given its noise and seed (ComfyUI's are)."""
        self.restarted = None
        self.begin_run(sigmas, n_images)
        self._restartable = self.restart_late_latches
        try:
            first = sample_images(None)
        finally:
            self._restartable = False
        late = self.late
        if not self.restart_late_latches or late is None or not late.any():
            return first
        if not isinstance(first, Tensor) or first.shape[0] != late.numel():
            raise SafeDIGError(f"SafeDIG could not restart this sampling run: it returned {type(first).__name__} "
                               f"{getattr(first, 'shape', '')}, not one row per image of its {late.numel()}",
                               "report this sampler to SafeDIG; to sample without steering, set Steer's mode to Off")
        self.restarted = late
        if not subsets:
            self.begin_run(sigmas, n_images, latched=late)
            self.recorder.sampled_again = late.nonzero().flatten().tolist()
            again = sample_images(None)
            assert isinstance(again, Tensor)
            self.late = late  # as after a cut restart: the images of the first run that latched late
            return torch.where(late.to(first.device).view(-1, *([1] * (first.dim() - 1))), again, first)  # type: ignore[return-value]
        idx = late.nonzero().flatten()
        latched = self.latched
        with self._lock:  # the Report keeps the first run's record of the other images
            self.recorder.begin_resample(idx)
            self.latched = torch.ones(idx.numel(), dtype=torch.bool)
            self.late, self._first_sigma = None, None
        try:
            again = sample_images(idx)
        finally:
            self.latched, self.late = latched, late
        if not isinstance(again, Tensor) or again.shape[0] != idx.numel():
            raise SafeDIGError(f"SafeDIG could not restart {idx.numel()} image(s) of this sampling run: the sampler "
                               f"returned {getattr(again, 'shape', type(again).__name__)}",
                               "report this sampler to SafeDIG; to sample without steering, set Steer's mode to Off")
        out = first.clone()
        out[idx.to(first.device)] = again.to(first.dtype)
        return out  # type: ignore[return-value]

    def steer_call(self, dit: object, x: Tensor, sigma: float | Tensor, sample_sigmas: Sequence[float] | Tensor | None,
                   chunks: list[int] | None, run: Callable[[], T]) -> T:
        """Run one model call `run()` on input `x` [batch, ...] with the hooks this call needs."""
        positions = resolve(dit)
        batch = x.shape[0]
        rows = rows_for_chunks(chunks, batch, self.params.apply_to)
        sigma = float(sigma.flatten()[0]) if isinstance(sigma, Tensor) else float(sigma)
        active = self.params.in_step_range(schedule_fraction(sigma, sample_sigmas))
        rec = self.recorder
        per_chunk = batch // len(chunks) if chunks and batch % len(chunks) == 0 else batch
        on_scores = None
        with self._lock:
            if not rec.started:  # a sampler that bypassed the start of the run
                rec.begin(sample_sigmas, n_images=0)
            if active:
                if x.dim() >= 4:
                    rec.set_grid((int(x.shape[-2]), int(x.shape[-1])), _patch_size(dit))
                on_scores = self._locked(rec.callback(rec.step_of(sigma), rows, per_chunk))
            per_image = self._row_latch(batch, per_chunk, x.device) if active else None
        record: list[tuple] = []  # this call's scores, recorded once we know which pass's output is kept
        hooks = SteeringHooks(dit, self.dictionary, self.params, row_mask=rows, active=active, owner=self,
                              on_scores=None if on_scores is None else lambda *a: record.append(a),
                              model_positions=positions, latch=per_image)
        with hooks:
            out = run()
        if hooks.not_run:
            raise self._bypassed(dit, hooks.not_run)
        late = hooks.late_latched
        # a latch after the run's first step inside sample_run restarts the run: its second pass would be thrown away
        restarts = self._restartable and self._first_sigma is not None and sigma != self._first_sigma
        if self.rerun_late_latches and not restarts and late is not None and late.any():
            out = self._run_again(dit, run, out, late.to(x.device), rows, on_scores, positions, per_image)
        elif on_scores is not None:
            for args in record:
                on_scores(*args)
        if per_image is not None:
            with self._lock:  # an image latched in any chunk stays latched for the rest of the run
                if self.latched is not None and per_image.numel() % self.latched.numel() == 0:
                    now = per_image.view(-1, self.latched.numel()).any(0).cpu()
                    if self._first_sigma is None:
                        self._first_sigma = sigma
                    elif sigma != self._first_sigma:  # a later step than the first: the image missed steps
                        self.late = (now & ~self.latched) | (self.late if self.late is not None else False)
                    self.latched |= now
        return out

    def _run_again(self, dit: object, run: Callable[[], T], first: T, late: Tensor, rows: Tensor | None,
                   on_scores: Callable[..., None] | None, positions, per_image: Tensor | None) -> T:
        """A call in which an image latched after an editing position had already run (detected at a block,
        steered at the input projection that runs before it) is run again with the latch open from the
        start, so that image is steered at every position from this call on; the other rows keep the first
        pass's output bit for bit. Costs one extra model call per call in which an image latches."""
        hooks = SteeringHooks(dit, self.dictionary, self.params, row_mask=rows, owner=self, on_scores=on_scores,
                              model_positions=positions, latch=per_image)
        with hooks:
            again = run()
        if hooks.not_run:
            raise self._bypassed(dit, hooks.not_run)
        if not isinstance(first, Tensor) or not isinstance(again, Tensor) or first.shape[0] != late.numel():
            return again  # not one row per batch row: the second pass's output, every row steered as latched
        return torch.where(late.view(-1, *([1] * (first.dim() - 1))), again, first)  # type: ignore[return-value]

    def _locked(self, callback: Callable[..., None]) -> Callable[..., None]:
        def locked(*args) -> None:
            with self._lock:
                callback(*args)
        return locked

    def _bypassed(self, dit: object, positions: list[str]) -> SteeringBypassedError:
        model_class = f"{type(dit).__module__}.{type(dit).__qualname__}"
        return SteeringBypassedError(
            f"SafeDIG steering was active but the hook at {', '.join(positions)} did not run in this call of "
            f"{model_class} ({self.host}): the module there was bypassed (a node that skips or caches blocks, a "
            "replayed CUDA graph, a fused kernel or a renamed block), so the image would not be steered; the run "
            "was stopped",
            "remove the node that skips or caches transformer blocks (or disable CUDA graphs, e.g. ComfyUI's "
            "--disable-cuda-graphs), or choose positions that run (Steer's `positions`); to sample unsteered, "
            "set Steer's mode to Off")

    def _row_latch(self, batch: int, per_chunk: int, device: torch.device) -> Tensor | None:
        """The image-scope latch for this call's rows (row r is image r % images per chunk)."""
        if self.params.scope != GateScope.IMAGE:
            return None
        if self.latched is None or self.latched.numel() != per_chunk:
            self.latched = torch.zeros(per_chunk, dtype=torch.bool)
        return self.latched.repeat(batch // per_chunk).to(device)


def _patch_size(dit: object) -> int:
    """The DiT's patch size: diffusers keeps it in `config` (reading the attribute warns), ComfyUI on the model."""
    size = getattr(getattr(dit, "config", None), "patch_size", None)
    return int(size if isinstance(size, int) else getattr(dit, "patch_size", 1))
