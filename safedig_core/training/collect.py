"""Collect activations: run a generator over prompts x sampled steps, capture every candidate position
with the core's hooks (`ActivationCapture`), and write them as shards (docs/method.md sections 2-4).

One folder per prompt set (e.g. runs/NAME/collect/source/):
    manifest.json                 the plan: prompts (text, label, seed, pair, subdomain), capture steps,
                                  positions, shard size, generator; a rerun with another plan is refused
    shard-00000.safetensors ...   written under a temp name, then renamed: a shard exists only when complete,
                                  so a killed run resumes at the next unfinished shard
Tensors of a shard (rows = prompts x capture steps of the shard, cond chunk only):
    act.{position}   [rows, tokens, d] float16   the tokens kept per row (all, or an evenly strided subset)
    mean.{position}  [rows, d]         float32   mean over ALL tokens of the row (what routing scores)
    row.prompt       [rows] int64      index into the manifest's prompts;   row.step [rows] int64

Memory holds one shard's rows at a time. Under torch.distributed, rank r collects shards r, r+W, ...
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import SafeDIGError
from ..hooks import ActivationCapture
from .generators import Generator

MANIFEST = "manifest.json"
COLLECT_VERSION = 1


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a set. label 1 = unsafe, 0 = safe counterpart or benign. A matched unsafe/safe pair
    shares `pair` (>= 0) and `seed` (the same starting noise); unpaired prompts have pair -1."""

    text: str
    label: int
    seed: int
    pair: int = -1
    subdomain: str = ""
    concept: str = ""


def world_prompts(kind: str, n_per_concept: int, seed: int = 0, split: str = "train") -> list[PromptRecord]:
    """The bundled model's prompt sets: "source" / "target" matched pairs, or "benign" prompts."""
    from ..bundled import world

    if kind == "benign":
        prompts = world.eval_prompts(n_per_concept, split, seed, concepts=world.BENIGN_CONCEPTS)
        return [PromptRecord(p.text, 0, 1_000_000 * (seed + 1) + i, -1, "benign", p.concept)
                for i, p in enumerate(prompts)]
    if kind not in ("source", "target"):
        raise SafeDIGError(f"unknown prompt set {kind!r}", "use source, target or benign, or pass --prompts FILE")
    records = []
    for i, (unsafe, safe) in enumerate(world.matched_pairs(kind, n_per_concept, split, seed)):
        sub = world.CONCEPT_BY_NAME[unsafe.concept].subdomain
        noise_seed = 1_000_000 * (seed + 1) + 10_000 * (1 + ("source", "target").index(kind)) + i
        records.append(PromptRecord(unsafe.text, 1, noise_seed, i, sub, unsafe.concept))
        records.append(PromptRecord(safe.text, 0, noise_seed, i, sub, safe.concept))
    return records


