"""workflows/*.json against a real ComfyUI 0.3.75 server (the session server of tests/comfy_server.py):

- every workflow uses only node types, links and widget values that the server's /object_info accepts; the
  FLUX.1 Dev and SD3.5 Large ones load no weights, so their standard model files are zero-byte stand-ins here
  (only their names reach /object_info's option lists);
- the template browser's API lists them with their thumbnails;
- the bundled-model workflow and the before/after workflow, converted to API format by scripts/comfy_workflow.py,
  run to images, and the before/after strip is exactly the bundled workflow's image at each mode.

The shipped bundled model and pack are used when both exist; until then random-weight stand-ins under the
shipped names go into the server's models/ folders (searched before the shipped ones).
"""

from __future__ import annotations

import copy
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

pytest.register_assert_rewrite("comfy_server")
from comfy_server import PACK_LINK_NAME, register_preparer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import comfy_workflow as cw  # noqa: E402
import headless  # noqa: E402

pytest_plugins = ["comfy_server"]
pytestmark = pytest.mark.comfy_server

WORKFLOWS = ROOT / "workflows"
NAMES = ["safedig_flux1_dev", "safedig_sd3.5_large", "safedig_bundled_model", "safedig_before_after",
         "safedig_build_pack_bundled", "safedig_build_pack_flux1_dev"]
# The standard file names of the big models (what their official releases and ComfyUI's examples use).
STANDARD_FILES = {
    "safedig_flux1_dev": {("UNETLoader", "unet_name"): ("diffusion_models", "flux1-dev.safetensors"),
                          ("DualCLIPLoader", "clip_name1"): ("text_encoders", "clip_l.safetensors"),
                          ("DualCLIPLoader", "clip_name2"): ("text_encoders", "t5xxl_fp16.safetensors"),
                          ("VAELoader", "vae_name"): ("vae", "ae.safetensors"),
                          ("SafeDIGLoadDictionary", "pack"): ("safedig", "safedig_flux1-dev.safetensors")},
    "safedig_sd3.5_large": {("CheckpointLoaderSimple", "ckpt_name"): ("checkpoints", "sd3.5_large.safetensors"),
                            ("TripleCLIPLoader", "clip_name1"): ("text_encoders", "clip_l.safetensors"),
                            ("TripleCLIPLoader", "clip_name2"): ("text_encoders", "clip_g.safetensors"),
                            ("TripleCLIPLoader", "clip_name3"): ("text_encoders", "t5xxl_fp16.safetensors"),
                            ("SafeDIGLoadDictionary", "pack"): ("safedig", "safedig_sd3.5-large.safetensors")},
    "safedig_build_pack_flux1_dev": {("UNETLoader", "unet_name"): ("diffusion_models", "flux1-dev.safetensors"),
                                     ("DualCLIPLoader", "clip_name2"): ("text_encoders", "t5xxl_fp16.safetensors"),
                                     ("SafeDIGBuildDictionary", "prompt_pairs"): ("safedig/prompts",
                                                                                  "violence_pairs.jsonl"),
                                     ("SafeDIGBuildDictionary", "target_pairs"): ("safedig/prompts",
                                                                                  "weapons_pairs.jsonl")},
}
BUNDLED_POSITIONS = ["double.0.txt.mlp", "double.1.img.attn", "single.1.out"]
FIRE = dict(expansion=2, k=16, n_harmful=24, tau=0.0)  # a random pack whose gate opens on most tokens
FAST_STEPS = 6


def shipped_assets_exist() -> bool:
    return not headless.missing_assets(headless.SHIPPED_PACK, headless.SHIPPED_WEIGHTS, home=None)


def write_bundled_stand_ins(models: Path) -> bool:
    """Unless the shipped bundled model AND pack both exist: random-weight ones under the shipped names in
    models/safedig_bundled/ and models/safedig/ (searched first). Returns True when the shipped ones are used."""
    if shipped_assets_exist():
        return True
    from safedig_core import save_pack
    from safedig_core.synthetic import random_pack

    from test_nodes_inprocess import write_random_bundled

    _, path = write_random_bundled(models / "safedig_bundled")
    for suffix in (".safetensors", ".json"):
        path.with_suffix(suffix).rename(models / "safedig_bundled" / Path(headless.SHIPPED_WEIGHTS).with_suffix(suffix))
    save_pack(models / "safedig" / headless.SHIPPED_PACK,
              *random_pack("flux", 128, BUNDLED_POSITIONS, seed=7, **FIRE))
    return False


