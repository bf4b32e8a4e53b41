"""TopK SAE training per routed position (docs/method.md section 2) and decoder-only transfer to a target risk
domain (section 5), resumable, deterministic under a seed, data-parallel under torch.distributed.

Training (source domain):   x' = x / s,  z = TopK(ReLU((x' - b_dec) W_enc^T + b_enc)),  x_hat' = z W_dec + b_dec
    loss = ||x_hat' - x'||^2 / ||x' - mean||^2  +  aux_coef * AuxK
AuxK (Gao et al. 2024): the latents that fired on none of the last `dead_tokens` tokens reconstruct the
residual with their own top-aux_k, which gives them gradient and revives them. Decoder rows stay unit norm
(gradient projected, rows renormalised after every step). After training the encoder keeps a frozen copy of
b_dec as b_pre, so a target decoder with its own b_dec never changes which latents fire.

Adaptation (target domain): encoder and feature ids frozen; W_dec, b_dec start at the source decoder and
minimise the same reconstruction loss on target activations plus pull * (||W_dec - W_src||^2 / d_sae +
||b_dec - b_src||^2), the pull toward the source decoder.

Each loop checkpoints every `checkpoint_every` steps (atomically); rerunning resumes from the checkpoint
and, because the data stream is a pure function of the seed, ends bitwise where an uninterrupted run ends.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..sae import TopKSAE
from . import distributed as dist
from .collect import ActivationSet, count_tokens, token_rows, token_stream


@dataclass(frozen=True)
class SAEConfig:
    expansion: int = 16
    k: int = 32
    epochs: float = 4.0          # passes over the training tokens
    batch_size: int = 1024       # tokens per step (all ranks together)
    lr: float = 3e-3
    aux_k: int = 0               # 0: d_model // 2
    aux_coef: float = 1 / 32
    dead_tokens: int = 100_000
    checkpoint_every: int = 100
    buffer_tokens: int = 2_000_000
    seed: int = 0
    store_dtype: str = "float16"  # weights are rounded to it before evaluation: the pack stores them exactly


@dataclass(frozen=True)
class AdaptConfig:
    epochs: float = 4.0
    batch_size: int = 1024
    lr: float = 1e-3
    pull: float = 1.0
    checkpoint_every: int = 100
    buffer_tokens: int = 2_000_000
    seed: int = 0
    store_dtype: str = "float16"


STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@torch.no_grad()
def round_to_storage_(module: torch.nn.Module, dtype: str) -> None:
    """Round parameters to values the storage dtype holds exactly (kept float32 for computing), so every
    later stage (metrics, features, tau) sees bit for bit the weights the pack will contain."""
    for p in module.parameters():
        p.copy_(p.to(STORE_DTYPES[dtype]).float())


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def position_seed(seed: int, position: str) -> int:
    return seed * 1_000_003 + zlib.crc32(position.encode())


def estimate_scale(sets: Sequence[ActivationSet], position: str, max_tokens: int = 200_000) -> tuple[float, Tensor]:
    """(s, mean) from the first training tokens: s = mean activation norm / sqrt(d_model)."""
    norm_sum, total, n = 0.0, torch.zeros(sets[0].d_model, dtype=torch.float64), 0
    for a in sets:
        for shard in a.shards:
            x = token_rows(a, shard, position, heldout=False).double()
            norm_sum += float(x.norm(dim=-1).sum())
            total += x.sum(0)
            n += x.shape[0]
            if n >= max_tokens:
                break
        if n >= max_tokens:
            break
    scale = norm_sum / n / math.sqrt(sets[0].d_model)
    return scale, (total / n).float()


def _project_decoder_grad_(W_dec: torch.nn.Parameter) -> None:
    """Remove the gradient component along each (unit) decoder row: the row norm constraint stays exact."""
    if W_dec.grad is not None:
        W_dec.grad -= (W_dec.grad * W_dec.data).sum(-1, keepdim=True) * W_dec.data


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Constant, then linear decay to 0 over the last 20 % of the steps."""
    tail = max(1, steps // 5)
    return lr * min(1.0, (steps - step) / tail)


def _train_loop(*, desc: str, params: list[torch.nn.Parameter], W_dec: torch.nn.Parameter,
                loss_fn: Callable[[Tensor], tuple[Tensor, dict]], stream, steps: int, lr: float, ckpt: Path,
                config_hash: str, state: dict[str, Tensor], modules: dict[str, torch.nn.Module],
                checkpoint_every: int, progress: bool, on_step: Callable[[int], None] | None) -> None:
    """The shared optimisation loop: Adam, decoder-row constraint, gradient all-reduce, checkpoints."""
    from tqdm import tqdm

    info = dist.current()
    opt = torch.optim.Adam(params, lr=lr)
    start = 0
    if ckpt.exists():
        ck = torch.load(ckpt, map_location="cpu", weights_only=True)
        if ck["config_hash"] == config_hash:
            for name, m in modules.items():
                m.load_state_dict(ck["modules"][name])
            opt.load_state_dict(ck["opt"])
            for k, v in ck["state"].items():
                state[k].copy_(v)
            start = int(ck["step"])
            for _ in range(start):  # replay the stream to where the checkpoint stopped
                next(stream)

    def save(step: int) -> None:
        if info.is_main:
            tmp = ckpt.with_suffix(f".{os.getpid()}.tmp")
            torch.save({"config_hash": config_hash, "step": step, "opt": opt.state_dict(), "state": state,
                        "modules": {n: m.state_dict() for n, m in modules.items()}}, tmp)
            os.replace(tmp, ckpt)

    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc, disable=not (progress and info.is_main),
               dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        batch = next(stream)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        loss, log = loss_fn(batch)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        dist.all_reduce_mean_([cast(Tensor, p.grad) for p in params])  # every parameter has a gradient here
        _project_decoder_grad_(W_dec)
        opt.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
        bar.set_postfix({k: f"{v:.4f}" for k, v in log.items()}, refresh=False)
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            save(step + 1)
        if on_step is not None:
            on_step(step + 1)
    bar.close()


def _sparse_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """TopK(ReLU(pre)) as (values, latent ids) [batch, k]: decoding then costs k rows, not d_sae."""
    values, ids = pre.topk(k, dim=-1)
    return values.relu(), ids


def _decode_sparse(values: Tensor, ids: Tensor, W_dec: Tensor) -> Tensor:
    return F.embedding_bag(ids, W_dec, per_sample_weights=values, mode="sum")


def _normalized_mse(x: Tensor, x_hat: Tensor) -> Tensor:
    return (x_hat - x).pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)


