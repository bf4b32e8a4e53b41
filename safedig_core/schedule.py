"""Where a model call sits in the sampling schedule: the one home of the nearest-step rule.

ComfyUI passes the current sigma per call and the run's `sample_sigmas` (the last one is usually 0, the end
of sampling, not a step). Steering (is this call inside start..end?) and the Report (which step column does
this call fill?) must agree on the step, so both use `nearest_step`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def step_sigmas(sample_sigmas: Sequence[float] | Tensor | None) -> list[float]:
    """The sigmas at which the model is called, one per step: the positive ones (all of them if none is)."""
    if sample_sigmas is None:
        return []
    sigmas = [float(s) for s in sample_sigmas]
    return [s for s in sigmas if s > 0] or sigmas


def nearest_step(sigma: float, steps: Sequence[float]) -> int:
    """Index of the step whose sigma is nearest to `sigma` (0 = first step); 0 without a schedule."""
    if not steps:
        return 0
    return min(range(len(steps)), key=lambda i: abs(steps[i] - float(sigma)))


def schedule_fraction(sigma: float, sample_sigmas: Sequence[float] | Tensor | None) -> float:
    """How far through the sampling schedule the current sigma is: 0 at the first step, 1 at the last."""
    steps = step_sigmas(sample_sigmas)
    if len(steps) <= 1:
        return 0.0
    return nearest_step(sigma, steps) / (len(steps) - 1)
