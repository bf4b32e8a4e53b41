"""Training-pipeline subcommands (`python -m safedig_core ...`), each resumable over one --run folder:

    collect     activations of a prompt set at every candidate position (bundled or diffusers pipeline)
    route       score every candidate before any SAE, keep R under the diversity rule, plot the table
    train       one TopK SAE per routed position (FVE, dead latents, L0)
    features    harmful features, safe anchor, gate threshold tau calibrated on benign generations
    adapt       decoder-only transfer to a target domain (+ its weights, anchor and tau)
    export      one pack file with full provenance (`inspect` shows it)
    build-pack  all of the above for the bundled model (the shipped pack)
    steer-check a quick judge-scored look at what a pack does to unsafe and benign generations
    plan        what a Build Dictionary run on FLUX.1 Dev / SD3.5 Large needs (storage, memory, time), computed

Under `torchrun` / `accelerate launch`, collect and train split the work over the processes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..errors import SafeDIGError
from . import distributed as dist
from .collect import PromptRecord, collect, evenly_spaced_steps, read_prompt_file, world_prompts
from .features import FeatureConfig
from .pipeline import open_set, run_adapt, run_export, run_features, run_route, run_train
from .sae_training import AdaptConfig, SAEConfig

SHIPPED_PACK = "dictionaries/bundled_hazard_to_toxic.safetensors"
DEFAULT_PLOT = "docs/images/routing_bundled.png"
BUILD_PACK_HARMFUL_FROM = "source,target"  # H chosen on both domains' pairs (the target is collected first)


def parse_prompts(spec: str, run: Path | None = None, seed: int = 0) -> list[PromptRecord]:
    """world:KIND:N[:SPLIT][:unsafe|safe] (concept-world prompts, N per concept), set:NAME[:unsafe|safe]
    (the prompts of a collected set of this run), or a JSON-lines file."""
    parts = spec.split(":")
    keep = parts.pop() if parts[-1] in ("unsafe", "safe") else None
    if parts[0] == "world" and len(parts) in (3, 4):
        try:
            records = world_prompts(parts[1], int(parts[2]), seed, parts[3] if len(parts) == 4 else "train")
        except ValueError:
            raise SafeDIGError(f"bad prompt spec {spec!r}", "write world:KIND:N[:SPLIT], e.g. world:source:4") from None
    elif parts[0] == "set" and len(parts) == 2 and run is not None:
        records = open_set(run, parts[1]).prompts
    else:
        records = read_prompt_file(spec, seed)
    if keep:
        records = [r for r in records if r.label == (keep == "unsafe")]
    return records


def _common(p: argparse.ArgumentParser, run_required: bool = True) -> None:
    p.add_argument("--run", required=run_required, default="runs/build-pack", help="run folder (resumable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _sae_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expansion", type=int, default=SAEConfig.expansion)
    p.add_argument("--k", type=int, default=SAEConfig.k)
    p.add_argument("--epochs", type=float, default=SAEConfig.epochs)
    p.add_argument("--batch-size", type=int, default=SAEConfig.batch_size)
    p.add_argument("--lr", type=float, default=SAEConfig.lr)
    p.add_argument("--store-dtype", choices=("float16", "bfloat16", "float32"), default=SAEConfig.store_dtype,
                   help="weights are rounded to this before evaluation and stored in it")


def _generator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("bundled", "diffusers"), default="bundled")
    p.add_argument("--weights", default=None, help="bundled generator .safetensors (default: the shipped one)")
    p.add_argument("--model-dir", default=None, help="local diffusers FluxPipeline / StableDiffusion3Pipeline folder")
    p.add_argument("--prompt-embeds", default=None, help="precomputed embeddings (pipelines without text encoders)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20 bundled, 28 diffusers)")
    p.add_argument("--guidance", type=float, default=None, help="guidance (default 3.0 bundled, 3.5 diffusers)")


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    _add_stages(sub)
    _add_build_pack(sub)
    _add_steer_check(sub)
    _add_plan(sub)


def _add_stages(sub: argparse._SubParsersAction) -> None:
    """One subcommand per pipeline stage, run in order on one --run folder."""
    p = sub.add_parser("collect", help="capture activations of a prompt set at every candidate position")
    _common(p)
    _generator_args(p)
    p.add_argument("--set", required=True, help="name of the prompt set (source, target, benign, ...)")
    p.add_argument("--prompts", default=None, help="world:KIND:N[:SPLIT] or a JSON-lines file (default world:SET:48)")
    p.add_argument("--capture-steps", type=int, default=4, help="how many steps of the schedule to capture")
    p.add_argument("--positions", default=None, help="comma-separated ids (default: every position)")
    p.add_argument("--shard-size", type=int, default=64, help="prompts per shard")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generator call")
    p.add_argument("--max-tokens", type=int, default=0, help="tokens kept per row for SAE training (0: all)")
    p.set_defaults(func=_collect)

    p = sub.add_parser("route", help="score every candidate position and keep the top R (diversity rule)")
    _common(p)
    p.add_argument("--set", default="source")
    p.add_argument("-R", type=int, default=3, help="positions to route")
    p.add_argument("--plot", default=None, help="also write the routing plot here")
    p.add_argument("--positions", default=None, help="comma-separated ids: route exactly these (user-chosen; "
                   "the table still scores every candidate)")
    p.set_defaults(func=_route)

    p = sub.add_parser("train", help="train a TopK SAE at every routed position")
    _common(p)
    _sae_args(p)
    p.add_argument("--sets", default="source,benign", help="comma-separated collected sets to train on")
    p.set_defaults(func=_train)

    p = sub.add_parser("features", help="harmful features, safe anchor and calibrated gate threshold")
    _common(p)
    _feature_args(p)
    p.add_argument("--domain", default="hazard", help="name of the source risk domain")
    p.add_argument("--set", default="source")
    p.add_argument("--calib", action="append", default=None, metavar="NAME=SPEC",
                   help="prompt sets sampled for the gate: the first fits tau (benign), the rest are measured")
    p.set_defaults(func=_features)

    p = sub.add_parser("adapt", help="adapt the decoders to a target risk domain")
    _common(p)
    p.add_argument("--domain", default="toxic")
    p.add_argument("--set", default="target")
    p.add_argument("--epochs", type=float, default=AdaptConfig.epochs)
    p.add_argument("--lr", type=float, default=AdaptConfig.lr)
    p.add_argument("--pull", type=float, default=AdaptConfig.pull, help="strength of the pull to the source decoder")
    p.set_defaults(func=_adapt)

    p = sub.add_parser("export", help="write the run's pack file")
    _common(p)
    p.add_argument("--out", required=True, help="pack path (.safetensors)")
    p.set_defaults(func=_export)


def _add_build_pack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-pack", help="the whole pipeline on the bundled model -> the shipped pack")
    _common(p, run_required=False)
    _sae_args(p)
    _feature_args(p)
    p.add_argument("--out", default=None, help="the pack (default: pack.safetensors in the run folder; the shipped "
                   f"{SHIPPED_PACK} is this build's input.txt combined with a single.0.out detector, docs/training.md)")
    p.add_argument("--plot", default=DEFAULT_PLOT)
    p.add_argument("--weights", default=None, help="bundled generator .safetensors (default: the shipped one)")
    p.add_argument("--n-source", type=int, default=40, help="matched pairs per source concept")
    p.add_argument("--n-target", type=int, default=32, help="matched pairs per target concept")
    p.add_argument("--n-benign", type=int, default=20, help="benign prompts per benign concept")
    p.add_argument("--n-calib", type=int, default=40, help="benign generations per concept for tau")
    p.add_argument("--n-check", type=int, default=8, help="held-out generations per concept for the rates")
    p.add_argument("--capture-steps", type=int, default=4)
    p.add_argument("-R", type=int, default=3)
    p.add_argument("--positions", default=None, help="comma-separated ids: route exactly these (user-chosen)")
    p.add_argument("--steer-pairs", type=int, default=24,
                   help="source pairs the steerability criterion patches (routing.py)")
    p.add_argument("--blend-target", choices=("map", "anchor"), default="map",
                   help="what Blend moves harmful codes to: the learned map (default) or the constant anchor "
                        "(how the shipped pack was built)")
    p.add_argument("--adapt-epochs", type=float, default=3.0)
    p.add_argument("--pull", type=float, default=AdaptConfig.pull)
    p.set_defaults(func=_build_pack, epochs=3.0)  # 3 SAE epochs keep every FVE > 0.8 and the build < 15 min


def _add_steer_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("steer-check", help="judge unsafe/benign generations of the bundled model with a pack")
    p.add_argument("pack")
    p.add_argument("--n", type=int, default=8, help="held-out prompts per concept")
    p.add_argument("--modes", default="off,blend,repel,both")
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--open-gate", action="store_true", help="steer every token (tau -inf): the dictionary's reach")
    p.add_argument("--gate-scope", choices=("image", "token"), default="image",
                   help="image (the Steer node's default) or token (each token on its own score)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", default=None, help="bundled generator .safetensors (default: the shipped one)")
    p.add_argument("--judge", default=None, help="judge .safetensors (default: the shipped one)")
    p.add_argument("--json", dest="json_out", default=None)
    p.set_defaults(func=_steer_check)


# Published DiTs for `plan`: transformer parameters and the text tokens ComfyUI gives them (FLUX.1: T5 padded
# to 256; SD3.5: CLIP 77 + T5 77), and the classifier-free-guidance calls per step of their usual settings.
PLAN_MODELS: dict[str, dict[str, int]] = {
    "flux-dev": {"params": 11_900_000_000, "text_tokens": 256, "calls_per_step": 1, "steps": 20},
    "sd35-large": {"params": 8_100_000_000, "text_tokens": 154, "calls_per_step": 2, "steps": 28}}


def _add_plan(p_sub: argparse._SubParsersAction) -> None:
    p = p_sub.add_parser("plan", help="storage, memory and time of a Build Dictionary run on a published model")
    p.add_argument("model", choices=sorted(PLAN_MODELS))
    p.add_argument("--pairs", type=int, default=144, help="prompts in the pair set (unsafe + safe)")
    p.add_argument("--benign", type=int, default=185, help="benign prompts")
    p.add_argument("--size", type=int, default=1024, help="image width = height")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--capture-steps", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--positions", type=int, default=0, help="candidate positions (0: all)")
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--routed", type=int, default=3)
    p.add_argument("--tflops", type=float, default=80.0,
                   help="sustained GPU throughput for sampling (80: a 24 GB RTX 4090-class card in bf16/fp8)")
    p.add_argument("--cpu-gflops", type=float, default=0.0, help="CPU rate for SAE training (0: measure here)")
    p.set_defaults(func=_plan)


def _plan(args) -> int:
    from ..positions import REFERENCE_MODELS, reference_ids
    from .build import BuildSettings, matmul_flops_per_second, plan_costs

    m = PLAN_MODELS[args.model]
    arch, d_model, blocks, single = REFERENCE_MODELS[args.model]
    ids = reference_ids(arch, blocks, single)
    ids = ids[:args.positions] if args.positions else ids
    steps = args.steps or m["steps"]
    image_tokens = (args.size // 16) ** 2
    tokens = image_tokens + m["text_tokens"]
    layers = blocks + single
    call_flops = 2 * m["params"] * tokens + 4 * layers * tokens**2 * d_model
    per_gen = steps * m["calls_per_step"] * call_flops / (args.tflops * 1e12)
    settings = BuildSettings(capture_steps=args.capture_steps, routed=args.routed, expansion=args.expansion,
                             max_tokens=args.max_tokens)
    plan = plan_costs(d_model=d_model, positions=ids, image_tokens=image_tokens, text_tokens=m["text_tokens"],
                      steps=steps, calls_per_step=m["calls_per_step"], settings=settings,
                      n_collect=args.pairs + args.benign, n_calibrate=args.benign + args.pairs // 20,
                      seconds_per_generation=per_gen,
                      train_flops_per_second=args.cpu_gflops * 1e9 or matmul_flops_per_second())
    print("\n".join(plan.lines()))
    return 0


def _feature_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-harmful", type=int, default=None,
                   help=f"size of H (default {FeatureConfig.n_harmful} per set of --harmful-from)")
    p.add_argument("--n-anchor", type=int, default=FeatureConfig.n_anchor)
    p.add_argument("--min-smd", type=float, default=FeatureConfig.min_smd)
    p.add_argument("--fire-rate", type=float, default=FeatureConfig.fire_rate,
                   help="max share of benign generations whose gate opens anywhere")
    p.add_argument("--harmful-from", default=None, metavar="SET,SET",
                   help="collected pair sets the harmful ids H are chosen from, an equal share of --n-harmful each "
                        "(weights are still fit per domain on its own pairs); default: the --set alone for "
                        "`features`, source,target for `build-pack`; 'none' there keeps source only")


def _setup(args) -> dist.DistInfo:
    torch.set_num_threads(args.threads)
    return dist.init_from_env()


def _make_generator(args):
    from .generators import BundledGenerator, DiffusersGenerator, PromptEmbeddings, load_pipeline

    if args.backend == "bundled":
        return BundledGenerator(weights=args.weights, steps=args.steps or 20,
                                guidance=3.0 if args.guidance is None else args.guidance)
    if not args.model_dir:
        raise SafeDIGError("--backend diffusers needs --model-dir", "pass a local pipeline folder")
    pipe = load_pipeline(args.model_dir, getattr(torch, args.dtype), args.device)
    emb = PromptEmbeddings.load(args.prompt_embeds) if args.prompt_embeds else None
    spec = {"model_dir": str(Path(args.model_dir).resolve()),
            **({"prompt_embeds": str(Path(args.prompt_embeds).resolve())} if args.prompt_embeds else {})}
    return DiffusersGenerator(pipe, args.steps or 28, 3.5 if args.guidance is None else args.guidance,
                              args.height, args.width, emb, spec)


def _collect(args) -> int:
    info = _setup(args)
    t0 = time.time()
    generator = _make_generator(args)
    prompts = parse_prompts(args.prompts or f"world:{args.set}:48", Path(args.run), args.seed)
    collect(generator, prompts, Path(args.run) / "collect" / args.set,
            capture_steps=evenly_spaced_steps(generator.steps, args.capture_steps),
            positions=args.positions.split(",") if args.positions else None, shard_size=args.shard_size,
            batch_size=args.batch_size, max_tokens=args.max_tokens or None, rank=info.rank,
            world_size=info.world_size, progress=not args.no_progress)
    dist.barrier()
    if info.is_main:
        print(f"collected {len(prompts)} prompts of '{args.set}' in {time.time() - t0:.0f}s")
    return 0


def _route(args) -> int:
    _setup(args)
    table = run_route(Path(args.run), args.set, args.R, args.plot, _positions(args))
    print(format_routing(table))
    return 0


def _positions(args) -> list[str] | None:
    return [p.strip() for p in args.positions.split(",") if p.strip()] if getattr(args, "positions", None) else None


def format_routing(table: list[dict], top: int | None = None) -> str:
    cols = ["position", "separability", "loso", "transfer", "timestep_cv", "robustness", "steerability", "score",
            "note"]
    cols = [k for k in cols if any(k in c for c in table)]
    rows = [[str(c.get(k, "-")) for k in cols] for c in table[:top]]
    widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in [cols, *rows])


def _train(args) -> int:
    info = _setup(args)
    cfg = SAEConfig(expansion=args.expansion, k=args.k, epochs=args.epochs, batch_size=args.batch_size,
                    lr=args.lr, seed=args.seed, store_dtype=args.store_dtype)
    metrics = run_train(Path(args.run), args.sets.split(","), cfg, progress=not args.no_progress)
    if info.is_main:
        for pos, m in metrics.items():
            print(f"{pos}: FVE {m['fve']:.3f}  dead {m['dead_fraction']:.3f}  L0 {m['l0']:.1f}")
    return 0


def _feature_cfg(args, default_from: str = "") -> FeatureConfig:
    spec = default_from if args.harmful_from is None else args.harmful_from
    sets = () if spec.strip().lower() in ("", "none") else tuple(s.strip() for s in spec.split(",") if s.strip())
    return FeatureConfig.for_sets(sets, args.n_harmful, n_anchor=args.n_anchor, min_smd=args.min_smd,
                                  fire_rate=args.fire_rate)


def _features(args) -> int:
    _setup(args)
    run = Path(args.run)
    specs = args.calib or ["benign=world:benign:50", "benign_heldout=world:benign:16:heldout"]
    calib: dict[str, list[PromptRecord]] = {}
    for item in specs:
        name, _, spec = item.partition("=")
        if not spec:
            raise SafeDIGError(f"--calib {item!r} has no prompt spec", "write NAME=SPEC, e.g. benign=set:benign")
        calib[name] = parse_prompts(spec, run, args.seed + 1 + len(calib))
    entry = run_features(run, args.domain, args.set, calib, _feature_cfg(args), progress=not args.no_progress)
    print(json.dumps(entry["calibration"], indent=1))
    return 0


def _adapt(args) -> int:
    _setup(args)
    entry = run_adapt(Path(args.run), args.domain, args.set,
                      AdaptConfig(epochs=args.epochs, lr=args.lr, pull=args.pull, seed=args.seed),
                      progress=not args.no_progress)
    for pos, m in entry["adapt"].items():
        print(f"{pos}: target FVE {m['fve_target_source_decoder']:.3f} (source decoder) -> "
              f"{m['fve_target_adapted']:.3f} (adapted)")
    return 0


def _export(args) -> int:
    from ..pack_info import format_pack

    _setup(args)
    from ..pack import load_pack

    path = run_export(Path(args.run), args.out)
    print(format_pack(load_pack(path)))
    return 0


def _build_pack(args) -> int:
    from ..pack import load_pack
    from ..pack_info import format_pack
    from .generators import BundledGenerator
    from .pipeline import blend_to_anchor, choose_blend_target

    info = _setup(args)
    t0 = time.time()
    run, seed = Path(args.run), args.seed
    generator = BundledGenerator(weights=args.weights, steps=20, guidance=3.0)
    capture = evenly_spaced_steps(generator.steps, args.capture_steps)
    for name, n in (("source", args.n_source), ("target", args.n_target), ("benign", args.n_benign)):
        collect(generator, world_prompts(name, n, seed), run / "collect" / name, capture_steps=capture,
                shard_size=64, batch_size=64, rank=info.rank, world_size=info.world_size,
                progress=not args.no_progress)
    dist.barrier()
    if info.is_main:
        print(format_routing(run_route(run, "source", args.R, args.plot, _positions(args), generator,
                                       args.steer_pairs)))
    dist.barrier()
    sae_cfg = SAEConfig(expansion=args.expansion, k=args.k, epochs=args.epochs, batch_size=args.batch_size,
                        lr=args.lr, seed=seed, store_dtype=args.store_dtype)
    run_train(run, ["source", "benign"], sae_cfg, progress=not args.no_progress)
    if not info.is_main:
        return 0
    calib = {
        "benign": world_prompts("benign", args.n_calib, seed + 1),
        "benign_heldout": world_prompts("benign", args.n_check, seed + 2, "heldout"),
        "unsafe_source_heldout": [r for r in world_prompts("source", args.n_check, seed + 3, "heldout") if r.label],
        "unsafe_target_heldout": [r for r in world_prompts("target", args.n_check, seed + 4, "heldout") if r.label],
    }
    run_features(run, "hazard", "source", calib, _feature_cfg(args, BUILD_PACK_HARMFUL_FROM), generator,
                 progress=not args.no_progress)
    run_adapt(run, "toxic", "target", AdaptConfig(epochs=args.adapt_epochs, pull=args.pull, seed=seed),
              progress=not args.no_progress)
    if args.blend_target == "anchor":
        blend_to_anchor(run)
    else:
        choose_blend_target(run, generator, ["source", "target"], args.steer_pairs)
    wall = time.time() - t0
    path = run_export(run, args.out or run / "pack.safetensors",
                      {"build_pack_wall_seconds": round(wall, 1), "threads": args.threads, "seed": seed,
                       "processes": info.world_size})
    print(format_pack(load_pack(path)))
    print(f"\nbuild-pack finished in {wall / 60:.1f} min -> {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def _steer_check(args) -> int:
    from ..bundled.generator import load_bundled
    from ..bundled.judge import Judge
    from .judged_check import steer_check

    torch.set_num_threads(args.threads)
    result = steer_check(args.pack, n_per_concept=args.n, modes=args.modes.split(","), strength=args.strength,
                         seed=args.seed, model=load_bundled(args.weights), judge=Judge.load(args.judge),
                         tau_override=-1e30 if args.open_gate else None, scope=args.gate_scope)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0
