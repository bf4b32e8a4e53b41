"""Build workflows/*.json (UI format) and their thumbnails with the real ComfyUI frontend, plus the docs'
screenshots. A maintenance tool, not part of the run or test commands:

    .venv/bin/python scripts/make_workflows.py                 # starts `scripts/run.sh` on a temp folder
    .venv/bin/python scripts/make_workflows.py --url http://127.0.0.1:8188   # or use a running server

Each workflow below is a list of nodes (type, position, widget values by name) and links. The frontend
itself creates the nodes (`LiteGraph.createNode`), sets the widgets, connects the links and serializes the
graph (`app.graph.serialize()`), so the files are exactly what the frontend saves. Thumbnails
(`workflows/NAME.jpg`, what /api/workflow_templates serves next to NAME.json):
- FLUX.1 Dev / SD3.5 Large: a screenshot of the graph as the frontend draws it (no weights here to run them);
- bundled model and before/after: the real output of the shipped bundled model and pack (the headless grid
  and the comparison strip) once they exist; until then a screenshot of the graph, and the tool says so.
Screenshots of every SafeDIG node and of each graph go to docs/images/.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import comfy_workflow as cw  # noqa: E402
import headless  # noqa: E402

WORKFLOWS = ROOT / "workflows"
IMAGES = ROOT / "docs" / "images"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
THUMB = 512

BUNDLED_PROMPT = "a drawing of an ember-checked circular shape sitting near the right edge over a silver background"
STEER = dict(enabled=True, mode="Blend", blend_strength=1.0, repel_strength=1.0, gate="hard",
             override_threshold=False, threshold=0.0, apply_to="cond", start_percent=0.0, end_percent=1.0,
             positions="", threshold_scale=1.0, gate_scope="image")
NOTE_COLOR = dict(color="#432", bgcolor="#653")

TOGGLES = """**What to toggle** (on *SafeDIG Steer*):
- **mode**: `Off` gives exactly the image without SafeDIG; `Blend` moves the harmful features to the pack's
  safe target (learned from matched pairs, e.g. hazard -> candy, or a constant anchor); `Repel` subtracts
  them; `Both` does Blend, then Repel. When the gate opens only after the first step, the run is sampled
  again with the image steered from the start (the progress bar runs twice).
