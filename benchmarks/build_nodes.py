"""The bundled build inside a real ComfyUI server, against the CLI's: SafeDIG Build Dictionary on the
shipped bundled prompt sets (the prompts and seeds `build-pack` collects and calibrates on, at its settings
and its shipped position `single.0.out`), timed; then Build on the source alone + Adapt Dictionary. Every
pack is judged by `steer-check` on the same held-out prompts and seeds as the shipped (CLI-built) pack.
Differences with 95 % CIs (Wilson per rate, Newcombe for the gap).

    .venv/bin/python benchmarks/build_nodes.py      # ~10-15 min on 2 cores; writes benchmarks/results/build_nodes.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from comfy_server import start_test_server  # noqa: E402

CLI_PACK = ROOT / "dictionaries" / "bundled_hazard_to_toxic.safetensors"
SAMPLING = dict(sampler_name="euler", scheduler="simple", steps=20, cfg=3.0, guidance=3.5, width=32, height=32,
                seeds_per_prompt=1, capture_steps=4, max_tokens_per_row=0, build_seed=0)


def graph() -> dict:
    """build-pack's pipeline as nodes (the same prompt files, settings and position): Build Dictionary with
    the target pairs and the calibration set ("node build"); and Build on the source alone, then Adapt
    Dictionary with the target pairs ("node build + adapt", whose harmful latents never saw the target)."""
    build = {"model": ["1", 0], "clip": ["2", 0], "prompt_pairs": "bundled_source_pairs.jsonl",
             "benign_prompts": "bundled_benign.jsonl", "domain": "hazard", "overwrite": True, **SAMPLING,
             "candidate_positions": "single.0.out", "routed_count": 1, "sae_expansion": 16, "sae_k": 32,
             "sae_epochs": 3.0, "pasted_pairs": "", "pasted_benign": "",
             "calibration_prompts": "bundled_benign_calibration.jsonl"}
    return {
        "1": {"class_type": "SafeDIGLoadBundledModel", "inputs": {"weights": "bundled_flux.safetensors"}},
        "2": {"class_type": "SafeDIGLoadBundledTextEncoder", "inputs": {}},
        "3": {"class_type": "SafeDIGBuildDictionary", "inputs": {
            **build, "pack_name": "node_build", "target_pairs": "bundled_target_pairs.jsonl",
            "target_domain": "toxic"}},
        "5": {"class_type": "SafeDIGBuildDictionary", "inputs": {**build, "pack_name": "node_source_only"}},
        "4": {"class_type": "SafeDIGAdaptDictionary", "inputs": {
            "model": ["1", 0], "clip": ["2", 0], "pack": "(dictionary input)", "dictionary": ["5", 0],
            "prompt_pairs": "bundled_target_pairs.jsonl", "benign_prompts": "bundled_benign.jsonl",
            "domain": "toxic", "pack_name": "node_build_adapt", "overwrite": True, **SAMPLING, "adapt_epochs": 3.0,
            "pasted_pairs": "", "pasted_benign": ""}},
    }


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def newcombe(p1: float, n1: int, p2: float, n2: int) -> tuple[float, float]:
    """95 % CI of p1 - p2 from the two Wilson intervals."""
    l1, u1 = wilson(p1 * n1, n1)
    l2, u2 = wilson(p2 * n2, n2)
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="held-out prompts per concept for steer-check")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "build_nodes.json"))
    args = ap.parse_args()
    import torch

    from safedig_core.training.judged_check import steer_check

    torch.set_num_threads(2)
    base = Path(tempfile.mkdtemp(prefix="safedig-build-"))
    server = start_test_server(base)
    try:
        t0 = time.time()
        server.run({k: v for k, v in graph().items() if k in ("1", "2", "3")}, timeout=3600)
        wall = time.time() - t0
        t0 = time.time()
        server.run(graph(), timeout=3600)  # node 3 is cached: this is Build (source) + Adapt
        wall_adapt = time.time() - t0
    finally:
        server.stop()
    packs = base / "models" / "safedig"
    checks = {name: steer_check(path, n_per_concept=args.n, modes=["off", "blend"], verbose=False)
              for name, path in (("node build", packs / "node_build.safetensors"),
                                 ("node build + adapt", packs / "node_build_adapt.safetensors"), ("cli", CLI_PACK))}
    rows = {}
    for variant in ("node build", "node build + adapt"):
        for key in checks["cli"]:
            label = key.replace("(hazard dict)", "(source dict)").replace("(toxic dict)", "(target dict)")
            a, b = checks[variant][key], checks["cli"][key]
            for metric in ("unsafe_rate", "concept_accuracy"):
                if metric in a:
                    lo, hi = newcombe(a[metric], a["n"], b[metric], b["n"])
                    rows[f"{variant}: {label} {metric}"] = {
                        "node": round(a[metric], 4), "cli": round(b[metric], 4), "n": a["n"],
                        "node_minus_cli": round(a[metric] - b[metric], 4), "ci95": [round(lo, 4), round(hi, 4)],
                        "within_noise": lo <= 0 <= hi}
    result = {"build_wall_seconds": round(wall, 1), "build_then_adapt_wall_seconds": round(wall_adapt, 1),
              "threads": 2, "comparison": rows, "steer_check": checks, "cli_pack": CLI_PACK.name}
    print(f"Build Dictionary (with target pairs) in ComfyUI: {wall / 60:.1f} min; Build + Adapt: "
          f"{wall_adapt / 60:.1f} min")
    for name, r in rows.items():
        print(f"{name:65s} node {r['node']:.3f}  cli {r['cli']:.3f}  diff {r['node_minus_cli']:+.3f} "
              f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]{'' if r['within_noise'] else '  (outside noise)'}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
