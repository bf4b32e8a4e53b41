"""SafeDIG's ComfyUI nodes (V3 schema, pinned to comfy_api.v0_0_2). The only package that imports ComfyUI."""

from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

from . import packs
from .dictionary import LoadDictionary
from .report import Report
from .steer import Steer

NODES: list[type[io.ComfyNode]] = [LoadDictionary, Steer, Report]


class SafeDIGExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> SafeDIGExtension:
    packs.register_folder()
    return SafeDIGExtension()
