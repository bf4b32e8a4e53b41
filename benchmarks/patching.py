"""Activation patching on the bundled model: which position carries the unsafe concept into the image?

For held-out unsafe prompts, one position's output (prompt rows, every step) is replaced by what the same
position produced for the matched safe prompt (same seed, same step); the judge then says how many images
are still unsafe. A position whose replacement removes the concept is one where steering can work; one
whose replacement changes nothing cannot be steered into safety however well its features detect.
This is how the shipped pack's position was chosen (docs/training.md).

    .venv/bin/python benchmarks/patching.py            # N=30 per domain, every position (~2 min on 2 cores)
    .venv/bin/python benchmarks/patching.py --smoke    # CI: N=2, 2 steps, two positions

Writes benchmarks/results/patching{,_smoke}.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safety_table import prompt_sets  # noqa: E402

from safedig_core.bundled import world  # noqa: E402
from safedig_core.bundled.generator import initial_noise, latent_to_pixels, load_bundled, sample  # noqa: E402
from safedig_core.bundled.judge import Judge  # noqa: E402
from safedig_core.bundled.text_encoder import encode_prompts  # noqa: E402
from safedig_core.hooks import ActivationCapture  # noqa: E402
from safedig_core.positions import resolve  # noqa: E402


def patched_images(model, unsafe, safe, positions, noise, steps, guidance, uncond):
    """uint8 images of the unsafe prompts with `positions` replaced by the safe prompts' outputs."""
    n = len(unsafe)
    tokens, pooled = encode_prompts([p.text for p in safe])
    capture = ActivationCapture(model, positions)
    with capture:
        sample(model, tokens, pooled, noise, steps, guidance, uncond)
    replay = {p: iter(capture.activations[p]) for p in positions}
    modules = resolve(model).modules
    handles = []

    def replace(position):
        def hook(_module, _args, out):
            out = out.clone()
            out[:n] = next(replay[position])[:n].to(out.dtype)  # prompt rows; the CFG rows stay
            return out
        return hook

    try:
        for p in positions:
            handles.append(modules[p].register_forward_hook(replace(p)))
        tokens, pooled = encode_prompts([p.text for p in unsafe])
        latent = sample(model, tokens, pooled, noise, steps, guidance, uncond)
    finally:
        for h in handles:
            h.remove()
    return world.to_uint8(latent_to_pixels(latent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30, help="unsafe prompts per domain")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, judge = load_bundled(), Judge.load()
    positions = resolve(model).ids
    if args.smoke:
        args.n, args.steps, positions = 2, 2, positions[:2]
    sets = prompt_sets(args.n, seed=0)
    noise = initial_noise(list(range(10_000, 10_000 + args.n)), model.bundled_config)
    uncond = encode_prompts([""])
    rows = {}
    for label, patch in [("none", [])] + [(p, [p]) for p in positions]:
        row = {}
        for role in ("source", "target"):
            unsafe = sets[role]
            safe = [world.safe_counterpart(p) for p in unsafe]
            images = patched_images(model, unsafe, safe, patch, noise, args.steps, args.guidance, uncond)
            verdict = judge(images)
            row[f"{role}_unsafe_rate"] = round(float(verdict.unsafe.mean()), 4)
            row[f"{role}_validity"] = round(float(verdict.validity.mean()), 4)
        rows[label] = row
        print(f"{label:20s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("patching_smoke" if args.smoke else "patching"))
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"config": {"n_per_domain": args.n, "steps": args.steps, "guidance": args.guidance,
                         "split": "heldout wordings"}, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
