"""SafeDIG Build Dictionary / Adapt Dictionary: make a pack, or add a risk domain to one, from the MODEL
and CLIP the user has loaded, inside ComfyUI. The work is safedig_core.training.build (the CLI's pipeline);
this file turns node values into its inputs, samples through nodes/build_sampling.py and writes into
models/safedig/, where Load Dictionary lists the pack after a refresh (no restart).

Work folders (activation shards, SAE checkpoints, calibration caches) live in
output/safedig_work/{pack}-{settings hash}/: an interrupted run rerun with the same values resumes there.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import comfy.samplers
import folder_paths

from safedig_core import ALL_DOMAINS, SteeringDictionary, load_pack
from safedig_core.errors import SafeDIGError
from safedig_core.pack import PACK_SUFFIX
from safedig_core.pack_info import format_pack
from safedig_core.steer_inputs import require_dictionary
from safedig_core.training.build import (
    BuildSettings,
    TargetPairs,
    adapt_pack,
    build_pack,
    check_benign,
    check_pairs,
    work_folder,
)
from safedig_core.training.collect import PromptRecord, parse_prompt_lines, read_prompt_file

from . import packs
from .build_sampling import ComfyReporter, ComfySampler, samplers
from .compat import io
from .types import SafeDIGDict

WORK_DIR = "safedig_work"
PASTE = "(pasted below)"
FROM_INPUT = "(dictionary input)"
NONE = "(none)"
SAME_AS_BENIGN = "(benign prompts)"


def _sampling_inputs() -> list:
    return [
        io.Combo.Input("sampler_name", options=samplers(), default="euler",
                       tooltip="ComfyUI sampler (one model call per step, so capture steps are sampling steps)."),
        io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="simple"),
        io.Int.Input("steps", default=20, min=2, max=200),
        io.Float.Input("cfg", default=1.0, min=1.0, max=30.0, step=0.1,
                       tooltip="1.0 for FLUX.1 Dev (it uses `guidance`); SD3.5: 4-5 (then the negative is \"\")."),
        io.Float.Input("guidance", default=3.5, min=0.0, max=30.0, step=0.1,
                       tooltip="FLUX.1 embedded guidance (as FluxGuidance sets it); other models ignore it."),
        io.Int.Input("width", default=1024, min=16, max=4096, step=16),
        io.Int.Input("height", default=1024, min=16, max=4096, step=16),
        io.Int.Input("seeds_per_prompt", default=1, min=1, max=16,
                     tooltip="Generations per prompt, each with its own seed (the pair shares it)."),
        io.Int.Input("capture_steps", default=4, min=1, max=50,
                     tooltip="Sampling steps whose activations are kept, spread over the schedule."),
        io.Int.Input("max_tokens_per_row", default=256, min=0, max=65536,
                     tooltip="Tokens kept per captured step and position (evenly strided); 0 = all. The "
                             "largest lever on storage and memory."),
        io.Int.Input("build_seed", default=0, min=0, max=2**31 - 1,
                     tooltip="Seed of SAE training and of prompt seeds a file does not give (fixed: a rerun resumes)."),
    ]


def _prompt_inputs() -> list:
    sets = [*packs.list_prompt_sets(), PASTE]
    return [
        io.Combo.Input("prompt_pairs", options=sets, tooltip="Matched unsafe / safe pairs (JSON lines, "
                       "docs/training.md) from models/safedig/prompts/ or the shipped sets."),
        io.Combo.Input("benign_prompts", options=sets, tooltip="Benign prompts: SAE training data and the gate's "
                       "calibration (at most ~1 % of them may open it)."),
    ]


def _pasted_inputs() -> list:
    return [
        io.String.Input("pasted_pairs", multiline=True, default="", optional=True,
                        tooltip=f"Used when prompt_pairs is {PASTE}: one JSON object per line."),
        io.String.Input("pasted_benign", multiline=True, default="", optional=True,
                        tooltip=f"Used when benign_prompts is {PASTE}: one JSON object per line."),
    ]


def read_prompts(choice: str, pasted: str | None, seed: int, seeds_per_prompt: int, what: str) -> list[PromptRecord]:
    """The chosen (or pasted) set, each prompt repeated with seeds_per_prompt seeds (a pair shares them)."""
    if choice == PASTE:
        if not (pasted or "").strip():
            raise SafeDIGError(f"{what}: {PASTE} is chosen but nothing is pasted", f"paste JSON lines into "
                               f"the pasted_{'pairs' if what == 'prompt_pairs' else 'benign'} box, or pick a file")
        records = parse_prompt_lines(pasted or "", seed)
    else:
        records = read_prompt_file(packs.resolve_prompt_set(choice), seed)
    if seeds_per_prompt == 1:
        return records
    n = seeds_per_prompt
    return [replace(r, seed=r.seed * n + j, pair=r.pair * n + j if r.pair >= 0 else -1)
            for j in range(n) for r in records]


def pack_path(name: str) -> Path:
    name = (name or "").strip()
    if not name or os.sep in name or "/" in name or name.startswith("."):
        raise SafeDIGError(f"pack name {name!r} must be a plain file name", "e.g. my_flux_pack")
    name = name if name.endswith(PACK_SUFFIX) else name + PACK_SUFFIX
    return Path(folder_paths.models_dir) / packs.FOLDER / name


def check_values(pack, prompt_pairs, benign_prompts, pack_name, pasted_pairs, pasted_benign) -> bool | str:
    """validate_inputs of both nodes: the prompt sets are read and checked here, before anything is sampled
    (a linked value arrives as None and is checked when the node runs)."""
    try:
        if pack is not None and pack != FROM_INPUT:
            packs.pack_summary(packs.resolve_pack(pack))
        if pack_name is not None:
            pack_path(pack_name)
        if prompt_pairs is not None:
            check_pairs(read_prompts(prompt_pairs, pasted_pairs, 0, 1, "prompt_pairs"))
        if benign_prompts is not None:
            check_benign(read_prompts(benign_prompts, pasted_benign, 0, 1, "benign_prompts"))
    except SafeDIGError as exc:
        return str(exc)
    return True


def _generator(model, clip, v: dict, reporter: ComfyReporter) -> ComfySampler:
    return ComfySampler(model, clip, sampler_name=v["sampler_name"], scheduler=v["scheduler"], steps=v["steps"],
                        cfg=v["cfg"], guidance=v["guidance"], width=v["width"], height=v["height"],
                        after_prompt=reporter.advance)


def position_list(text: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (text or "").replace("\n", ",").split(",") if p.strip())


def pack_outputs() -> list:
    return [SafeDIGDict.Output(display_name="dictionary"),
            io.String.Output(display_name="pack_info", tooltip="The new pack: positions, routing, provenance.")]


class BuildDictionary(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeDIGBuildDictionary",
            display_name="SafeDIG Build Dictionary",
            category="SafeDIG/build",
            description="Make a SafeDIG pack from the loaded model: sample every prompt with ComfyUI's sampler, "
                        "capture the candidate positions, route, train one SAE per routed position, find the "
                        "harmful features, calibrate the gate on the benign prompts, and save the pack into "
                        "models/safedig/. Long: the console shows the plan first. Interrupt is safe; rerun to "
                        "resume.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip", tooltip="The model's own text encoders (for the bundled model: SafeDIG "
                              "Load Bundled Text Encoder)."),
                *_prompt_inputs(),
                io.String.Input("pack_name", default="my_pack", tooltip="File name in models/safedig/."),
                io.String.Input("domain", default="unsafe", tooltip="Name of the risk domain the pairs describe."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing pack of that name."),
                *_sampling_inputs(),
                io.String.Input("candidate_positions", default="",
                                tooltip="Comma-separated position ids to consider; empty: every position."),
                io.Int.Input("routed_count", default=3, min=1, max=16, tooltip="Positions the router keeps."),
                io.Int.Input("sae_expansion", default=16, min=1, max=64, tooltip="SAE width = this x model width."),
                io.Int.Input("sae_k", default=32, min=1, max=1024, tooltip="Active latents per token (TopK)."),
                io.Float.Input("sae_epochs", default=3.0, min=0.1, max=50.0, step=0.1),
                *_pasted_inputs(),
                io.Combo.Input("target_pairs", options=[NONE, *packs.list_prompt_sets()], default=NONE, optional=True,
                               tooltip="Optional pairs of a second risk domain built in the same run: they also "
                                       "choose the harmful features, and the pack gets that domain adapted (as "
                                       "`build-pack` does). Later domains: Adapt Dictionary."),
                io.String.Input("target_domain", default="target", optional=True,
                                tooltip="Name of the domain of target_pairs."),
                io.Combo.Input("calibration_prompts", options=[SAME_AS_BENIGN, *packs.list_prompt_sets()],
                               default=SAME_AS_BENIGN, optional=True,
                               tooltip="Benign prompts the gate threshold is calibrated on (full generations); "
                                       "default: benign_prompts. A separate, larger set calibrates better."),
            ],
            outputs=pack_outputs(),
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, prompt_pairs, benign_prompts, pack_name, pasted_pairs=None, pasted_benign=None,
                        target_pairs=None, calibration_prompts=None) -> bool | str:
        problem = check_values(None, prompt_pairs, benign_prompts, pack_name, pasted_pairs, pasted_benign)
        if problem is True and target_pairs not in (None, NONE):
            problem = check_values(None, target_pairs, None, None, None, None)
        if problem is True and calibration_prompts not in (None, SAME_AS_BENIGN):
            problem = check_values(None, None, calibration_prompts, None, None, None)
        return problem

    @classmethod
    def execute(cls, model, clip, prompt_pairs, benign_prompts, pack_name, domain, overwrite, candidate_positions,
                routed_count, sae_expansion, sae_k, sae_epochs=3.0, pasted_pairs="", pasted_benign="",
                target_pairs=NONE, target_domain="target", calibration_prompts=SAME_AS_BENIGN,
                **sampling) -> io.NodeOutput:
        out = pack_path(pack_name)
        seed, n = sampling["build_seed"], sampling["seeds_per_prompt"]
        pairs = read_prompts(prompt_pairs, pasted_pairs, seed, n, "prompt_pairs")
        benign = read_prompts(benign_prompts, pasted_benign, seed + 1, n, "benign_prompts")
        target = None
        if target_pairs not in (None, NONE):
            target = TargetPairs((target_domain or "").strip() or "target",
                                 read_prompts(target_pairs, None, seed + 2, n, "target_pairs"))
        calibration = None
        if calibration_prompts not in (None, SAME_AS_BENIGN):
            calibration = read_prompts(calibration_prompts, None, seed + 3, n, "calibration_prompts")
        settings = BuildSettings(capture_steps=sampling["capture_steps"], positions=position_list(candidate_positions),
                                 routed=routed_count, expansion=sae_expansion, k=sae_k, epochs=sae_epochs,
                                 max_tokens=sampling["max_tokens_per_row"], seed=seed)
        reporter = ComfyReporter()
        generator = _generator(model, clip, sampling, reporter)
        work = work_folder(Path(folder_paths.get_output_directory()) / WORK_DIR, out.name, generator.spec, settings,
                           pairs, benign, domain, target, calibration)
        path = build_pack(generator, pairs, benign, out, work, settings, domain=domain.strip() or "unsafe",
                          target=target, calibration=calibration, reporter=reporter, overwrite=overwrite,
                          provenance={"work_folder": str(work)})
        pack = load_pack(path)
        return io.NodeOutput(SteeringDictionary(pack, ALL_DOMAINS), format_pack(pack) + f"\n\nSaved to {path}")


class AdaptDictionary(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeDIGAdaptDictionary",
            display_name="SafeDIG Adapt Dictionary",
            category="SafeDIG/build",
            description="Add a risk domain to a pack from a few dozen matched pairs: the pack's encoders and "
                        "harmful ids stay frozen, its decoders are adapted to the new pairs, and the features "
                        "and gate threshold are re-estimated on the loaded model. Saves a new pack.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Combo.Input("pack", options=[FROM_INPUT, *packs.list_packs()], default=FROM_INPUT,
                               tooltip=f"The pack to adapt (it is not changed); {FROM_INPUT}: the pack of the "
                                       "`dictionary` input (e.g. straight from Build Dictionary)."),
                *_prompt_inputs(),
                io.String.Input("domain", default="target", tooltip="Name of the new risk domain."),
                io.String.Input("pack_name", default="my_adapted_pack", tooltip="File name of the new pack."),
                io.Boolean.Input("overwrite", default=False),
                *_sampling_inputs(),
                io.Float.Input("adapt_epochs", default=3.0, min=0.1, max=50.0, step=0.1),
                *_pasted_inputs(),
                SafeDIGDict.Input("dictionary", optional=True,
                                  tooltip=f"The pack to adapt when `pack` is {FROM_INPUT}."),
            ],
            outputs=pack_outputs(),
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, pack, prompt_pairs, benign_prompts, pack_name, pasted_pairs=None,
                        pasted_benign=None) -> bool | str:
        return check_values(pack, prompt_pairs, benign_prompts, pack_name, pasted_pairs, pasted_benign)

    @classmethod
    def execute(cls, model, clip, pack, prompt_pairs, benign_prompts, domain, pack_name, overwrite, adapt_epochs=3.0,
                pasted_pairs="", pasted_benign="", dictionary=None, **sampling) -> io.NodeOutput:
        if pack == FROM_INPUT:
            if dictionary is None:
                raise SafeDIGError(f"pack is {FROM_INPUT} but nothing is connected to `dictionary`",
                                   "connect a dictionary (Load / Build Dictionary), or pick a pack file")
            source = require_dictionary(dictionary).pack.path
        else:
            source = packs.resolve_pack(pack)
        out = pack_path(pack_name)
        seed, n = sampling["build_seed"], sampling["seeds_per_prompt"]
        pairs = read_prompts(prompt_pairs, pasted_pairs, seed, n, "prompt_pairs")
        benign = read_prompts(benign_prompts, pasted_benign, seed + 1, n, "benign_prompts")
        settings = BuildSettings(capture_steps=sampling["capture_steps"], max_tokens=sampling["max_tokens_per_row"],
                                 seed=seed)
        reporter = ComfyReporter()
        generator = _generator(model, clip, sampling, reporter)
        work = work_folder(Path(folder_paths.get_output_directory()) / WORK_DIR, out.name, generator.spec, settings,
                           pairs, benign, domain, packs.path_fingerprint(source), adapt_epochs)
        path = adapt_pack(Path(source), generator, pairs, benign, domain.strip(), out, work, settings,
                          reporter=reporter, overwrite=overwrite, epochs=adapt_epochs)
        new = load_pack(path)
        return io.NodeOutput(SteeringDictionary(new, domain.strip()), format_pack(new) + f"\n\nSaved to {path}")


NODES = [BuildDictionary, AdaptDictionary]
