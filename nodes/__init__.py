"""SafeDIG's ComfyUI nodes (V3 schema, pinned to comfy_api.v0_0_2). The only package that imports ComfyUI."""

from __future__ import annotations

import logging

from comfy_api.v0_0_2 import ComfyExtension, io

from . import packs
from .dictionary import LoadDictionary
from .report import Report
from .steer import Steer

NODES: list[type[io.ComfyNode]] = [LoadDictionary, Steer, Report]

try:  # the bundled model's nodes must not take the steering nodes down with them
    from . import bundled_model
except Exception as exc:  # pragma: no cover - reported in ComfyUI's log
    logging.warning("SafeDIG: bundled-model nodes unavailable (%s: %s)", type(exc).__name__, exc)
    bundled_model = None
else:
    NODES += bundled_model.NODES


class SafeDIGExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> SafeDIGExtension:
    packs.register_folder()
    if bundled_model is not None:
        bundled_model.register_folder()
    return SafeDIGExtension()
