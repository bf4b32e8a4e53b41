"""Hostile input through a real ComfyUI server (issue 16): a models/safedig/ folder full of malformed packs
never takes Load Dictionary down, the shipped pack still runs beside them, and choosing a bad pack or a
hostile node value gets one clear message naming the file (or input) and the fix, before the prompt runs.

Uses the session's one server (tests/comfy_server.py) and the shipped bundled model and pack."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import save_file

from safedig_core.pack import METADATA_KEY, encoder_key, save_pack
from safedig_core.synthetic import random_pack

pytest.register_assert_rewrite("comfy_server")  # it is also this module's pytest plugin (below)
from comfy_server import ComfyServer, register_preparer  # noqa: E402

pytest_plugins = ["comfy_server"]
pytestmark = pytest.mark.comfy_server

SHIPPED_PACK = "bundled_hazard_to_toxic.safetensors"
SHIPPED_WEIGHTS = "bundled_flux.safetensors"
GOOD = "hostile/good.safetensors"  # a valid pack in the same folder as the bad ones
POSITION = "single.0.out"
HEADER_20_MIB = 20 * 2**20

# file in models/safedig/hostile/ -> what its one error message must say (regex-free substrings)
BAD_PACKS = {
    "meta_null.safetensors": "metadata must be a JSON object, got null",
    "meta_list.safetensors": "metadata must be a JSON object, got a list",
    "meta_only_domains.safetensors": "metadata has no 'format_version' field",
    "domains_number.safetensors": "metadata field domains must be a JSON object, got the number 5",
    "tau_string.safetensors": f"metadata field domains['source'].features['{POSITION}'].tau must be a finite "
                              "number, got the string 'high'",
    "harmful_ids_null.safetensors": f"metadata field positions['{POSITION}'].harmful_ids must be a list, got null",
    "header_20mib.safetensors": f"header is {HEADER_20_MIB} bytes, over the header-size cap of 16777216 bytes",
    "torch_save.safetensors": "is a zip archive (the format torch.save writes: a pickle inside), not a safetensors "
                              "file; SafeDIG never loads pickles",
    "pickle.safetensors": "is a Python pickle (an older torch.save or pickle.dump file), not a safetensors file; "
                          "SafeDIG never loads pickles",
    "narrow_encoder.safetensors": f"tensor '{encoder_key(POSITION, 'W_enc')}' has shape [64, 15] but the metadata "
                                  "implies [64, 16]",
}


def _with_metadata(meta_json: str, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A file whose safetensors layout is sound and whose `safedig` metadata is `meta_json` verbatim."""
    save_file(tensors, str(path), metadata={METADATA_KEY: meta_json})


@register_preparer
def write_hostile_packs(base: Path) -> None:
    folder = base / "models" / "safedig" / "hostile"
    meta, tensors = random_pack("flux", 16, [POSITION], expansion=4, k=4, seed=9)
    save_pack(folder / "good.safetensors", meta, tensors)
    _with_metadata("null", tensors, folder / "meta_null.safetensors")
    _with_metadata("[1, 2]", tensors, folder / "meta_list.safetensors")
    _with_metadata('{"domains": 5}', tensors, folder / "meta_only_domains.safetensors")
    _with_metadata(json.dumps({**meta, "domains": 5}), tensors, folder / "domains_number.safetensors")
    bad = json.loads(json.dumps(meta))
    bad["domains"]["source"]["features"][POSITION]["tau"] = "high"
    _with_metadata(json.dumps(bad), tensors, folder / "tau_string.safetensors")
    bad = json.loads(json.dumps(meta))
    bad["positions"][POSITION]["harmful_ids"] = None
    _with_metadata(json.dumps(bad), tensors, folder / "harmful_ids_null.safetensors")
    # A header that fits in its file but is over the cap (the file is 20 MiB + a few bytes).
    (folder / "header_20mib.safetensors").write_bytes(
        struct.pack("<Q", HEADER_20_MIB) + b"{" + b" " * (HEADER_20_MIB - 2) + b"}" + b"\0" * 2)
    torch.save(tensors, folder / "torch_save.safetensors")
    (folder / "pickle.safetensors").write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))
    # Tensor bytes consistent with their shapes, but the encoder is narrower than the metadata's d_model.
    narrow = dict(tensors, **{encoder_key(POSITION, "W_enc"): torch.zeros(64, 15)})
    _with_metadata(json.dumps(meta), narrow, folder / "narrow_encoder.safetensors")


STEER = dict(enabled=True, mode="Both", blend_strength=1.0, repel_strength=1.0, gate="hard", override_threshold=False,
             threshold=0.0, apply_to="cond", start_percent=0.0, end_percent=1.0, positions="")


