"""The bundled text-to-image model: a tiny diffusers `FluxTransformer2DModel` trained on the concept world.

Same class as FLUX.1, so every FLUX position id (double.{i}.*, single.{j}.out) exists on it, and the
same weights run in ComfyUI's own `comfy.ldm.flux.model.Flux` (see `comfy_flux_params()`).

Latent = pixels. A 32x32 RGB image in [-1, 1] is folded 2x2 space-to-depth into LATENT_CHANNELS = 12
channels of 16x16 (`pixels_to_latent`), no VAE. The transformer, like FLUX.1, patchifies the latent
2x2 itself, "b c (h ph) (w pw) -> b (h w) (c ph pw)" (= ComfyUI's Flux and FluxPipeline._pack_latents):
64 image tokens of 48 values.

Rectified flow, as ComfyUI's Flux uses it: x_t = (1 - t) * x0 + t * noise, the model predicts
v = noise - x0, the timestep given to the diffusers model is t in [0, 1] (it multiplies by 1000 itself).
Training draws t uniformly from [0, 1]; sampling is Euler on t = linspace(1, 0) with shift 1.0
(no timestep shift), and classifier-free guidance against the empty prompt "".
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SafeDIGError
from ..sampling import SamplingSteering
from . import world
from .text_encoder import CONTEXT_LEN, TEXT_DIM

ASSETS = Path(__file__).resolve().parent / "assets"
GENERATOR_WEIGHTS = ASSETS / "bundled_flux.safetensors"
GENERATOR_CONFIG = ASSETS / "bundled_flux.json"
PROMPT_CACHE = ASSETS / "prompt_cache.safetensors"

PIXEL_CHANNELS = 3
SPACE_TO_DEPTH = 2
LATENT_CHANNELS = PIXEL_CHANNELS * SPACE_TO_DEPTH ** 2  # 12
FLUX_PATCH = 2  # the transformer's own 2x2 patchify, as in FLUX.1
TIMESTEP_SHIFT = 1.0


# ---------------------------------------------------------------- latent <-> pixels

def pixels_to_latent(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, 12, H/2, W/2]; channel order (rgb, dy, dx) of pixel_unshuffle."""
    return F.pixel_unshuffle(pixels, SPACE_TO_DEPTH)


def latent_to_pixels(latent: torch.Tensor) -> torch.Tensor:
    """Inverse of pixels_to_latent (exact)."""
    return F.pixel_shuffle(latent, SPACE_TO_DEPTH)


def pack_latent(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), C*4], exactly FluxPipeline._pack_latents / ComfyUI Flux.process_img."""
    b, c, h, w = latent.shape
    x = latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latent(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of pack_latent for a latent of spatial size (height, width)."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int) -> torch.Tensor:
    """[(H/2)(W/2), 3] RoPE ids of the packed image tokens: 0, row, column (FluxPipeline convention)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


def text_ids(length: int = CONTEXT_LEN) -> torch.Tensor:
    return torch.zeros(length, 3)


# ---------------------------------------------------------------- the model

@dataclass
class BundledConfig:
    image_size: int = world.IMAGE_SIZE
    num_layers: int = 2          # double-stream blocks
    num_single_layers: int = 2   # single-stream blocks
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    # RoPE dims (unused image index, row, column), sum = attention_head_dim. Rows/columns get most dims:
    # absolute position reaches image tokens only through their rotation against the text tokens at 0.
    axes_dims_rope: tuple[int, int, int] = (4, 14, 14)
    context_len: int = CONTEXT_LEN
    text_dim: int = TEXT_DIM

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_size(self) -> int:
        return self.image_size // SPACE_TO_DEPTH

    def diffusers_kwargs(self) -> dict:
        return dict(patch_size=1, in_channels=LATENT_CHANNELS * FLUX_PATCH ** 2, out_channels=None,
                    num_layers=self.num_layers, num_single_layers=self.num_single_layers,
                    attention_head_dim=self.attention_head_dim, num_attention_heads=self.num_attention_heads,
                    joint_attention_dim=self.text_dim, pooled_projection_dim=self.text_dim,
                    guidance_embeds=False, axes_dims_rope=tuple(self.axes_dims_rope))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BundledConfig:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "axes_dims_rope" in d:
            d["axes_dims_rope"] = tuple(d["axes_dims_rope"])
        return cls(**d)


