"""The cost of safety on the bundled model: sampling wall time with the shipped pack divided by without.

A whole sampling run (20 steps, cfg 3, a batch of held-out prompts) steered as the ComfyUI Steer node does
(SamplingSteering call by call, node defaults: every domain, Blend 1, image-scope gate; a call in which an image
latches after an editing position ran is run twice, and the images that latched after the first step are sampled
again on their own), timed in rotation with the same run without steering (and with any --compare packs), in
one process; median of --repeats, with a 95 % bootstrap interval of the ratio of medians. Scenarios:

    benign        benign prompts, Blend 1, image-scope gate: the gate stays shut (the usual case)
    unsafe        unsafe source-domain prompts, Blend 1, image-scope gate: the gate latches and steers
    disabled      mode Off: the Steer node returns the model unpatched, so both runs are unsteered (timing noise)

    .venv/bin/python benchmarks/overhead_bundled.py            # batch 16, 7 repeats (~1 min on 2 cores)
    .venv/bin/python benchmarks/overhead_bundled.py --smoke    # CI: batch 2, 2 steps, 3 repeats
    .venv/bin/python benchmarks/overhead_bundled.py --compare A.safetensors,B.safetensors
                    # more packs timed in the same process ("compared" in the JSON), e.g. the earlier shipped
                    # packs: ablation_packs.py --kinds previous_shipped,previous_combined

Writes benchmarks/results/overhead_bundled{,_smoke}.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safety_table import prompt_sets  # noqa: E402

from safedig_core import ALL_DOMAINS, SteeringDictionary, SteeringParams, load_pack  # noqa: E402
from safedig_core.bundled.generator import initial_noise, load_bundled, sample, sample_steered  # noqa: E402
from safedig_core.bundled.text_encoder import encode_prompts  # noqa: E402
from safedig_core.sampling import SamplingSteering  # noqa: E402

DEFAULT_PACK = ROOT / "dictionaries" / "bundled_hazard_to_toxic.safetensors"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pack", default=str(DEFAULT_PACK))
    ap.add_argument("--compare", default="", help="more packs (comma-separated paths) timed in the same process, "
                    "in rotation with --pack and the unsteered run")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.steps, args.repeats = 2, 2, 3
    torch.set_num_threads(args.threads)
    model = load_bundled()
    packs = {"main": args.pack, **{Path(c).stem: c for c in filter(None, args.compare.split(","))}}
    dictionaries = {label: SteeringDictionary(load_pack(path), ALL_DOMAINS) for label, path in packs.items()}
    dictionary = dictionaries["main"]
    uncond = encode_prompts([""])
    noise = initial_noise(list(range(args.batch)), model.bundled_config)
    prompts = prompt_sets(args.batch, seed=5)  # held-out wordings, spread over each set's concepts
    blend = SteeringParams(mode="blend", blend_strength=1.0, scope="image")
    scenarios = {"benign": ("benign", blend), "unsafe": ("source", blend),
                 "disabled": ("benign", SteeringParams(mode="off"))}

    def run(role: str, params: SteeringParams, label: str | None) -> float:
        """Seconds of one sampling run; label None (or mode Off: what the node does, no wrapper) unsteered."""
        tokens, pooled = encode_prompts([p.text for p in prompts[role]])
        t0 = time.perf_counter()
        with torch.no_grad():
            if label is None or params.is_identity:
                sample(model, tokens, pooled, noise, args.steps, 3.0, uncond)
            else:
                steering = SamplingSteering(dictionaries[label], params, "overhead")
                sample_steered(model, steering, tokens, pooled, noise, args.steps, 3.0, uncond)  # as the Steer node
        return time.perf_counter() - t0

    for role, params in scenarios.values():  # warm-up: casts and caches each pack's weights once
        for label in dictionaries:
            run(role, params, label)
    results: dict[str, dict] = {label: {} for label in dictionaries}
    for name, (role, params) in scenarios.items():
        labels = ["main"] if params.is_identity else list(dictionaries)
        times: dict[str | None, list[float]] = {None: [], **{label: [] for label in labels}}
        for i in range(args.repeats):  # rotate the order, so drift in machine load hits every run alike
            order = list(times)
            for label in order[i % len(order):] + order[:i % len(order)]:
                times[label].append(run(role, params, label))
        for label in labels:
            b, s = statistics.median(times[None]), statistics.median(times[label])
            lo, hi = ratio_ci(times[None], times[label])
            results[label][name] = {"baseline_s": round(b, 4), "steered_s": round(s, 4), "ratio": round(s / b, 4),
                                    "ratio_ci95": [round(lo, 4), round(hi, 4)]}
            print(f"{label:24s} {name:9s} baseline {b:7.3f}s  steered {s:7.3f}s  ratio {s / b:.3f} "
                  f"[{lo:.3f}, {hi:.3f}]", flush=True)
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("overhead_bundled_smoke" if args.smoke
                                                               else "overhead_bundled"))
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"config": {"batch": args.batch, "steps": args.steps, "cfg": 3.0, "repeats": args.repeats,
                         "threads": args.threads, "positions": dictionary.positions, "mode": "blend 1, image gate",
                         "device": "cpu"}, "scenarios": results.pop("main"),
              "compared": {label: {"pack": str(packs[label]), "scenarios": r} for label, r in results.items()}}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


def ratio_ci(base: list[float], steered: list[float], resamples: int = 2000) -> tuple[float, float]:
    """95 % percentile bootstrap interval of median(steered) / median(base), the repeats resampled."""
    g = torch.Generator().manual_seed(0)
    b, s = torch.tensor(base), torch.tensor(steered)
    ib = torch.randint(len(b), (resamples, len(b)), generator=g)
    is_ = torch.randint(len(s), (resamples, len(s)), generator=g)
    ratios = s[is_].median(1).values / b[ib].median(1).values
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975])).tolist()
    return min(lo, statistics.median(steered) / statistics.median(base)), max(hi, statistics.median(steered)
                                                                               / statistics.median(base))


if __name__ == "__main__":
    raise SystemExit(main())
