"""SafeDIG nodes in a real ComfyUI 0.3.75 server (one per session, tests/comfy_server.py): API-format
prompts over HTTP, latents compared bitwise through SaveLatent files."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safedig_core import save_pack
from safedig_core.synthetic import random_pack

from test_nodes_inprocess import write_random_bundled
from tiny_models import SD3_CFG, diffusers_sd3

pytest.register_assert_rewrite("comfy_server")  # it is also this module's pytest plugin (below)
from comfy_server import ComfyServer, PromptError, register_preparer  # noqa: E402

pytest_plugins = ["comfy_server"]
pytestmark = pytest.mark.comfy_server

ROOT = Path(__file__).resolve().parents[1]
SD3_FILE = "tiny_sd3.safetensors"
LORA_FILE = "tiny_sd3_lora.safetensors"
SD3_POSITIONS = ["joint.0.txt.mlp", "joint.0.img.attn", "joint.1.img.mlp"]
BUNDLED_POSITIONS = ["double.0.txt.mlp", "double.1.img.attn", "single.1.out"]
FIRE = dict(expansion=2, k=16, n_harmful=24, tau=0.0)  # random packs whose gate opens on most tokens


@register_preparer
def write_test_files(base: Path) -> None:
    models = base / "models"
    (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
    (models / "loras").mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in diffusers_sd3().state_dict().items()}
    save_file(sd, str(models / "diffusion_models" / SD3_FILE))
    # A LoRA on a module SafeDIG hooks (ComfyUI's generic key format), so weights and hooks meet.
    g = torch.Generator().manual_seed(11)
    key = "diffusion_model.joint_blocks.0.x_block.attn.proj"
    save_file({f"{key}.lora_up.weight": torch.randn(128, 4, generator=g) * 0.5,
               f"{key}.lora_down.weight": torch.randn(4, 128, generator=g) * 0.5},
              str(models / "loras" / LORA_FILE))
    packs = models / "safedig"
    save_pack(packs / "sd3_fire.safetensors", *random_pack("sd3", 128, SD3_POSITIONS, seed=1, **FIRE))
    save_pack(packs / "sub" / "sd3_other.safetensors", *random_pack("sd3", 128, SD3_POSITIONS, seed=2, **FIRE))
    save_pack(packs / "flux_tiny.safetensors", *random_pack("flux", 64, ["double.0.img.attn"], seed=3))
    save_pack(packs / "sd3_wide.safetensors", *random_pack("sd3", 256, ["joint.0.img.attn"], seed=4))
    good = (packs / "sd3_fire.safetensors").read_bytes()
    (packs / "broken.safetensors").write_bytes(good[: len(good) // 3])
    outside = base / "outside"
    outside.mkdir()
    save_pack(outside / "escape.safetensors", *random_pack("sd3", 128, SD3_POSITIONS, seed=5, **FIRE))
    os.symlink(outside / "escape.safetensors", packs / "escape.safetensors")
    write_random_bundled(models / "safedig_bundled")
    save_pack(packs / "bundled_fire.safetensors", *random_pack("flux", 128, BUNDLED_POSITIONS, seed=7, **FIRE))
    save_pack(base / "extra_packs" / "extra_pack.safetensors",
              *random_pack("sd3", 128, SD3_POSITIONS, seed=6, domains=("violence", "gore"), **FIRE))


# ------------------------------------------------------------------------------------------ graphs

STEER_DEFAULTS = dict(enabled=True, mode="Blend", blend_strength=1.0, repel_strength=1.0, gate="hard",
                      override_threshold=False, threshold=0.0, apply_to="cond", start_percent=0.0,
                      end_percent=1.0, positions="")


def sd3_graph(tag: str, steer: dict | list[dict] | None = None, *, cfg: float = 1.0, steps: int = 3, batch: int = 1,
              seed: int = 7, lora: float | None = None, nonce: int = 0, report: bool = False,
              hook_count: bool = True) -> dict:
    """UNETLoader(tiny SD3) [-> LoRA] [-> SafeDIG Steer ...] -> KSampler -> SaveLatent (+ helpers).

    `steer`: None (no SafeDIG at all), one dict of Steer inputs (plus optional pack/domain), or a list
    for chained Steer nodes. Node "10" counts hooks on the loader's (shared) model after sampling."""
    g: dict = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": SD3_FILE, "weight_dtype": "default"}},
        "5": {"class_type": "TEST_ONLY_SafeDIG_RandomConditioning",
              "inputs": {"text": "a photo of a cat", "context_dim": SD3_CFG["ctx_dim"],
                         "pooled_dim": SD3_CFG["pooled"], "tokens": 6, "nonce": nonce}},
        "6": {"class_type": "TEST_ONLY_SafeDIG_RandomConditioning",
              "inputs": {"text": "", "context_dim": SD3_CFG["ctx_dim"], "pooled_dim": SD3_CFG["pooled"],
                         "tokens": 6, "nonce": nonce}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
    }
    model = ["1", 0]
    if lora is not None:
        g["2"] = {"class_type": "LoraLoaderModelOnly",
                  "inputs": {"model": model, "lora_name": LORA_FILE, "strength_model": lora}}
        model = ["2", 0]
    steers = [] if steer is None else [steer] if isinstance(steer, dict) else list(steer)
    for i, s in enumerate(steers):
        s = dict(s)
        d_id, s_id = f"3{i}", f"4{i}"
        g[d_id] = {"class_type": "SafeDIGLoadDictionary",
                   "inputs": {"pack": s.pop("pack", "sd3_fire.safetensors"), "domain": s.pop("domain", "(source)")}}
        g[s_id] = {"class_type": "SafeDIGSteer", "inputs": {**STEER_DEFAULTS, **s, "model": model,
                                                            "dictionary": [d_id, 0]}}
        model = [s_id, 0]
    g["8"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}}
    g["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": f"latents/{tag}"}}
    if hook_count:
        g["10"] = {"class_type": "TEST_ONLY_SafeDIG_HookCount", "inputs": {"model": ["1", 0], "samples": ["8", 0]}}
    if report:
        g["11"] = {"class_type": "SafeDIGReport", "inputs": {"model": model, "samples": ["8", 0]}}
    return g