def comfy_flux_params(cfg: BundledConfig) -> dict:
    """Keyword arguments for ComfyUI's `comfy.ldm.flux.model.Flux(**params, operations=...)`."""
    return dict(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, vec_in_dim=cfg.text_dim,
                context_in_dim=cfg.text_dim, hidden_size=cfg.hidden_size, mlp_ratio=4.0,
                num_heads=cfg.num_attention_heads, depth=cfg.num_layers,
                depth_single_blocks=cfg.num_single_layers, axes_dim=list(cfg.axes_dims_rope), theta=10000,
                patch_size=FLUX_PATCH, qkv_bias=True, guidance_embed=False)


def build_model(cfg: BundledConfig, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**cfg.diffusers_kwargs())
    model.bundled_config = cfg  # type: ignore[attr-defined] # image size etc. for sampling; not part of the diffusers config
    return model


def velocity(model, latent: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor,
             pooled: torch.Tensor) -> torch.Tensor:
    """Model prediction v = noise - x0 for latent [B, 12, h, w] at t [B] in [0, 1]."""
    h, w = latent.shape[-2:]
    out = model(hidden_states=pack_latent(latent), encoder_hidden_states=tokens, pooled_projections=pooled,
                timestep=t, img_ids=image_ids(h, w).to(latent), txt_ids=text_ids(tokens.shape[1]).to(latent),
                return_dict=False)[0]
    return unpack_latent(out, h, w)


def load_bundled(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
    """The shipped (or given) generator as a FluxTransformer2DModel in eval mode, gradients off.
    The config is read from the JSON next to the weights (same stem)."""
    from safetensors.torch import load_file

    weights = Path(weights) if weights else GENERATOR_WEIGHTS
    cfg = read_config(weights.with_suffix(".json"))
    model = build_model(cfg)
    model.load_state_dict(load_file(os.fspath(weights)))
    model.requires_grad_(False)
    if dtype != torch.float32 or torch.device(device).type != "cpu":
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def read_config(path: str | os.PathLike = GENERATOR_CONFIG) -> BundledConfig:
    with open(path) as f:
        return BundledConfig.from_dict(json.load(f)["model"])


# ---------------------------------------------------------------- sampling

Encoder = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]


def is_generator(weights: Path) -> bool:
    """True when the same-stem .json is a generator config (its "model" section, as the trainer writes it);
    other checkpoints in a folder, e.g. the judge, have a config of another content."""
    try:
        read_config(weights.with_suffix(".json"))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def find_generator(name: object, folders: Sequence[str | os.PathLike], folder_label: str) -> Path:
    """The generator checkpoint `name` (a plain file name) in the first of `folders` that has it; errors say
    what was searched and how to get one (`folder_label`: the models/ subfolder users put theirs in)."""
    fix = (f"train one with `python -m safedig_core train-bundled` or put <name>.safetensors + <name>.json in "
           f"models/{folder_label}/; the shipped model is {GENERATOR_WEIGHTS.name} in safedig_core/bundled/assets/")
    searched = [str(f) for f in folders]
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise SafeDIGError(f"bundled model name {name!r} must be a plain file name; searched: {searched}", fix)
    for folder in folders:
        full = Path(folder) / name
        if full.is_file():
            if not full.with_suffix(".json").is_file():
                raise SafeDIGError(f"{full} has no config {full.with_suffix('.json').name} beside it", fix)
            if not is_generator(full):
                raise SafeDIGError(f"{full} is not a bundled generator: {full.with_suffix('.json').name} has no "
                                   "generator \"model\" section (the judge checkpoint is not a MODEL)", fix)
            return full
    raise SafeDIGError(f"bundled model {name!r} not found; searched: {searched}", fix)


def _default_encoder() -> Encoder:
    from .text_encoder import encode_prompts

    return encode_prompts


# wrap(run, latent_in, t, schedule) -> output: runs one model call run() (e.g. SamplingSteering.steer_call)
ModelCallWrapper = Callable[[Callable[[], torch.Tensor], torch.Tensor, float, Sequence[float]], torch.Tensor]


