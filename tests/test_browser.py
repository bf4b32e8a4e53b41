"""The run command end to end, on the real ComfyUI 0.3.75 with its real frontend:

- `bash scripts/run.sh --headless` starts ComfyUI, writes the before/after grid and exits, stopping ComfyUI;
  a missing shipped pack or model stops it first with the file and the command that builds it;
- a real browser, Debian's chromium (/usr/bin/chromium, headless, driven by playwright), against the server that
  `bash scripts/run.sh --port P --base-directory TMP` starts: the page loads, the bundled-model workflow is
  opened from the template browser, the SafeDIG Steer mode widget is switched Off -> Blend on the canvas, the
  Run button queues the prompt, and the output image appears in the page; a screenshot is saved
  (tmp folder; also to $SAFEDIG_SCREENSHOT_DIR when set);
- scripts/comfy_workflow.py converts every workflow exactly as the frontend does (`app.graphToPrompt()`).

Every server this module starts runs in its own process group and is killed when its test ends. The shipped
bundled model and pack are used when both exist, else random-weight stand-ins under the shipped names
(tests/test_workflows.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from test_workflows import NAMES, load, write_bundled_stand_ins

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import comfy_workflow as cw  # noqa: E402
import headless  # noqa: E402
from make_workflows import CHROMIUM, CHROMIUM_ARGS, free_port, run_command_server  # noqa: E402

pytestmark = pytest.mark.comfy_server
MODULE = "SafeDIG"  # the custom_nodes link run.sh makes: the template browser's category


def fresh_base(tmp_path: Path) -> Path:
    base = tmp_path / "comfy_home"
    for sub in ("models/safedig", "models/safedig_bundled"):
        (base / sub).mkdir(parents=True)
    write_bundled_stand_ins(base / "models")
    return base


def answers(url: str) -> bool:
    try:
        cw.fetch_json(url + "/system_stats", timeout=2)
    except OSError:
        return False
    return True


# ------------------------------------------------------------------------------------------ headless


def test_headless_run_writes_the_grid_and_stops_comfyui(tmp_path):
    base, out, port = fresh_base(tmp_path), tmp_path / "grid", free_port()
    t0 = time.monotonic()
    done = subprocess.run(["bash", str(ROOT / "scripts" / "run.sh"), "--headless", "--port", str(port),
                           "--base-directory", str(base), "--output", str(out)],
                          capture_output=True, text=True, timeout=600, start_new_session=True)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert f"wrote {out / 'safedig_grid.png'}" in log
    assert not answers(f"http://127.0.0.1:{port}"), "ComfyUI still running after --headless returned"
    record = json.loads((out / "safedig_grid.json").read_text())
    assert record["modes"] == ["Off", "Blend", "Repel", "Both"]
    assert [r["concept"] for r in record["rows"]] == list(headless.ROW_CONCEPTS)
    for row in record["rows"]:
        assert row["diff"]["Off"] == 0
        for mode, name in row["files"].items():
            assert Image.open(out / name).size == (256, 256), (row["concept"], mode)
    # Steering changes some picture (the stand-in pack fires everywhere; the shipped one on hazard prompts).
    assert max(r["diff"]["Blend"] for r in record["rows"]) > 0.5
    grid = Image.open(out / "safedig_grid.png")
    cell = headless.CELL + 6
    assert grid.size == (120 + 4 * cell + 6, 28 + len(headless.ROW_CONCEPTS) * cell + 6)
    print(f"headless run: {time.monotonic() - t0:.0f} s")


def test_headless_names_the_missing_pack_and_model_and_how_to_build_them(tmp_path):
    empty = tmp_path / "empty_home"
    empty.mkdir()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "headless.py"), "--output", str(tmp_path / "o"),
                           "--pack", "no_such_pack.safetensors", "--weights", "no_such_model.safetensors", "--",
                           "--base-directory", str(empty)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "dictionaries/no_such_pack.safetensors" in done.stderr and "safedig_core build-pack" in done.stderr
    assert ("safedig_core/bundled/assets/no_such_model.safetensors" in done.stderr
            and "safedig_core build-bundled --install" in done.stderr)
    assert not (tmp_path / "o").exists(), "nothing is started or written when an asset is missing"


# ------------------------------------------------------------------------------------------ browser


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, base): the run command's server on a fresh base directory, killed after this module."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `bash scripts/bootstrap.sh --dev` installs Debian's chromium")
    base = fresh_base(tmp_path_factory.mktemp("browser"))
    with run_command_server(base) as url:
        deadline = time.monotonic() + 30
        while "[run] ready after" not in (base / "run.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"ComfyUI with SafeDIG at {url}" in (base / "run.log").read_text(), "run.sh printed no URL"
        yield url, base


@pytest.fixture(scope="module")
def browser(served):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


STEER_MODE_POINT_JS = """() => {
  const node = app.graph.nodes.find(n => n.type === 'SafeDIGSteer');
  const w = node.widgets.find(w => w.name === 'mode');
  const h = w.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT;
  const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] / 2, node.pos[1] + w.y + h / 2]);
  const r = app.canvas.canvas.getBoundingClientRect();
  const px = r.left + x, py = r.top + y;
  return {x: px, y: py, onCanvas: document.elementFromPoint(px, py) === app.canvas.canvas, value: w.value};
}"""

SAVED_IMAGE_JS = """() => {
  const n = app.graph.nodes.find(n => n.type === 'SaveImage');
  const img = n && n.imgs && n.imgs[0];
  return img && img.complete && img.naturalWidth > 0 ? {src: img.src, width: img.naturalWidth} : null;
}"""


def test_browser_opens_the_bundled_workflow_switches_to_blend_and_shows_the_image(served, browser, tmp_path):
    url, base = served
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    thumbnails: set[str] = set()  # the template browser fetches them and shows blob: copies
    page.on("response", lambda r: thumbnails.add(r.url) if r.url.endswith(".jpg") and r.ok else None)
    try:
        page.goto(url)
        page.wait_for_function("window.app && window.app.graph && window.app.canvas", timeout=120_000)

        # Open the workflow from the template browser (the first run opens it by itself; else its sidebar button).
        dialog = page.locator(".p-dialog")
        try:
            dialog.wait_for(timeout=5000)
        except PlaywrightTimeout:
            page.get_by_role("button", name="Templates", exact=True).click()
        dialog.get_by_text(MODULE, exact=True).first.click()
        card = dialog.locator("[data-testid=template-workflow-safedig_bundled_model]")
        card.locator("img").first.wait_for()
        wanted = f"{url}/api/workflow_templates/{MODULE}/safedig_bundled_model.jpg"
        deadline = time.monotonic() + 15
        while wanted not in thumbnails and time.monotonic() < deadline:
            page.wait_for_timeout(200)
        assert wanted in thumbnails, sorted(thumbnails)
        card.click()
        page.wait_for_function("app.graph.nodes.some(n => n.type === 'SafeDIGSteer')", timeout=30_000)
        dialog.wait_for(state="hidden")
        assert sorted(n["type"] for n in page.evaluate("app.graph.serialize().nodes")) == sorted(
            n["type"] for n in load("safedig_bundled_model")["nodes"])

        # Switch the mode widget Off -> Blend with the mouse: click it on the canvas, pick Blend from its menu.
        point = page.evaluate(STEER_MODE_POINT_JS)
        assert point["value"] == "Off" and point["onCanvas"], point
        page.mouse.click(point["x"], point["y"])
        menu = page.locator(".litecontextmenu .litemenu-entry")
        menu.first.wait_for()
        assert [menu.nth(i).inner_text() for i in range(menu.count())] == ["Off", "Blend", "Repel", "Both"]
        menu.filter(has_text="Blend").first.click()
        assert page.evaluate(STEER_MODE_POINT_JS)["value"] == "Blend"

        # Queue with the Run button; the output image must appear in the SaveImage node.
        before = set(cw.fetch_json(url + "/history"))
        page.get_by_role("button", name="Run", exact=True).click()
        page.wait_for_function(SAVED_IMAGE_JS, timeout=180_000)
        shown = page.evaluate(SAVED_IMAGE_JS)
        assert shown["width"] == 256 and "SafeDIG_bundled_" in shown["src"]
        page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.Canvas.FitView'); }")
        time.sleep(1)
        shot = tmp_path / "browser_e2e.png"
        page.screenshot(path=str(shot))
        if os.environ.get("SAFEDIG_SCREENSHOT_DIR"):
            shutil.copy(shot, Path(os.environ["SAFEDIG_SCREENSHOT_DIR"]) / "browser_e2e.png")
    finally:
        page.close()
    assert Image.open(shot).size == (1600, 1000)

    # The server ran exactly that: one new prompt, with the Steer node at Blend, whose image is the one shown.
    history = cw.fetch_json(url + "/history")
    new = [h for pid, h in history.items() if pid not in before]
    assert len(new) == 1 and new[0]["status"]["status_str"] == "success"
    prompt = new[0]["prompt"][2]
    assert [n["inputs"]["mode"] for n in prompt.values() if n["class_type"] == "SafeDIGSteer"] == ["Blend"]
    saved = [i for out in new[0]["outputs"].values() for i in out.get("images", []) if i["type"] == "output"]
    assert len(saved) == 1 and f"filename={saved[0]['filename']}" in shown["src"]
    image = np.asarray(Image.open(base / "output" / saved[0]["filename"]))
    assert image.shape[:2] == (256, 256)
    assert not errors, errors


def test_converter_matches_the_frontends_own_conversion(served, browser):
    url, _ = served
    info = cw.fetch_object_info(url)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    try:
        page.goto(url)
        page.wait_for_function("window.app && window.app.graph && window.app.canvas", timeout=120_000)
        for name in NAMES:
            workflow = load(name)
            page.evaluate("(wf) => app.loadGraphData(wf)", workflow)
            theirs = json.loads(page.evaluate("async () => JSON.stringify((await app.graphToPrompt()).output)"))
            ours = cw.ui_to_api(workflow, info)
            assert sorted(theirs) == sorted(ours), name
            for node_id, node in theirs.items():
                declared = {n for n, _, _ in cw.input_specs(info[node["class_type"]])}
                # Widgets that frontend extensions add (PreviewAny's "preview") are not server inputs.
                theirs_inputs = {k: v for k, v in node["inputs"].items() if k in declared}
                assert node["class_type"] == ours[node_id]["class_type"]
                assert theirs_inputs == ours[node_id]["inputs"], (name, node_id)
    finally:
        page.close()
