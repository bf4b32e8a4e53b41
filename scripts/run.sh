#!/usr/bin/env bash
# The project's run command: set up (or reuse) the environment, link SafeDIG into ComfyUI's custom_nodes,
# make the model folders the nodes search, and start ComfyUI on 127.0.0.1; prints the URL once it answers.
#
#   bash scripts/run.sh                       ComfyUI with SafeDIG on http://127.0.0.1:8188 (Ctrl+C stops it)
#   bash scripts/run.sh --port 8190           another port
#   bash scripts/run.sh --headless            no browser: queue the bundled-model workflow for Off / Blend /
#                                             Repel / Both, write a before/after grid to outputs/headless/, exit
#   bash scripts/run.sh --headless --output DIR
#   bash scripts/run.sh --base-directory DIR  ComfyUI's --base-directory (custom_nodes/, models/, output/,
#                                             user/ under DIR instead of .comfyui/); used by the tests
#   bash scripts/run.sh -- --preview-method auto   anything after -- goes to ComfyUI's main.py
#
# The first run installs .venv/ and .comfyui/ (scripts/bootstrap.sh); later runs only check them.
# The bundled model (safedig_core/bundled/assets/) and the shipped packs (dictionaries/) are found by the nodes in
# place; packs of your own go in <ComfyUI>/models/safedig/, bundled-model checkpoints in models/safedig_bundled/.
# Device: CPU unless `nvidia-smi` finds a GPU; SAFEDIG_DEVICE=cpu|gpu overrides.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SAFEDIG_VENV:-$ROOT/.venv}"
COMFY="${SAFEDIG_COMFYUI:-$ROOT/.comfyui}"
PORT=""
HEADLESS=0
OUTPUT="$ROOT/outputs/headless"
BASE=""
EXTRA=()
usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while (($#)); do
  case "$1" in
    --port) PORT="$2"; shift 2 ;;
    --headless) HEADLESS=1; shift ;;
    --output) OUTPUT="$2"; shift 2 ;;
    --base-directory) BASE="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) echo "[run] unknown option $1 (ComfyUI options go after --)" >&2; usage >&2; exit 2 ;;
  esac
done

T0=$SECONDS
bash "$ROOT/scripts/bootstrap.sh"
PY="$VENV/bin/python"

# Where this ComfyUI keeps custom_nodes/ and models/: --base-directory, else the ComfyUI folder itself.
HOME_DIR="${BASE:-$COMFY}"
mkdir -p "$HOME_DIR"/{custom_nodes,models/safedig,models/safedig_bundled,input,output,temp,user}
ln -sfn "$ROOT" "$HOME_DIR/custom_nodes/SafeDIG"

WEIGHTS="$ROOT/safedig_core/bundled/assets/bundled_flux.safetensors"
if [[ -f "$WEIGHTS" && -f "${WEIGHTS%.safetensors}.json" ]]; then
  echo "[run] bundled model: ${WEIGHTS#"$ROOT"/}"
else
  echo "[run] bundled model not built yet (${WEIGHTS#"$ROOT"/}): build it with" \
       "'.venv/bin/python -m safedig_core build-bundled --install'" >&2
fi
shopt -s nullglob
packs=("$ROOT"/dictionaries/*.safetensors)
shopt -u nullglob
if ((${#packs[@]})); then
  echo "[run] shipped packs: ${packs[*]#"$ROOT"/}"
else
  echo "[run] no shipped pack in dictionaries/ yet: build it with '.venv/bin/python -m safedig_core build-pack --positions single.0.out --blend-target anchor'" >&2
fi

DEVICE_ARGS=()
case "${SAFEDIG_DEVICE:-auto}" in
  cpu) DEVICE_ARGS=(--cpu) ;;
  gpu) ;;
  *) nvidia-smi -L >/dev/null 2>&1 || DEVICE_ARGS=(--cpu) ;;
esac
COMFY_ARGS=(--listen 127.0.0.1 --disable-auto-launch ${DEVICE_ARGS[@]+"${DEVICE_ARGS[@]}"})
[[ -n "$BASE" ]] && COMFY_ARGS+=(--base-directory "$BASE")
COMFY_ARGS+=(${EXTRA[@]+"${EXTRA[@]}"})

if [[ $HEADLESS == 1 ]]; then
  # headless.py checks the assets first, starts ComfyUI itself (a free port unless --port) and always stops it.
  exec "$PY" "$ROOT/scripts/headless.py" --comfyui "$COMFY" --port "${PORT:-0}" --output "$OUTPUT" \
    -- "${COMFY_ARGS[@]}"
fi

PORT="${PORT:-8188}"
URL="http://127.0.0.1:$PORT"
cd "$COMFY"
"$PY" main.py --port "$PORT" "${COMFY_ARGS[@]}" &
SERVER=$!
trap 'kill -TERM "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' INT TERM
until "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$URL/system_stats" \
      2>/dev/null; do
  if ! kill -0 "$SERVER" 2>/dev/null; then
    wait "$SERVER" && rc=0 || rc=$?
    echo "[run] ComfyUI exited (code $rc) before it answered on $URL" >&2
    exit "$((rc == 0 ? 1 : rc))"
  fi
  sleep 1
done
echo "[run] ready after $((SECONDS - T0)) s: ComfyUI with SafeDIG at $URL"
wait "$SERVER"