def initial_noise(seeds: Sequence[int], cfg: BundledConfig) -> torch.Tensor:
    """One noise latent per seed, independent of batch composition."""
    shape = (LATENT_CHANNELS, cfg.latent_size, cfg.latent_size)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample(model, tokens: torch.Tensor, pooled: torch.Tensor, noise: torch.Tensor, steps: int = 20,
           guidance: float = 3.0, uncond: tuple[torch.Tensor, torch.Tensor] | None = None,
           callback: Callable[[int, torch.Tensor], None] | None = None,
           wrap: ModelCallWrapper | None = None) -> torch.Tensor:
    """Euler on the rectified flow from t=1 (noise) to t=0; returns the final latent.
    guidance > 1 needs `uncond` (the encoding of ""), broadcast over the batch; the DiT sees [cond; uncond].
    `wrap(run, latent_in, t, schedule)` runs each model call `run()` (e.g. through SamplingSteering.steer_call,
    as ComfyUI's APPLY_MODEL wrapper does); `schedule` is the t grid, 1 -> 0."""
    x = noise.clone()
    ts = torch.linspace(1.0, 0.0, steps + 1)
    b = x.shape[0]
    use_cfg = guidance != 1.0
    if use_cfg:
        if uncond is None:
            raise ValueError("guidance != 1 needs the unconditional encoding (uncond)")
        u_tok, u_pool = (u.expand(b, *u.shape[1:]) for u in uncond)
        tokens, pooled = torch.cat([tokens, u_tok]), torch.cat([pooled, u_pool])
    schedule = ts.tolist()
    for i in range(steps):
        t = ts[i].expand(b * (2 if use_cfg else 1)).to(x)
        x_in = torch.cat([x, x]) if use_cfg else x
        if wrap is None:
            v = velocity(model, x_in, t, tokens, pooled)
        else:
            def call(x_in: torch.Tensor = x_in, t: torch.Tensor = t) -> torch.Tensor:
                return velocity(model, x_in, t, tokens, pooled)

            v = wrap(call, x_in, schedule[i], schedule)
        if use_cfg:
            v_c, v_u = v.chunk(2)
            v = v_u + guidance * (v_c - v_u)
        x = x + (ts[i + 1] - ts[i]) * v
        if callback is not None:
            callback(i, x)
    return x