def train_sae(sets: Sequence[ActivationSet], position: str, cfg: SAEConfig, out_dir: str | os.PathLike,
              progress: bool = True, on_step: Callable[[int], None] | None = None) -> tuple[TopKSAE, dict]:
    """Train (or resume, or load the finished) SAE at `position` on the training rows of `sets`.
    Writes out_dir/sae.safetensors + metrics.json; returns (sae, metrics)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = sets[0].d_model
    d_sae = cfg.expansion * d
    config_hash = _hash({"cfg": asdict(cfg), "position": position, "sets": [str(a.path) for a in sets],
                         "plans": [a.manifest["plan_hash"] for a in sets], "world": dist.current().world_size})
    final = out / "sae.safetensors"
    if final.exists() and json.loads((out / "metrics.json").read_text()).get("config_hash") == config_hash:
        return load_sae(final), json.loads((out / "metrics.json").read_text())

    info = dist.current()
    scale, mean = estimate_scale(sets, position)
    g = torch.Generator().manual_seed(position_seed(cfg.seed, position))
    sae = TopKSAE(d, d_sae, cfg.k, scale)
    sae.reset_parameters(generator=g)
    with torch.no_grad():
        sae.decoder.b_dec.copy_(mean / scale)
    n_tokens = count_tokens(sets, position)
    steps = max(1, math.ceil(cfg.epochs * n_tokens / cfg.batch_size))
    stream = token_stream(sets, position, cfg.batch_size // info.world_size, position_seed(cfg.seed, position),
                          rank=info.rank, world_size=info.world_size, buffer_tokens=cfg.buffer_tokens)
    since_fired = torch.zeros(d_sae, dtype=torch.float64)
    aux_k = cfg.aux_k or d // 2
    enc, dec = sae.encoder, sae.decoder

    def loss_fn(batch: Tensor) -> tuple[Tensor, dict]:
        x = batch / scale
        pre = (x - dec.b_dec) @ enc.W_enc.T + enc.b_enc
        values, ids = _sparse_topk(pre, cfg.k)
        x_hat = _decode_sparse(values, ids, dec.W_dec) + dec.b_dec
        mse = _normalized_mse(x, x_hat)
        fired = dist.all_reduce_sum_(torch.bincount(ids[values > 0], minlength=d_sae).double())
        since_fired.add_(batch.shape[0] * info.world_size).masked_fill_(fired > 0, 0)
        dead = since_fired > cfg.dead_tokens
        aux = torch.zeros(())
        if dead.any():
            dead_ids = dead.nonzero().squeeze(1)
            aux_values, aux_ids = _sparse_topk(pre[:, dead_ids], min(aux_k, dead_ids.numel()))
            aux = _normalized_mse((x - x_hat).detach(), _decode_sparse(aux_values, dead_ids[aux_ids], dec.W_dec))
        return mse + cfg.aux_coef * aux, {"nmse": mse.item(), "dead": dead.double().mean().item()}

    _train_loop(desc=f"train {position}", params=[enc.W_enc, enc.b_enc, dec.W_dec, dec.b_dec], W_dec=dec.W_dec,
                loss_fn=loss_fn, stream=stream, steps=steps, lr=cfg.lr, ckpt=out / "ckpt.pt",
                config_hash=config_hash, state={"since_fired": since_fired}, modules={"sae": sae},
                checkpoint_every=cfg.checkpoint_every, progress=progress, on_step=on_step)
    with torch.no_grad():
        enc.b_pre.copy_(dec.b_dec)  # the encoder's own frozen centring
    round_to_storage_(sae, cfg.store_dtype)
    metrics = evaluate_sae(sae, sets, position)
    metrics.update(config_hash=config_hash, steps=steps, train_tokens=n_tokens, config=asdict(cfg))
    if info.is_main:
        save_sae(sae, final)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    dist.barrier()
    return sae, metrics


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, sets: Sequence[ActivationSet], position: str, decoder=None) -> dict:
    """FVE on held-out rows; L0 (mean active latents per token) and dead fraction (latents that fire on no
    token, train and held-out) over all rows. `decoder` replaces the SAE's own (target evaluation)."""
    decoder = decoder if decoder is not None else sae.decoder
    res, sq, n = 0.0, torch.zeros(sae.d_model, dtype=torch.float64), 0
    sum_x = torch.zeros(sae.d_model, dtype=torch.float64)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    l0_sum, l0_n = 0.0, 0
    for a in sets:
        for shard in a.shards:
            for heldout in (True, False):
                x = token_rows(a, shard, position, heldout=heldout)
                if x.numel() == 0:
                    continue
                z = sae.encode(x)
                fired |= (z > 0).any(0)
                l0_sum += float((z > 0).sum())
                l0_n += x.shape[0]
                if heldout:
                    x_hat = decoder(z) * sae.scale
                    res += float((x - x_hat).double().pow(2).sum())
                    sq += x.double().pow(2).sum(0)
                    sum_x += x.double().sum(0)
                    n += x.shape[0]
    total = float((sq - sum_x.pow(2) / max(n, 1)).sum())
    return {"fve": round(1 - res / max(total, 1e-12), 4), "dead_fraction": round(float((~fired).double().mean()), 4),
            "l0": round(l0_sum / max(l0_n, 1), 2), "heldout_tokens": n}


