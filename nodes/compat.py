"""Every behaviour that differs between ComfyUI versions, in one place (the list, with the versions checked:
docs/nodes.md, "ComfyUI compatibility").

- The V3 node API: the newest pinned `comfy_api.v0_0_*` module present that has what the nodes use
  (`io`, `ui`, `ComfyExtension`). `comfy_api.latest` is left out on purpose: it moves with every release.
  None of them: the nodes are not loaded and one log line says which ComfyUI is needed.
- `comfy.ldm.flux.model.FluxParams` is built as `Flux(**kwargs)`: the accepted keywords are the dataclass's own
  fields (0.3.75 has no `txt_ids_dims`, newer releases require it), so `flux_params` passes exactly those.

This module imports no ComfyUI at import time except `comfy_api`, so `__init__.py` can ask it first.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
from types import ModuleType
from typing import Any

from safedig_core.errors import SafeDIGError

# Pinned V3 API versions the nodes are written against, newest first (comfy_api/version_list.py upstream).
SUPPORTED_APIS = ("v0_0_3", "v0_0_2")
# The oldest ComfyUI whose comfy_api.v0_0_2 has every V3 name the nodes use (pyproject.toml requires-comfyui).
MINIMUM_COMFYUI = "0.3.52"
NEWEST_TESTED_COMFYUI = "0.3.75"  # the test command's first pass (scripts/bootstrap.sh)
API_NAMES = ("io", "ui", "ComfyExtension")

# FluxParams fields without a default that older ComfyUI did not have, with the value that reproduces FLUX.1's
# behaviour there: txt_ids_dims = [] keeps every text position id at zero, as 0.3.75 always did.
FLUX1_REQUIRED_DEFAULTS: dict[str, list[int]] = {"txt_ids_dims": []}


def comfyui_version() -> str:
    """The running ComfyUI's version (comfyui_version.py in its folder), or "unknown"."""
    try:
        return str(importlib.import_module("comfyui_version").__version__)
    except (ImportError, AttributeError):
        return "unknown"


def host_label() -> str:
    """How steering errors name the host, e.g. "ComfyUI 0.3.75"."""
    return f"ComfyUI {comfyui_version()}"


def resolve_api(versions: tuple[str, ...] = SUPPORTED_APIS) -> ModuleType | None:
    """The newest `comfy_api.<version>` present that has every name the nodes use, or None."""
    for version in versions:
        try:
            module = importlib.import_module(f"comfy_api.{version}")
        except ImportError:
            continue
        if all(hasattr(module, name) for name in API_NAMES):  # v0_0_3 serves `ui` through __getattr__
            return module
    return None


def missing_api_message(versions: tuple[str, ...] = SUPPORTED_APIS) -> str:
    return (f"SafeDIG: nodes not loaded: ComfyUI {comfyui_version()} has none of the V3 node APIs SafeDIG "
            f"supports ({', '.join('comfy_api.' + v for v in versions)}); SafeDIG needs ComfyUI >= "
            f"{MINIMUM_COMFYUI}: update ComfyUI")


def _load_api() -> ModuleType | None:
    if importlib.util.find_spec("comfy_api") is None:
        return None  # not inside ComfyUI (tools, tests of the core): nothing to say
    api = resolve_api()
    if api is None:
        logging.error(missing_api_message())
    return api


API = _load_api()
# Typed Any: the V3 API is a runtime-resolved module (its classes serve as bases and annotations), and None
# only outside ComfyUI, where no node module is imported.
io: Any = API.io if API is not None else None
ui: Any = API.ui if API is not None else None
ComfyExtension: Any = API.ComfyExtension if API is not None else None


def flux_params(values: dict, params_class: type | None = None) -> dict:
    """Keyword arguments for `comfy.ldm.flux.model.Flux(**kwargs)` from FLUX.1-style `values`, fitted to this
    ComfyUI's FluxParams (or `params_class`): keys it has no field for are dropped, required fields that older
    releases lacked get FLUX1_REQUIRED_DEFAULTS, and any other missing required field is a clear error."""
    if params_class is None:
        from comfy.ldm.flux.model import FluxParams

        params_class = FluxParams
    fields = {f.name: f for f in dataclasses.fields(params_class)}
    kwargs = {k: v for k, v in values.items() if k in fields}
    for name, field in fields.items():
        has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        if name in kwargs or has_default:
            continue
        if name not in FLUX1_REQUIRED_DEFAULTS:
            raise SafeDIGError(f"{host_label()}'s FluxParams requires a field {name!r} that SafeDIG does not know",
                               f"use a ComfyUI release SafeDIG was tested on ({MINIMUM_COMFYUI} to "
                               f"{NEWEST_TESTED_COMFYUI}, docs/nodes.md), and report {host_label()} to SafeDIG")
        kwargs[name] = list(FLUX1_REQUIRED_DEFAULTS[name])
    return kwargs
