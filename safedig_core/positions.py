"""Canonical intervention positions and where each backend computes them.

A position id names one module output inside one transformer block, the same for every backend that
runs the architecture (docs/method.md section 1):

    flux:  input.txt   double.{i}.{img|txt}.{attn|mlp}   single.{j}.out
    sd3:   input.txt   joint.{i}.{img|txt}.{attn|mlp}    (the last joint block has no text-stream outputs)

`input.txt` is the DiT's own text input projection (ComfyUI Flux `txt_in`, MMDiT `context_embedder`,
diffusers `context_embedder`): [batch, text tokens, d_model] like any block output, but every later
block inherits its change. The block positions are `ModelPositions.ids`, the input projections
`input_ids`; collection and routing consider both (`candidates`), and every id of either kind is in
`modules`, so packs, hooks and the nodes treat them alike.

The pooled-text projection (ComfyUI Flux `vector_in`, MMDiT `y_embedder`, diffusers
`time_text_embed.text_embedder`) is resolved too (`ModelPositions.pooled`, key `input.vec`) but is not a
position id: its output is [batch, d_model], no token axis, which steering, collection and the Report
do not handle yet. It is the prompt-dependent part of the conditioning vector in every backend (ComfyUI
adds it to `time_in(t)` (+ `guidance_in`), diffusers' `time_text_embed` returns the same sum), so
patching it equals patching the whole vector at an equal timestep and guidance.

Each backend maps ids to module paths. The ids of a model are derived from the model itself (block
counts, which sub-modules exist), never from hard-coded depths, so FLUX.1 Dev (19 + 38 blocks) and
SD3.5 Large (38 joint blocks) come out right, and so does any tiny test model of the same classes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeGuard, cast

from torch import nn

from .errors import ArchitectureError


@dataclass(frozen=True)
class Architecture:
    """A DiT family whose position ids SafeDIG knows; packs name one of these."""

    key: str
    description: str
    id_pattern: re.Pattern


ARCHITECTURES: dict[str, Architecture] = {
    "flux": Architecture(
        "flux", "FLUX.1 (double-stream + single-stream blocks)",
        re.compile(r"^(input\.txt|double\.\d+\.(img|txt)\.(attn|mlp)|single\.\d+\.out)$"),
    ),
    "sd3": Architecture(
        "sd3", "Stable Diffusion 3 / 3.5 MMDiT (joint blocks)",
        re.compile(r"^(input\.txt|joint\.\d+\.(img|txt)\.(attn|mlp))$"),
    ),
}


def get_architecture(key: str) -> Architecture:
    try:
        return ARCHITECTURES[key]
    except KeyError:
        raise ArchitectureError(
            f"unknown architecture {key!r}", f"use one of {sorted(ARCHITECTURES)}"
        ) from None


@dataclass(frozen=True)
class BlockGroup:
    """One list of blocks in a backend: the container attribute, the id prefix, and per site the
    module path (the module whose output is the activation) and the Linear that ends it (its weight
    key gives the width when only a state dict is at hand)."""

    container: str
    id_prefix: str
    sites: tuple[tuple[str, str, str], ...]  # (site id suffix, module path, output Linear path)


@dataclass(frozen=True)
class Backend:
    """How one implementation of an architecture lays out its modules."""

    name: str
    architecture: str
    class_ids: tuple[str, ...]  # "module:QualName" of the classes this backend handles
    groups: tuple[BlockGroup, ...]
    inputs: tuple[tuple[str, str], ...]  # (input position id, module path on the DiT)
    pooled_input: str  # module path of the pooled-text projection (ModelPositions.pooled["input.vec"])


_FLUX_SITES_COMFY = (
    ("img.attn", "img_attn.proj", "img_attn.proj"),
    ("txt.attn", "txt_attn.proj", "txt_attn.proj"),
    ("img.mlp", "img_mlp", "img_mlp.2"),
    ("txt.mlp", "txt_mlp", "txt_mlp.2"),
)
_DIFFUSERS_JOINT_SITES = (
    ("img.attn", "attn.to_out.0", "attn.to_out.0"),
    ("txt.attn", "attn.to_add_out", "attn.to_add_out"),
    ("img.mlp", "ff", "ff.net.2"),
    ("txt.mlp", "ff_context", "ff_context.net.2"),
)

BACKENDS: tuple[Backend, ...] = (
    Backend(
        "comfy.flux", "flux", ("comfy.ldm.flux.model:Flux",),
        (
            BlockGroup("double_blocks", "double", _FLUX_SITES_COMFY),
            BlockGroup("single_blocks", "single", (("out", "linear2", "linear2"),)),
        ),
        (("input.txt", "txt_in"),), "vector_in",
    ),
    Backend(
        "comfy.mmdit", "sd3", ("comfy.ldm.modules.diffusionmodules.mmdit:MMDiT",),
        (
            BlockGroup("joint_blocks", "joint", (
                ("img.attn", "x_block.attn.proj", "x_block.attn.proj"),
                ("txt.attn", "context_block.attn.proj", "context_block.attn.proj"),
                ("img.mlp", "x_block.mlp", "x_block.mlp.fc2"),
                ("txt.mlp", "context_block.mlp", "context_block.mlp.fc2"),
            )),
        ),
        (("input.txt", "context_embedder"),), "y_embedder",
    ),
    Backend(
        "diffusers.flux", "flux",
        ("diffusers.models.transformers.transformer_flux:FluxTransformer2DModel",),
        (
            BlockGroup("transformer_blocks", "double", _DIFFUSERS_JOINT_SITES),
            BlockGroup("single_transformer_blocks", "single", (("out", "proj_out", "proj_out"),)),
        ),
        (("input.txt", "context_embedder"),), "time_text_embed.text_embedder",
    ),
    Backend(
        "diffusers.sd3", "sd3",
        ("diffusers.models.transformers.transformer_sd3:SD3Transformer2DModel",),
        (BlockGroup("transformer_blocks", "joint", _DIFFUSERS_JOINT_SITES),),
        (("input.txt", "context_embedder"),), "time_text_embed.text_embedder",
    ),
)

# Wrappers that hold the DiT: ComfyUI's ModelPatcher (.model) and BaseModel (.diffusion_model),
# diffusers pipelines (.transformer).
_WRAPPER_ATTRS = ("diffusion_model", "transformer", "model")


@dataclass(frozen=True)
class ModelPositions:
    """The positions of one concrete model: id -> module (input projections, then blocks, in canonical
    order), and the pooled-text projection, which is not a position id (module docstring)."""

    backend: Backend
    d_model: int
    modules: Mapping[str, nn.Module]
    block_counts: Mapping[str, int]
    input_ids: tuple[str, ...] = ()
    pooled: Mapping[str, nn.Module] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return self.backend.architecture

    @property
    def ids(self) -> list[str]:
        """The block positions."""
        return [p for p in self.modules if p not in self.input_ids]

    @property
    def candidates(self) -> list[str]:
        """What collection and routing consider when given no positions: the input projections, then the
        block positions (the router found the text input projection the most steerable position)."""
        return [*self.input_ids, *self.ids]

    def describe(self) -> str:
        counts = ", ".join(f"{n} {prefix}" for prefix, n in self.block_counts.items())
        return f"{self.architecture} (d_model {self.d_model}; {counts} blocks; backend {self.backend.name})"


def _class_ids(obj: object) -> set[str]:
    return {f"{cls.__module__}:{cls.__qualname__}" for cls in type(obj).__mro__}


def find_backend(model: object) -> tuple[Backend, nn.Module]:
    """The backend for `model` and the DiT module itself (unwrapping ComfyUI/diffusers holders)."""
    seen = []
    current = model
    for _ in range(len(_WRAPPER_ATTRS) + 1):
        ids = _class_ids(current)
        for backend in BACKENDS:
            if ids.intersection(backend.class_ids):
                return backend, cast(nn.Module, current)
        seen.append(f"{type(current).__module__}.{type(current).__qualname__}")
        inner = next((getattr(current, a) for a in _WRAPPER_ATTRS if getattr(current, a, None) is not None), None)
        if inner is None:
            break
        current = inner
    children = [name for name, _ in current.named_children()][:8] if isinstance(current, nn.Module) else []
    supported = ", ".join(cid.split(":")[1] for b in BACKENDS for cid in b.class_ids)
    raise ArchitectureError(
        f"unsupported model: found {' -> '.join(seen)}"
        + (f" with children {children}" if children else ""),
        f"SafeDIG steers FLUX.1 and SD3/SD3.5 DiTs ({supported}); connect one of those models",
    )


def _get(module: nn.Module, path: str) -> nn.Module | None:
    """The sub-module at a dotted path, or None where the block lacks it (e.g. a pre-only text stream)."""
    current: nn.Module | None = module
    for part in path.split("."):
        current = getattr(current, part, None) if not part.isdigit() else _index(current, int(part))
        if current is None:
            return None
    return current


def _index(module: nn.Module | None, i: int) -> nn.Module | None:
    try:
        return module[i]  # type: ignore[index]
    except (TypeError, IndexError):
        return None


def _has_linear(module: nn.Module | None) -> TypeGuard[nn.Module]:
    return module is not None and any(isinstance(m, nn.Linear) for m in module.modules())


def _output_width(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ArchitectureError(f"no Linear layer inside {type(module).__name__}", "report this model class")
    return linears[-1].out_features


def resolve(model: object) -> ModelPositions:
    """Every position of `model` (a DiT, a ComfyUI BaseModel/ModelPatcher, or a diffusers pipeline)."""
    backend, dit = find_backend(model)
    # An input projection counts only where the model has one with weights (ComfyUI's MMDiT may hold an
    # Identity as its context_embedder; Flux variants without pooled text have no vector_in).
    modules: dict[str, nn.Module] = {
        pid: module for pid, path in backend.inputs if _has_linear(module := _get(dit, path))}
    input_ids = tuple(modules)
    pooled = _get(dit, backend.pooled_input)
    counts: dict[str, int] = {}
    for group in backend.groups:
        blocks = getattr(dit, group.container, None)
        if blocks is None:
            raise ArchitectureError(
                f"{type(dit).__name__} has no '{group.container}'", "this model version is not supported"
            )
        counts[group.id_prefix] = len(blocks)
        for i, block in enumerate(blocks):
            for site, path, _ in group.sites:
                module = _get(block, path)
                if module is not None:
                    modules[f"{group.id_prefix}.{i}.{site}"] = module
    widths = {pid: _output_width(m) for pid, m in modules.items()}
    if len(widths) == len(input_ids):
        raise ArchitectureError(f"{type(dit).__name__} has no blocks", "connect a model with transformer blocks")
    if len(set(widths.values())) != 1:
        raise ArchitectureError(f"positions have different widths {sorted(set(widths.values()))}", None)
    return ModelPositions(backend, next(iter(widths.values())), modules, counts, input_ids,
                          {"input.vec": pooled} if _has_linear(pooled) else {})


def positions_from_state_dict(shapes: Mapping[str, Iterable[int]]) -> tuple[str, str, int, list[str]]:
    """(architecture, backend name, d_model, ids) of a checkpoint, from its tensor names and shapes alone.

    Accepts ComfyUI (`model.diffusion_model.` prefix or none) and diffusers key layouts.
    """
    for backend in BACKENDS:
        first = backend.groups[0]
        probe = re.compile(rf"^(.*?){re.escape(first.container)}\.0\.{re.escape(first.sites[0][2])}\.weight$")
        prefix = next((m.group(1) for k in shapes if (m := probe.match(k))), None)
        # Every block list must be there: diffusers' Flux and SD3 share the `transformer_blocks` layout.
        if prefix is None or not all(any(k.startswith(f"{prefix}{g.container}.0.") for k in shapes)
                                     for g in backend.groups):
            continue
        ids, width = [], None
        for group in backend.groups:
            i = 0
            while any(k.startswith(f"{prefix}{group.container}.{i}.") for k in shapes):
                for site, _, linear in group.sites:
                    key = f"{prefix}{group.container}.{i}.{linear}.weight"
                    if key in shapes:
                        ids.append(f"{group.id_prefix}.{i}.{site}")
                        width = next(iter(shapes[key]))
                i += 1
        if ids and width:
            return backend.architecture, backend.name, int(width), ids
    raise ArchitectureError(
        "no FLUX.1 or SD3/MMDiT transformer blocks found in this checkpoint",
        "pass a FLUX.1 or SD3/SD3.5 diffusion model file (ComfyUI or diffusers layout)",
    )


def reference_ids(architecture: str, blocks: int, single_blocks: int = 0) -> list[str]:
    """Canonical ids for an architecture at a given depth, without a model (for the CLI and docs)."""
    get_architecture(architecture)
    if architecture == "flux":
        sites = [s for s, _, _ in _FLUX_SITES_COMFY]
        return [f"double.{i}.{s}" for i in range(blocks) for s in sites] + [
            f"single.{j}.out" for j in range(single_blocks)
        ]
    # SD3/SD3.5: the last joint block's text stream is pre-only (no attention projection, no MLP).
    return [
        f"joint.{i}.{s}"
        for i in range(blocks)
        for s in ("img.attn", "txt.attn", "img.mlp", "txt.mlp")
        if i < blocks - 1 or s.startswith("img")
    ]


# Published models, for `python -m safedig_core positions flux-dev` and for docs.
REFERENCE_MODELS = {
    "flux-dev": ("flux", 3072, 19, 38),
    "sd35-large": ("sd3", 2432, 38, 0),
}


@dataclass(frozen=True)
class PositionParts:
    """The parts of a position id: block kind and index, stream (img/txt/both) and site. An input
    projection parses as block "input", index 0, site "proj"."""

    block: str
    index: int
    stream: str
    site: str

    @classmethod
    def parse(cls, position: str) -> PositionParts:
        parts = position.split(".")
        if len(parts) == 2 and parts[0] == "input" and parts[1] == "txt":
            return cls("input", 0, parts[1], "proj")
        if len(parts) == 3 and parts[0] == "single":
            return cls("single", int(parts[1]), "both", parts[2])
        if len(parts) == 4 and parts[1].isdigit():
            return cls(parts[0], int(parts[1]), parts[2], parts[3])
        raise ArchitectureError(f"malformed position id {position!r}", "use ids like double.0.img.attn")
