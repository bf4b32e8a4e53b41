"""Combine two packs of one model: one pack's gate detects, the other pack's Blend steers.

A position that separates unsafe from safe prompts well on new wordings is not always one where an edit
redraws the image (docs/method.md sections 4 and 6). On the bundled model the image-stream block output
`single.0.out` detects (its gate stays shut on 97 % of held-out benign prompts) but its edits destroy the
image, while the text input projection `input.txt` redraws the safe concept when steered but its gate opens
on half of the benign prompts with new wordings. `combine_packs` writes one pack in which the detecting
positions keep their SAE, weights and calibrated tau and edit nothing (use "detect"), and the steering
positions keep their SAE, decoders and learned Blend maps and never open their own gate (use "steer"): they
edit the images the detectors latched (image-scope gate; sampling.py runs the call in which an image latches
once more, so a steering position that runs before the detector steers it from that call on).

    python -m safedig_core combine --detect PACK:single.0.out --steer PACK2:input.txt --out combined.safetensors
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import __version__
from .errors import PackError
from .pack import (
    BLEND_ANCHOR,
    K_ADAPTED_FROM,
    K_DOMAINS,
    K_PROVENANCE,
    K_ROUTING,
    K_SAE,
    USE_DETECT,
    USE_STEER,
    DictionaryPack,
    DomainEntry,
    DomainFeatures,
    PositionInfo,
    blend_tensor_key,
    build_metadata,
    decoder_key,
    encoder_key,
    save_pack,
)

K_COMBINED = "combined"  # in routing: which pack and positions detect, which steer, and who chose them


def _check_same_model(detector: DictionaryPack, steerer: DictionaryPack) -> None:
    def domains(p: DictionaryPack) -> dict:
        return {d: e.get(K_ADAPTED_FROM) for d, e in p.metadata[K_DOMAINS].items()}

    for what, a, b in (("architecture", detector.architecture, steerer.architecture),
                       ("d_model", detector.d_model, steerer.d_model),
                       ("source domain", detector.source_domain, steerer.source_domain),
                       ("domains", domains(detector), domains(steerer))):
        if a != b:
            raise PackError(f"the packs differ in {what}: {a} (detector) vs {b} (steerer)",
                            "combine two packs built for the same model and the same risk domains",
                            path=steerer.path)


def _positions(pack: DictionaryPack, positions: Sequence[str], role: str) -> list[str]:
    missing = [p for p in positions if p not in pack.positions]
    if missing or not positions:
        raise PackError(f"the {role} pack has no position {missing or positions}",
                        f"pick from its positions {pack.positions}", path=pack.path)
    return list(positions)


def combine_packs(detector: DictionaryPack, detect_at: Sequence[str], steerer: DictionaryPack,
                  steer_at: Sequence[str], out: str | os.PathLike, chosen_by: str = "user") -> Path:
    """One pack: `detector`'s gate at `detect_at` (use "detect"), `steerer`'s Blend at `steer_at` (use
    "steer"), every domain of both. `chosen_by` says who picked the detecting positions (the routing record
    keeps the steerer's routing table)."""
    _check_same_model(detector, steerer)
    detect_at, steer_at = _positions(detector, detect_at, "detector"), _positions(steerer, steer_at, "steerer")
    both = sorted(set(detect_at) & set(steer_at))
    if both:
        raise PackError(f"positions {both} would both detect and steer in the combined pack",
                        "detect and steer at different positions (or use one pack as it is)", path=steerer.path)
    parts = [(detector, p, USE_DETECT) for p in detect_at] + [(steerer, p, USE_STEER) for p in steer_at]
    infos: dict[str, PositionInfo] = {}
    tensors: dict[str, torch.Tensor] = {}
    features: dict[str, dict[str, DomainFeatures]] = {d: {} for d in steerer.domains}
    for pack, p, use in parts:
        i = pack.position_info(p)
        infos[p] = PositionInfo(i.d_model, i.d_sae, i.k, i.scale, i.harmful_ids, i.metrics, use)
        for name in ("W_enc", "b_enc", "b_pre"):
            tensors[encoder_key(p, name)] = pack.tensors[encoder_key(p, name)]
        for d in pack.domains:
            for name in ("W_dec", "b_dec"):
                tensors[decoder_key(d, p, name)] = pack.tensors[decoder_key(d, p, name)]
            f = pack.domain_features(d, p)
            # a detecting position edits nothing: only steering positions keep their learned Blend target
            target = f.blend_target if use == USE_STEER else BLEND_ANCHOR
            key = blend_tensor_key(d, p, target)
            if key is not None:
                tensors[key] = pack.tensors[key]
            features[d][p] = DomainFeatures(f.harmful_weights, f.anchor_ids, f.anchor_values, f.tau, f.extra, target)
    entries = {d: DomainEntry(features[d], steerer.metadata[K_DOMAINS][d].get(K_ADAPTED_FROM),
                              {"calibration": detector.metadata[K_DOMAINS][d].get("calibration", {})})
               for d in steerer.domains}
    routing = {**steerer.metadata[K_ROUTING],
               K_COMBINED: {"detect": {"pack": Path(detector.path).name, "positions": detect_at,
                                       "chosen_by": chosen_by},
                            "steer": {"pack": Path(steerer.path).name, "positions": steer_at,
                                      "chosen_by": "user" if steerer.metadata[K_ROUTING].get("user_positions")
                                      else "router"}}}
    provenance = {"combined": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "safedig_version": __version__,
                  "detector": {"file": Path(detector.path).name, **detector.metadata[K_PROVENANCE]},
                  "steerer": {"file": Path(steerer.path).name, **steerer.metadata[K_PROVENANCE]}}
    meta = build_metadata(architecture=steerer.architecture, d_model=steerer.d_model, positions=infos,
                          source_domain=steerer.source_domain, domains=entries, sae=steerer.metadata[K_SAE],
                          routing=routing, provenance=provenance)
    return save_pack(out, meta, tensors)
