"""The bundled tiny FLUX-class model inside ComfyUI's own sampler, so SafeDIG Steer steers it like FLUX.1.

    SafeDIG Load Bundled Model      diffusers weights -> ComfyUI's comfy.ldm.flux.model.Flux (converted by
                                    comfy.model_detection.convert_diffusers_mmdit) in a model_base.Flux with
                                    a 12-channel pixel latent format and no timestep shift -> MODEL
    SafeDIG Bundled Text Encode     MiniLM token states + pooled vector -> CONDITIONING
    SafeDIG Bundled Empty Latent    zeros [B, 12, H/2, W/2] (pixels folded 2x2 space-to-depth) -> LATENT
    SafeDIG Bundled Latent To Image LATENT -> IMAGE (exact inverse of the fold, no VAE)

With KSampler (euler, simple scheduler) this is the same rectified-flow sampler as
safedig_core.bundled.generator.sample: sigma = t, the model predicts v = noise - x0, cfg against the empty prompt.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import ClassVar

import comfy.latent_formats
import comfy.model_base
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
import folder_paths
import torch
from safetensors.torch import load_file

from safedig_core.bundled import generator
from safedig_core.errors import SafeDIGError

from . import compat
from .compat import io

FOLDER = "safedig_bundled"
SHIPPED = "bundled_flux.safetensors"


class BundledLatentFormat(comfy.latent_formats.LatentFormat):
    """Pixels in [-1, 1] folded 2x2 into 12 channels: no scaling, no shift."""

    latent_channels = generator.LATENT_CHANNELS
    latent_dimensions = 2
    scale_factor = 1.0


class BundledFluxConfig(comfy.supported_models_base.BASE):
    """ComfyUI model config for the bundled model: FLUX.1's classes, the bundled width/depth and latent."""

    unet_config: ClassVar[dict] = {}
    unet_extra_config: ClassVar[dict] = {}
    # ComfyUI's Flux shift is mu = ln(shift) (flux_time_shift); ln(1.0) = 0 is no shift, as the model was trained.
    sampling_settings: ClassVar[dict] = {"shift": math.log(generator.TIMESTEP_SHIFT)}
    latent_format = BundledLatentFormat
    supported_inference_dtypes: ClassVar[list] = [torch.float32]
    memory_usage_factor = 1.0

    def get_model(self, state_dict, prefix="", device=None):
        return comfy.model_base.Flux(self, device=device)


def register_folder() -> list[str]:
    default = os.path.join(folder_paths.models_dir, FOLDER)
    entry = folder_paths.folder_names_and_paths.get(FOLDER)
    paths = entry[0] if entry else []
    if default not in paths:
        paths.insert(0, default)
    shipped = str(generator.ASSETS)
    if shipped not in paths:
        paths.append(shipped)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, {".safetensors"})
    return list(paths)


def is_generator(weights: Path) -> bool:
    """True when the same-stem .json is a generator config (its "model" section, as the trainer writes it);
    other checkpoints in the folder, e.g. the judge, have a config of another content."""
    try:
        generator.read_config(weights.with_suffix(".json"))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def list_weights() -> list[str]:
    """Generator checkpoints: .safetensors files whose same-stem .json is a generator config."""
    register_folder()
    names = []
    for name in folder_paths.get_filename_list(FOLDER):
        full = folder_paths.get_full_path(FOLDER, name)
        if full and name.endswith(".safetensors") and is_generator(Path(full)):
            names.append(name)
    return sorted(names, key=lambda n: (n != SHIPPED, n))


def resolve_weights(name: str) -> Path:
    folders = register_folder()
    fix = (f"train one with `python -m safedig_core train-bundled` or put <name>.safetensors + <name>.json in "
           f"models/{FOLDER}/; the shipped model is {SHIPPED} in safedig_core/bundled/assets/")
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise SafeDIGError(f"bundled model name {name!r} must be a plain file name; searched: {folders}", fix)
    for folder in folders:
        full = Path(folder) / name
        if full.is_file():
            if not full.with_suffix(".json").is_file():
                raise SafeDIGError(f"{full} has no config {full.with_suffix('.json').name} beside it", fix)
            if not is_generator(full):
                raise SafeDIGError(f"{full} is not a bundled generator: {full.with_suffix('.json').name} has no "
                                   "generator \"model\" section (the judge checkpoint is not a MODEL)", fix)
            return full
    raise SafeDIGError(f"bundled model {name!r} not found; searched: {folders}", fix)


