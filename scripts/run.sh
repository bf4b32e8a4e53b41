#!/usr/bin/env bash
# The project's run command: set up (or reuse) the environment, link SafeDIG into ComfyUI's custom_nodes,
# and start ComfyUI on 127.0.0.1 with the bundled model and packs where the nodes find them.
# Usage: scripts/run.sh [--port N] [extra ComfyUI args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT=8188
if [[ "${1:-}" == "--port" ]]; then PORT="$2"; shift 2; fi
bash "$ROOT/scripts/bootstrap.sh"
COMFY="${SAFEDIG_COMFYUI:-$ROOT/.comfyui}"
ln -sfn "$ROOT" "$COMFY/custom_nodes/SafeDIG"
echo "[run] ComfyUI with SafeDIG: http://127.0.0.1:$PORT"
cd "$COMFY"
exec "$ROOT/.venv/bin/python" main.py --cpu --listen 127.0.0.1 --port "$PORT" --disable-auto-launch "$@"
