"""SafeDIG's ComfyUI nodes (V3 schema; the API version is resolved in nodes/compat.py). The only package that
imports ComfyUI. When this ComfyUI has no supported V3 API, compat logs why and nothing here is defined."""

from __future__ import annotations

import logging

from . import compat

NODES: list = []

if compat.API is not None:
    from . import packs
    from .build import NODES as BUILD_NODES
    from .combine import NODES as COMBINE_NODES
    from .dictionary import LoadDictionary
    from .report import Report
    from .steer import Steer

    NODES += [LoadDictionary, Steer, Report, *BUILD_NODES, *COMBINE_NODES]
    register_bundled_folder = None
    try:  # the bundled model's nodes must not take the steering nodes down with them
        from . import bundled_io, bundled_model
    except Exception as exc:  # pragma: no cover - reported in ComfyUI's log
        logging.warning("SafeDIG: bundled-model nodes unavailable (%s: %s)", type(exc).__name__, exc)
    else:
        NODES += bundled_model.NODES + bundled_io.NODES
        register_bundled_folder = bundled_model.register_folder

    class SafeDIGExtension(compat.ComfyExtension):
        async def get_node_list(self) -> list:
            return list(NODES)

    async def comfy_entrypoint() -> SafeDIGExtension:
        packs.register_folder()
        packs.register_prompt_folder()
        if register_bundled_folder is not None:
            register_bundled_folder()
        return SafeDIGExtension()
