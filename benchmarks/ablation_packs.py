"""Ablation packs for the safety table: the same pipeline as `build-pack`, on the same collected
activations, but with the routing replaced.

    fixed_position     one hand-picked position, no routing: the middle double block's image attention
    random_positions   R positions drawn at random (seeded) from every candidate, no routing
    detect_then_steer  a pilot merge of two packs: the shipped pack's single.0.out gate detects (an identity map
                       there: no edit), the router's input.txt map (router_choice.safetensors) steers the
                       latched images from the next step on (its own gate never opens)

    .venv/bin/python benchmarks/ablation_packs.py --run runs/build-pack    # after build-pack
Writes benchmarks/results/ablation_packs/{kind}.safetensors (regenerable, not
committed).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safedig_core.pack import (  # noqa: E402
    BLEND_MAP,
    DomainEntry,
    DomainFeatures,
    blend_map_key,
    build_metadata,
    load_pack,
    save_pack,
)
from safedig_core.training.cli import BUILD_PACK_HARMFUL_FROM  # noqa: E402
from safedig_core.training.collect import world_prompts  # noqa: E402
from safedig_core.training.features import FeatureConfig  # noqa: E402
from safedig_core.training.generators import BundledGenerator  # noqa: E402
from safedig_core.training.pipeline import run_adapt, run_export, run_features, run_train  # noqa: E402
from safedig_core.training.sae_training import AdaptConfig, SAEConfig  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "ablation_packs"


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
    OUT.mkdir(parents=True, exist_ok=True)
    return run_export(run, OUT / f"{kind}.safetensors", {"ablation": kind})


def detect_then_steer(detector: Path, steerer: Path, detect_at: str = "single.0.out",
                      steer_at: str = "input.txt") -> Path:
    """One pack: `detector`'s gate at `detect_at` with an identity map (Blend leaves it as it is), `steerer`'s
    learned map at `steer_at` with a threshold no score reaches, so it steers only images the detector
    latched (image-scope gate)."""
    det, steer = load_pack(detector), load_pack(steerer)
    infos = {steer_at: steer.position_info(steer_at), detect_at: det.position_info(detect_at)}
    tensors = {k: v for k, v in steer.tensors.items() if f".{steer_at}." in k}
    tensors.update({k: v for k, v in det.tensors.items() if f".{detect_at}." in k})
    ids = torch.tensor(infos[detect_at].harmful_ids)
    domains = {}
    for d in steer.domains:
        identity = torch.zeros(len(ids), infos[detect_at].d_sae)
        identity[torch.arange(len(ids)), ids] = 1.0  # z_H M = z_H: D(z_safe) - D(z) = 0
        tensors[blend_map_key(d, detect_at)] = identity
        fs, fd = steer.domain_features(d, steer_at), det.domain_features(d, detect_at)
        feats = {steer_at: DomainFeatures(fs.harmful_weights, fs.anchor_ids, fs.anchor_values, 1e30, fs.extra,
                                          BLEND_MAP),
                 detect_at: DomainFeatures(fd.harmful_weights, fd.anchor_ids, fd.anchor_values, fd.tau, fd.extra,
                                           BLEND_MAP)}
        domains[d] = DomainEntry(feats, steer.metadata["domains"][d].get("adapted_from"))
    meta = build_metadata(architecture=steer.architecture, d_model=steer.d_model, positions=infos,
                          source_domain=steer.source_domain, domains=domains, sae=steer.metadata["sae"],
                          routing=steer.metadata["routing"],
                          provenance={**steer.metadata["provenance"], "ablation": "detect_then_steer",
                                      "detector": str(detector), "steerer": str(steerer)})
    return save_pack(OUT / "detect_then_steer.safetensors", meta, tensors)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "build-pack"), help="the build-pack run folder")
    ap.add_argument("--kinds", default="fixed_position,random_positions,detect_then_steer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-R", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    for kind in args.kinds.split(","):
        if kind == "detect_then_steer":
            merged = detect_then_steer(ROOT / "dictionaries" / "bundled_hazard_to_toxic.safetensors",
                                       OUT / "router_choice.safetensors")
            print(f"-> {merged}")
            continue
        print(f"-> {build(kind, Path(args.run), args.seed, args.R)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
