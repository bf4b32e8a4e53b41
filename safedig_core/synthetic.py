"""Random dictionary packs of any shape: for tests, fuzzing and overhead benchmarks, never for steering
real models (their provenance says so)."""

from __future__ import annotations

import torch

from . import __version__
from .pack import (
    FORMAT_VERSION,
    K_ADAPTED_FROM,
    K_ANCHOR_IDS,
    K_ANCHOR_VALUES,
    K_ARCHITECTURE,
    K_D_MODEL,
    K_D_SAE,
    K_DOMAINS,
    K_FEATURES,
    K_FORMAT_VERSION,
    K_HARMFUL_IDS,
    K_HARMFUL_WEIGHTS,
    K_K,
    K_POSITIONS,
    K_PROVENANCE,
    K_ROLE,
    K_ROUTING,
    K_SAE,
    K_SCALE,
    K_SOURCE_DOMAIN,
    K_TAU,
    ROLE_SOURCE,
    ROLE_TARGET,
    decoder_key,
    encoder_key,
)


def random_pack(architecture: str, d_model: int, positions: list[str], *, expansion: int = 4, k: int = 8,
                n_harmful: int = 4, domains: tuple[str, ...] = ("source", "target"), tau: float = 0.0,
                scale: float = 1.0, harmful_bias: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(metadata, tensors) of a valid pack with random unit-norm decoders. The harmful latents get an
    encoder bias of `harmful_bias`, so they fire on most tokens; tau 0 then opens the gate wherever one
    of them is in the TopK."""
    g = torch.Generator().manual_seed(seed)
    d_sae = expansion * d_model
    meta_positions, tensors = {}, {}
    features = {d: {} for d in domains}
    for pos in positions:
        ids = torch.randperm(d_sae, generator=g)[: n_harmful + 2].tolist()
        harmful, anchor = ids[:n_harmful], ids[n_harmful:]
        meta_positions[pos] = {K_D_MODEL: d_model, K_D_SAE: d_sae, K_K: k, K_SCALE: scale, K_HARMFUL_IDS: harmful}
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
            features[domain][pos] = {
                K_HARMFUL_WEIGHTS: (torch.rand(n_harmful, generator=g) + 0.5).tolist(),
                K_ANCHOR_IDS: anchor,
                K_ANCHOR_VALUES: (torch.rand(len(anchor), generator=g) + 0.5).tolist(),
                K_TAU: tau,
            }
    meta = {
        K_FORMAT_VERSION: FORMAT_VERSION,
        K_ARCHITECTURE: architecture,
        K_D_MODEL: d_model,
        K_POSITIONS: meta_positions,
        K_SAE: {"type": "topk", "expansion": expansion, "k": k},
        K_ROUTING: {"method": "none (synthetic)", "candidates": [
            {"position": p, "score": 1.0 - i / max(1, len(positions))} for i, p in enumerate(positions)]},
        K_SOURCE_DOMAIN: domains[0],
        K_DOMAINS: {
            d: {K_ROLE: ROLE_SOURCE if i == 0 else ROLE_TARGET, K_FEATURES: features[d],
                **({K_ADAPTED_FROM: domains[0]} if i else {})}
            for i, d in enumerate(domains)
        },
        K_PROVENANCE: {"model": "synthetic random pack", "safedig_version": __version__, "seed": seed},
    }
    return meta, {name: t.to(dtype) for name, t in tensors.items()}
