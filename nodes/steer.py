"""SafeDIG Steer: MODEL + SAFEDIG_DICT -> MODEL, steering through an APPLY_MODEL wrapper.

The node never touches the incoming model: it returns `model.clone()` with two wrappers under the key
"safedig" (clones share the weights and copy the wrapper lists, not the wrapper objects):

    OUTER_SAMPLE  starts a new report generation for each sampling run;
    APPLY_MODEL   for each model call: rows to steer from transformer_options["cond_or_uncond"] (uncond
                  may come first; at cfg 1 there is no uncond chunk), schedule fraction from "sigmas" /
                  "sample_sigmas", then runs the model inside `SteeringHooks`, which removes its forward
                  hooks in `finally` (exceptions, /interrupt).

Disabled, mode Off or a zero strength return the input model itself: bitwise the unsteered output.
"""

from __future__ import annotations

import os

import comfy.patcher_extension as pe
import torch
from comfy_api.v0_0_2 import io

from safedig_core import ARCHITECTURES, SteeringDictionary, SteeringHooks, SteeringParams, resolve
from safedig_core.errors import PackError, SafeDIGError
from safedig_core.recorder import ScoreRecorder
from safedig_core.steering_math import (
    MAX_STRENGTH,
    MAX_TAU_SCALE,
    GateScope,
    in_step_range,
    rows_for_chunks,
    schedule_fraction,
)

from .types import SafeDIGDict

WRAPPER_KEY = "safedig"
MODES = ["Off", "Blend", "Repel", "Both"]
GATES = ["hard", "soft"]
SCOPES = ["token", "image"]
APPLY_TO = ["cond", "uncond", "both"]


def parse_positions(text: str | None) -> list[str] | None:
    """'double.0.img.attn, single.1.out' -> ids; blank -> None (every routed position)."""
    if not text or not text.strip():
        return None
    ids = [p.strip() for p in text.replace("\n", ",").split(",") if p.strip()]
    return ids or None


