"""One real ComfyUI server per test session, with SafeDIG linked into its custom_nodes/.

Use it as a pytest plugin, so every test module shares ONE server:

    pytest_plugins = ["comfy_server"]

    def test_x(comfyui):                     # a ComfyServer, started once per session
        result = comfyui.run(prompt)          # POST /prompt, wait on /history, raise on execution errors

The server runs `main.py --cpu --listen 127.0.0.1 --port <free> --base-directory <tmp>` (through a
tiny launcher that also exits when the test process dies); <tmp> holds
custom_nodes/ (links to this repo and to the test-only helper nodes), models/ (test files the session
writes before starting), input/, output/, temp/, user/. It is always killed at the end of the session
(and at interpreter exit), also when a test fails.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = Path(os.environ.get("SAFEDIG_COMFYUI", ROOT / ".comfyui"))
TEST_NODES = Path(__file__).resolve().parent / "comfy_test_nodes" / "safedig_test_only_nodes"
PACK_LINK_NAME = "ComfyUI-SafeDIG"
STARTUP_TIMEOUT_S = float(os.environ.get("SAFEDIG_COMFY_STARTUP_S", 180))
# Runs ComfyUI's main.py as `python main.py ...` would, and exits when its stdin (a pipe from the test
# process) closes: the server cannot outlive a test run that was killed without running its finalizers.
_LAUNCHER = """
import os, runpy, sys, threading
def _watch():
    sys.stdin.buffer.read()
    os._exit(0)