- **enabled**: off passes the model through untouched (also exactly the image without SafeDIG).
- **blend_strength** / **repel_strength** (0 to 4): start at 1; raise slowly, images degrade well before 4.
- **gate** `hard` / `soft`, **override_threshold** + **threshold**: when a token counts as harmful
  (default: the pack's calibrated threshold); **threshold_scale** below 1 steers more, at more drift.
- **gate_scope**: `image` (default) steers a whole image once any of its tokens passes the threshold;
  `token` steers each token on its own score (not with a pack that detects at one position and steers at
  another, such as the shipped bundled pack: the node says so).
- **start_percent** / **end_percent**: which part of the schedule is steered.
- **positions**: a comma-separated subset of the pack's routed positions (empty = all).

On *SafeDIG Load Dictionary*: **domain** `(all domains)` steers every risk domain of the pack at once;
`(source)` or one target domain steers that domain alone.
The KSampler seed is `fixed`: switch the mode and queue again to compare on the same noise.
*SafeDIG Report* shows per step and position where the gate opened, and a token map over the image."""


def _note(text: str, pos, size) -> dict:
    return dict(key="note", type="MarkdownNote", pos=pos, size=size, widgets={"text": text}, title="Read me",
                **NOTE_COLOR)


def flux_dev() -> dict:
    prompt = "a photo of a red fox in a snowy forest, golden hour"
    nodes = [
        dict(key="unet", type="UNETLoader", pos=[20, 60],
             widgets={"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}),
        dict(key="clip", type="DualCLIPLoader", pos=[20, 200],
             widgets={"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}),
        dict(key="vae", type="VAELoader", pos=[20, 390], widgets={"vae_name": "ae.safetensors"}),
        dict(key="pos", type="CLIPTextEncode", pos=[380, 60], size=[400, 180], widgets={"text": prompt},
             title="Positive prompt"),
        dict(key="guidance", type="FluxGuidance", pos=[380, 290], widgets={"guidance": 3.5}),
        dict(key="neg", type="ConditioningZeroOut", pos=[380, 410], title="Negative (unused at cfg 1)"),
        dict(key="latent", type="EmptySD3LatentImage", pos=[380, 490],
             widgets={"width": 1024, "height": 1024, "batch_size": 1}),
        dict(key="dict", type="SafeDIGLoadDictionary", pos=[840, 60],
             widgets={"pack": "safedig_flux1-dev.safetensors", "domain": "(all domains)"}),
        dict(key="steer", type="SafeDIGSteer", pos=[840, 220], widgets=STEER),
        dict(key="ksampler", type="KSampler", pos=[1180, 60],
             widgets={"seed": 42, "control_after_generate": "fixed", "steps": 20, "cfg": 1.0,
                      "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}),
        dict(key="decode", type="VAEDecode", pos=[1180, 380]),
        dict(key="save", type="SaveImage", pos=[1500, 60], size=[420, 470],
             widgets={"filename_prefix": "SafeDIG_flux"}),
        dict(key="report", type="SafeDIGReport", pos=[1180, 480], size=[300, 300]),
        dict(key="summary", type="PreviewAny", pos=[1500, 580], size=[420, 200], title="Report summary"),
        _note("## SafeDIG on FLUX.1 Dev\n\n"
              "**Files** (the standard names): `models/diffusion_models/flux1-dev.safetensors`, "
              "`models/text_encoders/clip_l.safetensors` and `t5xxl_fp16.safetensors`, `models/vae/ae.safetensors`; "
              "a SafeDIG pack trained on FLUX.1 Dev in `models/safedig/` (pick yours in *Load Dictionary*; "
              "how to build one: SafeDIG's docs/training.md).\n\n"
              "FLUX.1 Dev is guidance-distilled: cfg stays 1 (FluxGuidance sets the guidance), so there is no "
              "negative pass and **apply_to** stays `cond`.\n\n" + TOGGLES, [20, 560], [340, 760]),
    ]
    links = [
        ("clip", 0, "pos", "clip"), ("pos", 0, "guidance", "conditioning"), ("pos", 0, "neg", "conditioning"),
        ("unet", 0, "steer", "model"), ("dict", 0, "steer", "dictionary"),
        ("steer", 0, "ksampler", "model"), ("guidance", 0, "ksampler", "positive"), ("neg", 0, "ksampler", "negative"),
        ("latent", 0, "ksampler", "latent_image"), ("ksampler", 0, "decode", "samples"), ("vae", 0, "decode", "vae"),
        ("decode", 0, "save", "images"), ("steer", 0, "report", "model"), ("ksampler", 0, "report", "samples"),
        ("decode", 0, "report", "image"), ("report", 2, "summary", "source"),
    ]
    return dict(nodes=nodes, links=links)


def sd35_large() -> dict:
    prompt = "a photo of a red fox in a snowy forest, golden hour"
    nodes = [
        dict(key="ckpt", type="CheckpointLoaderSimple", pos=[20, 60], widgets={"ckpt_name": "sd3.5_large.safetensors"}),
        dict(key="clip", type="TripleCLIPLoader", pos=[20, 220],
             widgets={"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
                      "clip_name3": "t5xxl_fp16.safetensors"}),
        dict(key="pos", type="CLIPTextEncode", pos=[380, 60], size=[400, 180], widgets={"text": prompt},
             title="Positive prompt"),
        dict(key="neg", type="CLIPTextEncode", pos=[380, 290], size=[400, 140], widgets={"text": ""},
             title="Negative prompt"),
        dict(key="latent", type="EmptySD3LatentImage", pos=[380, 480],
             widgets={"width": 1024, "height": 1024, "batch_size": 1}),
        dict(key="dict", type="SafeDIGLoadDictionary", pos=[840, 60],
             widgets={"pack": "safedig_sd3.5-large.safetensors", "domain": "(all domains)"}),
        dict(key="steer", type="SafeDIGSteer", pos=[840, 220], widgets=STEER),
        dict(key="ksampler", type="KSampler", pos=[1180, 60],
             widgets={"seed": 42, "control_after_generate": "fixed", "steps": 28, "cfg": 4.5,
                      "sampler_name": "euler", "scheduler": "sgm_uniform", "denoise": 1.0}),
        dict(key="decode", type="VAEDecode", pos=[1180, 380]),
        dict(key="save", type="SaveImage", pos=[1500, 60], size=[420, 470],
             widgets={"filename_prefix": "SafeDIG_sd35"}),
        dict(key="report", type="SafeDIGReport", pos=[1180, 480], size=[300, 300]),
        dict(key="summary", type="PreviewAny", pos=[1500, 580], size=[420, 200], title="Report summary"),
        _note("## SafeDIG on Stable Diffusion 3.5 Large\n\n"
              "**Files** (the standard names): `models/checkpoints/sd3.5_large.safetensors`, "
              "`models/text_encoders/clip_l.safetensors`, `clip_g.safetensors` and `t5xxl_fp16.safetensors`; "
              "a SafeDIG pack trained on SD3.5 Large in `models/safedig/` (pick yours in *Load Dictionary*; "
              "how to build one: SafeDIG's docs/training.md).\n\n"
              "SD3.5 runs with real cfg (4.5 here): **apply_to** `cond` steers the positive prompt only, "
              "`both` also the negative pass.\n\n" + TOGGLES, [20, 420], [340, 760]),
    ]
    links = [
        ("clip", 0, "pos", "clip"), ("clip", 0, "neg", "clip"),
        ("ckpt", 0, "steer", "model"), ("dict", 0, "steer", "dictionary"),
        ("steer", 0, "ksampler", "model"), ("pos", 0, "ksampler", "positive"), ("neg", 0, "ksampler", "negative"),
        ("latent", 0, "ksampler", "latent_image"), ("ksampler", 0, "decode", "samples"), ("ckpt", 2, "decode", "vae"),
        ("decode", 0, "save", "images"), ("steer", 0, "report", "model"), ("ksampler", 0, "report", "samples"),
        ("decode", 0, "report", "image"), ("report", 2, "summary", "source"),
    ]
    return dict(nodes=nodes, links=links)


BUNDLED_SAMPLER = {"seed": 0, "control_after_generate": "fixed", "steps": 20, "cfg": 3.0, "sampler_name": "euler",
                   "scheduler": "simple", "denoise": 1.0}


def bundled() -> dict:
    nodes = [
        dict(key="model", type="SafeDIGLoadBundledModel", pos=[20, 60],
             widgets={"weights": headless.SHIPPED_WEIGHTS}),
        dict(key="pos", type="SafeDIGBundledTextEncode", pos=[20, 170], size=[400, 140],
             widgets={"text": BUNDLED_PROMPT}, title="Positive prompt"),
        dict(key="neg", type="SafeDIGBundledTextEncode", pos=[20, 360], size=[400, 100], widgets={"text": ""},
             title="Negative prompt (empty)"),
        dict(key="latent", type="SafeDIGBundledEmptyLatent", pos=[20, 510],
             widgets={"width": 32, "height": 32, "batch_size": 1}),
        dict(key="dict", type="SafeDIGLoadDictionary", pos=[480, 60],
             widgets={"pack": headless.SHIPPED_PACK, "domain": "(all domains)"}),
        dict(key="steer", type="SafeDIGSteer", pos=[480, 220], widgets={**STEER, "mode": "Off"}),
        dict(key="ksampler", type="KSampler", pos=[820, 60], widgets=BUNDLED_SAMPLER),
        dict(key="decode", type="SafeDIGBundledLatentToImage", pos=[820, 380]),
        dict(key="scale", type="ImageScale", pos=[820, 470],
             widgets={"upscale_method": "nearest-exact", "width": 256, "height": 256, "crop": "disabled"},
             title="Upscale x8 (to see the pixels)"),
        dict(key="save", type="SaveImage", pos=[1160, 60], size=[320, 380],
             widgets={"filename_prefix": "SafeDIG_bundled"}),
        dict(key="report", type="SafeDIGReport", pos=[1160, 500], size=[320, 320]),
        dict(key="summary", type="PreviewAny", pos=[1520, 500], size=[420, 320], title="Report summary"),
        _note("## SafeDIG on the bundled model\n\n"
              "Runs anywhere, on CPU, in seconds: the tiny FLUX-class model shipped with SafeDIG (32x32 images "
              "of one textured object) and its shipped pack `bundled_hazard_to_toxic` (source risk domain "
              "`hazard`: black-and-warm stripes, checks and spots; target domain `toxic`).\n\n"
              "**Try it**: *SafeDIG Steer* starts at mode `Off`. Press Run, switch **mode** to `Blend` (or "
              "`Repel` / `Both`), press Run again: same seed, so the difference is what SafeDIG changed.\n\n"
              "Sample it like this: KSampler `euler` / `simple`, cfg 3, negative prompt empty.\n\n" + TOGGLES,
              [1520, 60], [420, 420]),
    ]
    links = [
        ("model", 0, "steer", "model"), ("dict", 0, "steer", "dictionary"), ("steer", 0, "ksampler", "model"),
        ("pos", 0, "ksampler", "positive"), ("neg", 0, "ksampler", "negative"),
        ("latent", 0, "ksampler", "latent_image"),
        ("ksampler", 0, "decode", "samples"), ("decode", 0, "scale", "image"), ("scale", 0, "save", "images"),
        ("steer", 0, "report", "model"), ("ksampler", 0, "report", "samples"), ("decode", 0, "report", "image"),
        ("report", 2, "summary", "source"),
    ]
    return dict(nodes=nodes, links=links)


COMPARE_MODES = ["Off", "Blend", "Repel", "Both"]


def before_after() -> dict:
    nodes = [
        dict(key="model", type="SafeDIGLoadBundledModel", pos=[20, 60],
             widgets={"weights": headless.SHIPPED_WEIGHTS}),
        dict(key="pos", type="SafeDIGBundledTextEncode", pos=[20, 170], size=[400, 140],
             widgets={"text": BUNDLED_PROMPT}, title="Positive prompt"),
        dict(key="neg", type="SafeDIGBundledTextEncode", pos=[20, 360], size=[400, 100], widgets={"text": ""},
             title="Negative prompt (empty)"),
        dict(key="latent", type="SafeDIGBundledEmptyLatent", pos=[20, 510],
             widgets={"width": 32, "height": 32, "batch_size": 1}),
        dict(key="dict", type="SafeDIGLoadDictionary", pos=[20, 680],
             widgets={"pack": headless.SHIPPED_PACK, "domain": "(all domains)"}),
    ]
    links = [("pos", 0, f"ks{i}", "positive") for i in range(4)]
    links += [("neg", 0, f"ks{i}", "negative") for i in range(4)]
    links += [("latent", 0, f"ks{i}", "latent_image") for i in range(4)]
    for i, mode in enumerate(COMPARE_MODES):
        y = 60 + i * 380
        nodes += [
            dict(key=f"steer{i}", type="SafeDIGSteer", pos=[480, y], widgets={**STEER, "mode": mode},
                 title=f"SafeDIG Steer: {mode}"),
            dict(key=f"ks{i}", type="KSampler", pos=[820, y], widgets=BUNDLED_SAMPLER, title=f"KSampler ({mode})"),
            dict(key=f"img{i}", type="SafeDIGBundledLatentToImage", pos=[1160, y + 40]),
        ]
        links += [("model", 0, f"steer{i}", "model"), ("dict", 0, f"steer{i}", "dictionary"),
                  (f"steer{i}", 0, f"ks{i}", "model"), (f"ks{i}", 0, f"img{i}", "samples")]
    nodes += [
        dict(key="st1", type="ImageStitch", pos=[1480, 60], title="Off | Blend",
             widgets={"direction": "right", "match_image_size": True, "spacing_width": 2, "spacing_color": "white"}),
        dict(key="st2", type="ImageStitch", pos=[1480, 300], title="+ Repel",
             widgets={"direction": "right", "match_image_size": True, "spacing_width": 2, "spacing_color": "white"}),
        dict(key="st3", type="ImageStitch", pos=[1480, 540], title="+ Both",
             widgets={"direction": "right", "match_image_size": True, "spacing_width": 2, "spacing_color": "white"}),
        dict(key="scale", type="ImageScale", pos=[1480, 780], title="Upscale x4 (to see the pixels)",
             widgets={"upscale_method": "nearest-exact", "width": 536, "height": 128, "crop": "disabled"}),
        dict(key="save", type="SaveImage", pos=[1820, 60], size=[600, 300],
             widgets={"filename_prefix": "SafeDIG_before_after"}),
        _note("## Before / after: Off | Blend | Repel | Both\n\n"
              "One prompt, one seed, four SafeDIG Steer nodes that differ only in **mode**; the strip shows, left "
              "to right, `Off` (exactly the image without SafeDIG), `Blend`, `Repel`, `Both`.\n\n"
              "**What to toggle**: the prompt; the **seed** (set the same value in all four KSamplers, they are "
              "`fixed`); **blend_strength** / **repel_strength** on the steer nodes; **domain** on Load "
              "Dictionary (`(all domains)`, `(source)` = hazard, or `toxic`). Put a FLUX.1 Dev or SD3.5 Large "
              "loader in place of the bundled model (and its text encoders, latent and VAE decode) to compare on "
              "those.",
              [1820, 420], [600, 360]),
    ]
    links += [("img0", 0, "st1", "image1"), ("img1", 0, "st1", "image2"), ("st1", 0, "st2", "image1"),
              ("img2", 0, "st2", "image2"), ("st2", 0, "st3", "image1"), ("img3", 0, "st3", "image2"),
              ("st3", 0, "scale", "image"), ("scale", 0, "save", "images")]
    return dict(nodes=nodes, links=links)


BUILD_NOTE = """**What to toggle** (after the pack is built, on *SafeDIG Steer*): **mode** `Off` / `Blend` / `Repel` /
`Both`, the strengths and **threshold_scale**, as in the other SafeDIG workflows; on *Adapt Dictionary* the
**domain** that steers is the new one.

**Building** (the two build nodes): the console prints the plan first (storage, memory, time) and refuses one
that cannot fit, naming the setting to lower (**max_tokens_per_row**, **capture_steps**,
**candidate_positions**). The progress bar runs per stage; **Interrupt** is safe and Run again resumes from
`output/safedig_work/`. Change **pack_name** (or turn on **overwrite**) to build again. Prompt sets are JSON
lines in `models/safedig/prompts/` or SafeDIG's `dictionaries/prompts/`, or paste them (`(pasted below)`)."""


def _build_widgets(**over) -> dict:
    base = {"prompt_pairs": "", "benign_prompts": "", "pack_name": "my_pack", "domain": "unsafe", "overwrite": False,
            "sampler_name": "euler", "scheduler": "simple", "steps": 20, "cfg": 1.0, "guidance": 3.5, "width": 1024,
            "height": 1024, "seeds_per_prompt": 1, "capture_steps": 4, "max_tokens_per_row": 256, "build_seed": 0,
            "candidate_positions": "", "routed_count": 3, "sae_expansion": 16, "sae_k": 32, "sae_epochs": 3.0,
            "pasted_pairs": "", "pasted_benign": "", "target_pairs": "(none)", "target_domain": "target",
            "calibration_prompts": "(benign prompts)"}
    return {**base, **over}


def build_pack_bundled() -> dict:
    sampling = dict(steps=20, cfg=3.0, width=32, height=32, max_tokens_per_row=0)
    nodes = [
        dict(key="model", type="SafeDIGLoadBundledModel", pos=[20, 60], widgets={"weights": headless.SHIPPED_WEIGHTS}),
        dict(key="clip", type="SafeDIGLoadBundledTextEncoder", pos=[20, 170]),
        dict(key="build", type="SafeDIGBuildDictionary", pos=[380, 60], size=[360, 1000],
             widgets=_build_widgets(prompt_pairs="bundled_source_pairs.jsonl", benign_prompts="bundled_benign.jsonl",
                                    pack_name="my_bundled_pack", domain="hazard",
                                    target_pairs="bundled_target_pairs.jsonl", target_domain="toxic",
                                    calibration_prompts="bundled_benign_calibration.jsonl", **sampling)),
        dict(key="pos", type="SafeDIGBundledTextEncode", pos=[780, 60], size=[360, 120],
             widgets={"text": BUNDLED_PROMPT}, title="Positive prompt"),
        dict(key="neg", type="SafeDIGBundledTextEncode", pos=[780, 230], size=[360, 90], widgets={"text": ""},
             title="Negative prompt (empty)"),
        dict(key="latent", type="SafeDIGBundledEmptyLatent", pos=[780, 370],
             widgets={"width": 32, "height": 32, "batch_size": 1}),
        dict(key="steer", type="SafeDIGSteer", pos=[780, 530], widgets=STEER),
        dict(key="ksampler", type="KSampler", pos=[1180, 60], widgets=BUNDLED_SAMPLER),
        dict(key="decode", type="SafeDIGBundledLatentToImage", pos=[1180, 380]),
        dict(key="scale", type="ImageScale", pos=[1180, 470],
             widgets={"upscale_method": "nearest-exact", "width": 256, "height": 256, "crop": "disabled"},
             title="Upscale x8 (to see the pixels)"),
        dict(key="save", type="SaveImage", pos=[1520, 60], size=[320, 380],
             widgets={"filename_prefix": "SafeDIG_built_pack"}),
        dict(key="info", type="PreviewAny", pos=[1520, 500], size=[420, 320], title="The new pack"),
        _note("## Build a pack on the bundled model\n\n"
              "The whole pipeline of `python -m safedig_core build-pack` in one node, on CPU: *Build Dictionary* "
              "samples the shipped source pairs (hazard -> safe look-alikes), the target pairs (toxic) and the "
              "benign prompts with the bundled model, routes, trains the SAEs, finds the harmful features on "
              "both domains' pairs, calibrates the gate, adapts the `toxic` decoders and chooses the learned Blend "
              "target; the new pack steers the prompt on the right at once. About six minutes on two CPU cores "
              "(docs/training.md). To add a "
              "risk later, to this or any pack: *SafeDIG Adapt Dictionary*.\n\n" + BUILD_NOTE, [20, 300], [340, 800]),
    ]
    links = [
        ("model", 0, "build", "model"), ("clip", 0, "build", "clip"),
        ("model", 0, "steer", "model"), ("build", 0, "steer", "dictionary"), ("steer", 0, "ksampler", "model"),
        ("pos", 0, "ksampler", "positive"), ("neg", 0, "ksampler", "negative"),
        ("latent", 0, "ksampler", "latent_image"), ("ksampler", 0, "decode", "samples"),
        ("decode", 0, "scale", "image"), ("scale", 0, "save", "images"), ("build", 1, "info", "source"),
    ]
    return dict(nodes=nodes, links=links)


# 22 of FLUX.1 Dev's 114 positions (every third double block, every sixth single block, the text input): with
# 64 tokens per row the plan stays near 12 GB of activations (`python -m safedig_core plan flux-dev`).
FLUX_CANDIDATES = ",".join(["input.txt"] + [f"double.{i}.{s}" for i in range(0, 19, 3) for s in ("img.attn", "txt.mlp")]
                           + [f"single.{j}.out" for j in (0, 6, 12, 18, 24, 30, 37)])


def build_pack_flux1_dev() -> dict:
    sampling = dict(steps=20, cfg=1.0, guidance=3.5, width=1024, height=1024, max_tokens_per_row=64)
    flux = flux_dev()
    keep = {"unet", "clip", "vae", "pos", "guidance", "neg", "latent", "steer", "ksampler", "decode", "save"}
    nodes = [dict(n, pos=[n["pos"][0] + (400 if n["key"] not in ("unet", "clip", "vae") else 0), n["pos"][1]])
             for n in flux["nodes"] if n["key"] in keep]
    nodes += [
        dict(key="build", type="SafeDIGBuildDictionary", pos=[380, 60], size=[360, 1000],
             widgets=_build_widgets(prompt_pairs="violence_pairs.jsonl", benign_prompts="benign_calibration.jsonl",
                                    pack_name="safedig_flux1-dev_violence_weapons", domain="violence",
                                    target_pairs="weapons_pairs.jsonl", target_domain="weapons",
                                    candidate_positions=FLUX_CANDIDATES, sae_expansion=4, **sampling)),
        dict(key="info", type="PreviewAny", pos=[1900, 580], size=[420, 320], title="The new pack"),
        _note("## Build a FLUX.1 Dev pack in ComfyUI\n\n"
              "**Files**: FLUX.1 Dev and its text encoders, as in the `safedig_flux1_dev` workflow. *Build "
              "Dictionary* makes a pack with two risk domains from SafeDIG's starter pairs: `violence` (graphic "
              "violence -> the same scene without injury) and `weapons` (weapons -> harmless objects in the same "
              "pose), calibrated on the benign set. Replace the prompt sets with your own to cover your risks; "
              "add a risk later with *SafeDIG Adapt Dictionary*.\n\n"
              "**Plan** (computed for a 24 GB RTX 4090-class GPU, docs/training.md): ~700 generations, about "
              "18 GB of activations and 7 hours. Lower **steps**, **capture_steps** or "
              "**candidate_positions** to go faster.\n\n" + BUILD_NOTE, [20, 560], [340, 900]),
    ]
    links = [
        ("unet", 0, "build", "model"), ("clip", 0, "build", "clip"),
        ("clip", 0, "pos", "clip"), ("pos", 0, "guidance", "conditioning"), ("pos", 0, "neg", "conditioning"),
        ("unet", 0, "steer", "model"), ("build", 0, "steer", "dictionary"),
        ("steer", 0, "ksampler", "model"), ("guidance", 0, "ksampler", "positive"), ("neg", 0, "ksampler", "negative"),
        ("latent", 0, "ksampler", "latent_image"), ("ksampler", 0, "decode", "samples"), ("vae", 0, "decode", "vae"),
        ("decode", 0, "save", "images"), ("build", 1, "info", "source"),
    ]
    return dict(nodes=nodes, links=links)


SPECS = {
    "safedig_flux1_dev": flux_dev,
    "safedig_sd3.5_large": sd35_large,
    "safedig_bundled_model": bundled,
    "safedig_before_after": before_after,
    "safedig_build_pack_bundled": build_pack_bundled,
    "safedig_build_pack_flux1_dev": build_pack_flux1_dev,
}

TITLES = {
    "safedig_flux1_dev": "FLUX.1 Dev + SafeDIG",
    "safedig_sd3.5_large": "SD3.5 Large + SafeDIG",
    "safedig_bundled_model": "Bundled model + SafeDIG + Report",
    "safedig_before_after": "Before / after: Off | Blend | Repel | Both",
    "safedig_build_pack_bundled": "Build a pack: bundled model",
    "safedig_build_pack_flux1_dev": "Build a pack: FLUX.1 Dev",
}

BUILD_JS = """(spec) => {
  app.graph.clear();
  const byKey = {};
  for (const n of spec.nodes) {
    const node = LiteGraph.createNode(n.type);
    if (!node) throw new Error('unknown node type ' + n.type);
    node.pos = n.pos;
    if (n.title) node.title = n.title;
    if (n.color) { node.color = n.color; node.bgcolor = n.bgcolor; }
    app.graph.add(node);
    for (const [name, value] of Object.entries(n.widgets || {})) {
      const w = (node.widgets || []).find(w => w.name === name);
      if (!w) throw new Error(n.type + ' has no widget ' + name);
      w.value = value;
    }
    if (n.size) node.setSize(n.size);
    byKey[n.key] = node;
  }
  for (const [a, slot, b, input] of spec.links) {
    const dst = byKey[b];
    const idx = dst.findInputSlot(input);
    if (idx < 0) throw new Error(dst.type + ' has no input ' + input);
    if (!byKey[a].connect(slot, dst, idx)) throw new Error('cannot link ' + a + ' -> ' + b + '.' + input);
  }
  app.graph.setDirtyCanvas(true, true);
  return JSON.stringify(app.graph.serialize());
}"""

PREPARE_JS = """async () => {
  const settings = app.extensionManager.setting;
  await settings.set('LiteGraph.Canvas.MinFontSizeForLOD', 1);   // draw text at every zoom level
  await settings.set('Comfy.Minimap.Visible', false);
  await settings.set('Comfy.Graph.CanvasInfo', false);
  await app.extensionManager.command.execute('Workspace.ToggleFocusMode');   // hide the menus and panels
}"""

FIT_JS = """async () => {
  app.canvas.deselectAll && app.canvas.deselectAll();
  await app.extensionManager.command.execute('Comfy.Canvas.FitView');
  app.graph.setDirtyCanvas(true, true);
}"""

GRAPH_RECT_JS = """() => {
  const ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect(), t = LiteGraph.NODE_TITLE_HEIGHT;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of app.graph.nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - t);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const [ax, ay] = ds.convertOffsetToCanvas([x0, y0]), [bx, by] = ds.convertOffsetToCanvas([x1, y1]);
  const left = Math.max(0, r.left + ax - 16), top = Math.max(0, r.top + ay - 16);
  return {x: left, y: top, width: Math.min(window.innerWidth - left, bx - ax + 32),
          height: Math.min(window.innerHeight - top, by - ay + 32)};
}"""

NODE_RECT_JS = """(nodeId) => {
  const node = app.graph.getNodeById(nodeId);
  const ds = app.canvas.ds;
  const r = app.canvas.canvas.getBoundingClientRect();
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  const [x, y] = ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - title]);
  return {x: r.left + x - 6, y: r.top + y - 6, width: node.size[0] * ds.scale + 12,
          height: (node.size[1] + title) * ds.scale + 12};
}"""


# ------------------------------------------------------------------------------------------ server + browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_command_server(base: Path, port: int | None = None, timeout: float = 300, threads: int | None = 1,
                       settings: dict | None = None):
    """`bash scripts/run.sh --port P --base-directory BASE` in its own process group; yields the URL and
    always kills the group. threads: OMP_NUM_THREADS for ComfyUI (1 suits the bundled model, see headless.py);
    settings: the frontend user settings to start with (BASE/user/default/comfy.settings.json)."""
    port = port or free_port()
    if settings is not None:
        (base / "user" / "default").mkdir(parents=True, exist_ok=True)
        (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(settings))
    log = open(base / "run.log", "wb")  # noqa: SIM115
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "run.sh"), "--port", str(port), "--base-directory",
                             str(base)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"run.sh exited with {proc.returncode}:\n{(base / 'run.log').read_text()[-4000:]}")
            with contextlib.suppress(OSError):
                cw.fetch_json(url + "/system_stats", timeout=2)
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no server on {url} after {timeout}s:\n{(base / 'run.log').read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@contextlib.contextmanager
def browser_page(url: str, width: int = 1600, height: int = 1000):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.wait_for_function("window.app && window.app.graph && window.app.canvas", timeout=120_000)
            dialog = page.locator(".p-dialog")  # the template browser opens by itself on a first run
            with contextlib.suppress(PlaywrightTimeout):
                dialog.wait_for(timeout=5000)
            for _ in range(10):
                if not dialog.count():
                    break
                page.keyboard.press("Escape")
                page.wait_for_timeout(300)
            page.evaluate(PREPARE_JS)
            yield page
        finally:
            browser.close()


def fit_jpeg(png: bytes, title: str, size: int = THUMB, background=(20, 20, 20), smooth: bool = False) -> bytes:
    """The whole picture under a title band, inside a size x size square (letterboxed); nearest-neighbour
    scaling (pixel art) unless smooth."""
    from PIL import Image, ImageDraw, ImageFont

    band = 48
    img = Image.open(io.BytesIO(png)).convert("RGB")
    scale = min(size / img.width, (size - band) / img.height)
    img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))),
                     Image.LANCZOS if smooth else Image.NEAREST)
    canvas = Image.new("RGB", (size, size), background)
    canvas.paste(img, ((size - img.width) // 2, band + (size - band - img.height) // 2))
    ImageDraw.Draw(canvas).text((size // 2, band // 2), title, fill=(240, 240, 240), anchor="mm",
                                font=ImageFont.load_default(size=24))
    out = io.BytesIO()
    canvas.save(out, "JPEG", quality=90)
    return out.getvalue()


def no_dialogs(page) -> None:
    for _ in range(20):
        if not page.locator(".p-dialog").count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
    raise RuntimeError("a dialog stays open over the canvas")


def graph_screenshot(page, workflow: dict) -> bytes:
    no_dialogs(page)
    page.evaluate("(wf) => app.loadGraphData(wf)", workflow)
    page.evaluate(FIT_JS)
    time.sleep(0.5)
    return page.screenshot(clip=page.evaluate(GRAPH_RECT_JS))


def real_outputs(url: str, workflows: dict, out: Path, home: Path | None = None) -> dict[str, bytes]:
    """Thumbnails made of real output: the headless grid (bundled) and the comparison strip (before/after).
    Empty when the shipped model or pack is missing (also looked for in HOME/models/ when home is given)."""
    if headless.missing_assets(headless.SHIPPED_PACK, headless.SHIPPED_WEIGHTS, home=home):
        return {}
    info = cw.fetch_object_info(url)
    grid = headless.make_grid(url, workflows["safedig_bundled_model"], info, out / "grid")
    strip = headless.run_workflow(url, workflows["safedig_before_after"], info)
    return {"safedig_bundled_model": grid.read_bytes(), "safedig_before_after": strip[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="use this running ComfyUI (with SafeDIG) instead of starting scripts/run.sh")
    ap.add_argument("--no-images", action="store_true", help="write the workflow JSONs only")
    ap.add_argument("--home", type=Path, help="with --url: that server's base folder (its models/ count as shipped)")
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="safedig-wf-")))
        # A settled user (no first-run template browser over the canvas).
        url = args.url or stack.enter_context(run_command_server(tmp, settings={"Comfy.TutorialCompleted": True}))
        page = stack.enter_context(browser_page(url))
        workflows = {}
        for name, spec in SPECS.items():
            wf = json.loads(page.evaluate(BUILD_JS, spec()))
            wf.pop("id", None)  # a fresh id is given to every loaded copy
            workflows[name] = wf
            WORKFLOWS.mkdir(exist_ok=True)
            (WORKFLOWS / f"{name}.json").write_text(json.dumps(wf, indent=2) + "\n")
            print(f"wrote workflows/{name}.json ({len(wf['nodes'])} nodes, {len(wf['links'])} links)")
        if args.no_images:
            return 0
        real = real_outputs(url, workflows, tmp, args.home if args.url else None)
        if not real:
            print("shipped bundled model or pack missing: bundled/before-after thumbnails are graph screenshots")
        IMAGES.mkdir(parents=True, exist_ok=True)
        for name, wf in workflows.items():
            shot = graph_screenshot(page, wf)
            (IMAGES / f"workflow_{name}.png").write_bytes(shot)
            thumb = fit_jpeg(real[name], TITLES[name]) if name in real else fit_jpeg(shot, TITLES[name], smooth=True)
            (WORKFLOWS / f"{name}.jpg").write_bytes(thumb)
            print(f"wrote workflows/{name}.jpg ({'real output' if name in real else 'graph screenshot'})")
        # One screenshot per SafeDIG node, from the workflows that hold them.
        done = set()
        for wf in workflows.values():
            page.evaluate("(wf) => app.loadGraphData(wf)", wf)
            page.evaluate("() => { app.canvas.ds.scale = 1.0; app.canvas.ds.offset = [40, 40]; }")
            for node in wf["nodes"]:
                if not node["type"].startswith("SafeDIG") or node["type"] in done:
                    continue
                page.evaluate("([x, y]) => { app.canvas.ds.offset = [40 - x, 60 - y]; "
                              "app.graph.setDirtyCanvas(true, true); }", node["pos"])
                time.sleep(0.3)
                no_dialogs(page)
                rect = page.evaluate(NODE_RECT_JS, node["id"])
                (IMAGES / f"node_{node['type']}.png").write_bytes(page.screenshot(clip=rect))
                done.add(node["type"])
                print(f"wrote docs/images/node_{node['type']}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
