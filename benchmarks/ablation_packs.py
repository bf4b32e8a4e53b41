"""Ablation packs for the safety table: the same pipeline as `build-pack`, on the same collected
activations, but with the routing replaced.

    fixed_position     one hand-picked position, no routing: the middle double block's image attention
    random_positions   R positions drawn at random (seeded) from every candidate, no routing
    previous_shipped   the pack shipped until 2026-12 (single.0.out detects and steers with the constant anchor),
                       from git: the shipped pack's detector, kept as a row of the safety table
    previous_combined  the pack shipped until 2026-12-04 (single.0.out detects, input.txt steers with the learned
                       map at gain 3), from git: the learned map against today's affine target

    .venv/bin/python benchmarks/ablation_packs.py --run runs/build-pack    # after build-pack
Writes benchmarks/results/ablation_packs/{kind}.safetensors (regenerable, not
committed).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safedig_core.training.cli import BUILD_PACK_HARMFUL_FROM  # noqa: E402
from safedig_core.training.collect import world_prompts  # noqa: E402
from safedig_core.training.features import FeatureConfig  # noqa: E402
from safedig_core.training.generators import BundledGenerator  # noqa: E402
from safedig_core.training.pipeline import (  # noqa: E402
    choose_blend_target,
    run_adapt,
    run_export,
    run_features,
    run_train,
)
from safedig_core.training.sae_training import AdaptConfig, SAEConfig  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "ablation_packs"
SHIPPED = ROOT / "dictionaries" / "bundled_hazard_to_toxic.safetensors"
STEER_PAIRS = 24  # matched pairs the learned target is chosen on (build-pack's --steer-pairs default)
# The last commit that shipped each earlier pack, by ablation kind
FROM_GIT = {"previous_shipped": "2a21c8d", "previous_combined": "ec6f6d6"}


def choose(kind: str, candidates: list[str], r: int, seed: int) -> list[str]:
    if kind == "fixed_position":
        doubles = sorted({int(p.split(".")[1]) for p in candidates if p.startswith("double.")})
        return [f"double.{doubles[len(doubles) // 2]}.img.attn"]
    return random.Random(seed).sample(sorted(candidates), r)


def build(kind: str, main_run: Path, seed: int, r: int) -> Path:
    routing = json.loads((main_run / "routing.json").read_text())
    candidates = [c["position"] for c in routing["candidates"]]
    chosen = choose(kind, candidates, r, seed)
    run = main_run.parent / f"{main_run.name}-{kind}"
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    (run / "collect").symlink_to((main_run / "collect").resolve(), target_is_directory=True)
    for c in routing["candidates"]:
        c["selected"] = c["position"] in chosen
        c["rank"] = chosen.index(c["position"]) + 1 if c["selected"] else 0
        c["note"] = f"{kind} (ablation, not routed)" if c["selected"] else ""
    routing["method"] = f"ablation: {kind}, no routing (positions {chosen})"
    (run / "routing.json").write_text(json.dumps(routing, indent=1))
    print(f"{kind}: {chosen}", flush=True)

    generator = BundledGenerator(steps=20, guidance=3.0)
    run_train(run, ["source", "benign"], SAEConfig(seed=seed))
    calib = {
        "benign": world_prompts("benign", 50, seed + 1),
        "benign_heldout": world_prompts("benign", 16, seed + 2, "heldout"),
    }
    # H as build-pack chooses it: n_harmful latents from each domain's pairs
    run_features(run, "hazard", "source", calib, FeatureConfig.for_sets(BUILD_PACK_HARMFUL_FROM.split(",")),
                 generator)
    run_adapt(run, "toxic", "target", AdaptConfig(seed=seed))
    choose_blend_target(run, generator, ["source", "target"], STEER_PAIRS)  # the learned target, as build-pack
    OUT.mkdir(parents=True, exist_ok=True)
    return run_export(run, OUT / f"{kind}.safetensors", {"ablation": kind})


def from_git(kind: str) -> Path:
    """An earlier shipped pack (FROM_GIT), read from the git history."""
    data = subprocess.run(["git", "show", f"{FROM_GIT[kind]}:{SHIPPED.relative_to(ROOT)}"], cwd=ROOT,
                          check=True, capture_output=True).stdout
    out = OUT / f"{kind}.safetensors"
    OUT.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "build-pack"), help="the build-pack run folder")
    ap.add_argument("--kinds", default="fixed_position,random_positions,previous_shipped,previous_combined")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-R", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    for kind in args.kinds.split(","):
        out = from_git(kind) if kind in FROM_GIT else build(kind, Path(args.run), args.seed, args.R)
        print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
