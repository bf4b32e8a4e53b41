"""SafeDIG Build / Adapt Dictionary in a real ComfyUI server: the bundled model (ComfyUI's own Flux class)
and the tiny SD3 checkpoint (UNETLoader) build packs that Load Dictionary lists and Steer uses; bad prompt
sets are refused before sampling; an interrupted build leaves no pack and resumes from its shards."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from safedig_core import load_pack

pytest.register_assert_rewrite("comfy_server")
from comfy_server import ComfyServer, PromptError, register_preparer  # noqa: E402
from test_nodes_server import SD3_FILE, STEER_DEFAULTS, bundled_graph, execution_error, node_errors  # noqa: E402
from tiny_models import SD3_CFG  # noqa: E402

pytest_plugins = ["comfy_server"]
pytestmark = pytest.mark.comfy_server

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "dictionaries" / "prompts"
BUNDLED_CANDIDATES = "input.txt,double.1.img.attn,single.0.out"


def _lines(name: str, n_pairs: int | None = None, n: int | None = None) -> str:
    """A shipped set cut down: the first n_pairs pairs of every subdomain (routing needs several), or the
    first n lines."""
    rows = [json.loads(x) for x in (SHIPPED / name).read_text().splitlines()]
    if n_pairs is not None:
        kept: dict[str, list[int]] = {}
        for r in rows:
            pairs = kept.setdefault(r["subdomain"], [])
            if r["pair"] not in pairs and len(pairs) < n_pairs:
                pairs.append(r["pair"])
        rows = [r for r in rows if r["pair"] in kept[r["subdomain"]]]
    return "".join(json.dumps(r) + "\n" for r in rows[:n])


@register_preparer
def write_prompt_files(base: Path) -> None:
    folder = base / "models" / "safedig" / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bad_line.jsonl").write_text('{"text": "a cat", "label": "unsafe", "pair": 0}\nnot json\n')
    (folder / "unpaired.jsonl").write_text('{"text": "a cat", "label": "unsafe", "pair": 0}\n'
                                           '{"text": "a dog", "label": "unsafe", "pair": 0}\n')
    (folder / "small_pairs.jsonl").write_text(_lines("bundled_source_pairs.jsonl", n_pairs=6))
    (folder / "small_target.jsonl").write_text(_lines("bundled_target_pairs.jsonl", n_pairs=4))
    (folder / "small_benign.jsonl").write_text(_lines("bundled_benign.jsonl", n=40))


SAMPLING = dict(sampler_name="euler", scheduler="simple", steps=6, cfg=3.0, guidance=3.5, width=32, height=32,
                seeds_per_prompt=1, capture_steps=2, max_tokens_per_row=0, build_seed=0)


def build_graph(pack_name: str, *, pairs: str = "small_pairs.jsonl", benign: str = "small_benign.jsonl",
                overwrite: bool = False, candidates: str = BUNDLED_CANDIDATES, **sampling) -> dict:
    return {
        "1": {"class_type": "SafeDIGLoadBundledModel", "inputs": {"weights": "bundled_flux.safetensors"}},
        "2": {"class_type": "SafeDIGLoadBundledTextEncoder", "inputs": {}},
        "3": {"class_type": "SafeDIGBuildDictionary", "inputs": {
            "model": ["1", 0], "clip": ["2", 0], "prompt_pairs": pairs, "benign_prompts": benign,
            "pack_name": pack_name, "domain": "hazard", "overwrite": overwrite, **{**SAMPLING, **sampling},
            "candidate_positions": candidates, "routed_count": 1, "sae_expansion": 2, "sae_k": 8,
            "sae_epochs": 1.0, "pasted_pairs": "", "pasted_benign": ""}},
    }


def adapt_graph(pack: str, pack_name: str) -> dict:
    g = build_graph("unused")
    del g["3"]
    g["5"] = {"class_type": "SafeDIGAdaptDictionary", "inputs": {
        "model": ["1", 0], "clip": ["2", 0], "pack": pack, "prompt_pairs": "small_target.jsonl",
        "benign_prompts": "small_benign.jsonl", "domain": "toxic", "pack_name": pack_name, "overwrite": False,
        **SAMPLING, "adapt_epochs": 30.0, "pasted_pairs": "", "pasted_benign": ""}}
    return g


def test_bundled_build_and_adapt_through_the_nodes(comfyui: ComfyServer):
    packs = comfyui.base / "models" / "safedig"
    before = comfyui.object_info("SafeDIGLoadDictionary")["input"]["required"]["pack"][1]["options"]
    assert "built_bundled.safetensors" not in before
    comfyui.run(build_graph("built_bundled"), timeout=600)
    pack = load_pack(packs / "built_bundled.safetensors")
    assert pack.architecture == "flux" and pack.domains == ["hazard"] and len(pack.positions) == 1
    assert pack.positions[0] in BUNDLED_CANDIDATES.split(",")
    assert pack.metadata["provenance"]["model"]["backend"] == "comfyui"
    assert pack.metadata["provenance"]["build"] == "SafeDIGBuildDictionary"
    # Listed by Load Dictionary without a restart.
    listed = comfyui.object_info("SafeDIGLoadDictionary")["input"]["required"]["pack"][1]["options"]
    assert "built_bundled.safetensors" in listed
    # No overwrite without the toggle; the pack stays as it was.
    mtime = (packs / "built_bundled.safetensors").stat().st_mtime_ns
    with pytest.raises(PromptError) as err:
        comfyui.run(build_graph("built_bundled", build_seed=1))
    assert "built_bundled.safetensors already exists" in execution_error(err.value)
    assert (packs / "built_bundled.safetensors").stat().st_mtime_ns == mtime

    comfyui.run(adapt_graph("built_bundled.safetensors", "built_bundled_toxic"), timeout=600)
    adapted = load_pack(packs / "built_bundled_toxic.safetensors")
    assert adapted.domains == ["hazard", "toxic"] and adapted.positions == pack.positions
    p = pack.positions[0]
    for key in (f"encoder.{p}.W_enc", f"decoder.hazard.{p}.W_dec"):
        assert torch.equal(adapted.tensors[key], pack.tensors[key]), key  # frozen encoder, source decoder kept
    assert not torch.equal(adapted.tensors[f"decoder.toxic.{p}.W_dec"], pack.tensors[f"decoder.hazard.{p}.W_dec"])
    assert adapted.metadata["domains"]["toxic"]["adapted_from"] == "hazard"

    # The new pack steers: Load Dictionary -> Steer -> KSampler changes the image of an unsafe prompt.
    g = bundled_graph("built_steer", {"pack": "built_bundled_toxic.safetensors", "threshold_scale": 0.0},
                      weights="bundled_flux.safetensors", prompt="a hazard-striped triangle")
    entry = comfyui.run(g)
    assert "steps steered" in comfyui.ui_text(entry, "11")


def test_build_with_target_pairs_makes_both_domains_in_one_run(comfyui: ComfyServer):
    g = build_graph("built_two_domains")
    g["3"]["inputs"].update(target_pairs="small_target.jsonl", target_domain="toxic",
                            calibration_prompts="small_benign.jsonl")
    comfyui.run(g, timeout=600)
    pack = load_pack(comfyui.base / "models" / "safedig" / "built_two_domains.safetensors")
    assert pack.domains == ["hazard", "toxic"] and pack.metadata["domains"]["toxic"]["adapted_from"] == "hazard"
    # H was chosen on both domains' pairs.
    assert pack.metadata["provenance"]["harmful_from"] == ["source", "target"]
    # The learned Blend target was chosen with ComfyUI's sampler, one target for both domains, as build-pack does.
    chosen = [pack.domain_features(d, p) for d in pack.domains for p in pack.positions]
    assert len({f.blend_target for f in chosen}) == 1 and chosen[0].blend_target in ("map", "affine")
    assert all(len(f.extra["blend_fit"]["choice_distances"]) == 6 for f in chosen)


def test_bad_prompt_sets_are_refused_before_sampling(comfyui: ComfyServer):
    for name, expected in (("bad_line.jsonl", "line 2 is not a prompt record"),
                           ("unpaired.jsonl", "do not hold exactly one unsafe and one safe prompt"),
                           ("nope.jsonl", "prompt set 'nope.jsonl' not found")):
        with pytest.raises(PromptError) as err:
            comfyui.submit(build_graph(f"refused_{name}", pairs=name))
        assert expected in node_errors(err.value), name
    g = build_graph("refused_paste", pairs="(pasted below)")
    with pytest.raises(PromptError) as err:
        comfyui.submit(g)
    assert "nothing is pasted" in node_errors(err.value)
    assert not list((comfyui.base / "models" / "safedig").glob("refused_*"))


def test_interrupted_build_leaves_no_pack_and_resumes(comfyui: ComfyServer):
    graph = build_graph("interrupted_build", pairs="bundled_source_pairs.jsonl", steps=4, capture_steps=1)
    graph["3"]["inputs"]["sae_epochs"] = 0.5
    prompt_id = comfyui.submit(graph)["prompt_id"]
    work = comfyui.base / "output" / "safedig_work"
    deadline = time.time() + 300
    while not list(work.glob("interrupted_build-*/collect/source/shard-00001.safetensors")):
        assert time.time() < deadline, comfyui.log_tail()
        time.sleep(0.5)
    comfyui.interrupt()
    with pytest.raises(PromptError, match="interrupted"):
        comfyui.wait(prompt_id)
    assert not (comfyui.base / "models" / "safedig" / "interrupted_build.safetensors").exists()
    assert not list(work.rglob("*.tmp"))
    shards = sorted(work.glob("interrupted_build-*/collect/source/shard-*.safetensors"))
    assert shards
    stamps = {s: s.stat().st_mtime_ns for s in shards}
    comfyui.run(graph, timeout=600)
    assert all(s.stat().st_mtime_ns == t for s, t in stamps.items())  # finished shards reused, not redone
    assert load_pack(comfyui.base / "models" / "safedig" / "interrupted_build.safetensors").domains == ["hazard"]


def test_tiny_sd3_builds_and_steers_end_to_end(comfyui: ComfyServer):
    pairs = "".join(json.dumps({"text": f"{w} scene number {i}", "label": lab, "pair": i, "subdomain": f"s{i % 2}"})
                    + "\n" for i in range(8) for w, lab in (("an unsafe", "unsafe"), ("a safe", "safe")))
    benign = "".join(json.dumps({"text": f"benign picture {i}", "label": "benign"}) + "\n" for i in range(8))
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": SD3_FILE, "weight_dtype": "default"}},
        "2": {"class_type": "TEST_ONLY_SafeDIG_RandomCLIP",
              "inputs": {"context_dim": SD3_CFG["ctx_dim"], "pooled_dim": SD3_CFG["pooled"], "tokens": 6}},
        "3": {"class_type": "SafeDIGBuildDictionary", "inputs": {
            "model": ["1", 0], "clip": ["2", 0], "prompt_pairs": "(pasted below)", "benign_prompts": "(pasted below)",
            "pack_name": "built_sd3", "domain": "unsafe", "overwrite": True,
            **{**SAMPLING, "width": 64, "height": 64, "steps": 3, "cfg": 2.0},
            "candidate_positions": "", "routed_count": 2, "sae_expansion": 2, "sae_k": 8, "sae_epochs": 1.0,
            "pasted_pairs": pairs, "pasted_benign": benign}},
        "4": {"class_type": "TEST_ONLY_SafeDIG_RandomConditioning",
              "inputs": {"text": "an unsafe scene number 3", "context_dim": SD3_CFG["ctx_dim"],
                         "pooled_dim": SD3_CFG["pooled"], "tokens": 6, "nonce": 0}},
        "5": {"class_type": "TEST_ONLY_SafeDIG_RandomConditioning",
              "inputs": {"text": "", "context_dim": SD3_CFG["ctx_dim"], "pooled_dim": SD3_CFG["pooled"],
                         "tokens": 6, "nonce": 0}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "SafeDIGSteer", "inputs": {**STEER_DEFAULTS, "model": ["1", 0], "dictionary": ["3", 0],
                                                       "override_threshold": True, "threshold": -1e4}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["7", 0], "seed": 1, "steps": 3, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0], "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "latents/built_sd3"}},
    }
    steered = comfyui.latent(comfyui.run(g, timeout=600), "9")
    pack = load_pack(comfyui.base / "models" / "safedig" / "built_sd3.safetensors")
    assert pack.architecture == "sd3" and len(pack.positions) == 2
    g["7"]["inputs"]["enabled"] = False
    g["9"]["inputs"]["filename_prefix"] = "latents/built_sd3_off"
    unsteered = comfyui.latent(comfyui.run(g), "9")
    assert torch.isfinite(steered).all() and not torch.equal(steered, unsteered)
