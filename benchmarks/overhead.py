"""The cost of safety: sampling-step wall time with SafeDIG hooks divided by without, in one process.

Model: diffusers' FluxTransformer2DModel with random weights at FLUX.1-dev widths (hidden 3072, 24 heads,
MLP 12288, T5 context 4096, pooled 768) and reduced depth; a random 16x pack at 3 positions (text MLP,
image attention, single block). Scenarios, each timed in alternation with the unsteered baseline:

    disabled      mode Off: no hook is installed                          (expect 1.00)
    gate_closed   Blend+Repel, gate shut for every token: only the |H|-row bound runs
    gate_open     Blend+Repel, gate open for every token: the full SAE on every token (worst case)

Median of --repeats forward passes per scenario. Also reports the per-site cost relative to one block
and the memory a pack adds per position at 16x in bf16/fp16 (computed; on CUDA also measured, with the
peak GPU memory of the model alone and the extra peak a steered forward adds).

With --device cuda the model is built directly on the GPU in --dtype, every forward is bracketed by
torch.cuda.synchronize(), and the defaults become the full FLUX.1-dev depth (19 double + 38 single blocks),
bfloat16 and 11 repeats; --time-budget lowers the repeats if a forward turns out too slow for it.

    .venv/bin/python benchmarks/overhead.py                 # 2 double + 4 single blocks, 1024x1024 tokens
    .venv/bin/python benchmarks/overhead.py --double 1 --single 2 --image-tokens 256 --repeats 3  # a busy 2-core CPU
    .venv/bin/python benchmarks/overhead.py --smoke         # tiny widths, seconds (CI)
    python3 benchmarks/overhead.py --device cuda --out benchmarks/results/overhead_gpu.json  # full FLUX.1-dev
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

from safedig_core import SteeringDictionary, SteeringHooks, SteeringParams  # noqa: E402
from safedig_core.pack import DictionaryPack  # noqa: E402
from safedig_core.synthetic import random_pack  # noqa: E402

POSITIONS = ["double.0.txt.mlp", "double.0.img.attn", "single.1.out"]  # text MLP, image attention, single block
FLUX_DEV = dict(heads=24, head_dim=128, ctx=4096, pooled=768, double=2, single=4, image_tokens=4096,
                text_tokens=512, expansion=16, k=32)
FLUX_DEV_DEPTH = dict(double=19, single=38)  # the full FLUX.1-dev, the default with --device cuda
SMOKE = dict(heads=2, head_dim=32, ctx=32, pooled=16, double=2, single=2, image_tokens=64, text_tokens=8,
             expansion=16, k=8)


def build(cfg: dict, dtype: torch.dtype, device: torch.device | None = None):
    """Random-weight model and inputs. On CUDA the model is constructed on the GPU (a 12B-parameter
    fp32 init there is 48 GB, gone once cast) rather than on the CPU."""
    from diffusers import FluxTransformer2DModel

    device = device or torch.device("cpu")
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=cfg["double"], num_single_layers=cfg["single"],
            attention_head_dim=cfg["head_dim"], num_attention_heads=cfg["heads"], joint_attention_dim=cfg["ctx"],
            pooled_projection_dim=cfg["pooled"], guidance_embeds=True, axes_dims_rope=_axes(cfg["head_dim"]),
        )
    model = model.to(dtype).eval()
    side = int(cfg["image_tokens"] ** 0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    inputs = dict(
        hidden_states=torch.randn(1, side * side, 64, dtype=dtype),
        encoder_hidden_states=torch.randn(1, cfg["text_tokens"], cfg["ctx"], dtype=dtype),
        pooled_projections=torch.randn(1, cfg["pooled"], dtype=dtype),
        timestep=torch.tensor([0.5], dtype=dtype), guidance=torch.tensor([3.5], dtype=dtype),
        img_ids=img_ids.reshape(-1, 3).to(dtype), txt_ids=torch.zeros(cfg["text_tokens"], 3, dtype=dtype),
        return_dict=False,
    )
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return model, inputs


def _axes(head_dim: int) -> tuple[int, int, int]:
    a = head_dim // 8 * 2  # FLUX.1: (16, 56, 56) for 128
    b = (head_dim - a) // 2
    return (a, b, head_dim - a - b)


def dictionary(cfg: dict, d_model: int) -> SteeringDictionary:
    """One random 16x pack with a single decoder (at FLUX.1-dev width that is already 3.6 GB in fp32);
    the scenarios open or shut its gate with a threshold override."""
    meta, tensors = random_pack("flux", d_model, POSITIONS, expansion=cfg["expansion"], k=cfg["k"],
                                n_harmful=32 if cfg["expansion"] * d_model > 4096 else 4, harmful_bias=0.0,
                                domains=("source",))
    return SteeringDictionary(DictionaryPack("random-16x.safetensors", meta, tensors))


def _sync(model) -> None:
    """Wait for the model's device (a no-op on the CPU), so wall-clock marks bracket the GPU work."""
    if torch.cuda.is_available():
        device = next(model.parameters()).device
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def timed(model, inputs, hooks=None) -> float:
    _sync(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        if hooks is None:
            model(**inputs)
        else:
            with hooks:
                model(**inputs)
    _sync(model)
    return time.perf_counter() - t0


def block_time(model, inputs) -> float:
    """Seconds spent in one double block, from forward pre/post hooks on the first block."""
    marks = []
    block = model.transformer_blocks[0]

    def mark(*_):
        _sync(model)
        marks.append(time.perf_counter())

    h1 = block.register_forward_pre_hook(mark)
    h2 = block.register_forward_hook(mark)
    try:
        timed(model, inputs)
    finally:
        h1.remove()
        h2.remove()
    return marks[1] - marks[0]


MB = 2**20


def _log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)


