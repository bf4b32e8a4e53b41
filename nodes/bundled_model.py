"""The bundled tiny FLUX-class model inside ComfyUI's own sampler, so SafeDIG Steer steers it like FLUX.1.

    SafeDIG Load Bundled Model      diffusers weights -> ComfyUI's comfy.ldm.flux.model.Flux (converted by
                                    comfy.model_detection.convert_diffusers_mmdit) in a model_base.Flux with
                                    a 12-channel pixel latent format and no timestep shift -> MODEL

and its text encoder, empty latent and latent-to-image nodes in nodes/bundled_io.py.

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
SHIPPED = generator.GENERATOR_WEIGHTS.name


class BundledLatentFormat(comfy.latent_formats.LatentFormat):
    """Pixels in [-1, 1] folded 2x2 into 12 channels: no scaling, no shift."""

    latent_channels = generator.LATENT_CHANNELS
    latent_dimensions = 2
    scale_factor = 1.0
    spacial_downscale_ratio = generator.SPACE_TO_DEPTH  # ComfyUI's name; pixels per latent cell


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


def list_weights() -> list[str]:
    """Generator checkpoints: .safetensors files whose same-stem .json is a generator config."""
    register_folder()
    names = []
    for name in folder_paths.get_filename_list(FOLDER):
        full = folder_paths.get_full_path(FOLDER, name)
        if full and name.endswith(".safetensors") and generator.is_generator(Path(full)):
            names.append(name)
    return sorted(names, key=lambda n: (n != SHIPPED, n))


def resolve_weights(name: str) -> Path:
    return generator.find_generator(name, register_folder(), FOLDER)


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


NODES = [LoadBundledModel]