@register_preparer
def write_workflow_files(base: Path) -> None:
    models = base / "models"
    for files in STANDARD_FILES.values():
        for folder, name in files.values():
            if folder == "safedig/prompts":
                continue  # shipped in dictionaries/prompts/, listed as they are
            (models / folder).mkdir(parents=True, exist_ok=True)
            (models / folder / name).touch()  # a name for /object_info's lists; never loaded
    write_bundled_stand_ins(models)


def load(name: str) -> dict:
    return cw.load_workflow(WORKFLOWS / f"{name}.json")


def widget(workflow: dict, info: dict, node_type: str, name: str):
    node = cw.nodes_of_type(workflow, node_type)[0]
    return cw.widget_values(node, info[node_type])[name]


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ------------------------------------------------------------------------------------------ static checks


def test_the_workflows_and_thumbnails_are_there():
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == sorted(NAMES)
    for name in NAMES:
        thumb = Image.open(WORKFLOWS / f"{name}.jpg")
        assert thumb.format == "JPEG" and min(thumb.size) >= 256, name


@pytest.mark.parametrize("name", NAMES)
def test_workflow_is_accepted_by_object_info(comfyui, name):
    info = comfyui.object_info()
    workflow = load(name)
    assert cw.check_workflow(workflow, info) == []
    types = {n["type"] for n in workflow["nodes"]}
    assert "SafeDIGSteer" in types and types & {"SafeDIGLoadDictionary", "SafeDIGBuildDictionary"}
    for (node_type, input_name), (_, filename) in STANDARD_FILES.get(name, {}).items():
        assert widget(workflow, info, node_type, input_name) == filename
    notes = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert len(notes) == 1, "one note node documents what to toggle"
    assert "What to toggle" in notes[0] and all(m in notes[0] for m in ("`Off`", "`Blend`", "`Repel`", "`Both`"))
    prompt = cw.ui_to_api(workflow, info)
    assert all(n["class_type"] in info for n in prompt.values())
    assert len(prompt) == len([n for n in workflow["nodes"] if n["type"] not in cw.FRONTEND_ONLY])


def test_the_checker_refuses_what_the_server_would_refuse(comfyui):
    """The check above can fail: unknown types, bad widget values and mistyped links are all reported."""
    info = comfyui.object_info()
    base = load("safedig_bundled_model")
    cases = {
        "unknown node type": lambda wf: cw.nodes_of_type(wf, "KSampler")[0].update(type="KSamplerFancy"),
        "is not one of": lambda wf: cw.set_widget(wf, "SafeDIGSteer", "mode", "Sideways", info),
        "above the maximum 4.0": lambda wf: cw.set_widget(wf, "SafeDIGSteer", "blend_strength", 5.0, info),
        "widgets_values": lambda wf: cw.nodes_of_type(wf, "KSampler")[0]["widgets_values"].pop(),
        "is linked to a": lambda wf: wf["links"].__setitem__(
            0, [*wf["links"][0][:1], cw.nodes_of_type(wf, "SafeDIGBundledEmptyLatent")[0]["id"], 0,
                *wf["links"][0][3:]]),
        "pack='nope.safetensors' is not one of": lambda wf: cw.set_widget(wf, "SafeDIGLoadDictionary", "pack",
                                                                          "nope.safetensors", info),
    }
    for expected, mutate in cases.items():
        wf = copy.deepcopy(base)
        mutate(wf)
        problems = cw.check_workflow(wf, info)
        assert any(expected in p for p in problems), (expected, problems)


def test_template_browser_lists_the_workflows_with_thumbnails(comfyui):
    listed = comfyui.get("/api/workflow_templates")
    assert sorted(listed[PACK_LINK_NAME]) == sorted(NAMES)
    for name in NAMES:
        served = requests.get(f"{comfyui.url}/api/workflow_templates/{PACK_LINK_NAME}/{name}.json", timeout=30)
        assert served.status_code == 200 and served.json() == load(name)
        thumb = requests.get(f"{comfyui.url}/api/workflow_templates/{PACK_LINK_NAME}/{name}.jpg", timeout=30)
        assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff", name


