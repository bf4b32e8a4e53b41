"""Steerability: does intervening at a position move an unsafe generation to its matched safe one?
(docs/method.md section 4; a routing criterion measured before any SAE is trained, with no judge.)

For K matched pairs (unsafe prompt, safe prompt, one seed), the generator runs the safe prompts once and
records each candidate position's output (prompt rows, every DiT call). Then, for a set S of positions,
it runs the unsafe prompts with S's outputs replaced by the recorded safe ones, and compares final
latents:

    steerability(S) = mean over pairs of  1 - |L_patched(S) - L_safe| / |L_unsafe - L_safe|,  clipped to [0, 1]

1 means patching S turns the unsafe generation into the safe one; 0 means the later blocks undo it (they
rebuild the concept from what they still hold) or the change leads elsewhere. `greedy_sets` chooses the
routed set by joint effect: it starts from the best single position and adds the one that raises the
joint score most, while the gain is at least MIN_GAIN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch

from ..errors import SafeDIGError
from ..positions import resolve
from .collect import PromptRecord
from .generators import Generator

# A position joins the routed set only if it raises the joint steerability by at least this much. Each
# routed position adds a gate that can open on benign images, and on the bundled model a latent-distance
# gain of 0.08 (input.txt + double.1.img.attn over input.txt) bought no judged redraw (benchmarks/
# patching.py: 0.68 -> 0.68): a position must close at least a tenth of the distance to the safe image.
MIN_GAIN = 0.1


def matched_pairs(prompts: Sequence[PromptRecord], k: int) -> list[tuple[PromptRecord, PromptRecord]]:
    """Up to k (unsafe, safe) pairs, spread over the sub-domains (round robin), in prompt-file order."""
    by_pair: dict[int, dict[int, PromptRecord]] = {}
    for p in prompts:
        if p.pair >= 0:
            by_pair.setdefault(p.pair, {})[p.label] = p
    full = [(d[1], d[0]) for d in by_pair.values() if 0 in d and 1 in d]
    groups: dict[str, list] = {}
    for pair in full:
        groups.setdefault(pair[0].subdomain, []).append(pair)
    out: list[tuple[PromptRecord, PromptRecord]] = []
    while len(out) < k and any(groups.values()):
        for g in groups.values():
            if g and len(out) < k:
                out.append(g.pop(0))
    return out


@contextmanager
def forward_hooks(modules: dict[str, torch.nn.Module], make_hook: Callable[[str], Callable]):
    """Forward hooks make_hook(name) on each module for the block, removed in `finally`."""
    handles = [m.register_forward_hook(make_hook(name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def final_latents(generator: Generator, prompts: Sequence[PromptRecord]) -> torch.Tensor:
    """The final latents of `prompts` (each from its own seed, at most `generator.max_batch` per run), float32
    on the CPU."""
    step = generator.max_batch or max(len(prompts), 1)
    return torch.cat([generator.run([p.text for p in chunk], [p.seed for p in chunk], lambda _i: None).float().cpu()
                      for chunk in (prompts[i:i + step] for i in range(0, len(prompts), step))])


def distance(latent: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-generation L2 distance of two batches of final latents [N]."""
    return (latent - reference).flatten(1).norm(dim=1)


class SteerabilityProbe:
    """Runs the safe prompts once (recording every candidate's prompt rows), then scores position sets."""

    def __init__(self, generator: Generator, pairs: Sequence[tuple[PromptRecord, PromptRecord]],
                 candidates: Sequence[str]):
        if not pairs:
            raise SafeDIGError("steerability needs matched unsafe/safe pairs", "route on a set of matched pairs")
        self.generator = generator
        self.unsafe = [u for u, _ in pairs]
        safe = [s for _, s in pairs]
        self.modules = {p: m for p, m in resolve(generator.model).modules.items() if p in candidates}
        self.recorded: dict[str, list[torch.Tensor]] = {p: [] for p in self.modules}

        def record(name):
            def hook(_m, _a, out):
                self.recorded[name].append(out[self.generator.cond_rows(out.shape[0])].detach().clone())
            return hook

        with forward_hooks(self.modules, record):
            self.safe_latent = final_latents(generator, safe)
        self.base = distance(final_latents(generator, self.unsafe), self.safe_latent)
        self.cache: dict[tuple[str, ...], float] = {}

    def score(self, positions: Sequence[str]) -> float:
        """steerability of patching every position in `positions` together (cached per set)."""
        key = tuple(sorted(positions))
        if key in self.cache:
            return self.cache[key]
        replay = {p: iter(self.recorded[p]) for p in key}

        def patch(name):
            def hook(_m, _a, out):
                out = out.clone()
                out[self.generator.cond_rows(out.shape[0])] = next(replay[name]).to(out.dtype)
                return out
            return hook

        with forward_hooks({p: self.modules[p] for p in key}, patch):
            latent = final_latents(self.generator, self.unsafe)
        if any(next(it, None) is not None for it in replay.values()):
            raise SafeDIGError("a patched position ran fewer times than in the safe run",
                               "the generator must sample the same schedule for every prompt")
        value = float((1.0 - distance(latent, self.safe_latent) / self.base.clamp_min(1e-8)).clamp(0.0, 1.0).mean())
        self.cache[key] = round(value, 4)
        return self.cache[key]


def greedy_sets(probe: SteerabilityProbe, candidates: Sequence[str], r: int, first: str,
                allowed: Callable[[str], bool] = lambda _p: True) -> tuple[list[str], list[dict]]:
    """The routed set by joint effect: `first`, then the allowed candidate that raises the joint
    steerability most, while the gain is >= MIN_GAIN and the set is smaller than r. Returns the set and a
    log entry per step."""
    chosen = [first]
    current = probe.score(chosen)
    log: list[dict] = [{"set": list(chosen), "steerability": current}]
    while len(chosen) < r:
        tried = {p: probe.score([*chosen, p]) for p in candidates if p not in chosen and allowed(p)}
        if not tried:
            break
        best = max(tried, key=lambda p: (tried[p], p))
        gain = tried[best] - current
        log.append({"tried": tried, "best": best, "gain": round(gain, 4)})
        if gain < MIN_GAIN:
            log[-1]["stopped"] = f"gain below {MIN_GAIN}"
            break
        chosen.append(best)
        current = tried[best]
        log.append({"set": list(chosen), "steerability": current})
    return chosen, log