def sample_steered(model, steering: SamplingSteering, tokens: torch.Tensor, pooled: torch.Tensor,
                   noise: torch.Tensor, steps: int = 20, guidance: float = 3.0,
                   uncond: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`sample` steered call by call by `steering`, as ComfyUI's Steer node runs it: one sampling run
    (`SamplingSteering.sample_run`, whose images latched after the first step are sampled again on their own,
    with their own prompts and noise), each model call through `steer_call` ([cond; uncond] chunks)."""
    chunks = [0, 1] if guidance != 1.0 else [0]

    def images(idx: torch.Tensor | None) -> torch.Tensor:
        rows = (tokens, pooled, noise) if idx is None else (tokens[idx], pooled[idx], noise[idx])
        return sample(model, *rows, steps, guidance, uncond,
                      wrap=lambda run, x, t, schedule: steering.steer_call(model, x, t, schedule, chunks, run))

    return steering.sample_run(images, torch.linspace(1.0, 0.0, steps + 1).tolist(), n_images=noise.shape[0])


def generate(prompts: Sequence[str], seed: int | Sequence[int] = 0, steps: int = 20, guidance: float = 3.0,
             model=None, encoder: Encoder | None = None, batch_size: int = 64) -> np.ndarray:
    """Captions -> uint8 images [B, 32, 32, 3]. Image i uses seed + i (or seeds[i])."""
    model = model if model is not None else load_bundled()
    encoder = encoder or _default_encoder()
    cfg = getattr(model, "bundled_config", None) or BundledConfig()
    seeds = list(seed) if not isinstance(seed, int) else [seed + i for i in range(len(prompts))]
    uncond = encoder([""]) if guidance != 1.0 else None
    out = []
    for i in range(0, len(prompts), batch_size):
        tok, pool = encoder(list(prompts[i:i + batch_size]))
        noise = initial_noise(seeds[i:i + batch_size], cfg)
        lat = sample(model, tok, pool, noise, steps, guidance, uncond)
        out.append(world.to_uint8(latent_to_pixels(lat)))
    return np.concatenate(out)


def smoke_prompts() -> list[world.Prompt]:
    """Two held-out-wording prompts per concept: what the fast tests generate and judge."""
    return world.eval_prompts(2, "heldout", seed=1)


def write_prompt_cache(path: str | os.PathLike = PROMPT_CACHE) -> None:
    """Ship the encodings the tests need (smoke prompts, their safe counterparts, the smoke-training
    caption pool, and ""), so tests run without loading the text encoder."""
    from .text_encoder import PromptCache

    smoke = smoke_prompts()
    texts = [p.text for p in smoke] + [world.safe_counterpart(p).text for p in smoke if p.unsafe]
    texts += [p.text for p in world.prompt_pool(8)] + [""]
    PromptCache.build(texts).save(path)


# ---------------------------------------------------------------- training

@dataclass
class TrainArgs:
    out: str = "runs/bundled"
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    ema_decay: float = 0.995
    cfg_dropout: float = 0.1
    caption_pool: int = 8000
    seed: int = 0
    checkpoint_every: int = 100
    threads: int = 2
    model: BundledConfig = field(default_factory=BundledConfig)


def _lr_at(step: int, a: TrainArgs) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def training_batch(step: int, a: TrainArgs, pool: Sequence[world.Prompt]) -> tuple[torch.Tensor, np.ndarray]:
    """(pixels [B, 3, 32, 32], caption indices [B]) for this step: a pure function of (seed, step), so a
    resumed run sees exactly the batches an uninterrupted one would."""
    rng = np.random.default_rng([a.seed, step, 1])
    idx = rng.integers(len(pool), size=a.batch_size)
    images = world.render_batch([world.scene_for_prompt(pool[i], rng) for i in idx])
    return world.to_tensor(images), idx


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class _TrainState:
    """What a checkpoint holds besides the weights: where the run is and what it has logged."""

    step: int = 0
    history: list = field(default_factory=list)
    elapsed_s: float = 0.0
    running_loss: float | None = None


def _resume(ckpt_path: Path, a: TrainArgs, model, ema, opt, log: Callable[[str], None]) -> _TrainState:
    """Load the checkpoint into model / ema / optimizer when one exists; refuse one made with other settings."""
    if not ckpt_path.exists():
        return _TrainState()
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if ck["model_config"] != a.model.to_dict() or ck["seed"] != a.seed or ck["batch_size"] != a.batch_size:
        raise SafeDIGError("the checkpoint was made with other settings (model, seed or batch size)",
                           "use another --out, or delete the checkpoint to start over", path=ckpt_path)
    model.load_state_dict(ck["model"])
    ema.load_state_dict(ck["ema"])
    opt.load_state_dict(ck["opt"])
    state = _TrainState(ck["step"], ck["history"], ck["elapsed_s"], ck["running_loss"])
    log(f"resuming from step {state.step} ({state.elapsed_s / 60:.1f} min trained)")
    return state


def _encode_pool(encoder: Encoder, pool: Sequence[world.Prompt]):
    """(tokens, pooled) of every training caption, plus the empty caption's, encoded once: the encoder costs
    about a third of a training step per batch."""
    tok_chunks, pool_chunks = [], []
    for i in range(0, len(pool), 256):
        tk, pl = encoder([p.text for p in pool[i:i + 256]])
        tok_chunks.append(tk)
        pool_chunks.append(pl)
    null_tok, null_pooled = encoder([""])
    return torch.cat(tok_chunks), torch.cat(pool_chunks), null_tok, null_pooled


def _train_step(step: int, a: TrainArgs, model, ema, opt, pool, encoded) -> float:
    """One flow-matching step on this step's batch, then the EMA update; returns the loss."""
    pool_tok, pool_pooled, null_tok, null_pooled = encoded
    pixels, idx = training_batch(step, a, pool)
    g = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
    x0 = pixels_to_latent(pixels)
    noise = torch.randn(x0.shape, generator=g)
    # Uniform t: layout, shape and concept are decided near t = 1, which logit-normal sampling
    # (SD3's choice) visits too rarely for a short CPU run.
    t = torch.rand(a.batch_size, generator=g)
    drop = torch.rand(a.batch_size, generator=g) < a.cfg_dropout
    tokens, pooled = pool_tok[idx].clone(), pool_pooled[idx].clone()
    tokens[drop], pooled[drop] = null_tok, null_pooled
    xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
    v = velocity(model, xt, t, tokens, pooled)
    loss = F.mse_loss(v, noise - x0)
    for group in opt.param_groups:
        group["lr"] = _lr_at(step, a)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        d = min(a.ema_decay, (1 + step) / (10 + step))
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm, 1 - d)
    return loss.item()


