"""Random dictionary packs of any shape: for tests, fuzzing and overhead benchmarks, never for steering
real models (their provenance says so)."""

from __future__ import annotations

import torch

from . import __version__
from .pack import (
    BLEND_AFFINE,
    BLEND_ANCHOR,
    BLEND_MAP,
    DomainEntry,
    DomainFeatures,
    PositionInfo,
    blend_affine_key,
    blend_map_key,
    build_metadata,
    decoder_key,
    encoder_key,
)


def random_pack(architecture: str, d_model: int, positions: list[str], *, expansion: int = 4, k: int = 8,
                n_harmful: int = 4, domains: tuple[str, ...] = ("source", "target"), tau: float = 0.0,
                scale: float = 1.0, harmful_bias: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.float32,
                blend_maps: bool | str = False):
    """(metadata, tensors) of a valid pack with random unit-norm decoders. The harmful latents get an
    encoder bias of `harmful_bias`, so they fire on most tokens; tau 0 then opens the gate wherever one
    of them is in the TopK. With `blend_maps` True (or "map"), every domain blends with a random learned map;
    with "affine", with a random learned affine target."""
    target = BLEND_ANCHOR if not blend_maps else BLEND_AFFINE if blend_maps == BLEND_AFFINE else BLEND_MAP
    g = torch.Generator().manual_seed(seed)
    d_sae = expansion * d_model
    infos, tensors = {}, {}
    features: dict[str, dict[str, DomainFeatures]] = {d: {} for d in domains}
    for pos in positions:
        ids = torch.randperm(d_sae, generator=g)[: n_harmful + 2].tolist()
        harmful, anchor = ids[:n_harmful], ids[n_harmful:]
        infos[pos] = PositionInfo(d_model=d_model, d_sae=d_sae, k=k, scale=scale, harmful_ids=harmful)
        w_enc = torch.randn(d_sae, d_model, generator=g)
        w_enc /= w_enc.norm(dim=-1, keepdim=True)
        tensors[encoder_key(pos, "W_enc")] = w_enc
        b_enc = torch.randn(d_sae, generator=g) * 0.1
        b_enc[harmful] += harmful_bias
        tensors[encoder_key(pos, "b_enc")] = b_enc
        tensors[encoder_key(pos, "b_pre")] = torch.randn(d_model, generator=g) * 0.1
        for domain in domains:
            w_dec = w_enc + 0.3 * torch.randn(d_sae, d_model, generator=g)
            tensors[decoder_key(domain, pos, "W_dec")] = w_dec / w_dec.norm(dim=-1, keepdim=True)
            tensors[decoder_key(domain, pos, "b_dec")] = torch.randn(d_model, generator=g) * 0.1
            features[domain][pos] = DomainFeatures(
                harmful_weights=(torch.rand(n_harmful, generator=g) + 0.5).tolist(), anchor_ids=anchor,
                anchor_values=(torch.rand(len(anchor), generator=g) + 0.5).tolist(), tau=tau,
                blend_target=target)
            if target == BLEND_MAP:
                tensors[blend_map_key(domain, pos)] = 0.3 * torch.randn(n_harmful, d_sae, generator=g)
            elif target == BLEND_AFFINE:
                tensors[blend_affine_key(domain, pos)] = 0.1 * torch.randn(d_model + 1, d_model, generator=g)
    meta = build_metadata(
        architecture=architecture, d_model=d_model, positions=infos, source_domain=domains[0],
        domains={d: DomainEntry(features[d], adapted_from=domains[0] if i else None) for i, d in enumerate(domains)},
        sae={"type": "topk", "expansion": expansion, "k": k},
        routing={"method": "none (synthetic)", "candidates": [
            {"position": p, "score": 1.0 - i / max(1, len(positions))} for i, p in enumerate(positions)]},
        provenance={"model": "synthetic random pack", "safedig_version": __version__, "seed": seed},
    )
    return meta, {name: t.to(dtype) for name, t in tensors.items()}