def _cached_bytes(d: SteeringDictionary) -> int:
    """Bytes of the pack weights a SteeringDictionary has cast and cached (every device and dtype)."""
    return sum(v.numel() * v.element_size() for w in d._cache.values() for v in vars(w).values()
               if isinstance(v, torch.Tensor))


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny widths (CI)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: build on the GPU, full FLUX.1-dev depth, bfloat16, 11 repeats by default")
    ap.add_argument("--repeats", type=int, help="forward passes per scenario and side (5 on cpu, 11 on cuda)")
    ap.add_argument("--time-budget", type=float,
                    help="seconds for the timed loops; fewer repeats (at least 3) if the warm-up says they "
                         "would not fit (default: none on cpu, 240 on cuda)")
    ap.add_argument("--image-tokens", type=int, help="override the image token count (a square number)")
    ap.add_argument("--text-tokens", type=int, help="override the text token count")
    ap.add_argument("--double", type=int, help="override the number of double blocks")
    ap.add_argument("--single", type=int, help="override the number of single blocks")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="float32 on cpu, bfloat16 on cuda unless given")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overhead.json"))
    return ap.parse_args()


def _model_config(args: argparse.Namespace, cuda: bool) -> dict:
    cfg = dict(SMOKE if args.smoke else FLUX_DEV)
    if cuda and not args.smoke:
        cfg.update(FLUX_DEV_DEPTH)
    for key in ("image_tokens", "text_tokens", "double", "single"):
        if getattr(args, key):
            cfg[key] = getattr(args, key)
    return cfg


def _ratio_ci(base: list[float], steered: list[float], n_boot: int = 2000) -> list[float]:
    """95 % bootstrap interval of median(steered) / median(base), resampling the paired repeats."""
    gen = torch.Generator().manual_seed(0)
    b, s = torch.tensor(base), torch.tensor(steered)
    idx = torch.randint(len(base), (n_boot, len(base)), generator=gen)
    ratios = s[idx].median(dim=1).values / b[idx].median(dim=1).values
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975])).tolist()
    return [round(lo, 4), round(hi, 4)]


def _time_scenario(model, inputs, d, p, repeats: int, cuda: bool) -> tuple[dict, float, float]:
    """Alternate baseline and steered forwards (so drift in machine load hits both alike); medians."""
    base, steered = [], []
    for i in range(repeats):
        if i % 2 == 0:
            base.append(timed(model, inputs))
            steered.append(timed(model, inputs, SteeringHooks(model, d, p)))
        else:
            steered.append(timed(model, inputs, SteeringHooks(model, d, p)))
            base.append(timed(model, inputs))
    b, s = statistics.median(base), statistics.median(steered)
    result = {"baseline_s": round(b, 4), "steered_s": round(s, 4), "ratio": round(s / b, 4),
              "ratio_ci95": _ratio_ci(base, steered)}
    if cuda:  # GPU forwards are short: keep the spread and finer figures
        result.update(baseline_ms=round(b * 1e3, 2), steered_ms=round(s * 1e3, 2),
                      baseline_range_ms=[round(min(base) * 1e3, 2), round(max(base) * 1e3, 2)],
                      steered_range_ms=[round(min(steered) * 1e3, 2), round(max(steered) * 1e3, 2)])
    return result, b, s