def _write_model(out: Path, a: TrainArgs, ema, state: _TrainState, trained_now: bool) -> dict:
    """ema.safetensors (unless a finished run wrote it already) and ema.json, the config that loads it."""
    from safetensors.torch import save_file

    if trained_now or not (out / "ema.safetensors").exists():
        weights = {k: v.contiguous() for k, v in ema.state_dict().items()}
        save_file(weights, os.fspath(out / "ema.safetensors"))
    summary = {"model": a.model.to_dict(), "training": {
        "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "ema_decay": a.ema_decay,
        "cfg_dropout": a.cfg_dropout, "caption_pool": a.caption_pool, "seed": a.seed,
        "final_loss_ema": state.history[-1][1] if state.history else None,
        "train_minutes": round(state.elapsed_s / 60, 2),
        "threads": a.threads, "timestep_sampling": "uniform(0,1)", "timestep_shift": TIMESTEP_SHIFT}}
    with open(out / "ema.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def train(a: TrainArgs, encoder: Encoder | None = None, progress: bool = True,
          log: Callable[[str], None] = print, stop_after: int | None = None) -> dict:
    """Train (or resume) into a.out/: checkpoint.pt (resumable), ema.safetensors + ema.json (the model).
    Returns a summary dict. Kill it any time; rerun with the same args to continue. `stop_after` ends
    this call after that many new steps (as a kill would, but at a checkpoint)."""
    from tqdm import tqdm

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    encoder = encoder or _default_encoder()
    model = build_model(a.model, a.seed)
    ema = build_model(a.model, a.seed)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, betas=(0.9, 0.99))
    ckpt_path = out / "checkpoint.pt"
    state = _resume(ckpt_path, a, model, ema, opt, log)
    start = state.step

    pool = world.prompt_pool(a.caption_pool, a.seed)
    t0 = time.time()
    encoded = _encode_pool(encoder, pool)
    log(f"encoded {len(pool)} training captions in {time.time() - t0:.0f}s")

    model.train()
    bar = tqdm(range(start, a.steps), initial=start, total=a.steps, disable=not progress,
               desc="train-bundled", dynamic_ncols=True, mininterval=2.0)
    t_start = time.time() - state.elapsed_s

    def checkpoint(step: int) -> None:
        state.step, state.elapsed_s = step, time.time() - t_start
        _save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                      "step": step, "history": state.history, "elapsed_s": state.elapsed_s,
                      "model_config": a.model.to_dict(), "seed": a.seed, "batch_size": a.batch_size,
                      "running_loss": state.running_loss}, ckpt_path)

    end = a.steps if stop_after is None else min(a.steps, start + stop_after)
    for step in bar:
        if step == end:
            checkpoint(step)
            break
        loss = _train_step(step, a, model, ema, opt, pool, encoded)
        running = state.running_loss
        state.running_loss = loss if running is None else 0.98 * running + 0.02 * loss
        if (step + 1) % 25 == 0:
            state.history.append((step + 1, round(state.running_loss, 5)))
        bar.set_postfix(loss=f"{state.running_loss:.4f}", lr=f"{_lr_at(step, a):.1e}", refresh=False)
        if (step + 1) % a.checkpoint_every == 0 or step + 1 == a.steps:
            checkpoint(step + 1)
    bar.close()
    state.elapsed_s = time.time() - t_start
    if end < a.steps:
        log(f"stopped at step {end} of {a.steps}; rerun to continue")
        return {"stopped_at": end}
    summary = _write_model(out, a, ema, state, trained_now=start < a.steps)
    log(f"done: {a.steps} steps in {state.elapsed_s / 60:.1f} min, loss {summary['training']['final_loss_ema']}")
    return summary
