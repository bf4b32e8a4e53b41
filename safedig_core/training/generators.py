"""Generator adapters: one interface over the bundled model and diffusers FLUX / SD3 pipelines, so
collection and gate calibration run the same code on every backend.

    gen.model               what `resolve()` finds the DiT in (hooks go there)
    gen.steps               sampling steps per generation
    gen.run(texts, seeds, on_step)   sample one batch; on_step(i) is called before step i's DiT call
    gen.cond_rows(batch)    the rows of a DiT call that belong to the prompts (not the CFG unconditional)
    gen.spec                JSON description, enough to rebuild it (`make_generator`)

Each sample's starting noise depends on its seed only, never on the batch it shares.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import SafeDIGError

StepCallback = Callable[[int], None]


class Generator:
    model: object
    steps: int
    spec: dict
    max_batch: int | None = None  # prompts per run() call this generator accepts (None: any)
    calls_per_step: int = 1       # DiT calls per sampling step (2 when CFG runs cond and uncond apart)

    def run(self, texts: Sequence[str], seeds: Sequence[int], on_step: StepCallback) -> torch.Tensor:
        raise NotImplementedError

    def cond_rows(self, batch: int) -> slice:
        return slice(None)

    def cond_mask(self, batch: int) -> torch.Tensor:
        """[batch] bool: `cond_rows` of a DiT call of `batch` rows (SteeringHooks' row_mask)."""
        mask = torch.zeros(batch, dtype=torch.bool)
        mask[self.cond_rows(batch)] = True
        return mask

    def token_counts(self) -> tuple[int, int]:
        """(image tokens, text tokens) of one generation: what the build plan sizes storage by."""
        raise NotImplementedError(f"{type(self).__name__} does not report its token counts")

    def time_generation(self) -> float:
        """Seconds one generation takes here, measured on one sample (the build plan's time estimate)."""
        t0 = time.perf_counter()
        self.run(["a photo"], [0], lambda _i: None)
        return time.perf_counter() - t0


class BundledGenerator(Generator):
    """The bundled FLUX-class model: Euler sampling with CFG; the DiT sees [cond rows; uncond rows]."""

    def __init__(self, model=None, weights: str | None = None, steps: int = 20, guidance: float = 3.0, encoder=None):
        from ..bundled.generator import GENERATOR_WEIGHTS, load_bundled

        self.model = model if model is not None else load_bundled(weights)
        self.steps, self.guidance = steps, guidance
        self._encoder = encoder
        self.spec = {"backend": "bundled", "weights": weights, "steps": steps, "guidance": guidance}
        if model is None:  # provenance: which generator weights, whatever the path
            self.spec["weights_sha256"] = file_sha256(weights or GENERATOR_WEIGHTS)
        self._uncond = None

    def encode(self, texts: Sequence[str]):
        if self._encoder is None:
            from ..bundled.text_encoder import encode_prompts

            self._encoder = encode_prompts
        return self._encoder(list(texts))

    def run(self, texts, seeds, on_step):
        from ..bundled.generator import BundledConfig, initial_noise, sample

        if self._uncond is None and self.guidance != 1.0:
            self._uncond = self.encode([""])
        tokens, pooled = self.encode(texts)
        cfg = getattr(self.model, "bundled_config", None) or BundledConfig()
        on_step(0)
        return sample(self.model, tokens, pooled, initial_noise(seeds, cfg), self.steps, self.guidance,
                      self._uncond, callback=lambda i, _x: on_step(i + 1) if i + 1 < self.steps else None)

    def cond_rows(self, batch: int) -> slice:
        return slice(0, batch // 2) if self.guidance != 1.0 else slice(None)

    def token_counts(self) -> tuple[int, int]:
        from ..bundled.generator import FLUX_PATCH, BundledConfig, initial_noise

        noise = initial_noise([0], getattr(self.model, "bundled_config", None) or BundledConfig())
        return noise.shape[-1] * noise.shape[-2] // FLUX_PATCH**2, int(self.encode(["a photo"])[0].shape[1])


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class PromptEmbeddings:
    """Precomputed text conditioning for pipelines without text encoders (a safetensors file holding
    `prompt_embeds` [N, L, D] and `pooled_prompt_embeds` [N, P], metadata `texts` = JSON list)."""

    def __init__(self, texts: Sequence[str], embeds: torch.Tensor, pooled: torch.Tensor):
        self.index = {t: i for i, t in enumerate(texts)}
        self.embeds, self.pooled = embeds, pooled

    @classmethod
    def load(cls, path: str | os.PathLike) -> PromptEmbeddings:
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            return cls(json.loads(f.metadata()["texts"]), f.get_tensor("prompt_embeds"),
                       f.get_tensor("pooled_prompt_embeds"))

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        texts = sorted(self.index, key=self.index.__getitem__)
        save_file({"prompt_embeds": self.embeds.contiguous(), "pooled_prompt_embeds": self.pooled.contiguous()},
                  os.fspath(path), metadata={"texts": json.dumps(texts)})

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [t for t in texts if t not in self.index]
        if missing:
            raise SafeDIGError(f"{len(missing)} prompt(s) have no precomputed embedding, e.g. {missing[0]!r}",
                               "add them to the --prompt-embeds file")
        rows = [self.index[t] for t in texts]
        return self.embeds[rows], self.pooled[rows]


DIFFUSERS_PIPELINES = ("FluxPipeline", "StableDiffusion3Pipeline")


def load_pipeline(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A FluxPipeline / StableDiffusion3Pipeline from a local diffusers folder, offline. Components saved
    as null (e.g. no text encoders when embeddings are precomputed) are passed as None."""
    from diffusers import DiffusionPipeline

    index_path = Path(model_dir) / "model_index.json"
    if not index_path.exists():
        raise SafeDIGError("not a diffusers pipeline folder (no model_index.json)",
                           "pass the folder of a FLUX.1 or SD3/SD3.5 pipeline", path=model_dir)
    index = json.loads(index_path.read_text())
    if index.get("_class_name") not in DIFFUSERS_PIPELINES:
        raise SafeDIGError(f"pipeline class {index.get('_class_name')!r} is not supported",
                           f"use one of {DIFFUSERS_PIPELINES}", path=model_dir)
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v and v[0] is None}
    pipe = DiffusionPipeline.from_pretrained(os.fspath(model_dir), local_files_only=True, **absent,
                                             **{_dtype_keyword(): dtype})
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _dtype_keyword() -> str:
    """diffusers 0.40 renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns); older releases
    know only `torch_dtype`, and requirements allow diffusers >= 0.32."""
    import diffusers

    major, minor = (int(part) for part in diffusers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (0, 40) else "torch_dtype"


class DiffusersGenerator(Generator):
    """A diffusers FluxPipeline or StableDiffusion3Pipeline. Latents are never decoded (output_type
    "latent"), so collection needs no VAE. Without text encoders, pass `embeddings` (PromptEmbeddings);
    SD3 with guidance > 1 then also needs the embedding of the empty prompt ""."""

    def __init__(self, pipe, steps: int = 28, guidance: float = 3.5, height: int = 1024, width: int = 1024,
                 embeddings: Callable | None = None, spec: dict | None = None):
        kind = type(pipe).__name__
        if kind not in DIFFUSERS_PIPELINES:
            raise SafeDIGError(f"{kind} is not supported", f"use one of {DIFFUSERS_PIPELINES}")
        self.pipe, self.model, self.kind = pipe, pipe.transformer, kind
        self.steps, self.guidance, self.height, self.width = steps, guidance, height, width
        self.embeddings = embeddings
        self.spec = {"backend": "diffusers", "pipeline": kind, "steps": steps, "guidance": guidance,
                     "height": height, "width": width, **(spec or {})}
        if embeddings is None and getattr(pipe, "text_encoder", None) is None:
            raise SafeDIGError("this pipeline has no text encoder", "pass precomputed --prompt-embeds")

    @property
    def _sd3_cfg(self) -> bool:
        return self.kind == "StableDiffusion3Pipeline" and self.guidance > 1.0

    def run(self, texts, seeds, on_step):
        kw = dict(num_inference_steps=self.steps, guidance_scale=self.guidance, height=self.height,
                  width=self.width, output_type="latent",
                  generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
                  callback_on_step_end=lambda _p, i, _t, kwargs: (on_step(i + 1), kwargs)[1])
        device, dtype = self.pipe.transformer.device, self.pipe.transformer.dtype
        if self.embeddings is None:
            kw["prompt"] = list(texts)
        else:
            embeds, pooled = self.embeddings(list(texts))
            kw.update(prompt_embeds=embeds.to(device, dtype), pooled_prompt_embeds=pooled.to(device, dtype))
            if self._sd3_cfg:
                ne, np_ = self.embeddings([""])
                kw.update(negative_prompt_embeds=ne.expand_as(embeds).to(device, dtype),
                          negative_pooled_prompt_embeds=np_.expand_as(pooled).to(device, dtype))
        on_step(0)
        return self.pipe(**kw).images

    def cond_rows(self, batch: int) -> slice:
        # SD3 concatenates [negative; positive] for CFG; FLUX.1 uses embedded guidance (one pass).
        return slice(batch // 2, None) if self._sd3_cfg else slice(None)


def make_generator(spec: dict, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Generator:
    """Rebuild the generator a collection used, from its spec (later stages calibrate with it)."""
    if spec["backend"] == "bundled":
        return BundledGenerator(weights=spec.get("weights"), steps=spec["steps"], guidance=spec["guidance"])
    if spec.get("model_dir") is None:
        raise SafeDIGError("this run's diffusers pipeline was given in-process, not as a folder",
                           "pass the same generator object to the pipeline function")
    pipe = load_pipeline(spec["model_dir"], dtype, device)
    emb = PromptEmbeddings.load(spec["prompt_embeds"]) if spec.get("prompt_embeds") else None
    keep = {k: spec[k] for k in ("model_dir", "prompt_embeds") if spec.get(k)}
    return DiffusersGenerator(pipe, spec["steps"], spec["guidance"], spec["height"], spec["width"], emb, keep)
