"""Subcommands for the bundled model (`python -m safedig_core ...`):

    train-bundled   train / resume the generator (progress bar, checkpoints in --out)
    train-judge     train the judge on procedural images, report held-out accuracy
    generate        prompts -> PNGs (one per image) and a labelled grid
    eval-bundled    the model card's numbers: unsafe rates per domain, benign concept accuracy
    install-bundled evaluate a trained generator + judge, record the numbers, copy them into assets
    build-bundled   all of the above from scratch (with --install: into safedig_core/bundled/assets)
    world-images    the per-concept picture grids of docs/concept-world.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import world

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-bundled", help="train (or resume) the bundled FLUX-class generator")
    _train_args(p)
    p.set_defaults(func=_train_bundled)

    p = sub.add_parser("train-judge", help="train the judge on procedural images")
    p.add_argument("--out", default="runs/judge")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a busy machine)")
    p.set_defaults(func=_train_judge)

    p = sub.add_parser("generate", help="generate PNGs from prompts with the bundled model")
    p.add_argument("prompts", nargs="+", help="one or more captions")
    p.add_argument("--out", default="outputs/generate", help="folder for NNN.png and grid.png")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    _sampling_args(p)
    p.add_argument("--scale", type=int, default=4, help="upscale factor of the saved PNGs (nearest)")
    p.add_argument("--no-judge", action="store_true", help="do not label the grid with the judge's verdict")
    p.set_defaults(func=_generate)

    p = sub.add_parser("eval-bundled", help="measure unsafe rates and benign accuracy (model card numbers)")
    p.add_argument("--n-per-concept", type=int, default=64)
    p.add_argument("--split", default="heldout", choices=world.SPLITS)
    p.add_argument("--judge", default=None, help="judge .safetensors (default: the shipped one)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the metrics here")
    p.add_argument("--grid", default=None, help="write a labelled grid of the first 8 images per concept")
    _sampling_args(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("build-bundled", help="train judge + generator from scratch and evaluate them")
    _train_args(p, default_out="runs/build")
    p.add_argument("--judge-steps", type=int, default=1500)
    p.add_argument("--n-per-concept", type=int, default=64)
    p.add_argument("--install", action="store_true", help="copy the results into safedig_core/bundled/assets")
    p.set_defaults(func=_build)

    p = sub.add_parser("install-bundled", help="evaluate a trained generator + judge, copy them into assets")
    p.add_argument("generator", help="run folder of train-bundled (ema.safetensors, ema.json)")
    p.add_argument("judge", help="run folder of train-judge (judge.safetensors, judge.json)")
    p.add_argument("--n-per-concept", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=_install)

    p = sub.add_parser("world-images", help="write one picture grid per concept (docs/images)")
    p.add_argument("--out", default="docs/images")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_world_images)


def _train_args(p: argparse.ArgumentParser, default_out: str = "runs/bundled") -> None:
    from .generator import TrainArgs

    d = TrainArgs()
    p.add_argument("--out", default=default_out, help="run folder (checkpoint.pt, ema.safetensors)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--caption-pool", type=int, default=d.caption_pool)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch threads (1 is faster on a busy machine)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None, help="generator .safetensors (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="Euler steps")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a busy machine)")


def _train_bundled(args) -> int:
    from .generator import TrainArgs, train

    train(TrainArgs(out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    caption_pool=args.caption_pool, seed=args.seed, checkpoint_every=args.checkpoint_every,
                    threads=args.threads))
    print(f"weights: {Path(args.out) / 'ema.safetensors'}")
    return 0


def _train_judge(args) -> int:
    from .judge import train_judge

    train_judge(args.out, steps=args.steps, seed=args.seed, threads=args.threads)
    print(f"weights: {Path(args.out) / 'judge.safetensors'}")
    return 0


# ---------------------------------------------------------------- pictures

def labelled_grid(images: np.ndarray, labels: Sequence[str], columns: int = 8, scale: int = 4,
                  label_lines: int = 4):
    """A PIL image: tiles of `images` (uint8 [B, H, W, 3]) upscaled, each with its wrapped label below."""
    from PIL import Image, ImageDraw

    b, h, w, _ = images.shape
    tw, th = w * scale, h * scale
    line_h, chars = 11, max(8, tw // 6)
    cell_h = th + 4 + line_h * label_lines
    rows = (b + columns - 1) // columns
    canvas = Image.new("RGB", (columns * (tw + 4) + 4, rows * (cell_h + 4) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(b):
        x0, y0 = 4 + (i % columns) * (tw + 4), 4 + (i // columns) * (cell_h + 4)
        canvas.paste(Image.fromarray(images[i]).resize((tw, th), Image.Resampling.NEAREST), (x0, y0))
        for k, line in enumerate(textwrap.wrap(labels[i], chars)[:label_lines]):
            draw.text((x0, y0 + th + 2 + k * line_h), line, fill="black")
    return canvas


def _save_png(image: np.ndarray, path: Path, scale: int) -> None:
    from PIL import Image

    Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.NEAREST).save(path)


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _generate(args) -> int:
    from .generator import generate, load_bundled

    _set_threads(args.threads)
    model = load_bundled(args.weights)
    prompts = [p for p in args.prompts for _ in range(args.n)]
    images = generate(prompts, seed=args.seed, steps=args.steps, guidance=args.guidance, model=model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        _save_png(img, out / f"{i:03d}.png", args.scale)
    labels = [f"seed {args.seed + i}: {p}" for i, p in enumerate(prompts)]
    if not args.no_judge:
        from .judge import Judge

        v = Judge.load()(images)
        # verdict first: long captions are cut at the tile's last label line
        labels = [f"[{c}{' UNSAFE' if u else ''}] {lab}" for lab, c, u in zip(labels, v.concept, v.unsafe,
                                                                              strict=True)]
    labelled_grid(images, labels, columns=min(8, len(images)), scale=args.scale).save(out / "grid.png")
    print(f"wrote {len(images)} images and grid.png to {out}")
    return 0


# ---------------------------------------------------------------- evaluation

def evaluate_generator(model, judge, n_per_concept: int = 64, split: str = "heldout", seed: int = 0,
                       steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, encoder=None,
                       log=print) -> tuple[dict, np.ndarray, list]:
    """Generate n prompts per concept (wordings from `split`) and judge them.
    Returns (metrics, images, prompts). Unsafe rate of a domain = mean over its concepts of the share of
    images judged unsafe; benign accuracy = share of benign images judged as the requested concept."""
    from .generator import generate

    prompts = world.eval_prompts(n_per_concept, split, seed)
    t0 = time.time()
    images = generate([p.text for p in prompts], seed=seed * 100_000, steps=steps, guidance=guidance,
                      model=model, encoder=encoder)
    v = judge(images)
    per_concept = {}
    for name in world.CONCEPT_NAMES:
        idx = [i for i, p in enumerate(prompts) if p.concept == name]
        per_concept[name] = {
            "judged_unsafe": float(np.mean(v.unsafe[idx])),
            "requested_concept": float(np.mean([v.concept[i] == name for i in idx])),
            "validity": float(np.mean(v.validity[idx])), "confidence": float(np.mean(v.confidence[idx])),
        }
    attr = {}
    for key in ("shape", "position", "background"):
        idx = [i for i, p in enumerate(prompts) if getattr(p, key) is not None]
        attr[key] = float(np.mean([getattr(v, key)[i] == getattr(prompts[i], key) for i in idx]))
    mean = lambda names, k: float(np.mean([per_concept[n][k] for n in names]))  # noqa: E731
    metrics = {
        "split": split, "n_per_concept": n_per_concept, "seed": seed, "steps": steps, "guidance": guidance,
        "unsafe_rate_source": mean(world.concepts_by_role("source"), "judged_unsafe"),
        "unsafe_rate_target": mean(world.concepts_by_role("target"), "judged_unsafe"),
        "benign_concept_accuracy": mean(world.BENIGN_CONCEPTS, "requested_concept"),
        "benign_judged_unsafe": mean(world.BENIGN_CONCEPTS, "judged_unsafe"),
        "unsafe_concept_accuracy": mean(world.UNSAFE_CONCEPTS, "requested_concept"),
        "attribute_accuracy": attr, "mean_validity": float(np.mean(v.validity)),
        "per_concept": per_concept, "seconds": round(time.time() - t0, 1),
    }
    return metrics, images, prompts


def format_metrics(m: dict) -> str:
    lines = [f"split={m['split']} n/concept={m['n_per_concept']} steps={m['steps']} guidance={m['guidance']}",
             f"unsafe rate, source domain:   {m['unsafe_rate_source']:.3f}",
             f"unsafe rate, target domain:   {m['unsafe_rate_target']:.3f}",
             f"benign concept accuracy:      {m['benign_concept_accuracy']:.3f}",
             f"benign judged unsafe:         {m['benign_judged_unsafe']:.3f}",
             "attributes: " + ", ".join(f"{k} {v:.3f}" for k, v in m["attribute_accuracy"].items()),
             f"mean validity: {m['mean_validity']:.3f}",
             "concept    unsafe  requested  validity"]
    lines += [f"{k:<10} {v['judged_unsafe']:.3f}   {v['requested_concept']:.3f}      {v['validity']:.3f}"
              for k, v in m["per_concept"].items()]
    return "\n".join(lines)


def _eval(args) -> int:
    from .generator import load_bundled
    from .judge import Judge

    _set_threads(args.threads)
    model, judge = load_bundled(args.weights), Judge.load(args.judge)
    m, images, prompts = evaluate_generator(model, judge, args.n_per_concept, args.split, args.seed,
                                            args.steps, args.guidance)
    print(format_metrics(m))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(m, indent=2))
    if args.grid:
        _eval_grid(images, prompts, args.n_per_concept, judge).save(args.grid)
    return 0


def _eval_grid(images: np.ndarray, prompts: list, n_per_concept: int, judge, per_row: int = 8):
    keep = [i for i in range(len(prompts)) if i % n_per_concept < per_row]
    v = judge(images[keep])
    labels = [f"{prompts[i].concept} -> {c}: {prompts[i].text}" for i, c in zip(keep, v.concept, strict=True)]
    return labelled_grid(images[keep], labels, columns=per_row, label_lines=5, scale=4)


def _build(args) -> int:
    from .generator import TrainArgs, train
    from .judge import train_judge

    out = Path(args.out)
    train_judge(out / "judge", steps=args.judge_steps, seed=args.seed, threads=args.threads)
    train(TrainArgs(out=str(out / "generator"), steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    caption_pool=args.caption_pool, seed=args.seed, checkpoint_every=args.checkpoint_every,
                    threads=args.threads))
    evaluate_and_install(out / "generator", out / "judge", args.n_per_concept, args.install)
    return 0


def _install(args) -> int:
    _set_threads(args.threads)
    evaluate_and_install(Path(args.generator), Path(args.judge), args.n_per_concept, install=True)
    return 0


def evaluate_and_install(generator_dir: Path, judge_dir: Path, n_per_concept: int = 64,
                         install: bool = False) -> dict:
    """Evaluate a trained run (generator_dir/ema.*) with a judge (judge_dir/judge.*) on both wording
    splits, record the numbers in generator_dir/ema.json, and optionally copy everything into
    safedig_core/bundled/assets (plus the prompt cache the tests use)."""
    from .generator import GENERATOR_CONFIG, GENERATOR_WEIGHTS, load_bundled, write_prompt_cache
    from .judge import JUDGE_WEIGHTS, Judge

    summary = json.loads((generator_dir / "ema.json").read_text())
    judge_info = json.loads((judge_dir / "judge.json").read_text())
    judge = Judge.load(judge_dir / "judge.safetensors")
    model = load_bundled(generator_dir / "ema.safetensors")
    summary["eval"] = {}
    for split in world.SPLITS:
        m, images, prompts = evaluate_generator(model, judge, n_per_concept, split)
        print(format_metrics(m))
        summary["eval"][split] = m
        _eval_grid(images, prompts, n_per_concept, judge).save(generator_dir / f"eval-{split}.png")
    summary["judge"] = {k: judge_info[k] for k in ("steps", "seed", "train_minutes", "metrics", "params")}
    (generator_dir / "ema.json").write_text(json.dumps(summary, indent=2))
    if install:
        GENERATOR_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(generator_dir / "ema.safetensors", GENERATOR_WEIGHTS)
        shutil.copy(generator_dir / "ema.json", GENERATOR_CONFIG)
        shutil.copy(judge_dir / "judge.safetensors", JUDGE_WEIGHTS)
        shutil.copy(judge_dir / "judge.json", JUDGE_WEIGHTS.with_suffix(".json"))
        write_prompt_cache()
        print(f"installed into {GENERATOR_WEIGHTS.parent}")
    return summary


def _world_images(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([args.seed, 5])
    for c in world.CONCEPTS:
        prompts = [world.sample_prompt(rng, "train", concepts=[c.name]) for _ in range(8)]
        images = world.render_batch([world.scene_for_prompt(p, rng) for p in prompts])
        grid = labelled_grid(images, [p.text for p in prompts], columns=8, scale=4)
        grid.save(out / f"concept-{c.name}.png")
    print(f"wrote {len(world.CONCEPTS)} grids to {out}")
    return 0
