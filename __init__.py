"""SafeDIG ComfyUI node pack: position-routed SAE safety steering for FLUX.1 and SD3/SD3.5 DiTs.

ComfyUI loads this file from custom_nodes/. The nodes (and every ComfyUI import) live in `nodes/`; the
core library `safedig_core` imports no ComfyUI, so it and the tests also import without ComfyUI: then
this module defines nothing.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
# The nodes import the core as the top-level package `safedig_core` (one copy per process, shared with
# tools and tests). Appended, so nothing here can shadow ComfyUI's own modules (e.g. its `nodes`).
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

# nodes/compat.py resolves the V3 API (and logs one line when this ComfyUI has none SafeDIG supports);
# outside ComfyUI (no comfy_api) this module defines nothing.
from .nodes import compat  # noqa: E402  (needs the sys.path entry above)

if compat.API is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
else:
    __all__ = []
