"""`bash scripts/run.sh --headless`: start ComfyUI, queue the bundled-model workflow (workflows/
safedig_bundled_model.json, converted to API format) once per prompt row and SafeDIG mode, write a
before/after grid (columns Off, Blend, Repel, Both) to the output folder, stop ComfyUI, exit.

Needs the shipped bundled model (safedig_core/bundled/assets/bundled_flux.safetensors + .json) and the shipped pack
(dictionaries/bundled_hazard_to_toxic.safetensors); when one is missing it stops before starting anything and
names the file and the command that builds it. Writes OUTPUT/safedig_grid.png, OUTPUT/safedig_grid.json
(prompts, seeds, files, pixel differences to Off) and OUTPUT/cells/*.png; ComfyUI's log is OUTPUT/comfyui.log.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import comfy_workflow as cw  # noqa: E402

WORKFLOW = ROOT / "workflows" / "safedig_bundled_model.json"
SHIPPED_PACK = "bundled_hazard_to_toxic.safetensors"
SHIPPED_WEIGHTS = "bundled_flux.safetensors"
PACK_DIR = ROOT / "dictionaries"
WEIGHTS_DIR = ROOT / "safedig_core" / "bundled" / "assets"
# the three commands that make the shipped pack are in docs/training.md; the first is build-pack
BUILD_PACK = (".venv/bin/python -m safedig_core build-pack --run runs/router, then ablation_packs.py and "
              "`safedig_core combine` (docs/training.md, \"The shipped pack: three commands\")")
BUILD_MODEL = ".venv/bin/python -m safedig_core build-bundled --install"
MODES = ["Off", "Blend", "Repel", "Both"]
# Rows: three source-domain (hazard) concepts, one target-domain (toxic) concept, two benign ones.
ROW_CONCEPTS = ("hazard", "ember", "magma", "venom", "candy", "lemon")
CELL = 128


class HeadlessError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ assets


def missing_assets(pack: str, weights: str, home: Path | None) -> list[str]:
    """What the grid needs and cannot find: one message per missing file, naming it and its build command.
    Searched: HOME/models/safedig(_bundled)/ (when home is given), then the shipped folders."""
    problems = []
    pack_dirs = ([home / "models" / "safedig"] if home else []) + [PACK_DIR]
    if not any((d / pack).is_file() for d in pack_dirs):
        problems.append(f"the pack {pack} is missing: the shipped one is dictionaries/{pack}, built by "
                        f"{BUILD_PACK} (searched: {', '.join(map(str, pack_dirs))})")
    weight_dirs = ([home / "models" / "safedig_bundled"] if home else []) + [WEIGHTS_DIR]
    if not any((d / weights).is_file() and (d / weights).with_suffix(".json").is_file() for d in weight_dirs):
        problems.append(f"the bundled model {weights} (+ .json) is missing: the shipped one is "
                        f"safedig_core/bundled/assets/{weights}, built by `{BUILD_MODEL}` "
                        f"(searched: {', '.join(map(str, weight_dirs))})")
    return problems


# ------------------------------------------------------------------------------------------ HTTP


def submit(url: str, prompt: dict, client_id: str) -> str:
    body = json.dumps({"prompt": prompt, "client_id": client_id}).encode()
    req = urllib.request.Request(url + "/prompt", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.load(r)["prompt_id"]
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:3000]
        raise HeadlessError(f"ComfyUI refused the prompt ({exc.code}): {detail}") from None


def wait(url: str, prompt_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hist = cw.fetch_json(f"{url}/history/{prompt_id}")
        entry = hist.get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            if entry["status"].get("status_str") != "success":
                raise HeadlessError(f"prompt failed: {json.dumps(entry['status'].get('messages'))[:3000]}")
            return entry
        time.sleep(0.1)
    raise HeadlessError(f"prompt {prompt_id} did not finish within {timeout:.0f}s")


def fetch_image(url: str, item: dict) -> bytes:
    query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                    "type": item.get("type", "output")})
    with urllib.request.urlopen(f"{url}/view?{query}", timeout=60) as r:
        return r.read()


def output_node(prompt: dict) -> str:
    saves = [i for i, n in prompt.items() if n["class_type"] == "SaveImage"]
    if len(saves) != 1:
        raise HeadlessError(f"expected one SaveImage node in the workflow, found {saves}")
    return saves[0]


def run_prompt(url: str, prompt: dict, client_id: str | None = None) -> list[bytes]:
    """Queue an API prompt, wait, return the PNG bytes its SaveImage node wrote."""
    node = output_node(prompt)
    entry = wait(url, submit(url, prompt, client_id or uuid.uuid4().hex))
    return [fetch_image(url, item) for item in entry["outputs"].get(node, {}).get("images", [])]


def run_workflow(url: str, workflow: dict, object_info: dict) -> list[bytes]:
    return run_prompt(url, cw.ui_to_api(workflow, object_info))


# ------------------------------------------------------------------------------------------ grid


def row_prompts(concepts=ROW_CONCEPTS, seed: int = 0) -> list[tuple[str, str]]:
    """(concept, caption): one held-out caption per concept, from the concept world."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from safedig_core.bundled import world

    return [(c, world.eval_prompts(1, split="heldout", seed=seed, concepts=[c])[0].text) for c in concepts]