def adapt_decoder(sae: TopKSAE, sets: Sequence[ActivationSet], position: str, cfg: AdaptConfig,
                  out_dir: str | os.PathLike, progress: bool = True,
                  on_step: Callable[[int], None] | None = None) -> tuple[torch.nn.Module, dict]:
    """Adapt only the decoder of `sae` to the target rows of `sets`. The SAE itself is not modified;
    returns (new SAEDecoder, metrics with target FVE before and after)."""
    from ..sae import SAEDecoder

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = dist.current()
    src = sae.decoder
    config_hash = _hash({"cfg": asdict(cfg), "position": position, "plans": [a.manifest["plan_hash"] for a in sets],
                         "source": _tensor_digest(src.W_dec), "world": info.world_size})
    final = out / "decoder.safetensors"
    if final.exists() and json.loads((out / "metrics.json").read_text()).get("config_hash") == config_hash:
        t = load_file(str(final))
        dec = SAEDecoder(sae.d_model, sae.d_sae)
        dec.load_state_dict(t)
        return dec, json.loads((out / "metrics.json").read_text())

    sae.requires_grad_(False)
    dec = SAEDecoder(sae.d_model, sae.d_sae)
    dec.load_state_dict(src.state_dict())
    w0, b0 = src.W_dec.detach().clone(), src.b_dec.detach().clone()
    before = evaluate_sae(sae, sets, position)["fve"]
    n_tokens = count_tokens(sets, position)
    steps = max(1, math.ceil(cfg.epochs * n_tokens / cfg.batch_size))
    stream = token_stream(sets, position, cfg.batch_size // info.world_size, position_seed(cfg.seed + 1, position),
                          rank=info.rank, world_size=info.world_size, buffer_tokens=cfg.buffer_tokens)

    def loss_fn(batch: Tensor) -> tuple[Tensor, dict]:
        x = batch / sae.scale
        with torch.no_grad():
            values, ids = _sparse_topk(sae.encoder.preactivations(x), sae.encoder.k)
        mse = _normalized_mse(x, _decode_sparse(values, ids, dec.W_dec) + dec.b_dec)
        pull = (dec.W_dec - w0).pow(2).sum() / sae.d_sae + (dec.b_dec - b0).pow(2).sum()
        return mse + cfg.pull * pull, {"nmse": mse.item(), "pull": pull.item()}

    _train_loop(desc=f"adapt {position}", params=[dec.W_dec, dec.b_dec], W_dec=dec.W_dec, loss_fn=loss_fn,
                stream=stream, steps=steps, lr=cfg.lr, ckpt=out / "ckpt.pt", config_hash=config_hash, state={},
                modules={"decoder": dec}, checkpoint_every=cfg.checkpoint_every, progress=progress, on_step=on_step)
    round_to_storage_(dec, cfg.store_dtype)
    after = evaluate_sae(sae, sets, position, decoder=dec)["fve"]
    metrics = {"fve_target_source_decoder": before, "fve_target_adapted": after, "steps": steps,
               "config_hash": config_hash, "config": asdict(cfg)}
    if info.is_main:
        save_file({k: v.detach().contiguous() for k, v in dec.state_dict().items()}, str(final))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    dist.barrier()
    return dec, metrics


def _tensor_digest(t: Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def save_sae(sae: TopKSAE, path: str | os.PathLike) -> None:
    tensors = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
    save_file(tensors, str(path), metadata={"k": str(sae.encoder.k)})


def load_sae(path: str | os.PathLike) -> TopKSAE:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        k = int(f.metadata()["k"])
    t = load_file(str(path))
    d_sae, d = t["encoder.W_enc"].shape
    sae = TopKSAE(d, d_sae, k, float(t["scale"]))
    sae.load_state_dict(t)
    return sae.eval()