class SteerPatch:
    """One Steer node's steering: the dictionary, the parameters and the score recorder.

    Also the owner of its hooks (SteeringHooks refuses to install the same owner twice on a module).
    Stored in ModelPatcher.wrappers, which clones copy by reference; deepcopy returns the same object so
    the dictionary's tensors are never duplicated.
    """

    def __init__(self, dictionary: SteeringDictionary, params: SteeringParams, label: str):
        self.dictionary = dictionary
        self.params = params
        self.label = label
        taus = {p: params.threshold(dictionary.pack.domain_features(dictionary.domain, p).tau)
                for p in dictionary.positions}
        self.recorder = ScoreRecorder(dictionary.positions, taus, params.gate, label)
        self.latched: torch.Tensor | None = None  # image-scope gate: images latched in this sampling run

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return f"SteerPatch({self.label})"

    # OUTER_SAMPLE: (noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        self.recorder.begin(sigmas, n_images=noise.shape[0] if noise.dim() > 0 else 0)
        self.latched = None
        return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)

    # APPLY_MODEL: BaseModel._apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kw)
    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
        opts = transformer_options if transformer_options is not None else {}
        base_model = executor.class_obj
        dit = base_model.diffusion_model
        positions = resolve(dit)
        chunks = opts.get("cond_or_uncond")
        batch = x.shape[0]
        rows = rows_for_chunks(chunks, batch, self.params.apply_to)
        sigma = opts.get("sigmas", t)
        sigma = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        sample_sigmas = opts.get("sample_sigmas")
        active = in_step_range(schedule_fraction(sigma, sample_sigmas), self.params)
        rec = self.recorder
        if not rec.started:  # a sampler that bypassed OUTER_SAMPLE
            rec.begin(sample_sigmas, n_images=0)
        on_scores = None
        if active:
            if x.dim() >= 4:
                rec.set_grid(tuple(x.shape[-2:]), getattr(dit, "patch_size", 1))
            per_chunk = batch // len(chunks) if chunks and batch % len(chunks) == 0 else batch
            on_scores = rec.callback(rec.step_of(sigma), rows, per_chunk)
        per_image = self._row_latch(chunks, batch, x.device) if active else None
        with SteeringHooks(dit, self.dictionary, self.params, row_mask=rows, active=active, owner=self,
                           on_scores=on_scores, model_positions=positions, latch=per_image):
            out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if per_image is not None:  # an image latched in any chunk stays latched for the rest of the run
            self.latched |= per_image.view(-1, self.latched.numel()).any(0).cpu()
        return out

    def _row_latch(self, chunks, batch: int, device) -> torch.Tensor | None:
        """The image-scope latch for this call's rows (row r is image r % images per chunk)."""
        if self.params.scope != GateScope.IMAGE:
            return None
        per_chunk = batch // len(chunks) if chunks and batch % len(chunks) == 0 else batch
        if self.latched is None or self.latched.numel() != per_chunk:
            self.latched = torch.zeros(per_chunk, dtype=torch.bool)
        return self.latched.repeat(batch // per_chunk).to(device)


def steer_patches(model) -> list[SteerPatch]:
    """The SafeDIG steering setups on a ModelPatcher, in chain order."""
    return [w for w in model.get_wrappers(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY) if isinstance(w, SteerPatch)]


def check_choice(name: str, value, options: list[str]) -> str | None:
    if value is None or value in options:
        return None
    return f"{name} {value!r} is not one of {options}. Fix: pick one of {options}."


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
    def validate_inputs(cls, mode, gate, apply_to, start_percent, end_percent, positions=None,
                        threshold_scale=None, gate_scope=None) -> bool | str:
        for problem in (check_choice("mode", mode, MODES), check_choice("gate", gate, GATES),
                        check_choice("apply_to", apply_to, APPLY_TO), check_choice("gate_scope", gate_scope, SCOPES)):
            if problem:
                return problem
        bad = [p for p in parse_positions(positions) or []
               if not any(a.id_pattern.match(p) for a in ARCHITECTURES.values())]
        if bad:
            return (f"positions {bad} are not position ids. Fix: list ids of the pack's routed positions, e.g. "
                    "double.3.txt.mlp, single.10.out or joint.5.img.attn (see the pack_info output), or leave it "
                    "empty for all of them.")
        for name, v in (("start_percent", start_percent), ("end_percent", end_percent)):
            if v is not None and not 0.0 <= v <= 1.0:
                return f"{name} {v} is outside [0, 1]. Fix: use a fraction of the schedule between 0 and 1."
        if threshold_scale is not None and not 0.0 <= threshold_scale <= MAX_TAU_SCALE:
            return (f"threshold_scale {threshold_scale} is outside [0, {MAX_TAU_SCALE:g}]. Fix: use 1 for the pack's "
                    "calibrated thresholds, lower to steer more.")
        if start_percent is not None and end_percent is not None and start_percent > end_percent:
            return (f"start_percent {start_percent} is after end_percent {end_percent}. Fix: make "
                    "start_percent <= end_percent.")
        return True

    @classmethod
    def execute(cls, model, dictionary, enabled, mode, blend_strength, repel_strength, gate, override_threshold,
                threshold, apply_to, start_percent, end_percent, positions="", threshold_scale=1.0,
                gate_scope="image") -> io.NodeOutput:
        for problem in (check_choice("mode", mode, MODES), check_choice("gate", gate, GATES),
                        check_choice("apply_to", apply_to, APPLY_TO), check_choice("gate_scope", gate_scope, SCOPES)):
            if problem:
                raise SafeDIGError(problem.split(". Fix: ")[0], problem.split(". Fix: ")[1].rstrip("."))
        if not isinstance(dictionary, SteeringDictionary):
            raise SafeDIGError(f"the dictionary input is a {type(dictionary).__name__}, not a SafeDIG dictionary",
                               "connect a SafeDIG Load Dictionary node")
        params = SteeringParams(mode=mode, blend_strength=blend_strength, repel_strength=repel_strength, gate=gate,
                                tau_override=threshold if override_threshold else None,
                                tau_scale=1.0 if threshold_scale is None else threshold_scale,
                                scope=gate_scope or "image", apply_to=apply_to,
                                start=start_percent, end=end_percent)
        if not enabled or params.is_identity:
            return io.NodeOutput(model)  # not even a clone: bitwise the unsteered graph
        subset = parse_positions(positions)
        if subset is not None:
            dictionary = SteeringDictionary(dictionary.pack, dictionary.domain, subset)
        model_positions = resolve(model)  # ArchitectureError for a model SafeDIG cannot steer
        try:
            dictionary.pack.check_compatible(model_positions, dictionary.positions)
        except PackError as exc:
            raise PackError(exc.problem + f" (pack {os.path.basename(dictionary.pack.path)})", exc.fix,
                            path=exc.path) from None
        label = (f"pack {os.path.basename(dictionary.pack.path)}, domain {dictionary.domain}; mode "
                 f"{params.mode.value} (blend {params.blend_strength:g}, repel {params.repel_strength:g}); gate "
                 f"{params.gate.value} per {params.scope.value}, tau "
                 + (f"{params.tau_override:g} (override)" if params.tau_override is not None
                    else f"from pack x {params.tau_scale:g}")
                 + f"; applies to {params.apply_to.value}; schedule {start_percent:.0%}-{end_percent:.0%}")
        patch = SteerPatch(dictionary, params, label)
        out = model.clone()
        out.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, patch.outer_sample)
        out.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, patch)
        return io.NodeOutput(out)
