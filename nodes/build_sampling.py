"""The ComfyUI side of building a pack: a safedig_core `Generator` that samples with ComfyUI's own sampler
(comfy.sample.sample, the path KSampler takes) and the user's own text encoders (the CLIP input), and a
`Reporter` on ComfyUI's progress bar and interrupt button.

One prompt per sampler call: each prompt's starting noise is comfy.sample.prepare_noise(latent, seed),
as KSampler makes it, so a seed gives the same image here as in a workflow.
"""

from __future__ import annotations

import hashlib

import comfy.model_management
import comfy.patcher_extension as pe
import comfy.sample
import comfy.samplers
import comfy.utils
import node_helpers
import torch

from safedig_core.errors import SafeDIGError
from safedig_core.training.build import Reporter
from safedig_core.training.generators import Generator

WRAPPER_KEY = "safedig_build"
# Samplers that call the model once per step: capture steps are model calls, so others would mix steps.
ONE_CALL_SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "lcm", "ddim", "ipndm", "deis",
                     "res_multistep", "uni_pc")
PATCH = 2  # FLUX and MMDiT both patchify the latent 2x2 into tokens


def samplers() -> list[str]:
    return [s for s in ONE_CALL_SAMPLERS if s in comfy.samplers.KSampler.SAMPLERS]


class ComfySampler(Generator):
    """Sample one prompt at a time on a ComfyUI MODEL with conditioning from a ComfyUI CLIP."""

    max_batch = 1

    def __init__(self, model, clip, *, sampler_name: str, scheduler: str, steps: int, cfg: float, guidance: float,
                 width: int, height: int, after_prompt=None):
        if clip is None:
            raise SafeDIGError("no text encoder connected", "connect the CLIP output of your checkpoint or CLIP "
                               "loader (for the bundled model: SafeDIG Load Bundled Text Encoder)")
        if sampler_name not in samplers():
            raise SafeDIGError(f"sampler {sampler_name!r} calls the model more than once per step",
                               f"choose one of {', '.join(samplers())}")
        self.patcher = model.clone()  # the wrapper goes on a clone: the user's model stays as it was
        self.patcher.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, self._apply_model)
        self.model = model
        self.clip = clip
        self.steps, self.cfg, self.guidance = steps, cfg, guidance
        self.sampler_name, self.scheduler, self.width, self.height = sampler_name, scheduler, width, height
        self.calls_per_step = 1 if cfg == 1.0 else 2
        self.after_prompt = after_prompt
        self._cond_or_uncond: list[int] = [0]
        self._on_step = None
        self._cond_calls = 0
        self._negative = None
        self.spec = {"backend": "comfyui", "model": type(model.model).__name__, "weights": weights_fingerprint(model),
                     "sampler": sampler_name, "scheduler": scheduler, "steps": steps, "cfg": cfg,
                     "guidance": guidance, "width": width, "height": height}

    def encode(self, text: str):
        conditioning = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
        return node_helpers.conditioning_set_values(conditioning, {"guidance": self.guidance})

    def empty_latent(self) -> torch.Tensor:
        fmt = self.patcher.get_model_object("latent_format")
        ratio = getattr(fmt, "spacial_downscale_ratio", 8)
        if self.width % (ratio * PATCH) or self.height % (ratio * PATCH):
            raise SafeDIGError(f"size {self.width}x{self.height} does not fit this model's latent",
                               f"use multiples of {ratio * PATCH}")
        return torch.zeros(1, fmt.latent_channels, self.height // ratio, self.width // ratio)

    def token_counts(self) -> tuple[int, int]:
        latent = self.empty_latent()
        text = self.encode("a photo")[0][0].shape[1]
        return latent.shape[-1] * latent.shape[-2] // PATCH**2, int(text)

    def _apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                     **kwargs):
        opts = transformer_options if transformer_options is not None else {}
        self._cond_or_uncond = list(opts.get("cond_or_uncond") or [0])
        if self._on_step is not None:
            if 0 in self._cond_or_uncond:
                self._on_step(self._cond_calls)
                self._cond_calls += 1
            else:
                self._on_step(-1)  # the unconditional prompt alone: nothing of it is captured
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def cond_rows(self, batch: int) -> slice:
        chunks = self._cond_or_uncond
        if 0 not in chunks:
            return slice(0, 0)
        n = batch // len(chunks)
        i = chunks.index(0)
        return slice(i * n, (i + 1) * n)

    def run(self, texts, seeds, on_step):
        if len(texts) != 1:
            raise SafeDIGError(f"ComfySampler samples one prompt per call, got {len(texts)}", None)
        positive = self.encode(texts[0])
        if self._negative is None:
            self._negative = self.encode("")
        latent = comfy.sample.fix_empty_latent_channels(self.patcher, self.empty_latent())
        noise = comfy.sample.prepare_noise(latent, int(seeds[0]))
        self._on_step, self._cond_calls = on_step, 0
        try:
            with torch.inference_mode():
                samples = comfy.sample.sample(self.patcher, noise, self.steps, self.cfg, self.sampler_name,
                                              self.scheduler, positive, self._negative, latent,
                                              callback=self._step_done, disable_pbar=True, seed=int(seeds[0]))
        finally:
            self._on_step = None
        if self._cond_calls != self.steps:
            raise SafeDIGError(f"the sampler called the model {self._cond_calls} times for {self.steps} steps",
                               f"choose one of {', '.join(samplers())}")
        if self.after_prompt is not None:
            self.after_prompt()
        return samples

    @staticmethod
    def _step_done(*_args) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()


def weights_fingerprint(model) -> str:
    """A cheap identity of the loaded weights (a few thousand values of a few tensors), so a build's work
    folder is never resumed on another model."""
    digest = hashlib.sha256()
    state = model.model.diffusion_model.state_dict()
    for name in sorted(state)[:: max(1, len(state) // 8)]:
        digest.update(name.encode())
        digest.update(state[name].flatten()[:2048].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class ComfyReporter(Reporter):
    """A ComfyUI progress bar per stage (the node's own bar in the UI) and the interrupt button."""

    def __init__(self) -> None:
        self.bar: comfy.utils.ProgressBar | None = None

    def stage(self, name: str, total: int) -> None:
        super().stage(name, total)
        self.bar = comfy.utils.ProgressBar(max(1, total))

    def advance(self, n: int = 1) -> None:
        self.check()
        if self.bar is not None and n:
            self.bar.update(n)

    def check(self) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