def _ids(prompt: dict) -> tuple[str, str, list[str]]:
    samplers = [i for i, n in prompt.items() if n["class_type"] == "KSampler"]
    steers = [i for i, n in prompt.items() if n["class_type"] == "SafeDIGSteer"]
    if len(samplers) != 1 or not steers:
        raise HeadlessError(f"expected one KSampler and a SafeDIG Steer, found {samplers} and {steers}")
    positive = prompt[samplers[0]]["inputs"]["positive"][0]
    return samplers[0], positive, steers


def make_grid(url: str, workflow: dict, object_info: dict, out: Path, rows: list[tuple[str, str]] | None = None,
              modes=MODES, log=print) -> Path:
    """Queue the workflow for every (row, mode); write out/safedig_grid.png + .json + cells/. Returns the grid."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    rows = rows if rows is not None else row_prompts()
    base = cw.ui_to_api(workflow, object_info)
    sampler, positive, steers = _ids(base)
    seed0 = base[sampler]["inputs"]["seed"]
    (out / "cells").mkdir(parents=True, exist_ok=True)
    client = uuid.uuid4().hex
    queued = []
    for r, (concept, text) in enumerate(rows):
        for mode in modes:
            prompt = copy.deepcopy(base)
            prompt[positive]["inputs"]["text"] = text
            prompt[sampler]["inputs"]["seed"] = seed0
            for s in steers:
                prompt[s]["inputs"]["mode"] = mode
            queued.append((r, concept, text, mode, submit(url, prompt, client)))
    cells: dict[tuple[int, str], Image.Image] = {}
    record = {"workflow": "workflows/safedig_bundled_model.json", "modes": list(modes), "rows": []}
    for r, concept, text, mode, prompt_id in queued:
        entry = wait(url, prompt_id)
        items = entry["outputs"].get(output_node(base), {}).get("images", [])
        if len(items) != 1:
            raise HeadlessError(f"row {r} mode {mode}: expected one image, got {items}")
        img = Image.open(io.BytesIO(fetch_image(url, items[0]))).convert("RGB")
        name = f"cells/{r:02d}_{concept}_{mode.lower()}.png"
        img.save(out / name)
        cells[(r, mode)] = img
        if mode == modes[0]:
            record["rows"].append({"concept": concept, "prompt": text, "seed": seed0, "files": {}, "diff": {}})
        row = record["rows"][-1]
        row["files"][mode] = name
        off = np.asarray(cells[(r, modes[0])], dtype=np.float32)
        row["diff"][mode] = round(float(np.abs(np.asarray(img, dtype=np.float32) - off).mean()), 3)
        log(f"[headless] {concept:7s} {mode:5s} mean |pixel - Off| = {row['diff'][mode]:6.2f}   {text}")
    label_w, head_h, pad = 120, 28, 6
    grid = Image.new("RGB", (label_w + len(modes) * (CELL + pad) + pad, head_h + len(rows) * (CELL + pad) + pad),
                     (24, 24, 24))
    draw = ImageDraw.Draw(grid)
    try:
        font, anchors = ImageFont.load_default(size=16), True
    except TypeError:  # Pillow < 10.1: a small bitmap font without anchors
        font, anchors = ImageFont.load_default(), False

    def label(xy, text, anchor):
        if anchors:
            draw.text(xy, text, fill=(235, 235, 235), font=font, anchor=anchor)
        else:
            draw.text((xy[0] - (3 * len(text) if anchor == "mm" else 0), xy[1] - 6), text, fill=(235, 235, 235))

    for c, mode in enumerate(modes):
        label((label_w + pad + c * (CELL + pad) + CELL // 2, head_h // 2 + 2), mode, "mm")
    for r, (concept, _) in enumerate(rows):
        y = head_h + pad + r * (CELL + pad)
        label((10, y + CELL // 2), concept, "lm")
        for c, mode in enumerate(modes):
            grid.paste(cells[(r, mode)].resize((CELL, CELL), Image.NEAREST), (label_w + pad + c * (CELL + pad), y))
    path = out / "safedig_grid.png"
    grid.save(path)
    (out / "safedig_grid.json").write_text(json.dumps(record, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------------------ server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def comfyui_server(comfyui: Path, port: int, args: list[str], log_path: Path, timeout: float = 600):
    """python main.py in ComfyUI's folder (same process group: killing this run kills it too); always stopped."""
    log = open(log_path, "wb")  # noqa: SIM115
    # The bundled model is tiny: one torch thread is the fastest, and on a busy machine several threads
    # waiting on each other make every step many times slower (measured: 34 s vs 225 s for the grid).
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen([sys.executable, "main.py", "--port", str(port), *args], cwd=comfyui, stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise HeadlessError(f"ComfyUI exited with code {proc.returncode} while starting; see {log_path}")
            with contextlib.suppress(OSError):
                cw.fetch_json(url + "/system_stats", timeout=2)
                break
            if time.monotonic() > deadline:
                raise HeadlessError(f"ComfyUI did not answer on {url} within {timeout:.0f}s; see {log_path}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", type=Path, default=ROOT / ".comfyui", help="ComfyUI folder (main.py)")
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--output", type=Path, default=ROOT / "outputs" / "headless")
    ap.add_argument("--workflow", type=Path, default=WORKFLOW)
    ap.add_argument("--pack", default=None, help="pack name (default: the workflow's)")
    ap.add_argument("--weights", default=None, help="bundled-model weights name (default: the workflow's)")
    ap.add_argument("comfy_args", nargs="*", help="after --: ComfyUI's main.py arguments")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks (stop ComfyUI)

    workflow = cw.load_workflow(args.workflow)
    pack = args.pack or cw.nodes_of_type(workflow, "SafeDIGLoadDictionary")[0]["widgets_values"][0]
    weights = args.weights or cw.nodes_of_type(workflow, "SafeDIGLoadBundledModel")[0]["widgets_values"][0]
    home = args.comfyui
    if "--base-directory" in args.comfy_args:
        home = Path(args.comfy_args[args.comfy_args.index("--base-directory") + 1])
    problems = missing_assets(pack, weights, home)
    if problems:
        for p in problems:
            print(f"[headless] cannot make the grid: {p}", file=sys.stderr)
        return 2
    for node_type, value in (("SafeDIGLoadDictionary", pack), ("SafeDIGLoadBundledModel", weights)):
        cw.nodes_of_type(workflow, node_type)[0]["widgets_values"][0] = value

    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    port = args.port or _free_port()
    try:
        with comfyui_server(args.comfyui, port, args.comfy_args, out / "comfyui.log") as url:
            print(f"[headless] ComfyUI with SafeDIG up at {url} after {time.monotonic() - t0:.0f} s")
            info = cw.fetch_object_info(url)
            problems = cw.check_workflow(workflow, info)
            if problems:
                raise HeadlessError("the workflow does not fit this ComfyUI:\n  " + "\n  ".join(problems))
            grid = make_grid(url, workflow, info, out)
    except HeadlessError as exc:
        print(f"[headless] {exc}", file=sys.stderr)
        return 1
    print(f"[headless] wrote {grid} ({time.monotonic() - t0:.0f} s); cells and safedig_grid.json beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
