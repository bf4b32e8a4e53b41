"""The cost of safety: sampling-step wall time with SafeDIG hooks divided by without, in one process.

Model: diffusers' FluxTransformer2DModel with random weights at FLUX.1-dev widths (hidden 3072, 24 heads,
MLP 12288, T5 context 4096, pooled 768) and reduced depth; a random 16x pack at 3 positions (text MLP,
image attention, single block). Scenarios, each timed in alternation with the unsteered baseline:

    disabled      mode Off: no hook is installed                          (expect 1.00)
    gate_closed   Blend+Repel, gate shut for every token: only the |H|-row bound runs
    gate_open     Blend+Repel, gate open for every token: the full SAE on every token (worst case)

Median of --repeats forward passes per scenario. Also reports the per-site cost relative to one block
and the memory a pack adds per position at 16x in bf16/fp16.

    .venv/bin/python benchmarks/overhead.py                 # 2 double + 4 single blocks, 1024x1024 tokens
    .venv/bin/python benchmarks/overhead.py --double 1 --single 2 --image-tokens 256 --repeats 3  # a busy 2-core CPU
    .venv/bin/python benchmarks/overhead.py --smoke         # tiny widths, seconds (CI)
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
SMOKE = dict(heads=2, head_dim=32, ctx=32, pooled=16, double=2, single=2, image_tokens=64, text_tokens=8,
             expansion=16, k=8)


def build(cfg: dict, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=cfg["double"], num_single_layers=cfg["single"],
        attention_head_dim=cfg["head_dim"], num_attention_heads=cfg["heads"], joint_attention_dim=cfg["ctx"],
        pooled_projection_dim=cfg["pooled"], guidance_embeds=True, axes_dims_rope=_axes(cfg["head_dim"]),
    ).to(dtype).eval()
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


def timed(model, inputs, hooks=None) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        if hooks is None:
            model(**inputs)
        else:
            with hooks:
                model(**inputs)
    return time.perf_counter() - t0


def block_time(model, inputs) -> float:
    """Seconds spent in one double block, from forward pre/post hooks on the first block."""
    marks = []
    block = model.transformer_blocks[0]
    h1 = block.register_forward_pre_hook(lambda *_: marks.append(time.perf_counter()))
    h2 = block.register_forward_hook(lambda *_: marks.append(time.perf_counter()))
    try:
        timed(model, inputs)
    finally:
        h1.remove()
        h2.remove()
    return marks[1] - marks[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny widths (CI)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--image-tokens", type=int, help="override the image token count (a square number)")
    ap.add_argument("--text-tokens", type=int, help="override the text token count")
    ap.add_argument("--double", type=int, help="override the number of double blocks")
    ap.add_argument("--single", type=int, help="override the number of single blocks")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overhead.json"))
    args = ap.parse_args()
    cfg = dict(SMOKE if args.smoke else FLUX_DEV)
    for key in ("image_tokens", "text_tokens", "double", "single"):
        if getattr(args, key):
            cfg[key] = getattr(args, key)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model, inputs = build(cfg, dtype)
    d_model = cfg["heads"] * cfg["head_dim"]
    pack = dictionary(cfg, d_model)
    both = dict(mode="both", blend_strength=1.0, repel_strength=1.0)
    scenarios = {
        "disabled": (pack, SteeringParams(mode="off")),
        "gate_closed": (pack, SteeringParams(**both, tau_override=1e9)),
        "gate_open": (pack, SteeringParams(**both, tau_override=-1e9)),
    }
    print(f"model: hidden {d_model}, {cfg['double']} double + {cfg['single']} single blocks, "
          f"{cfg['image_tokens']} image + {cfg['text_tokens']} text tokens, {args.dtype}, CPU threads "
          f"{torch.get_num_threads()}", flush=True)
    timed(model, inputs)  # warm-up
    for d, p in scenarios.values():  # warm-up: casts and caches each pack's weights once
        timed(model, inputs, SteeringHooks(model, d, p))
    results = {}
    for name, (d, p) in scenarios.items():
        base, steered = [], []
        for i in range(args.repeats):  # alternate, so drift in machine load hits both alike
            if i % 2 == 0:
                base.append(timed(model, inputs))
                steered.append(timed(model, inputs, SteeringHooks(model, d, p)))
            else:
                steered.append(timed(model, inputs, SteeringHooks(model, d, p)))
                base.append(timed(model, inputs))
        b, s = statistics.median(base), statistics.median(steered)
        results[name] = {"baseline_s": round(b, 4), "steered_s": round(s, 4), "ratio": round(s / b, 4)}
        print(f"{name:12s} baseline {b:8.3f}s  steered {s:8.3f}s  ratio {s / b:.3f}", flush=True)
    one_block = statistics.median(block_time(model, inputs) for _ in range(3))
    for name in ("gate_closed", "gate_open"):
        r = results[name]
        r["per_site_vs_one_double_block"] = round((r["steered_s"] - r["baseline_s"]) / len(POSITIONS) / one_block, 4)
    d_sae = cfg["expansion"] * d_model
    per_position_mb = {
        # encoder (W_enc, b_enc, b_pre) + one domain's decoder (W_dec, b_dec), 2 bytes per value
        "bf16_or_fp16_one_domain": round((2 * d_sae * d_model + d_sae + 2 * d_model) * 2 / 2**20, 1),
        "bf16_or_fp16_each_extra_domain": round((d_sae * d_model + d_model) * 2 / 2**20, 1),
    }
    out = {"config": {**cfg, "dtype": args.dtype, "positions": POSITIONS, "device": "cpu",
                      "threads": torch.get_num_threads(), "repeats": args.repeats},
           "one_double_block_s": round(one_block, 4), "scenarios": results, "pack_memory_mb_per_position":
           per_position_mb}
    print(json.dumps(out, indent=2))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    plot(out, path.with_suffix(".png"))
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
    ax.set_title(f"SafeDIG overhead, {c['heads'] * c['head_dim']}-wide FLUX, {c['double']}+{c['single']} blocks",
                 fontsize=9)
    ax.set_ylim(0, max(ratios) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
