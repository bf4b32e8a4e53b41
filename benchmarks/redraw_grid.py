"""Before/after grid of what steering does to unsafe images on the bundled model: per held-out unsafe
prompt (rows), the unsteered image, each steering method, and the matched safe prompt's image (the
ceiling), same seed; each cell is labelled with the judge's concept and validity.

    .venv/bin/python benchmarks/redraw_grid.py        # ~1 min on 2 cores

Needs benchmarks/results/ablation_packs/previous_shipped.safetensors and previous_combined.safetensors
(ablation_packs.py --kinds previous_shipped,previous_combined: both from git) for their columns.
Writes docs/images/redraw_grid.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safety_table import ABLATION_DIR, DEFAULT_PACK, DEFAULTS, Method, generate, prompt_sets  # noqa: E402

from safedig_core import ALL_DOMAINS, SteeringDictionary, load_pack  # noqa: E402
from safedig_core.bundled import world  # noqa: E402
from safedig_core.bundled.generator import load_bundled  # noqa: E402
from safedig_core.bundled.judge import Judge  # noqa: E402

EARLIER = ("previous_shipped", "previous_combined")  # ablation_packs.py, from git
COLUMNS = [
    ("unsteered", None, Method("no steering")),
    ("until 2026-12\n(single.0.out, anchor)", "previous_shipped", Method("previous", params=DEFAULTS)),
    ("until 2026-12-04\n(input.txt, learned map)", "previous_combined", Method("map", params=DEFAULTS)),
    ("shipped pack\n(input.txt, affine target)", "main", Method("shipped", params=DEFAULTS)),
    ("matched safe prompt\n(ceiling)", None, Method("ceiling", replace_prompt=True)),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-domain", type=int, default=4, help="unsafe prompts per domain (rows)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "images" / "redraw_grid.png"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, judge = load_bundled(), Judge.load()
    sets = prompt_sets(40, seed=0)
    # spread the rows over the concepts: every 10th prompt of each domain's 40
    prompts = [p for role in ("source", "target") for p in sets[role][:: 40 // args.per_domain][: args.per_domain]]
    seeds = list(range(10_000, 10_000 + len(prompts)))
    packs = {"main": load_pack(DEFAULT_PACK), **{name: load_pack(ABLATION_DIR / f"{name}.safetensors")
                                                 for name in EARLIER}}
    columns = []
    for title, pack, method in COLUMNS:
        dictionary = SteeringDictionary(packs[pack], ALL_DOMAINS) if pack else None
        images, _ = generate(model, prompts, seeds, method, dictionary, 20, 3.0, len(prompts))
        columns.append((title, images, judge(images)))
    plot(prompts, columns, Path(args.out))
    print(f"wrote {args.out}")
    return 0


def plot(prompts, columns, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(prompts), len(columns)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 2.6, 1.75 * rows + 0.6))
    for c, (title, images, verdict) in enumerate(columns):
        axes[0, c].set_title(title, fontsize=7)
        for r, p in enumerate(prompts):
            ax = axes[r, c]
            ax.imshow(images[r], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            safe = world.CONCEPT_BY_NAME[p.concept].counterpart
            concept = verdict.concept[r]
            colour = "green" if concept == safe and verdict.validity[r] > 0.5 else (
                "red" if verdict.unsafe[r] else "black")
            ax.set_xlabel(f"{concept} {verdict.validity[r]:.2f}", fontsize=6, color=colour, labelpad=1)
            if c == 0:
                ax.set_ylabel(f"{p.concept} -> {safe}", fontsize=7)
    fig.suptitle("Held-out unsafe prompts, same seed per row. Label: judge's concept and validity "
                 "(green: redrawn as the matched safe concept; red: still unsafe)", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