def read_prompt_file(path: str | os.PathLike, seed: int = 0) -> list[PromptRecord]:
    """JSON lines: {"text", "label": "unsafe"|"safe"|"benign"|1|0, "pair"?, "subdomain"?, "seed"?}."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SafeDIGError(f"cannot read prompt file ({getattr(exc, 'strerror', None) or exc})",
                           "pass a UTF-8 JSON-lines file", path=path) from None
    return parse_prompt_lines(text, seed, path)


def parse_prompt_lines(text: str, seed: int = 0, path: str | os.PathLike | None = None) -> list[PromptRecord]:
    """The JSON-lines prompt format (read_prompt_file) from a string, e.g. pasted into a node."""
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            label = {"unsafe": 1, "safe": 0, "benign": 0}.get(r["label"], r["label"])
            if label not in (0, 1):
                raise ValueError(f"label {r['label']!r}")
            pair = int(r.get("pair", -1))
            records.append(PromptRecord(str(r["text"]), int(label), int(r.get("seed", seed * 1_000_003 + max(pair, n))),
                                        pair, str(r.get("subdomain", "")), str(r.get("concept", ""))))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SafeDIGError(f"line {n} is not a prompt record ({exc!r})",
                               'write {"text": ..., "label": "unsafe"|"safe"|"benign", "pair": N}', path=path) from None
    if not records:
        raise SafeDIGError("the prompt set is empty", "add one JSON object per line", path=path)
    return records


def evenly_spaced_steps(steps: int, n: int) -> list[int]:
    """n capture steps spread over a schedule of `steps` (first and last included)."""
    if n >= steps:
        return list(range(steps))
    return sorted({round(i * (steps - 1) / max(1, n - 1)) for i in range(n)})


def _plan_hash(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def collect(generator: Generator, prompts: Sequence[PromptRecord], out_dir: str | os.PathLike, *,
            capture_steps: Sequence[int], positions: Sequence[str] | None = None, shard_size: int = 64,
            batch_size: int = 32, max_tokens: int | None = None, rank: int = 0, world_size: int = 1,
            progress: bool = True, on_shard: Callable[[int], None] | None = None) -> Path:
    """Collect (or resume collecting) `prompts` into out_dir; returns out_dir. Deterministic: the same
    plan gives bitwise the same shards, whatever was interrupted before."""
    from tqdm import tqdm

    out = Path(out_dir)
    model_positions = ActivationCapture(generator.model).model_positions
    positions = list(positions) if positions else model_positions.candidates
    bad = [s for s in capture_steps if not 0 <= s < generator.steps]
    if bad or not capture_steps:
        raise SafeDIGError(f"capture steps {list(capture_steps)} do not fit a {generator.steps}-step schedule",
                           f"use steps in 0..{generator.steps - 1}")
    plan = {
        "version": COLLECT_VERSION, "prompts": [asdict(p) for p in prompts], "capture_steps": sorted(capture_steps),
        "positions": positions, "shard_size": shard_size, "max_tokens": max_tokens, "generator": generator.spec,
        "architecture": model_positions.architecture, "d_model": model_positions.d_model,
    }
    start_manifest(out, plan, rank)
    n_shards = (len(prompts) + shard_size - 1) // shard_size
    mine = [i for i in range(n_shards) if i % world_size == rank]
    todo = [i for i in mine if not (out / shard_name(i)).exists()]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"collect {out.name}", unit="shard",
               disable=not progress, dynamic_ncols=True)
    for i in todo:
        indices = list(range(i * shard_size, min(len(prompts), (i + 1) * shard_size)))
        tensors = _collect_shard(generator, prompts, indices, positions, sorted(capture_steps), batch_size,
                                 max_tokens)
        write_shard(out, i, tensors, _plan_hash(plan))
        bar.update(1)
        if on_shard is not None:
            on_shard(i)
    bar.close()
    return out


def start_manifest(out: Path, plan: dict, rank: int = 0) -> None:
    """Write the plan (rank 0), or check that an existing folder was made with the same plan."""
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("plan_hash") != _plan_hash(plan):
            raise SafeDIGError("this folder holds a collection made with other settings (prompts, steps, "
                               "positions, generator)", "use another --run folder, or delete it to start over",
                               path=out)
    elif rank == 0:
        tmp = manifest_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**plan, "plan_hash": _plan_hash(plan)}, indent=1))
        os.replace(tmp, manifest_path)


def write_shard(out: Path, i: int, tensors: dict[str, torch.Tensor], plan_hash: str) -> None:
    """Temp name, then rename: a shard file exists only when it is complete."""
    tmp = out / f".{shard_name(i)}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp), metadata={"plan_hash": plan_hash})
    os.replace(tmp, out / shard_name(i))


def _collect_shard(generator: Generator, prompts: Sequence[PromptRecord], indices: list[int], positions: list[str],
                   capture_steps: list[int], batch_size: int, max_tokens: int | None) -> dict[str, torch.Tensor]:
    acts: dict[str, list[torch.Tensor]] = {p: [] for p in positions}
    means: dict[str, list[torch.Tensor]] = {p: [] for p in positions}
    row_prompt: list[int] = []
    row_step: list[int] = []
    state: dict[str, Any] = {"step": -1, "batch": []}
    wanted = set(capture_steps)

    def on_activation(position: str, out) -> None:
        if state["step"] not in wanted or not isinstance(out, torch.Tensor):
            return
        x = out[generator.cond_rows(out.shape[0])].detach().float()
        if x.shape[0] == 0:  # a call of the unconditional prompt alone (ComfyUI may split cond and uncond)
            return
        means[position].append(x.mean(1).cpu())
        if max_tokens and x.shape[1] > max_tokens:
            x = x[:, torch.linspace(0, x.shape[1] - 1, max_tokens).round().long()]
        acts[position].append(x.to(torch.float16).cpu())

    def on_step(step: int) -> None:
        state["step"] = step
        if step in wanted:
            row_prompt.extend(state["batch"])
            row_step.extend([step] * len(state["batch"]))

    batch_size = min(batch_size, generator.max_batch or batch_size)
    with ActivationCapture(generator.model, positions, on_activation=on_activation):
        for b in range(0, len(indices), batch_size):
            batch = indices[b:b + batch_size]
            state["batch"] = batch
            generator.run([prompts[j].text for j in batch], [prompts[j].seed for j in batch], on_step)
    tensors = {"row.prompt": torch.tensor(row_prompt, dtype=torch.int64),
               "row.step": torch.tensor(row_step, dtype=torch.int64)}
    for p in positions:
        tensors[f"act.{p}"] = torch.cat(acts[p]).contiguous()
        tensors[f"mean.{p}"] = torch.cat(means[p]).contiguous()
        if tensors[f"act.{p}"].shape[0] != len(row_prompt):
            raise SafeDIGError(f"position {p} fired {tensors[f'act.{p}'].shape[0]} times for {len(row_prompt)} "
                               "captured rows", "the generator must call the DiT once per step")
    return tensors


# ------------------------------------------------------------------------------------------------ reading


class ActivationSet:
    """A finished (or partly finished) collection folder, read lazily shard by shard."""

    def __init__(self, path: str | os.PathLike, require_complete: bool = True):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.exists():
            raise SafeDIGError("no collection here (manifest.json missing)", "run `collect` first", path=self.path)
        self.manifest = json.loads(manifest.read_text())
        self.prompts = [PromptRecord(**p) for p in self.manifest["prompts"]]
        self.positions: list[str] = self.manifest["positions"]
        self.capture_steps: list[int] = self.manifest["capture_steps"]
        self.d_model: int = self.manifest["d_model"]
        self.architecture: str = self.manifest["architecture"]
        n = (len(self.prompts) + self.manifest["shard_size"] - 1) // self.manifest["shard_size"]
        self.shards = [self.path / shard_name(i) for i in range(n)]
        missing = [s.name for s in self.shards if not s.exists()]
        if missing and require_complete:
            raise SafeDIGError(f"collection is unfinished ({len(missing)} of {n} shards missing)",
                               "rerun the same `collect` command to resume it", path=self.path)

    @property
    def name(self) -> str:
        return self.path.name

    def read(self, shard: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
        with safe_open(str(shard), framework="pt") as f:
            return {n: f.get_tensor(n) for n in names}

    def rows(self, shard: Path) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.read(shard, ["row.prompt", "row.step"])
        return t["row.prompt"], t["row.step"]

    def means(self, position: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean activations [rows, d], prompt index [rows], step [rows]) over all shards (small)."""
        parts = [self.read(s, [f"mean.{position}", "row.prompt", "row.step"]) for s in self.shards]
        mean, prompt, step = (torch.cat([p[k] for p in parts]) for k in (f"mean.{position}", "row.prompt", "row.step"))
        return mean, prompt, step

    def labels(self) -> torch.Tensor:
        return torch.tensor([p.label for p in self.prompts])


