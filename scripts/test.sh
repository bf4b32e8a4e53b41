#!/usr/bin/env bash
# The project's test command: set up (or reuse) the environment, lint, type-check, run the whole test suite on ComfyUI
# 0.3.75, then run everything that touches ComfyUI again on the oldest release the nodes support (0.3.52).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh --dev
.venv/bin/ruff check .
.venv/bin/mypy   # safedig_core/ and nodes/ ([tool.mypy] in pyproject.toml)
.venv/bin/python -m pytest "$@"
OLD="${SAFEDIG_COMFYUI_OLD:-$ROOT/.comfyui-0.3.52}"
echo "[test] second pass: server and in-process ComfyUI tests on ComfyUI 0.3.52 ($OLD)"
# The browser test is left to the first pass: it drives the frontend package, which differs per release.
SAFEDIG_COMFYUI="$OLD" SAFEDIG_EXPECT_COMFYUI=0.3.52 PYTHONPATH="$OLD/_deps${PYTHONPATH:+:$PYTHONPATH}" \
  exec .venv/bin/python -m pytest "$@" -p no:cacheprovider -m "comfy_server or comfy_inprocess" \
  --deselect tests/test_browser.py