# ------------------------------------------------------------------------------------------ runs


def run_images(comfyui, prompt: dict) -> tuple[list[np.ndarray], dict]:
    entry = comfyui.run(prompt)
    save = headless.output_node(prompt)
    return [np.asarray(Image.open(comfyui.output_file(i)).convert("RGB"))
            for i in comfyui.ui_outputs(entry, save)["images"]], entry


def test_bundled_workflow_runs_to_an_image_with_a_report(comfyui):
    info = comfyui.object_info()
    workflow = load("safedig_bundled_model")
    assert widget(workflow, info, "SafeDIGSteer", "mode") == "Off"  # the note's "try it": Off, then Blend
    images = {}
    for mode in ("Off", "Blend"):
        cw.set_widget(workflow, "SafeDIGSteer", "mode", mode, info)
        prompt = cw.ui_to_api(workflow, info)
        out, entry = run_images(comfyui, prompt)
        assert len(out) == 1 and out[0].shape == (256, 256, 3), mode
        images[mode] = out[0]
        report_id = next(i for i, n in prompt.items() if n["class_type"] == "SafeDIGReport")
        summary_id = next(i for i, n in prompt.items() if n["class_type"] == "PreviewAny")
        assert len(comfyui.ui_outputs(entry, report_id)["images"]) == 2  # step heatmap + token map
        summary = comfyui.ui_text(entry, summary_id)
        assert ("nothing was recorded" in summary) == (mode == "Off"), summary
    # Blend changes the picture (the stand-in pack's gate opens everywhere; the shipped pack's on this prompt).
    assert np.abs(images["Blend"].astype(int) - images["Off"].astype(int)).mean() > 0.5


def test_before_after_strip_is_the_bundled_workflow_at_each_mode(comfyui):
    info = comfyui.object_info()
    pair = load("safedig_before_after"), load("safedig_bundled_model")
    for workflow in pair:  # fewer steps keep this quick; both workflows get the same ones
        assert cw.set_widget(workflow, "KSampler", "steps", FAST_STEPS, info) >= 1
    strip, _ = run_images(comfyui, cw.ui_to_api(pair[0], info))
    assert len(strip) == 1 and strip[0].shape == (128, 536, 3)
    # 4 panels of 32 px + 2 px white spacing, upscaled x4 (nearest): panel i starts at 4 * 34 * i.
    panels = [strip[0][::4, 136 * i: 136 * i + 128: 4] for i in range(4)]
    assert (strip[0][:, 128:136] == 255).all()
    single = pair[1]
    for mode, panel in zip(("Off", "Blend", "Repel", "Both"), panels, strict=True):
        cw.set_widget(single, "SafeDIGSteer", "mode", mode, info)
        (image,), _ = run_images(comfyui, cw.ui_to_api(single, info))
        assert np.array_equal(image[::8, ::8], panel), mode
    assert not np.array_equal(panels[0], panels[1])


def test_headless_grid_code_on_the_session_server(comfyui, tmp_path):
    """The grid writer of `run.sh --headless` (its server start is tested in tests/test_browser.py)."""
    info = comfyui.object_info()
    rows = headless.row_prompts(("hazard", "candy"))
    workflow = load("safedig_bundled_model")
    cw.set_widget(workflow, "KSampler", "steps", FAST_STEPS, info)
    grid = headless.make_grid(comfyui.url, workflow, info, tmp_path, rows=rows, log=lambda _: None)
    record = json.loads((tmp_path / "safedig_grid.json").read_text())
    assert [r["concept"] for r in record["rows"]] == ["hazard", "candy"]
    assert all(r["diff"]["Off"] == 0 for r in record["rows"])
    assert Image.open(grid).size == (120 + 4 * (headless.CELL + 6) + 6, 28 + 2 * (headless.CELL + 6) + 6)
    assert len(list((tmp_path / "cells").glob("*.png"))) == 8