def is_heldout(record: PromptRecord, index: int, every: int = 10) -> bool:
    """Rows kept out of SAE training for FVE: every tenth pair (both members) or unpaired prompt, starting
    with the first, so even a small set holds some out."""
    key = record.pair if record.pair >= 0 else index
    return key % every == 0


def token_rows(aset: ActivationSet, shard: Path, position: str, heldout: bool | None) -> torch.Tensor:
    """One shard's tokens at a position as float32 [n, d]; heldout None = all rows, else train or held-out."""
    t = aset.read(shard, [f"act.{position}", "row.prompt"])
    x = t[f"act.{position}"]
    if heldout is not None:
        keep = torch.tensor([is_heldout(aset.prompts[i], i) == heldout for i in t["row.prompt"].tolist()])
        x = x[keep]
    return x.reshape(-1, x.shape[-1]).float()


def token_stream(sets: Sequence[ActivationSet], position: str, batch_size: int, seed: int, *,
                 rank: int = 0, world_size: int = 1, buffer_tokens: int = 2_000_000):
    """Endless shuffled batches [batch_size, d] of training tokens at `position` from this rank's shards
    (shard j of the concatenated list goes to rank j % world_size). Memory: one buffer of at most about
    buffer_tokens tokens. A pure function of (sets, seed, rank): resuming replays it."""
    shards = [(a, s) for a in sets for s in a.shards]
    mine = [shards[j] for j in range(len(shards)) if j % world_size == rank]
    if not mine:
        raise SafeDIGError(f"rank {rank} has no shards ({len(shards)} shards for {world_size} ranks)",
                           "collect more prompts or use fewer processes")
    chunk = [torch.empty(0, sets[0].d_model)]  # carries the tokens short of a full batch
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(mine), generator=g).tolist()
        for n, j in enumerate(order):
            a, s = mine[j]
            chunk.append(token_rows(a, s, position, heldout=False))
            if sum(c.shape[0] for c in chunk) >= buffer_tokens or n == len(order) - 1:
                buf = torch.cat(chunk)
                buf = buf[torch.randperm(buf.shape[0], generator=g)]
                full = buf.shape[0] // batch_size * batch_size
                yield from buf[:full].split(batch_size)
                chunk = [buf[full:]]
        epoch += 1


def count_tokens(sets: Sequence[ActivationSet], position: str) -> int:
    """Training tokens at a position over all shards (from the headers, no data read)."""
    total = 0
    for a in sets:
        for s in a.shards:
            prompt = a.read(s, ["row.prompt"])["row.prompt"].tolist()
            with safe_open(str(s), framework="pt") as f:
                per_row = f.get_slice(f"act.{position}").get_shape()[1]
            total += per_row * sum(not is_heldout(a.prompts[i], i) for i in prompt)
    return total