def load_model(path: Path) -> comfy.model_patcher.ModelPatcher:
    """The bundled generator as a ComfyUI MODEL built on ComfyUI's own Flux class."""
    try:
        cfg = generator.read_config(path.with_suffix(".json"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SafeDIGError(f"{path.with_suffix('.json')}: not a bundled-model config ({exc})",
                           "use the .json the trainer wrote next to the weights") from None
    params = compat.flux_params(generator.comfy_flux_params(cfg))  # fitted to this ComfyUI's FluxParams
    model_config = BundledFluxConfig({"image_model": "flux", **params})
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    model_config.set_inference_dtype(torch.float32, None)
    sd = comfy.model_detection.convert_diffusers_mmdit(load_file(str(path)), "")
    if not sd:
        raise SafeDIGError(f"{path}: no diffusers FluxTransformer2DModel weights found",
                           "load the generator written by the bundled-model trainer")
    model = model_config.get_model(sd, "", device=offload_device)
    missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise SafeDIGError(f"{path}: weights do not fit the config (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]})", "keep the .json that was written with these weights")
    model.diffusion_model.requires_grad_(False)
    model.bundled_config = cfg
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


class LoadBundledModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeDIGLoadBundledModel",
            display_name="SafeDIG Load Bundled Model",
            category="SafeDIG/bundled model",
            description="The tiny FLUX-class text-to-image model shipped with SafeDIG (32x32 pixel images), as a "
                        "ComfyUI MODEL on ComfyUI's own Flux class: sample it with KSampler (euler, simple).",
            inputs=[io.Combo.Input("weights", options=list_weights(), default=SHIPPED,
                                   tooltip=f"Generator checkpoint (+ same-name .json) in models/{FOLDER}/ or "
                                           "the shipped one.")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, weights) -> bool | str:
        if weights is None:
            return True
        try:
            resolve_weights(weights)
        except SafeDIGError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, weights) -> io.NodeOutput:
        return io.NodeOutput(load_model(resolve_weights(weights)))


class BundledTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeDIGBundledTextEncode",
            display_name="SafeDIG Bundled Text Encode",
            category="SafeDIG/bundled model",
            description="Encode a caption with the bundled model's sentence encoder (all-MiniLM-L6-v2): token "
                        "states as context, the sentence embedding as pooled vector. Use \"\" as negative.",
            inputs=[io.String.Input("text", multiline=True, default="")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text) -> io.NodeOutput:
        from safedig_core.bundled.text_encoder import encode_prompts

        tokens, pooled = encode_prompts([text])
        return io.NodeOutput([[tokens, {"pooled_output": pooled}]])


class BundledEmptyLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        step = generator.SPACE_TO_DEPTH * generator.FLUX_PATCH
        return io.Schema(
            node_id="SafeDIGBundledEmptyLatent",
            display_name="SafeDIG Bundled Empty Latent",
            category="SafeDIG/bundled model",
            description="An empty latent for the bundled model: 12 channels at half the image size.",
            inputs=[
                io.Int.Input("width", default=32, min=step, max=512, step=step),
                io.Int.Input("height", default=32, min=step, max=512, step=step),
                io.Int.Input("batch_size", default=1, min=1, max=4096),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, width, height, batch_size) -> io.NodeOutput:
        step = generator.SPACE_TO_DEPTH * generator.FLUX_PATCH
        if width % step or height % step:
            raise SafeDIGError(f"size {width}x{height} is not a multiple of {step}", f"use multiples of {step}")
        latent = torch.zeros(batch_size, generator.LATENT_CHANNELS, height // generator.SPACE_TO_DEPTH,
                             width // generator.SPACE_TO_DEPTH, device=comfy.model_management.intermediate_device())
        return io.NodeOutput({"samples": latent})


class BundledLatentToImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeDIGBundledLatentToImage",
            display_name="SafeDIG Bundled Latent To Image",
            category="SafeDIG/bundled model",
            description="Unfold the bundled model's 12-channel latent into RGB pixels (exact, no VAE).",
            inputs=[io.Latent.Input("samples")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples) -> io.NodeOutput:
        latent = samples["samples"]
        if latent.dim() != 4 or latent.shape[1] != generator.LATENT_CHANNELS:
            raise SafeDIGError(f"latent has shape {list(latent.shape)}, the bundled model's has "
                               f"{generator.LATENT_CHANNELS} channels", "connect a latent sampled with the "
                               "bundled model (SafeDIG Bundled Empty Latent -> KSampler)")
        pixels = generator.latent_to_pixels(latent.float().cpu())
        image = ((pixels + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).contiguous()
        return io.NodeOutput(image)


NODES = [LoadBundledModel, BundledTextEncode, BundledEmptyLatent, BundledLatentToImage]
