"""SafeDIG Steer: MODEL + SAFEDIG_DICT -> MODEL, steering through an APPLY_MODEL wrapper.

The node never touches the incoming model: it returns `model.clone()` with two wrappers under the key
"safedig" (clones share the weights and copy the wrapper lists, not the wrapper objects): OUTER_SAMPLE
runs a sampling run (Report generation, image latch, and the restart of the images that latched late),
APPLY_MODEL steers each model call through
safedig_core.sampling.SamplingSteering. Values are checked by the core (safedig_core.steer_inputs), by
one function for validate_inputs and execute, with the node's input names. Disabled, mode Off or a zero
strength return the input model itself: bitwise the unsteered output.
"""

from __future__ import annotations

import comfy.patcher_extension as pe
import torch

from safedig_core import SteeringParams, resolve
from safedig_core.sampling import SamplingSteering
from safedig_core.steer_inputs import (
    APPLY_TO,
    GATES,
    MODES,
    SCOPES,
    dictionary_for_run,
    first_problem,
    node_params,
    pack_name,
    require_dictionary,
)
from safedig_core.steering_math import MAX_STRENGTH, MAX_TAU_SCALE

from . import compat
from .compat import io
from .types import SafeDIGDict

WRAPPER_KEY = "safedig"


class SteerPatch(SamplingSteering):
    """One Steer node's steering, stored in ModelPatcher.wrappers (clones copy it by reference; deepcopy
    returns the same object so the dictionary's tensors are never duplicated). Also the owner of its hooks:
    SteeringHooks refuses to install the same owner twice on a module."""

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return f"SteerPatch({self.label})"

    # OUTER_SAMPLE: (noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed[, latent_shapes]).
    # The images that latched late are sampled again as a batch of their own (SamplingSteering.sample_run), so
    # the progress bar runs twice for such a run.
    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                     disable_pbar=False, seed=None, **kwargs):
        n = noise.shape[0] if noise.dim() > 0 else 0

        def sample_images(idx):
            if idx is None:
                return executor(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed,
                                **kwargs)

            def cut(t):  # the rows of images idx of a per-image tensor ([n, ...]; a [H, W] mask is shared)
                return t[idx.to(t.device)] if isinstance(t, torch.Tensor) and t.dim() > 2 and t.shape[0] == n else t
            shapes = kwargs.get("latent_shapes")
            extra = dict(kwargs, latent_shapes=[torch.Size((idx.numel(), *shapes[0][1:]))]) if shapes else kwargs
            return executor(cut(noise), cut(latent_image), sampler, sigmas, cut(denoise_mask), callback, disable_pbar,
                            seed, **extra)

        cuttable = batch_cuttable(executor.class_obj, n, denoise_mask, kwargs.get("latent_shapes"))
        return self.sample_run(sample_images, sigmas, n_images=n, subsets=cuttable)

    # APPLY_MODEL: BaseModel._apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kw)
    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        opts = transformer_options if transformer_options is not None else {}
        return self.steer_call(executor.class_obj.diffusion_model, x, opts.get("sigmas", t),
                               opts.get("sample_sigmas"), opts.get("cond_or_uncond"),
                               lambda: executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs))


def batch_cuttable(guider, n: int, denoise_mask, latent_shapes) -> bool:
    """Whether some images of this run can be sampled on their own: one latent (not a nested pack), a mask
    of one or n entries, and conditioning shared by every image (no tensor with one entry per image, no
    ControlNet or GLIGEN, whose inputs may be batched). Otherwise the whole batch is sampled again."""
    if latent_shapes is not None and len(latent_shapes) != 1:
        return False
    if isinstance(denoise_mask, torch.Tensor) and denoise_mask.dim() > 2 and denoise_mask.shape[0] not in (1, n):
        return False
    for conds in getattr(guider, "original_conds", {}).values():
        for cond in conds:
            if "control" in cond or "gligen" in cond:
                return False
            values = [*cond.values(), *cond.get("model_conds", {}).values()]
            if any(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] > 1
                   for t in (getattr(v, "cond", v) for v in values)):
                return False
    return True


def steer_patches(model) -> list[SteerPatch]:
    """The SafeDIG steering setups on a ModelPatcher, in chain order."""
    return [w for w in model.get_wrappers(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY) if isinstance(w, SteerPatch)]


