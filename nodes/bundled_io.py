"""The bundled model's conditioning and latent nodes (the model itself: nodes/bundled_model.py).

    SafeDIG Bundled Text Encode     MiniLM token states + pooled vector -> CONDITIONING
    SafeDIG Load Bundled Text Encoder  the same encoder as a CLIP (for CLIPTextEncode and Build Dictionary)
    SafeDIG Bundled Empty Latent    zeros [B, 12, H/2, W/2] (pixels folded 2x2 space-to-depth) -> LATENT
    SafeDIG Bundled Latent To Image LATENT -> IMAGE (exact inverse of the fold, no VAE)
"""

from __future__ import annotations

import comfy.model_management
import torch

from safedig_core.bundled import generator
from safedig_core.errors import SafeDIGError

from .compat import io


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
        clip = BundledClip()
        return io.NodeOutput(clip.encode_from_tokens_scheduled(clip.tokenize(text)))


class BundledClip:
    """The bundled sentence encoder behind the part of ComfyUI's CLIP interface that text encoding uses
    (tokenize, encode_from_tokens_scheduled, encode_from_tokens), so CLIPTextEncode and SafeDIG Build
    Dictionary take it like a checkpoint's text encoder."""

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        return {"text": str(text)}

    def encode_from_tokens(self, tokens: dict, return_pooled: bool = False, return_dict: bool = False):
        from safedig_core.bundled.text_encoder import encode_prompts

        cond, pooled = encode_prompts([tokens["text"]])
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens: dict, unprojected: bool = False, add_dict=None,
                                     show_pbar: bool = True) -> list:
        cond, pooled = self.encode_from_tokens(tokens, return_pooled=True)
        return [[cond, {"pooled_output": pooled, **(add_dict or {})}]]


class LoadBundledTextEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeDIGLoadBundledTextEncoder",
            display_name="SafeDIG Load Bundled Text Encoder",
            category="SafeDIG/bundled model",
            description="The bundled model's sentence encoder as a CLIP: connect it to CLIPTextEncode or to "
                        "SafeDIG Build / Adapt Dictionary.",
            inputs=[],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(BundledClip())


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


NODES = [BundledTextEncode, LoadBundledTextEncoder, BundledEmptyLatent, BundledLatentToImage]