def _warm_up(model, inputs, scenarios: dict, warm: int, gpu: dict, t_start: float) -> tuple[list, dict]:
    """Warm-up forwards (unsteered, then each scenario once or twice: casts and caches the pack's weights);
    on CUDA also the peak memory of an unsteered and of a steered forward, into `gpu`."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    base_warm = [timed(model, inputs) for _ in range(warm)]
    _log(t_start, f"unsteered warm-up: {', '.join(f'{t:.3f}s' for t in base_warm)}")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        timed(model, inputs)
        gpu["forward_peak_unsteered"] = torch.cuda.max_memory_allocated(device)
        before_pack = torch.cuda.memory_allocated(device)
    steered_warm = {}
    for name, (d, p) in scenarios.items():
        steered_warm[name] = [timed(model, inputs, SteeringHooks(model, d, p)) for _ in range(2 if cuda else 1)]
        _log(t_start, f"{name} warm-up: {', '.join(f'{t:.3f}s' for t in steered_warm[name])}")
    if cuda:
        torch.cuda.synchronize(device)
        gpu["pack_weights_cached"] = torch.cuda.memory_allocated(device) - before_pack
        gpu["forward_peak_steered"] = {}
        for name in ("gate_closed", "gate_open"):
            d, p = scenarios[name]
            torch.cuda.reset_peak_memory_stats(device)
            timed(model, inputs, SteeringHooks(model, d, p))
            gpu["forward_peak_steered"][name] = torch.cuda.max_memory_allocated(device)
    return base_warm, steered_warm


def _repeats_within(budget: float | None, repeats: int, base_warm: list[float], steered_warm: dict,
                    t_start: float) -> int:
    """Fewer repeats (at least 3) when the warm-up says `repeats` would overrun the time budget."""
    if budget is None:
        return repeats
    # one repeat = one unsteered + one steered forward per scenario
    per_repeat = len(steered_warm) * statistics.median(base_warm) + sum(ts[-1] for ts in steered_warm.values())
    if per_repeat * repeats <= budget:
        return repeats
    fitted = max(3, int(budget / per_repeat))
    _log(t_start, f"{repeats} repeats would take ~{per_repeat * repeats:.0f}s > budget {budget:.0f}s: {fitted} repeats")
    return fitted


def _pack_memory_mb(cfg: dict, d_model: int) -> dict:
    d_sae = cfg["expansion"] * d_model
    return {
        # encoder (W_enc, b_enc, b_pre) + one domain's decoder (W_dec, b_dec), 2 bytes per value
        "bf16_or_fp16_one_domain": round((2 * d_sae * d_model + d_sae + 2 * d_model) * 2 / 2**20, 1),
        "bf16_or_fp16_each_extra_domain": round((d_sae * d_model + d_model) * 2 / 2**20, 1),
    }


def _gpu_memory_mb(gpu: dict) -> dict:
    n, peak = len(POSITIONS), gpu["forward_peak_unsteered"]
    steered = gpu["forward_peak_steered"]
    return {
        "model": round(gpu["model"] / MB, 1),
        "model_init_peak": round(gpu["model_init_peak"] / MB, 1),
        "forward_peak_unsteered": round(peak / MB, 1),
        "pack_weights_cached": round(gpu["pack_weights_cached"] / MB, 1),
        "forward_peak_steered": {k: round(v / MB, 1) for k, v in steered.items()},
        "extra_peak_vs_unsteered": {k: round((v - peak) / MB, 1) for k, v in steered.items()},
        "extra_peak_vs_unsteered_per_position": {k: round((v - peak) / n / MB, 1) for k, v in steered.items()},
    }


def main() -> int:
    args = _parse_args()
    t_start = time.perf_counter()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    repeats = args.repeats or (11 if cuda else 5)
    budget = args.time_budget if args.time_budget is not None else (240.0 if cuda else None)
    cfg = _model_config(args, cuda)
    dtype = getattr(torch, args.dtype)
    d_model = cfg["heads"] * cfg["head_dim"]
    gpu = {}  # peak GPU memory, bytes
    if cuda:
        _log(t_start, f"device {torch.cuda.get_device_name(device)}, torch {torch.__version__} "
                      f"(CUDA {torch.version.cuda})")
        torch.cuda.reset_peak_memory_stats(device)
    _log(t_start, f"building the model: hidden {d_model}, {cfg['double']} double + {cfg['single']} single blocks, "
                  f"{args.dtype}, on {device}")
    torch.manual_seed(0)
    model, inputs = build(cfg, dtype, device)
    if cuda:
        torch.cuda.synchronize(device)
        gpu["model_init_peak"] = torch.cuda.max_memory_allocated(device)
        torch.cuda.empty_cache()
        gpu["model"] = torch.cuda.memory_allocated(device)  # weights and inputs
    n_params = sum(p.numel() for p in model.parameters())
    _log(t_start, f"model built: {n_params / 1e9:.2f}B parameters"
                  + (f", {gpu['model'] / MB:.0f} MB on the GPU" if cuda else ""))
    _log(t_start, "building the random 16x pack on the CPU")
    pack = dictionary(cfg, d_model)
    _log(t_start, "pack built")
    both = dict(mode="both", blend_strength=1.0, repel_strength=1.0)
    scenarios = {
        "disabled": (pack, SteeringParams(mode="off")),
        "gate_closed": (pack, SteeringParams(**both, tau_override=1e9)),
        "gate_open": (pack, SteeringParams(**both, tau_override=-1e9)),
    }
    print(f"model: hidden {d_model}, {cfg['double']} double + {cfg['single']} single blocks, "
          f"{cfg['image_tokens']} image + {cfg['text_tokens']} text tokens, {args.dtype}, "
          + (f"{torch.cuda.get_device_name(device)}" if cuda else f"CPU threads {torch.get_num_threads()}"),
          flush=True)
    warm = 3 if cuda else 1  # the GPU's first calls pick kernels and grow the allocator's pools
    base_warm, steered_warm = _warm_up(model, inputs, scenarios, warm, gpu, t_start)
    requested = repeats
    repeats = _repeats_within(budget, repeats, base_warm, steered_warm, t_start)
    results, medians = {}, {}
    for name, (d, p) in scenarios.items():
        results[name], b, s = _time_scenario(model, inputs, d, p, repeats, cuda)
        medians[name] = (b, s)
        print(f"{name:12s} baseline {b:8.3f}s  steered {s:8.3f}s  ratio {s / b:.3f} "
              f"(95% CI {results[name]['ratio_ci95'][0]:.3f}-{results[name]['ratio_ci95'][1]:.3f})", flush=True)
    one_block = statistics.median(block_time(model, inputs) for _ in range(5 if cuda else 3))
    for name in ("gate_closed", "gate_open"):
        b, s = medians[name]
        results[name]["per_site_vs_one_double_block"] = round((s - b) / len(POSITIONS) / one_block, 4)
    per_position_mb = _pack_memory_mb(cfg, d_model)
    config = {**cfg, "dtype": args.dtype, "positions": POSITIONS, "device": args.device,
              "threads": torch.get_num_threads(), "repeats": repeats}
    if cuda:
        import diffusers

        config.update(device_name=torch.cuda.get_device_name(device), torch=torch.__version__,
                      cuda=torch.version.cuda, diffusers=diffusers.__version__, parameters=n_params,
                      repeats_requested=requested, warmups=dict(unsteered=warm, steered=2), timing=(
                          "wall clock between torch.cuda.synchronize() calls, hooks installed and removed "
                          "inside; median of the repeats"))
        n = len(POSITIONS)
        per_position_mb[f"measured_{args.dtype}_one_domain"] = round(gpu["pack_weights_cached"] / n / MB, 1)
        per_position_mb[f"measured_{args.dtype}_one_domain_tensor_bytes"] = round(_cached_bytes(pack) / n / MB, 1)
    out = {"config": config,
           "one_double_block_s": round(one_block, 4), "scenarios": results, "pack_memory_mb_per_position":
           per_position_mb}
    if cuda:
        out["one_double_block_ms"] = round(one_block * 1e3, 3)
        out["gpu_memory_mb"] = _gpu_memory_mb(gpu)
    print(json.dumps(out, indent=2))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    plot(out, path.with_suffix(".png"))
    _log(t_start, f"wrote {path} and {path.with_suffix('.png').name}")
    return 0


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["scenarios"])
    ratios = [out["scenarios"][n]["ratio"] for n in names]
    fig, ax = plt.subplots(figsize=(5, 3))
    bars = ax.bar(names, ratios, color=["#999999", "#4c72b0", "#dd8452"])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.bar_label(bars, labels=[f"{r:.3f}" for r in ratios])
    c = out["config"]
    ax.set_ylabel("steered / unsteered time")
    title = f"SafeDIG overhead, {c['heads'] * c['head_dim']}-wide FLUX, {c['double']}+{c['single']} blocks"
    if c.get("device_name"):
        title += f"\n{c['device_name']}, {c['dtype']}, {c['image_tokens']}+{c['text_tokens']} tokens"
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, max(ratios) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
