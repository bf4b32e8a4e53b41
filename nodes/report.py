"""SafeDIG Report: where (positions, image tokens) and when (steps) the gate fired in the last generation."""

from __future__ import annotations

import numpy as np
import torch

from safedig_core.recorder import render_step_heatmap, render_token_maps

from .compat import io, ui
from .steer import steer_patches

LATENT_TO_PIXEL = 8  # FLUX.1 / SD3 VAE factor, for the token map when no image is connected


def _to_image(array: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] or [B, H, W, 3] -> ComfyUI IMAGE [B, H, W, 3] float in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(array)).float() / 255.0
    return t if t.dim() == 4 else t.unsqueeze(0)


class Report(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeDIGReport",
            display_name="SafeDIG Report",
            category="SafeDIG",
            description="After sampling with a SafeDIG-steered model: the harmful-feature gate per routed "
                        "position and step (heatmap), per image token (map over the image) and a text summary.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of SafeDIG Steer (the one the sampler used)."),
                io.Latent.Input("samples", tooltip="The sampler's output: runs the report after that generation."),
                io.Image.Input("image", optional=True, tooltip="Decoded image to draw the token map over."),
            ],
            outputs=[
                io.Image.Output(display_name="step_heatmap", tooltip="Rows: routed positions; columns: steps."),
                io.Image.Output(display_name="token_map", tooltip="Gate over the image tokens, per image."),
                io.String.Output(display_name="summary"),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, samples, image=None) -> io.NodeOutput:
        patches = steer_patches(model)
        recorders = [p.recorder for p in patches]
        latent = samples.get("samples") if isinstance(samples, dict) else None
        n_images = int(latent.shape[0]) if isinstance(latent, torch.Tensor) and latent.dim() >= 1 else 1
        if recorders:
            parts = [r.summary(f"SafeDIG steer {i + 1} of {len(recorders)}") for i, r in enumerate(recorders)]
            summary = "\n\n".join(parts)
        else:
            summary = ("SafeDIG report: this model carries no active SafeDIG steering (Steer disabled, mode Off, "
                       "strengths 0, or the model did not come from SafeDIG Steer); nothing was recorded.")
        heatmap = render_step_heatmap(recorders)
        if image is not None:
            base = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()[..., :3]
            token_map = render_token_maps(recorders, images=base)
        else:
            if isinstance(latent, torch.Tensor) and latent.dim() == 4:
                size = (int(latent.shape[-2]) * LATENT_TO_PIXEL, int(latent.shape[-1]) * LATENT_TO_PIXEL)
            else:
                size = (256, 256)
            token_map = render_token_maps(recorders, size=size, n_images=n_images)
        heat_t, map_t = _to_image(heatmap), _to_image(token_map)
        previews = ui.PreviewImage(torch.cat([heat_t]), cls=cls).as_dict()
        maps = ui.PreviewImage(map_t, cls=cls).as_dict()
        shown = {"images": previews["images"] + maps["images"], "animated": (False,), "text": (summary,)}
        return io.NodeOutput(heat_t, map_t, summary, ui=shown)