threading.Thread(target=_watch, daemon=True).start()
sys.argv = ["main.py", *sys.argv[1:]]
sys.path.insert(0, os.getcwd())
runpy.run_path("main.py", run_name="__main__")
"""


class PromptError(AssertionError):
    """A prompt was refused (HTTP 400) or failed during execution."""

    def __init__(self, message: str, payload: Any):
        super().__init__(message)
        self.payload = payload


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base: Path, port: int, proc: subprocess.Popen, log_path: Path):
        self.base = base
        self.port = port
        self.proc = proc
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"
        self.client_id = uuid.uuid4().hex

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(cls, base: Path, prepare: Callable[[Path], None] | None = None, extra_args: list[str] | None = None,
              timeout: float = STARTUP_TIMEOUT_S) -> ComfyServer:
        import requests

        if not (COMFYUI_DIR / "main.py").is_file():
            pytest.fail(f"ComfyUI not found at {COMFYUI_DIR}: run scripts/bootstrap.sh (or set SAFEDIG_COMFYUI)")
        for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "custom_nodes" / PACK_LINK_NAME).symlink_to(ROOT, target_is_directory=True)
        (base / "custom_nodes" / TEST_NODES.name).symlink_to(TEST_NODES, target_is_directory=True)
        if prepare is not None:
            prepare(base)
        port = _free_port()
        log_path = base / "comfyui.log"
        cmd = [sys.executable, "-c", _LAUNCHER, "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--disable-auto-launch", "--disable-api-nodes",
               "--disable-metadata", *(extra_args or [])]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        log = open(log_path, "wb")  # noqa: SIM115  (closed in stop())
        proc = subprocess.Popen(cmd, cwd=COMFYUI_DIR, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        server = cls(base, port, proc, log_path)
        server._log = log
        atexit.register(server.stop)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                server.stop()
                pytest.fail(f"ComfyUI exited with code {proc.returncode} during startup:\n{server.log_tail()}")
            try:
                if requests.get(server.url + "/system_stats", timeout=2).status_code == 200:
                    return server
            except requests.RequestException:
                pass
            time.sleep(0.5)
        server.stop()
        pytest.fail(f"ComfyUI did not answer within {timeout:.0f}s:\n{server.log_tail()}")

    def stop(self) -> None:
        """Kill the server's process group (the server and anything it started); idempotent."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, getattr(self, "_log", None)):
            if stream is not None and not stream.closed:
                stream.close()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------ HTTP

    def get(self, path: str, **kw):
        import requests

        r = requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)
        r.raise_for_status()
        return r.json()

    def object_info(self, node: str | None = None) -> dict:
        info = self.get("/object_info" + (f"/{node}" if node else ""))
        return info[node] if node else info

    def submit(self, prompt: dict) -> dict:
        """POST /prompt. Returns the JSON answer; raises PromptError with node_errors on HTTP 400."""
        import requests

        r = requests.post(self.url + "/prompt", json={"prompt": prompt, "client_id": self.client_id}, timeout=60)
        body = r.json()
        if r.status_code != 200:
            raise PromptError(f"prompt refused ({r.status_code}): {json.dumps(body)[:3000]}", body)
        return body

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The /history entry of a finished prompt; PromptError if it failed or was interrupted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                status = entry["status"]
                if status.get("status_str") != "success":
                    msgs = status.get("messages", [])
                    raise PromptError(f"prompt {prompt_id} ended with {status.get('status_str')}: "
                                      f"{json.dumps(msgs)[:4000]}", entry)
                return entry
            if self.proc.poll() is not None:
                raise AssertionError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.1)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout}s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        return self.wait(self.submit(prompt)["prompt_id"], timeout)

    def interrupt(self) -> None:
        import requests

        requests.post(self.url + "/interrupt", timeout=10).raise_for_status()

    def websocket(self):
        import websocket

        ws = websocket.WebSocket()
        ws.connect(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=30)
        return ws

    # ------------------------------------------------------------------ outputs

    def ui_outputs(self, entry: dict, node_id: str) -> dict:
        return entry["outputs"].get(str(node_id), {})

    def ui_text(self, entry: dict, node_id: str) -> str:
        text = self.ui_outputs(entry, node_id).get("text", [])
        return "".join(text)

    def output_file(self, item: dict) -> Path:
        folder = {"output": "output", "temp": "temp", "input": "input"}[item.get("type", "output")]
        return self.base / folder / item.get("subfolder", "") / item["filename"]

    def latent(self, entry: dict, node_id: str):
        """The tensor a SaveLatent node wrote, read back from its .latent file."""
        from safetensors.torch import load_file

        items = self.ui_outputs(entry, node_id).get("latents", [])
        assert len(items) == 1, f"SaveLatent {node_id} wrote {items}"
        return load_file(str(self.output_file(items[0])))["latent_tensor"]

    def images(self, entry: dict, node_id: str):
        """The images a node showed (ui images), as uint8 arrays."""
        import numpy as np
        from PIL import Image

        return [np.asarray(Image.open(self.output_file(i)).convert("RGB"))
                for i in self.ui_outputs(entry, node_id).get("images", [])]


# -------------------------------------------------------------------------------- pytest plugin

_PREPARERS: list[Callable[[Path], None]] = []


def register_preparer(fn: Callable[[Path], None]) -> Callable[[Path], None]:
    """Register a function that writes files into the server's base directory before it starts."""
    _PREPARERS.append(fn)
    return fn


def start_test_server(base: Path) -> ComfyServer:
    """A server on `base` with every registered preparer's files and an extra_model_paths.yaml that adds
    base/extra_packs as a `safedig` folder (the session fixture; benchmarks call it directly)."""

    def prepare(b: Path) -> None:
        for fn in _PREPARERS:
            fn(b)

    extra = base / "extra_model_paths.yaml"
    extra_packs = base / "extra_packs"
    extra_packs.mkdir()
    extra.write_text(f"safedig_test:\n    safedig: {extra_packs}\n")
    return ComfyServer.start(base, prepare, ["--extra-model-paths-config", str(extra)])


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory) -> ComfyServer:
    server = start_test_server(tmp_path_factory.mktemp("comfy_base"))
    try:
        yield server
    finally:
        server.stop()