def graph(pack=SHIPPED_PACK, domain="(source)", tag="hostile", **steer) -> dict:
    """Load Bundled Model (shipped) + Load Dictionary -> Steer -> KSampler (2 steps, 32x32) -> SaveLatent."""
    return {
        "1": {"class_type": "SafeDIGLoadBundledModel", "inputs": {"weights": SHIPPED_WEIGHTS}},
        "2": {"class_type": "SafeDIGBundledTextEncode", "inputs": {"text": "a red circle in the center"}},
        "3": {"class_type": "SafeDIGBundledTextEncode", "inputs": {"text": ""}},
        "4": {"class_type": "SafeDIGBundledEmptyLatent", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "5": {"class_type": "SafeDIGLoadDictionary", "inputs": {"pack": pack, "domain": domain}},
        "6": {"class_type": "SafeDIGSteer", "inputs": {**STEER, **steer, "model": ["1", 0], "dictionary": ["5", 0]}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["6", 0], "seed": 1, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"latents/{tag}"}},
    }


def refusal(comfyui: ComfyServer, prompt: dict, node: str) -> tuple[set[str], requests.Response]:
    """The distinct validation messages of `node` in a refused prompt (ComfyUI repeats a node's message
    once per input it validated), and the raw answer."""
    payload = json.dumps({"prompt": prompt, "client_id": comfyui.client_id})  # NaN allowed, as a client may send
    answer = requests.post(comfyui.url + "/prompt", data=payload, headers={"Content-Type": "application/json"},
                           timeout=60)
    assert answer.status_code == 400, answer.text[:2000]
    body = answer.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation", body
    errors = body["node_errors"][node]["errors"]
    return {e["details"].split(" - ", 1)[-1] for e in errors}, answer


def test_load_dictionary_stays_listed_beside_malformed_packs(comfyui):
    for _ in range(2):  # the node list is rebuilt on every page load; a bad file is logged once
        info = comfyui.object_info()
        assert "SafeDIGLoadDictionary" in info and "SafeDIGSteer" in info
    required = comfyui.object_info("SafeDIGLoadDictionary")["input"]["required"]
    packs = required["pack"][1]["options"]
    assert SHIPPED_PACK in packs and GOOD in packs
    assert {f"hostile/{name}" for name in BAD_PACKS} <= set(packs)  # listed, so choosing one explains it
    domains = required["domain"][1]["options"]
    assert domains[:2] == ["(all domains)", "(source)"] and {"hazard", "toxic", "source", "target"} <= set(domains)
    log = comfyui.log_tail(10**7)
    for name in BAD_PACKS:
        lines = [line for line in log.splitlines() if "left out of the domain list" in line and name in line]
        assert len(lines) == 1, (name, lines)


def test_the_shipped_pack_still_runs(comfyui):
    entry = comfyui.run(graph(tag="shipped"))
    latent = comfyui.latent(entry, "8")
    assert latent.shape[0] == 1 and torch.isfinite(latent).all()
    comfyui.run(graph(pack=GOOD, tag="good_beside_bad", mode="Off"))  # a valid pack in the hostile folder


@pytest.mark.parametrize("name", sorted(BAD_PACKS))
def test_choosing_a_bad_pack_gets_one_message_naming_the_file_and_the_fix(comfyui, name):
    messages, _ = refusal(comfyui, graph(pack=f"hostile/{name}"), "5")
    assert len(messages) == 1, messages
    (message,) = messages
    assert f"hostile/{name}: " in message and BAD_PACKS[name] in message and ". Fix: " in message, message


@pytest.mark.parametrize("value,shown", [(12345, "12345 (int)"), ({}, "{} (dict)")])
def test_a_pack_value_that_is_not_a_string_is_named(comfyui, value, shown):
    messages, _ = refusal(comfyui, graph(pack=value), "5")
    (message,) = messages
    assert f"the pack value {shown} is not a pack file name" in message and "Fix: put the .safetensors" in message
    assert "no pack selected" not in message


@pytest.mark.parametrize("steer,expected", [
    (dict(blend_strength=float("nan")), "blend_strength nan is out of range. Fix: use a value in [0, 4"),
    (dict(override_threshold=True, threshold=float("nan")), "threshold nan is not a finite number"),
    (dict(positions=f"{POSITION}, {POSITION}"), f"'{POSITION}' are listed more than once"),
])
def test_hostile_steer_values_are_refused_by_input_name_before_the_run(comfyui, steer, expected):
    messages, _ = refusal(comfyui, graph(**steer), "6")
    assert len(messages) == 1 and expected in next(iter(messages)), messages
    assert "tau_override" not in next(iter(messages))


def test_a_huge_positions_string_gets_a_short_answer(comfyui):
    positions = ",".join(f"nope{i}" for i in range(200_000))  # ~1.3 MB
    messages, answer = refusal(comfyui, graph(positions=positions), "6")
    (message,) = messages
    assert "and 199995 more" in message and len(message) < 1000
    assert len(answer.content) < 64_000, len(answer.content)  # was 12.8 MB