def run_latent(comfyui: ComfyServer, graph: dict) -> tuple[torch.Tensor, dict, dict]:
    """(latent, hook report of the shared model after the run, history entry)."""
    entry = comfyui.run(graph)
    hooks = json.loads(comfyui.ui_text(entry, "10")) if "10" in graph else {}
    return comfyui.latent(entry, "9"), hooks, entry


def no_hooks(report: dict) -> bool:
    return report["safedig_hooks"] == 0 and report["forward_hooks"] == 0 and report["forward_pre_hooks"] == 0


def node_errors(exc: PromptError) -> str:
    return json.dumps(exc.payload.get("node_errors", {}))


def execution_error(exc: PromptError) -> str:
    for kind, data in exc.payload["status"]["messages"]:
        if kind == "execution_error":
            return data["exception_message"]
    raise AssertionError(f"no execution_error in {exc.payload['status']}")


# ------------------------------------------------------------------------------------------ tests


def _documented_inputs() -> dict[str, dict[str, tuple[str, str]]]:
    """{node id: {input: (type, default)}} from the `| input | type | default | ... |` tables in docs/nodes.md."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    current, in_table = None, False
    for line in (ROOT / "docs" / "nodes.md").read_text().splitlines():
        m = re.match(r"^##+ .*\(`(SafeDIG\w+)`\)", line)
        if m:
            current, in_table = out.setdefault(m.group(1), {}), False
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:3] == ["input", "type", "default"]:
            in_table = current is not None
        elif in_table and not set(cells[0]) <= {"-"}:
            current[cells[0]] = (cells[1], cells[2])
    return out


def test_object_info_matches_the_documented_inputs(comfyui):
    documented = _documented_inputs()
    assert {"SafeDIGLoadDictionary", "SafeDIGSteer", "SafeDIGReport", "SafeDIGBuildDictionary",
            "SafeDIGAdaptDictionary", "SafeDIGCombineDictionaries", "SafeDIGLoadBundledModel",
            "SafeDIGBundledTextEncode",
            "SafeDIGLoadBundledTextEncoder", "SafeDIGBundledEmptyLatent",
            "SafeDIGBundledLatentToImage"} == set(documented)
    info = comfyui.object_info()
    assert {n for n in info if n.startswith("SafeDIG")} == set(documented)
    for node_id, inputs in documented.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        served = {**info[node_id]["input"].get("required", {}), **info[node_id]["input"].get("optional", {})}
        assert list(served) == list(inputs), node_id
        for name, (typ, default) in inputs.items():
            assert served[name][0] == typ, (node_id, name)
            got = served[name][1].get("default", "") if len(served[name]) > 1 else ""
            assert str(got).lower() == default.lower(), (node_id, name, got, default)
        assert info[node_id]["category"].startswith("SafeDIG")
    steer = info["SafeDIGSteer"]
    assert steer["input"]["required"]["mode"][1]["options"] == ["Off", "Blend", "Repel", "Both"]
    assert steer["output"] == ["MODEL"]
    assert info["SafeDIGLoadDictionary"]["output"] == ["SAFEDIG_DICT", "STRING"]
    assert info["SafeDIGReport"]["output"] == ["IMAGE", "IMAGE", "STRING"] and info["SafeDIGReport"]["output_node"]


def test_pack_list_covers_models_subfolders_and_extra_model_paths(comfyui):
    req = comfyui.object_info("SafeDIGLoadDictionary")["input"]["required"]
    packs = req["pack"][1]["options"]
    for name in ("sd3_fire.safetensors", "sub/sd3_other.safetensors", "extra_pack.safetensors"):
        assert name in packs
    assert {"(source)", "source", "target", "violence", "gore"} <= set(req["domain"][1]["options"])
    # A pack from the extra_model_paths.yaml folder steers, with its adapted domain.
    steered, hooks, _ = run_latent(comfyui, sd3_graph("extra", {"pack": "extra_pack.safetensors", "domain": "gore"}))
    base, _, _ = run_latent(comfyui, sd3_graph("extra_base"))
    assert not torch.equal(steered, base) and no_hooks(hooks)


@pytest.mark.parametrize("pack,domain,expected", [
    ("nope.safetensors", "(source)", r"pack 'nope.safetensors' not found; searched: \[.*models/safedig"),
    ("../diffusion_models/" + SD3_FILE, "(source)", "must be a plain name inside the safedig folders"),
    ("/etc/passwd.safetensors", "(source)", "must be a plain name inside the safedig folders"),
    ("escape.safetensors", "(source)", "is a link to .*outside the safedig folders"),
    ("broken.safetensors", "(source)", "truncated"),
    ("sd3_fire.safetensors", "nonexistent",
     r"has no domain 'nonexistent'. Fix: choose \(all domains\), \(source\) or one of"),
])
def test_bad_pack_choices_are_refused_before_running(comfyui, pack, domain, expected):
    with pytest.raises(PromptError) as err:
        comfyui.submit(sd3_graph("refused", {"pack": pack, "domain": domain}))
    assert err.value.payload["error"]["type"] == "prompt_outputs_failed_validation"
    assert re.search(expected, node_errors(err.value)), node_errors(err.value)


@pytest.mark.parametrize("field,value,expected", [
    ("mode", "Sideways", r"mode 'Sideways' is not one of \['Off', 'Blend', 'Repel', 'Both'\]"),
    ("apply_to", "negative", "apply_to 'negative' is not one of"),
    ("start_percent", 0.9, "start_percent 0.9 is after end_percent 0.5"),
    ("blend_strength", 5.0, r"blend_strength 5.0 is out of range. Fix: use a value in \[0, 4.0\]"),
    ("positions", "joint.0.img.attn, img.attn.0", r"positions 'img.attn.0' are not position ids"),
])
def test_bad_steer_values_are_refused_before_running(comfyui, field, value, expected):
    with pytest.raises(PromptError) as err:
        comfyui.submit(sd3_graph("refused", {field: value, "end_percent": 0.5}))
    assert re.search(expected, node_errors(err.value)), node_errors(err.value)


def test_steering_changes_the_output_and_identity_settings_are_bitwise(comfyui):
    base, hooks0, _ = run_latent(comfyui, sd3_graph("base"))
    outs = {}
    for name, steer in {"blend": {}, "repel": {"mode": "Repel"}, "both": {"mode": "Both"},
                        "soft": {"gate": "soft", "override_threshold": True, "threshold": 0.5}}.items():
        outs[name], hooks, _ = run_latent(comfyui, sd3_graph(name, steer))
        assert not torch.equal(outs[name], base), name
        assert torch.isfinite(outs[name]).all()
        assert no_hooks(hooks) and hooks["diffusion_model_id"] == hooks0["diffusion_model_id"]
    assert not torch.equal(outs["blend"], outs["repel"]) and not torch.equal(outs["blend"], outs["both"])
    for name, steer in {"disabled": {"enabled": False}, "off": {"mode": "Off"},
                        "blend0": {"blend_strength": 0.0}, "repel0": {"mode": "Repel", "repel_strength": 0.0}}.items():
        out, hooks, _ = run_latent(comfyui, sd3_graph(name, steer))
        assert torch.equal(out, base), name
        assert no_hooks(hooks)
    # After all those steered runs, the same graph without SafeDIG (forced to run again by a nonce
    # that changes nothing but the cache key) is bitwise the first one, on the same model object.
    again, hooks, _ = run_latent(comfyui, sd3_graph("base_again", nonce=1))
    assert torch.equal(again, base)
    assert no_hooks(hooks) and hooks["diffusion_model_id"] == hooks0["diffusion_model_id"]


def test_cfg_batch_and_apply_to(comfyui):
    kw = dict(cfg=3.0, batch=2)
    base, _, _ = run_latent(comfyui, sd3_graph("cfg_base", **kw))
    assert base.shape[0] == 2
    outs = {a: run_latent(comfyui, sd3_graph(f"cfg_{a}", {"apply_to": a}, **kw))[0] for a in ("cond", "uncond", "both")}
    for a, out in outs.items():
        for i in range(2):
            assert not torch.equal(out[i], base[i]), (a, i)
    assert not torch.equal(outs["cond"], outs["uncond"])
    assert not torch.equal(outs["cond"], outs["both"]) and not torch.equal(outs["uncond"], outs["both"])
    again, hooks, _ = run_latent(comfyui, sd3_graph("cfg_base_again", nonce=2, **kw))
    assert torch.equal(again, base) and no_hooks(hooks)


def test_chained_steer_nodes_and_lora(comfyui):
    single, _, _ = run_latent(comfyui, sd3_graph("single", {}))
    chain = [{}, {"pack": "sub/sd3_other.safetensors", "mode": "Repel"}]
    chained, hooks, _ = run_latent(comfyui, sd3_graph("chain", chain))
    assert not torch.equal(chained, single) and no_hooks(hooks)

    lora, _, _ = run_latent(comfyui, sd3_graph("lora", lora=1.0))
    base, _, _ = run_latent(comfyui, sd3_graph("base"))
    assert not torch.equal(lora, base)  # the LoRA does something
    lora_steered, hooks, _ = run_latent(comfyui, sd3_graph("lora_steer", {}, lora=1.0))
    assert not torch.equal(lora_steered, lora) and not torch.equal(lora_steered, single) and no_hooks(hooks)
    lora_again, hooks, _ = run_latent(comfyui, sd3_graph("lora_again", lora=1.0, nonce=3))
    assert torch.equal(lora_again, lora) and no_hooks(hooks)
    base_again, _, _ = run_latent(comfyui, sd3_graph("base_after_lora", nonce=4))
    assert torch.equal(base_again, base)  # LoRA weights were restored too


def test_mismatched_packs_fail_at_execution_with_the_fix(comfyui):
    with pytest.raises(PromptError) as err:
        comfyui.run(sd3_graph("mismatch", {"pack": "flux_tiny.safetensors"}))
    msg = execution_error(err.value)
    assert "pack is for flux (d_model 64) but the model is sd3 (d_model 128)" in msg
    assert "flux_tiny.safetensors" in msg and "Fix: load a pack trained for sd3" in msg
    with pytest.raises(PromptError) as err:
        comfyui.run(sd3_graph("wide", {"pack": "sd3_wide.safetensors"}))
    assert "pack is for sd3 (d_model 256) but the model is sd3 (d_model 128)" in execution_error(err.value)
    with pytest.raises(PromptError) as err:
        comfyui.run(sd3_graph("subset", {"positions": "joint.0.img.attn, joint.7.txt.mlp"}))
    assert "positions ['joint.7.txt.mlp'] are not routed in this pack" in execution_error(err.value)


def test_report_shows_where_and_when_the_gate_fired(comfyui):
    _, _, entry = run_latent(comfyui, sd3_graph("report", {"start_percent": 0.5}, steps=3, batch=2, report=True))
    text = comfyui.ui_text(entry, "11")
    assert "steps steered: 2-3 of 3" in text, text
    for pos in SD3_POSITIONS:
        assert re.search(rf"{re.escape(pos)}\s+0\s+\d+\.\d%\s+[\d.e+-]+\s+2-3\b", text), text
    assert "verdict: the gate fired" in text and "2 image(s), image tokens 4x4" in text
    images = comfyui.images(entry, "11")
    assert len(images) == 3  # heatmap + one token map per image
    heat, maps = images[0], images[1:]
    assert heat.shape[1] >= 3 * 14 and heat.shape[0] >= 3 * 14
    assert all(m.shape == (64, 64, 3) for m in maps)
    # Step 1 was outside the range: its column is grey; steps 2-3 are coloured.
    assert len({tuple(p) for p in heat.reshape(-1, 3)}) > 10

    _, _, entry = run_latent(comfyui, sd3_graph("report_off", {"enabled": False}, report=True))
    assert "carries no active SafeDIG steering" in comfyui.ui_text(entry, "11")


def test_interrupt_leaves_no_hook(comfyui):
    ws = comfyui.websocket()
    try:
        graph = sd3_graph("interrupted", {}, steps=1000, nonce=5, hook_count=False)
        prompt_id = comfyui.submit(graph)["prompt_id"]
        progressed = False
        while True:
            msg = ws.recv()
            if not isinstance(msg, str):
                continue
            data = json.loads(msg)
            if data["type"] == "progress" and data["data"].get("prompt_id") == prompt_id and data["data"]["value"] >= 5:
                progressed = True
                comfyui.interrupt()
            if data["type"] in ("execution_interrupted", "execution_success", "execution_error") \
                    and data["data"].get("prompt_id") == prompt_id:
                break
        assert progressed and data["type"] == "execution_interrupted", data
    finally:
        ws.close()
    with pytest.raises(PromptError, match="interrupted"):
        comfyui.wait(prompt_id)
    hooks = json.loads(comfyui.ui_text(comfyui.run({
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": SD3_FILE, "weight_dtype": "default"}},
        "10": {"class_type": "TEST_ONLY_SafeDIG_HookCount", "inputs": {"model": ["1", 0]}}}), "10"))
    assert no_hooks(hooks) and hooks["modules"] > 10


# ------------------------------------------------------------------------------------ bundled model


def bundled_graph(tag: str, steer: dict | None = None, *, weights: str = "random_bundled.safetensors",
                  prompt: str = "a red circle in the center", steps: int = 4, cfg: float = 3.0, batch: int = 1,
                  nonce: int = 0) -> dict:
    """Load Bundled Model [-> Steer] -> KSampler (euler/simple) -> SaveLatent, Latent To Image -> Report."""
    g: dict = {
        "1": {"class_type": "SafeDIGLoadBundledModel", "inputs": {"weights": weights}},
        "5": {"class_type": "SafeDIGBundledTextEncode", "inputs": {"text": prompt}},
        "6": {"class_type": "SafeDIGBundledTextEncode", "inputs": {"text": ""}},
        "7": {"class_type": "SafeDIGBundledEmptyLatent", "inputs": {"width": 32, "height": 32, "batch_size": batch}},
    }
    model = ["1", 0]
    if steer is not None:
        s = dict(steer)
        g["30"] = {"class_type": "SafeDIGLoadDictionary",
                   "inputs": {"pack": s.pop("pack", "bundled_fire.safetensors"), "domain": "(source)"}}
        g["40"] = {"class_type": "SafeDIGSteer", "inputs": {**STEER_DEFAULTS, **s, "model": model,
                                                            "dictionary": ["30", 0]}}
        model = ["40", 0]
    g["8"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 3, "steps": steps, "cfg": cfg, "sampler_name": "euler",
        "scheduler": "simple", "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0],
        "denoise": 1.0}}
    g["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": f"latents/{tag}"}}
    g["10"] = {"class_type": "TEST_ONLY_SafeDIG_HookCount", "inputs": {"model": ["1", 0], "samples": ["8", 0]}}
    g["12"] = {"class_type": "SafeDIGBundledLatentToImage", "inputs": {"samples": ["8", 0]}}
    g["11"] = {"class_type": "SafeDIGReport", "inputs": {"model": model, "samples": ["8", 0], "image": ["12", 0]}}
    for i in range(nonce):  # no-ops on the (zero) latent that only change the sampler's cache key
        g[f"7{i}"] = {"class_type": "LatentMultiply", "inputs": {"samples": g["8"]["inputs"]["latent_image"],
                                                                 "multiplier": 1.0}}
        g["8"]["inputs"]["latent_image"] = [f"7{i}", 0]
    return g


def test_bundled_model_nodes_sample_and_steer(comfyui):
    base, hooks0, entry = run_latent(comfyui, bundled_graph("bundled_base"))
    assert base.shape == (1, 12, 16, 16) and torch.isfinite(base).all()
    assert "carries no active SafeDIG steering" in comfyui.ui_text(entry, "11")
    steered, hooks, entry = run_latent(comfyui, bundled_graph("bundled_steered", {"mode": "Both"}))
    assert not torch.equal(steered, base) and no_hooks(hooks)
    assert hooks["diffusion_model_id"] == hooks0["diffusion_model_id"]
    text = comfyui.ui_text(entry, "11")
    assert "steps steered: 1-4 of 4" in text and "image tokens 8x8" in text and "single.1.out" in text
    token_map = comfyui.images(entry, "11")[1]
    assert token_map.shape == (32, 32, 3)  # drawn over the 32x32 decoded image
    off, hooks, _ = run_latent(comfyui, bundled_graph("bundled_off", {"enabled": False}))
    assert torch.equal(off, base) and no_hooks(hooks)
    again, hooks, _ = run_latent(comfyui, bundled_graph("bundled_again", nonce=1))
    assert torch.equal(again, base) and no_hooks(hooks)
    # Another prompt gives another image (the text encoder conditions the model).
    other, _, _ = run_latent(comfyui, bundled_graph("bundled_other", prompt="a blue square on the left"))
    assert not torch.equal(other, base)


def test_bundled_pack_mismatch_names_the_widths(comfyui):
    with pytest.raises(PromptError) as err:
        comfyui.run(bundled_graph("bundled_mismatch", {"pack": "sd3_fire.safetensors"}))
    assert "pack is for sd3 (d_model 128) but the model is flux (d_model 128" in execution_error(err.value)
    with pytest.raises(PromptError) as err:
        comfyui.run(bundled_graph("bundled_flux64", {"pack": "flux_tiny.safetensors"}))
    assert "pack is for flux (d_model 64) but the model is flux (d_model 128" in execution_error(err.value)
    with pytest.raises(PromptError) as err:
        comfyui.submit(bundled_graph("bundled_missing", weights="nope.safetensors"))
    assert re.search(r"bundled model 'nope.safetensors' not found; searched: \[.*safedig_bundled",
                     node_errors(err.value)), node_errors(err.value)
