"""Dictionary packs: ONE .safetensors file holding a pack's tensors and its JSON metadata.

Tensors (names built by the functions below, never by hand elsewhere):
    encoder.{position}.W_enc  [d_sae, d_model]     encoder.{position}.b_enc  [d_sae]
    encoder.{position}.b_pre  [d_model]
    decoder.{domain}.{position}.W_dec  [d_sae, d_model]   decoder.{domain}.{position}.b_dec  [d_model]
    blend.{domain}.{position}.map      [n_harmful, d_sae]  only where that domain's blend_target is "map"

Metadata: the safetensors header's `__metadata__[METADATA_KEY]` is one JSON document, written only by
`build_metadata` and checked against `METADATA_SCHEMA` (every field's JSON type and range) and then
against itself and the tensor shapes (docs/pack-format.md). The header is parsed and checked by this
module before any tensor is read, so a malformed or hostile file is refused with a PackError (naming the
file, the problem and the fix) and never makes us allocate what it merely declares. `read_summary` is
that header pass alone (cheap: no tensor data is read); `load_pack` is the header pass plus the tensors.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ArchitectureError, PackError
from .positions import Architecture, ModelPositions, get_architecture

PACK_SUFFIX = ".safetensors"
METADATA_KEY = "safedig"
# 2 adds learned Blend maps, 3 the positions' use (detect / steer), 4 the affine Blend target; a pack is
# written with the lowest version that holds what it uses, so older SafeDIG keeps reading packs that need
# nothing new
FORMAT_VERSION = 4
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3, 4)

# Metadata keys (one place; readers and writers both use these).
K_FORMAT_VERSION = "format_version"
K_ARCHITECTURE = "architecture"
K_D_MODEL = "d_model"
K_POSITIONS = "positions"
K_ROUTING = "routing"
K_SAE = "sae"
K_SOURCE_DOMAIN = "source_domain"
K_DOMAINS = "domains"
K_PROVENANCE = "provenance"
K_CANDIDATES = "candidates"  # in routing: one entry per candidate position
K_POSITION = "position"  # in each candidate: its position id
K_SCORE = "score"  # in each candidate: the final routing score
# Per position
K_D_SAE = "d_sae"
K_K = "k"
K_SCALE = "scale"
K_HARMFUL_IDS = "harmful_ids"
K_METRICS = "metrics"
K_USE = "use"  # what the position does: detect and steer (the default), detect only, or steer only
USE_BOTH, USE_DETECT, USE_STEER = "detect_and_steer", "detect", "steer"
# Per domain
K_ROLE = "role"
K_ADAPTED_FROM = "adapted_from"
K_FEATURES = "features"
K_HARMFUL_WEIGHTS = "harmful_weights"
K_ANCHOR_IDS = "safe_anchor_ids"
K_ANCHOR_VALUES = "safe_anchor_values"
K_TAU = "tau"
# "anchor" (the constant safe anchor; the default), "map" (learned, on the harmful code) or "affine" (learned,
# on the activation)
K_BLEND_TARGET = "blend_target"
BLEND_ANCHOR, BLEND_MAP, BLEND_AFFINE = "anchor", "map", "affine"
# The lowest pack format version that holds each learned Blend target
BLEND_TARGET_VERSION = {BLEND_MAP: 2, BLEND_AFFINE: 4}

ROLE_SOURCE, ROLE_TARGET = "source", "target"
STORAGE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
# A pack header is a few hundred KB at most; refuse absurd declared sizes before reading them.
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSOR_ELEMENTS = 2**34
MAX_SIZE = 2**31  # the largest d_model / d_sae / k / latent id the schema accepts

REEXPORT = "re-export the pack with `python -m safedig_core export`"
SCHEMA_FIX = f"{REEXPORT} (the metadata schema is in docs/pack-format.md), or re-download it"


def encoder_key(position: str, name: str) -> str:
    return f"encoder.{position}.{name}"


def decoder_key(domain: str, position: str, name: str) -> str:
    return f"decoder.{domain}.{position}.{name}"


def blend_map_key(domain: str, position: str) -> str:
    return f"blend.{domain}.{position}.map"


def blend_affine_key(domain: str, position: str) -> str:
    return f"blend.{domain}.{position}.affine"


def blend_tensor_key(domain: str, position: str, blend_target: str) -> str | None:
    """The tensor a learned Blend target is stored in, or None for the constant anchor (no tensor)."""
    if blend_target == BLEND_MAP:
        return blend_map_key(domain, position)
    if blend_target == BLEND_AFFINE:
        return blend_affine_key(domain, position)
    return None


@dataclass(frozen=True)
class DomainFeatures:
    """Per position, per domain: weights of the harmful latents, the safe anchor, the gate threshold and
    what Blend moves a harmful code to (`blend_target`: the anchor, or the learned map stored beside the
    decoder). `extra` holds further per-position figures stored beside them (e.g. detection_auroc)."""

    harmful_weights: list[float]
    anchor_ids: list[int]
    anchor_values: list[float]
    tau: float
    extra: dict[str, Any] = field(default_factory=dict)
    blend_target: str = BLEND_ANCHOR


@dataclass(frozen=True)
class PositionInfo:
    d_model: int
    d_sae: int
    k: int
    scale: float
    harmful_ids: list[int]
    metrics: dict[str, float] = field(default_factory=dict)
    # USE_DETECT: its gate latches images but it edits nothing; USE_STEER: it edits the images a detecting
    # position latched (image-scope gate) and its own gate never opens; USE_BOTH: both (docs/method.md sec. 6)
    use: str = USE_BOTH

    @property
    def detects(self) -> bool:
        return self.use != USE_STEER

    @property
    def edits(self) -> bool:
        return self.use != USE_DETECT


@dataclass(frozen=True)
class DomainEntry:
    """One domain of a pack being written: its features per position. `adapted_from` is None for the
    source domain; `extra` is stored beside role and features (e.g. the tau calibration)."""

    features: Mapping[str, DomainFeatures]
    adapted_from: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PackSummary:
    """What the header of a valid pack says, read without its tensor data (`read_summary`)."""

    path: str
    architecture: str
    d_model: int
    positions: tuple[str, ...]
    source_domain: str
    domains: tuple[str, ...]


@dataclass
class DictionaryPack:
    """A validated pack. Tensors stay on CPU in their stored dtype; the steering code casts them once."""

    path: str
    metadata: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def architecture(self) -> str:
        return self.metadata[K_ARCHITECTURE]

    @property
    def d_model(self) -> int:
        return self.metadata[K_D_MODEL]

    @property
    def positions(self) -> list[str]:
        return list(self.metadata[K_POSITIONS])

    @property
    def source_domain(self) -> str:
        return self.metadata[K_SOURCE_DOMAIN]

    @property
    def domains(self) -> list[str]:
        return list(self.metadata[K_DOMAINS])

    def position_info(self, position: str) -> PositionInfo:
        p = self.metadata[K_POSITIONS][position]
        return PositionInfo(p[K_D_MODEL], p[K_D_SAE], p[K_K], p[K_SCALE], list(p[K_HARMFUL_IDS]),
                            dict(p.get(K_METRICS, {})), p.get(K_USE, USE_BOTH))

    def positions_that(self, use: str) -> list[str]:
        """The positions that detect (use USE_DETECT) or that edit (USE_STEER), in pack order."""
        want = {USE_DETECT: "detects", USE_STEER: "edits"}[use]
        return [p for p in self.positions if getattr(self.position_info(p), want)]

    def domain_features(self, domain: str, position: str) -> DomainFeatures:
        self.require_domain(domain)
        f = self.metadata[K_DOMAINS][domain][K_FEATURES][position]
        return DomainFeatures(list(f[K_HARMFUL_WEIGHTS]), list(f[K_ANCHOR_IDS]), list(f[K_ANCHOR_VALUES]),
                              float(f[K_TAU]), {k: v for k, v in f.items() if k not in _FEATURE_KEYS},
                              f.get(K_BLEND_TARGET, BLEND_ANCHOR))

    def blend_map(self, domain: str, position: str) -> torch.Tensor | None:
        """The learned Blend map of a domain at a position, or None where the domain blends to its anchor."""
        key = blend_map_key(domain, position)
        return self.tensors.get(key) if self.domain_features(domain, position).blend_target == BLEND_MAP else None

    def blend_affine(self, domain: str, position: str) -> torch.Tensor | None:
        """The learned affine Blend target [d_model + 1, d_model] (last row: the bias) of a domain at a
        position, or None where the domain blends another way."""
        key = blend_affine_key(domain, position)
        return self.tensors.get(key) if self.domain_features(domain, position).blend_target == BLEND_AFFINE else None

    def without_blend_maps(self) -> DictionaryPack:
        """This pack with every domain blending to its constant anchor (the learned maps dropped): the
        pre-map Blend, kept for comparison (benchmarks/safety_table.py). In memory only."""
        meta = json.loads(json.dumps(self.metadata))
        for entry in meta[K_DOMAINS].values():
            for f in entry[K_FEATURES].values():
                f.pop(K_BLEND_TARGET, None)
        return DictionaryPack(self.path, meta, {k: v for k, v in self.tensors.items() if not k.startswith("blend.")})

    def require_domain(self, domain: str) -> None:
        if domain not in self.metadata[K_DOMAINS]:
            raise PackError(f"pack has no domain {domain!r}", f"choose one of {self.domains}", path=self.path)

    def check_compatible(self, model: ModelPositions, positions: list[str] | None = None) -> None:
        """Raise a PackError naming the mismatch if this pack cannot steer `model`."""
        if model.architecture != self.architecture or model.d_model != self.d_model:
            raise PackError(
                f"pack is for {self.architecture} (d_model {self.d_model}) but the model is "
                f"{model.architecture} (d_model {model.d_model})",
                f"load a pack trained for {model.describe()}",
                path=self.path,
            )
        missing = [p for p in (positions or self.positions) if p not in model.modules]
        if missing:
            raise PackError(
                f"positions {missing} do not exist in the model ({model.describe()})",
                "use a pack trained on this model's depth, or pick a position subset the model has",
                path=self.path,
            )


_FEATURE_KEYS = (K_HARMFUL_WEIGHTS, K_ANCHOR_IDS, K_ANCHOR_VALUES, K_TAU, K_BLEND_TARGET)


# ------------------------------------------------------------------------------------------- write


def build_metadata(*, architecture: str, d_model: int, positions: Mapping[str, PositionInfo], source_domain: str,
                   domains: Mapping[str, DomainEntry], sae: Mapping[str, Any], routing: Mapping[str, Any],
                   provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The `safedig` metadata document of a pack (the only place that lays it out). `save_pack` checks it."""

    def with_extra(extra: Mapping[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(set(extra) & set(fields))
        if clash:
            raise ValueError(f"extra metadata keys {clash} would overwrite fields of the pack format")
        return {**fields, **extra}

    def feature_entry(f: DomainFeatures) -> dict[str, Any]:
        fields = {K_HARMFUL_WEIGHTS: list(f.harmful_weights), K_ANCHOR_IDS: list(f.anchor_ids),
                  K_ANCHOR_VALUES: list(f.anchor_values), K_TAU: f.tau}
        if f.blend_target != BLEND_ANCHOR:
            fields[K_BLEND_TARGET] = f.blend_target
        return with_extra(f.extra, fields)

    def domain_entry(name: str, d: DomainEntry) -> dict[str, Any]:
        fields = {K_ROLE: ROLE_SOURCE if name == source_domain else ROLE_TARGET,
                  K_FEATURES: {p: feature_entry(f) for p, f in d.features.items()}}
        if d.adapted_from is not None:
            fields[K_ADAPTED_FROM] = d.adapted_from
        return with_extra(d.extra, fields)

    needs = [BLEND_TARGET_VERSION.get(f.blend_target, 1) for d in domains.values() for f in d.features.values()]
    needs.append(3 if any(i.use != USE_BOTH for i in positions.values()) else 1)
    return {
        K_FORMAT_VERSION: max(needs),  # the lowest version that holds what the pack uses
        K_ARCHITECTURE: architecture,
        K_D_MODEL: d_model,
        K_POSITIONS: {
            p: {K_D_MODEL: i.d_model, K_D_SAE: i.d_sae, K_K: i.k, K_SCALE: i.scale, K_HARMFUL_IDS: list(i.harmful_ids),
                **({K_METRICS: dict(i.metrics)} if i.metrics else {}), **({K_USE: i.use} if i.use != USE_BOTH else {})}
            for p, i in positions.items()
        },
        K_SAE: dict(sae),
        K_ROUTING: dict(routing),
        K_SOURCE_DOMAIN: source_domain,
        K_DOMAINS: {name: domain_entry(name, d) for name, d in domains.items()},
        K_PROVENANCE: dict(provenance),
    }


def save_pack(path: str | os.PathLike, metadata: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Validate and write a pack atomically (temp file, then rename: a half-written pack never exists
    under its final name)."""
    path = Path(path)
    if path.suffix != PACK_SUFFIX:
        raise PackError(f"pack files must end in {PACK_SUFFIX}", f"rename to {path.stem}{PACK_SUFFIX}", path=path)
    meta = dict(metadata)
    meta.setdefault(K_FORMAT_VERSION, 1)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _validate(str(path), meta, {k: (_dtype_name(v.dtype, path), list(v.shape)) for k, v in tensors.items()})
    _check_values(str(path), tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def with_domain(pack: DictionaryPack, domain: str, entry: DomainEntry,
                decoders: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                position_metrics: Mapping[str, Mapping[str, float]], out: str | os.PathLike,
                adaptation: Mapping[str, Any], blend_maps: Mapping[str, torch.Tensor] | None = None) -> Path:
    """A copy of `pack` with one more (adapted) domain: its decoder (and learned Blend target, where its
    features name one) per position, its features, metrics added to each position's and the adaptation
    appended to provenance["adaptations"]. Written by save_pack."""
    meta = pack.metadata
    positions = {}
    for p in pack.positions:
        info = pack.position_info(p)
        positions[p] = PositionInfo(info.d_model, info.d_sae, info.k, info.scale, info.harmful_ids,
                                    {**info.metrics, **position_metrics.get(p, {})}, info.use)
    domains = {}
    for name, d in meta[K_DOMAINS].items():
        feats = {p: pack.domain_features(name, p) for p in d[K_FEATURES]}
        extra = {k: v for k, v in d.items() if k not in (K_ROLE, K_FEATURES, K_ADAPTED_FROM)}
        domains[name] = DomainEntry(feats, d.get(K_ADAPTED_FROM), extra)
    domains[domain] = entry
    provenance = dict(meta[K_PROVENANCE])
    provenance["adaptations"] = [*provenance.get("adaptations", []), dict(adaptation)]
    new_meta = build_metadata(architecture=pack.architecture, d_model=pack.d_model, positions=positions,
                              source_domain=pack.source_domain, domains=domains, sae=meta[K_SAE],
                              routing=meta[K_ROUTING], provenance=provenance)
    tensors = dict(pack.tensors)
    dtype = tensors[decoder_key(pack.source_domain, pack.positions[0], "W_dec")].dtype
    for p, (w, b) in decoders.items():
        tensors[decoder_key(domain, p, "W_dec")] = w.to(dtype)
        tensors[decoder_key(domain, p, "b_dec")] = b.to(dtype)
    for p, mapping in (blend_maps or {}).items():
        key = blend_tensor_key(domain, p, entry.features[p].blend_target)
        if key is None:
            raise ValueError(f"{domain}/{p} blends to its anchor: it has no learned target to store")
        tensors[key] = mapping.float()
    return save_pack(out, new_meta, tensors)


def _dtype_name(dtype: torch.dtype, path) -> str:
    for name, dt in STORAGE_DTYPES.items():
        if dt == dtype:
            return name
    raise PackError(f"tensor dtype {dtype} cannot be stored", "store float32, float16 or bfloat16", path=path)


# -------------------------------------------------------------------------------------------- read


def load_pack(path: str | os.PathLike) -> DictionaryPack:
    """Read and fully validate a pack; every problem becomes a PackError."""
    path = os.fspath(path)
    header, meta = _checked_header(path)
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in header}
    except Exception as exc:  # safetensors raises several types; the header was already checked
        raise PackError(f"tensor data cannot be read ({exc})", "re-download or re-export the pack", path=path) from None
    _check_values(path, tensors)
    return DictionaryPack(path, meta, tensors)


def read_summary(path: str | os.PathLike) -> PackSummary:
    """The header pass of `load_pack` alone: everything but the tensor values is checked (metadata
    schema, tensor names and shapes against the metadata); no tensor data is read."""
    path = os.fspath(path)
    _, meta = _checked_header(path)
    return PackSummary(path, meta[K_ARCHITECTURE], meta[K_D_MODEL], tuple(meta[K_POSITIONS]),
                       meta[K_SOURCE_DOMAIN], tuple(meta[K_DOMAINS]))


def _checked_header(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor entries of the header, validated metadata): the whole check that needs no tensor data."""
    header = read_header(path)
    raw_meta = header.pop("__metadata__", None)
    if not isinstance(raw_meta, dict) or METADATA_KEY not in raw_meta:
        raise PackError("not a SafeDIG pack (no safedig metadata in the safetensors header)",
                        "load a pack written by `python -m safedig_core export`", path=path)
    try:
        meta = json.loads(raw_meta[METADATA_KEY])
    except ValueError as exc:
        raise PackError(f"pack metadata is not valid JSON ({exc})", REEXPORT, path=path) from None
    _validate(path, meta, {k: (v["dtype"], v["shape"]) for k, v in header.items()})
    return header, meta


def read_header(path: str) -> dict[str, Any]:
    """The safetensors header as a dict, checked for sane sizes, dtypes and non-overlapping offsets."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            _check_header_length(path, prefix, size)
            (n,) = struct.unpack("<Q", prefix)
            raw = f.read(n)
    except FileNotFoundError:
        raise PackError("file not found", "check the path, or put the pack in models/safedig/", path=path) from None
    except IsADirectoryError:
        raise PackError("is a directory, not a pack file", "point to a .safetensors pack", path=path) from None
    except OSError as exc:
        raise PackError(f"cannot be read ({exc.strerror or exc})", "check that the file is readable by the user "
                        "running SafeDIG", path=path) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise PackError("header is not valid JSON", "re-download the pack", path=path) from None
    if not isinstance(header, dict):
        raise PackError("header is not a JSON object", "re-download the pack", path=path)
    _check_entries(path, header, size - 8 - n)
    return header


# Files people rename to .safetensors; their first bytes say what they are.
_FOREIGN_FORMATS = (
    (b"PK\x03\x04", "a zip archive (the format torch.save writes: a pickle inside)"),
    *((bytes([0x80, proto]), "a Python pickle (an older torch.save or pickle.dump file)") for proto in range(2, 6)),
)


def _check_header_length(path: str, prefix: bytes, size: int) -> None:
    for magic, kind in _FOREIGN_FORMATS:
        if prefix.startswith(magic):
            raise PackError(f"is {kind}, not a safetensors file; SafeDIG never loads pickles, which can run code",
                            "use a SafeDIG pack: a .safetensors file written by `python -m safedig_core export`",
                            path=path)
    if len(prefix) < 8:
        raise PackError(f"file is truncated ({size} bytes, no header)", "re-download the pack", path=path)
    (n,) = struct.unpack("<Q", prefix)
    if n < 2 or n > size - 8:
        raise PackError(f"header length {n} is impossible for a {size}-byte file (truncated or not safetensors)",
                        "re-download the pack; packs are .safetensors files written by SafeDIG", path=path)
    if n > MAX_HEADER_BYTES:
        raise PackError(f"header is {n} bytes, over the header-size cap of {MAX_HEADER_BYTES} bytes "
                        f"({MAX_HEADER_BYTES // 2**20} MiB) that SafeDIG reads; a pack's header is a few hundred KB",
                        f"{REEXPORT}: packs SafeDIG writes stay far below the cap", path=path)


def _check_entries(path: str, header: dict[str, Any], data_len: int) -> None:
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise PackError("__metadata__ must map strings to strings", REEXPORT, path=path)
            continue
        dtype, shape, offsets = _entry_fields(path, name, entry)
        numel = math.prod(shape)
        begin, end = offsets
        if not 0 <= begin <= end <= data_len or end - begin != numel * _ITEMSIZE[dtype]:
            raise PackError(f"tensor {name!r} has offsets {offsets} that do not fit its shape {shape} and the "
                            f"{data_len}-byte data section (file truncated or corrupted)", "re-download the pack",
                            path=path)
        spans.append((begin, end, name))
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise PackError(f"tensors {n0!r} and {n1!r} overlap", REEXPORT, path=path)


def _entry_fields(path: str, name: str, entry: Any) -> tuple[str, list[int], list[int]]:
    if not isinstance(entry, dict):
        raise PackError(f"header entry {name!r} is not an object", REEXPORT, path=path)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in STORAGE_DTYPES:
        raise PackError(f"tensor {name!r} has dtype {dtype!r}; packs store F32, F16 or BF16",
                        "re-export the pack with a float dtype", path=path)
    if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
            or math.prod(shape) > MAX_TENSOR_ELEMENTS):
        raise PackError(f"tensor {name!r} has an invalid shape {shape!r}", REEXPORT, path=path)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise PackError(f"tensor {name!r} has invalid data_offsets {offsets!r}", REEXPORT, path=path)
    return dtype, shape, offsets


# ---------------------------------------------------------------------------------- metadata schema
# Every field's JSON type and range; what one field says about another (ids below d_sae, features for
# every routed position, ...) is checked after the schema, by _check_references.


@dataclass(frozen=True)
class Leaf:
    """A JSON value that is `expected` (the words used in the message) when `ok` says so."""

    expected: str
    ok: Callable[[Any], bool]


@dataclass(frozen=True)
class Obj:
    """A JSON object with these required and optional fields; keys not named are free unless `others`
    says what their values must be."""

    required: Mapping[str, Spec]
    optional: Mapping[str, Spec] = field(default_factory=dict)
    others: Spec | None = None


@dataclass(frozen=True)
class MapOf:
    """A JSON object whose keys are names (ids, domains) and whose values all follow `values`."""

    values: Spec
    min_len: int = 0


@dataclass(frozen=True)
class ListOf:
    items: Spec
    min_len: int = 0


Spec = Leaf | Obj | MapOf | ListOf


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite_number(x: Any) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:  # an int beyond float range
        return False


INTEGER = Leaf("an integer", _is_int)
SIZE = Leaf(f"a whole number in [1, {MAX_SIZE}]", lambda x: _is_int(x) and 1 <= x <= MAX_SIZE)
LATENT_ID = Leaf(f"a whole number in [0, {MAX_SIZE})", lambda x: _is_int(x) and 0 <= x < MAX_SIZE)
NAME = Leaf("a non-empty string", lambda x: isinstance(x, str) and bool(x))
FINITE = Leaf("a finite number", _finite_number)
NON_NEGATIVE = Leaf("a finite number >= 0", lambda x: _finite_number(x) and x >= 0)
POSITIVE = Leaf("a finite number > 0", lambda x: _finite_number(x) and x > 0)
PLAIN = Leaf("a finite number, a string or true/false", lambda x: _finite_number(x) or isinstance(x, (str, bool)))
ROLE = Leaf(f"{ROLE_SOURCE!r} or {ROLE_TARGET!r}", lambda x: x in (ROLE_SOURCE, ROLE_TARGET))

USE = Leaf(f"{USE_BOTH!r}, {USE_DETECT!r} or {USE_STEER!r}", lambda x: x in (USE_BOTH, USE_DETECT, USE_STEER))
POSITION_SCHEMA = Obj({K_D_MODEL: SIZE, K_D_SAE: SIZE, K_K: SIZE, K_SCALE: POSITIVE,
                       K_HARMFUL_IDS: ListOf(LATENT_ID, min_len=1)},
                      optional={K_METRICS: MapOf(FINITE), K_USE: USE})
BLEND_TARGET = Leaf(f"{BLEND_ANCHOR!r}, {BLEND_MAP!r} or {BLEND_AFFINE!r}",
                    lambda x: x in (BLEND_ANCHOR, BLEND_MAP, BLEND_AFFINE))
FEATURES_SCHEMA = Obj({K_HARMFUL_WEIGHTS: ListOf(NON_NEGATIVE), K_ANCHOR_IDS: ListOf(LATENT_ID),
                       K_ANCHOR_VALUES: ListOf(FINITE), K_TAU: FINITE}, optional={K_BLEND_TARGET: BLEND_TARGET})
DOMAIN_SCHEMA = Obj({K_ROLE: ROLE, K_FEATURES: MapOf(FEATURES_SCHEMA)}, optional={K_ADAPTED_FROM: NAME})
CANDIDATE_SCHEMA = Obj({K_POSITION: NAME, K_SCORE: FINITE}, others=PLAIN)
METADATA_SCHEMA = Obj({
    K_FORMAT_VERSION: INTEGER,
    K_ARCHITECTURE: NAME,
    K_D_MODEL: SIZE,
    K_POSITIONS: MapOf(POSITION_SCHEMA, min_len=1),
    K_ROUTING: Obj({K_CANDIDATES: ListOf(CANDIDATE_SCHEMA)}),
    K_SAE: Obj({}),
    K_SOURCE_DOMAIN: NAME,
    K_DOMAINS: MapOf(DOMAIN_SCHEMA, min_len=1),
    K_PROVENANCE: Obj({}),
})


def schema_problem(spec: Spec, value: Any, where: str = "") -> str | None:
    """The first way `value` breaks `spec`, as 'metadata field <where> must be ..., got ...'; None if it fits."""
    name = f"metadata field {where}" if where else "metadata"
    if isinstance(spec, Leaf):
        return None if spec.ok(value) else f"{name} must be {spec.expected}, got {_json_kind(value)}"
    if isinstance(spec, ListOf):
        if not isinstance(value, list):
            return f"{name} must be a list, got {_json_kind(value)}"
        if len(value) < spec.min_len:
            return f"{name} must hold at least {spec.min_len} item(s), got an empty list"
        return _first(schema_problem(spec.items, v, f"{where}[{i}]") for i, v in enumerate(value))
    if not isinstance(value, dict):
        return f"{name} must be a JSON object, got {_json_kind(value)}"
    if isinstance(spec, MapOf):
        if len(value) < spec.min_len:
            return f"{name} must hold at least {spec.min_len} entr{'y' if spec.min_len == 1 else 'ies'}, got none"
        return _first(schema_problem(spec.values, v, f"{where}[{k!r}]") for k, v in value.items())
    prefix = f"{where}." if where else ""
    missing = [k for k in spec.required if k not in value]
    if missing:
        return f"{name} has no {missing[0]!r} field" + (f" (nor {missing[1:]})" if len(missing) > 1 else "")
    fields = {**spec.required, **spec.optional}
    return _first(schema_problem(fields.get(k) or spec.others, v, f"{prefix}{k}")  # type: ignore[arg-type]
                  for k, v in value.items() if k in fields or spec.others is not None)


def _first(problems) -> str | None:
    return next((p for p in problems if p is not None), None)


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {str(value)[:30]}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return "a list" if isinstance(value, list) else "a JSON object"


# ----------------------------------------------------------------------------------------- validation


def validate_metadata(path: str, meta: Any) -> Architecture:
    """Check a metadata document: its format version, the schema, then what its fields say about each
    other. Returns the pack's architecture; every problem is a PackError naming the field."""
    version = meta.get(K_FORMAT_VERSION) if isinstance(meta, dict) else None
    if _is_int(version) and version not in SUPPORTED_FORMAT_VERSIONS:
        raise PackError(f"unknown pack format version {version} (this SafeDIG reads {list(SUPPORTED_FORMAT_VERSIONS)})",
                        "update SafeDIG, or re-export the pack with this version", path=path)
    problem = schema_problem(METADATA_SCHEMA, meta)
    if problem:
        raise PackError(problem, SCHEMA_FIX, path=path)
    try:
        architecture = get_architecture(meta[K_ARCHITECTURE])
    except ArchitectureError as exc:
        raise PackError(f"unknown architecture {meta[K_ARCHITECTURE]!r}", exc.fix or "", path=path) from None
    problem = _position_problem(meta, architecture) or _domain_problem(meta)
    if problem:
        raise PackError(problem, REEXPORT, path=path)
    return architecture


def _position_problem(meta: dict[str, Any], architecture: Architecture) -> str | None:
    d_model = meta[K_D_MODEL]
    for pos, info in meta[K_POSITIONS].items():
        d_sae, ids = info[K_D_SAE], info[K_HARMFUL_IDS]
        if not architecture.id_pattern.match(pos):
            return f"position {pos!r} is not a {architecture.key} position id"
        if info[K_D_MODEL] != d_model:
            return f"position {pos!r} has d_model {info[K_D_MODEL]}, pack says {d_model}"
        if info[K_K] > d_sae:
            return f"position {pos!r} has k {info[K_K]} above its d_sae {d_sae}"
        if not all(i < d_sae for i in ids) or len(set(ids)) != len(ids):
            return f"position {pos!r} harmful_ids must be distinct ints in [0, {d_sae})"
        if info.get(K_USE, USE_BOTH) != USE_BOTH and meta[K_FORMAT_VERSION] < 3:
            return f"position {pos!r} use {info[K_USE]!r} needs pack format version 3, the pack says " \
                   f"{meta[K_FORMAT_VERSION]}"
    uses = {info.get(K_USE, USE_BOTH) for info in meta[K_POSITIONS].values()}
    if uses == {USE_DETECT}:
        return "every position of the pack only detects (use 'detect'): nothing would steer"
    if uses == {USE_STEER}:
        return "every position of the pack only steers (use 'steer'): no gate would ever open"
    return None


def _domain_problem(meta: dict[str, Any]) -> str | None:
    positions, domains, source = meta[K_POSITIONS], meta[K_DOMAINS], meta[K_SOURCE_DOMAIN]
    if source not in domains:
        return f"source domain {source!r} has no entry in domains {sorted(domains)}"
    for domain, entry in domains.items():
        role = entry[K_ROLE]
        if not domain or "." in domain:
            return f"domain name {domain!r} must be non-empty and contain no '.'"
        if role != (ROLE_SOURCE if domain == source else ROLE_TARGET):
            return f"domain {domain!r} has role {role!r}; the source domain is {source!r}"
        if role == ROLE_TARGET and entry.get(K_ADAPTED_FROM) not in domains:
            return f"domain {domain!r} is adapted from an unknown domain ({entry.get(K_ADAPTED_FROM)!r})"
        features = entry[K_FEATURES]
        if set(features) != set(positions):
            return f"domain {domain!r} has features for {sorted(features)} but the pack routes {sorted(positions)}"
        for pos, f in features.items():
            where = f"domains[{domain!r}].features[{pos!r}]."
            n_harm, d_sae = len(positions[pos][K_HARMFUL_IDS]), positions[pos][K_D_SAE]
            if len(f[K_HARMFUL_WEIGHTS]) != n_harm:
                return f"{where}harmful_weights needs {n_harm} finite non-negative numbers (one per harmful id)"
            target = f.get(K_BLEND_TARGET, BLEND_ANCHOR)
            if meta[K_FORMAT_VERSION] < BLEND_TARGET_VERSION.get(target, 1):
                return f"{where}blend_target {target!r} needs pack format version {BLEND_TARGET_VERSION[target]}, " \
                       f"the pack says {meta[K_FORMAT_VERSION]}"
            if len(f[K_ANCHOR_IDS]) != len(f[K_ANCHOR_VALUES]) or not all(i < d_sae for i in f[K_ANCHOR_IDS]):
                return f"{where}safe anchor ids/values must be equal-length lists of latent ids below {d_sae} " \
                       "and finite numbers"
    return None


def expected_tensor_shapes(meta: dict[str, Any]) -> dict[str, list[int]]:
    """Name -> shape of every tensor a (validated) metadata document implies."""
    d_model, shapes = meta[K_D_MODEL], {}
    for pos, info in meta[K_POSITIONS].items():
        shapes[encoder_key(pos, "W_enc")] = [info[K_D_SAE], d_model]
        shapes[encoder_key(pos, "b_enc")] = [info[K_D_SAE]]
        shapes[encoder_key(pos, "b_pre")] = [d_model]
        for domain, entry in meta[K_DOMAINS].items():
            shapes[decoder_key(domain, pos, "W_dec")] = [info[K_D_SAE], d_model]
            shapes[decoder_key(domain, pos, "b_dec")] = [d_model]
            target = entry[K_FEATURES][pos].get(K_BLEND_TARGET)
            if target == BLEND_MAP:
                shapes[blend_map_key(domain, pos)] = [len(info[K_HARMFUL_IDS]), info[K_D_SAE]]
            elif target == BLEND_AFFINE:
                shapes[blend_affine_key(domain, pos)] = [d_model + 1, d_model]
    return shapes


def _validate(path: str, meta: Any, tensors: Mapping[str, tuple[str, list[int]]]) -> None:
    """The metadata, then the tensors: exactly those it implies, each with the shape it implies."""
    validate_metadata(path, meta)
    expected = expected_tensor_shapes(meta)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise PackError(f"missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1
                                                            else ""), REEXPORT, path=path)
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise PackError(f"unexpected tensor {extra[0]!r} not described by the metadata", REEXPORT, path=path)
    for name, shape in expected.items():
        if list(tensors[name][1]) != shape:
            raise PackError(f"tensor {name!r} has shape {list(tensors[name][1])} but the metadata implies {shape} "
                            f"(d_sae / d_model in the metadata)", REEXPORT, path=path)


def _check_values(path: str, tensors: Mapping[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise PackError(f"tensor {name!r} contains NaN or inf", "re-train or re-export the pack", path=path)