class Steer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        strength = dict(min=0.0, max=MAX_STRENGTH, step=0.05)
        return io.Schema(
            node_id="SafeDIGSteer",
            display_name="SafeDIG Steer",
            category="SafeDIG",
            description="Steer a FLUX.1 or SD3/SD3.5 model away from the dictionary's harmful features. "
                        "Returns a patched copy; the input model is never changed. Disabled, Off or zero "
                        "strength return the input model unchanged.",
            inputs=[
                io.Model.Input("model"),
                SafeDIGDict.Input("dictionary"),
                io.Boolean.Input("enabled", default=True),
                io.Combo.Input("mode", options=MODES, default="Blend",
                               tooltip="Blend: replace harmful features by the safe anchor. Repel: subtract "
                                       "them. Both: Blend then Repel. Off: no change."),
                io.Float.Input("blend_strength", default=1.0, **strength),
                io.Float.Input("repel_strength", default=1.0, **strength),
                io.Combo.Input("gate", options=GATES, default="hard",
                               tooltip="hard: steer tokens whose harmful score exceeds the threshold; soft: "
                                       "ramp in from half the threshold."),
                io.Boolean.Input("override_threshold", default=False,
                                 tooltip="Use `threshold` instead of the pack's calibrated tau."),
                io.Float.Input("threshold", default=0.0, min=-1e4, max=1e4, step=0.01,
                               tooltip="Gate threshold when override_threshold is on."),
                io.Combo.Input("apply_to", options=APPLY_TO, default="cond",
                               tooltip="Which batch chunks to steer: the positive prompt (cond), the "
                                       "negative/empty prompt (uncond), or both."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01),
                io.String.Input("positions", default="", optional=True,
                                tooltip="Optional comma-separated subset of the pack's routed positions "
                                        "(e.g. double.3.txt.mlp); empty: all of them."),
                # Optional and last: workflows saved before this input existed still load.
                io.Float.Input("threshold_scale", default=1.0, min=0.0, max=MAX_TAU_SCALE, step=0.05, optional=True,
                               tooltip="Multiplies the pack's calibrated thresholds: 1 = calibrated (benign "
                                       "prompts almost never fire); lower = more unsafe tokens steered, more "
                                       "drift on benign images; 0 = wherever a harmful feature is active. "
                                       "Ignored when override_threshold is on."),
                io.Combo.Input("gate_scope", options=SCOPES, default="image", optional=True,
                               tooltip="token: each token opens on its own score. image: once any token of an "
                                       "image passes the threshold, every token of that image with a harmful "
                                       "feature active is steered for the rest of the sampling run."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, mode, blend_strength, repel_strength, gate, override_threshold, threshold, apply_to,
                        start_percent, end_percent, positions=None, threshold_scale=None,
                        gate_scope=None) -> bool | str:
        values = node_params(None, blend_strength, repel_strength, None, override_threshold, threshold, None,
                             start_percent, end_percent, threshold_scale, None)
        problem = first_problem(dict(mode=mode, gate=gate, apply_to=apply_to, gate_scope=gate_scope), values,
                                positions)
        return True if problem is None else str(problem)

    @classmethod
    def execute(cls, model, dictionary, enabled, mode, blend_strength, repel_strength, gate, override_threshold,
                threshold, apply_to, start_percent, end_percent, positions="", threshold_scale=1.0,
                gate_scope="image") -> io.NodeOutput:
        values = node_params(mode, blend_strength, repel_strength, gate, override_threshold, threshold, apply_to,
                             start_percent, end_percent, 1.0 if threshold_scale is None else threshold_scale,
                             gate_scope or "image")
        problem = first_problem(dict(mode=mode, gate=gate, apply_to=apply_to, gate_scope=gate_scope), values,
                                positions)
        if problem is not None:
            raise problem
        dictionary = require_dictionary(dictionary)
        params = SteeringParams(**values)
        if not enabled or params.is_identity:
            return io.NodeOutput(model)  # not even a clone: bitwise the unsteered graph
        dictionary = dictionary_for_run(dictionary, positions, resolve(model))  # resolve: ArchitectureError
        dictionary.check_params(params)  # e.g. the token gate on a pack that detects and steers at different positions
        label = f"pack {pack_name(dictionary)}, domain {dictionary.domain}; {params.describe()}"
        patch = SteerPatch(dictionary, params, label, host=compat.host_label())
        out = model.clone()
        out.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, patch.outer_sample)
        out.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, patch)
        return io.NodeOutput(out)
