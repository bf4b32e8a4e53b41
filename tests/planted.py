"""Planted activations written in the collection format, and bag-of-words prompt embeddings for tiny
diffusers pipelines (their tokenizers cannot be built offline)."""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from safedig_core.training.collect import PromptRecord, start_manifest, write_shard
from safedig_core.training.generators import PromptEmbeddings

SUBDOMAINS = ("stripes", "checks", "spots")


def paired_prompts(n_pairs_per_sub: int, subdomains=SUBDOMAINS, seed: int = 0) -> list[PromptRecord]:
    out = []
    for i in range(n_pairs_per_sub * len(subdomains)):
        sub = subdomains[i % len(subdomains)]
        out.append(PromptRecord(f"unsafe {sub} {i}", 1, seed + i, i, sub, f"bad-{sub}"))
        out.append(PromptRecord(f"safe {sub} {i}", 0, seed + i, i, sub, f"good-{sub}"))
    return out


def write_set(path: Path, prompts: list[PromptRecord], make_rows, *, positions: list[str], steps=(0, 1, 2),
              tokens: int = 4, d: int = 16, shard_size: int = 8, architecture: str = "flux") -> Path:
    """A collection folder whose activations come from make_rows(position, prompt, step) -> [tokens, d]."""
    plan = {"version": 1, "prompts": [p.__dict__ for p in prompts], "capture_steps": list(steps),
            "positions": positions, "shard_size": shard_size, "max_tokens": None,
            "generator": {"backend": "planted"}, "architecture": architecture, "d_model": d}
    start_manifest(path, plan)
    from safedig_core.training.collect import _plan_hash

    for i in range(0, len(prompts), shard_size):
        idx = list(range(i, min(len(prompts), i + shard_size)))
        rows = [(j, s) for s in steps for j in idx]
        tensors = {"row.prompt": torch.tensor([j for j, _ in rows]), "row.step": torch.tensor([s for _, s in rows])}
        for pos in positions:
            act = torch.stack([make_rows(pos, prompts[j], s) for j, s in rows])
            tensors[f"act.{pos}"] = act.half()
            tensors[f"mean.{pos}"] = act.float().mean(1)
        write_shard(path, i // shard_size, tensors, _plan_hash(plan))
    return path


def word_vector(word: str, dim: int) -> torch.Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(zlib.crc32(word.encode())))


def bag_of_words_embeddings(texts: list[str], length: int, dim: int, pooled_dim: int) -> PromptEmbeddings:
    """Each word a fixed random vector (seeded by its hash): the same word always means the same thing,
    so 'unsafe' vs 'safe' prompts differ in a consistent direction, like real text encoders."""
    texts = list(dict.fromkeys(["", *texts]))
    embeds = torch.zeros(len(texts), length, dim)
    pooled = torch.zeros(len(texts), pooled_dim)
    for i, t in enumerate(texts):
        words = t.split()[:length]
        for j, w in enumerate(words):
            embeds[i, j] = word_vector(w, dim)
        if words:
            pooled[i] = torch.stack([word_vector(w, pooled_dim) for w in words]).mean(0)
    return PromptEmbeddings(texts, embeds, pooled)


def tiny_pipeline(kind: str, seed: int = 0):
    """A FluxPipeline / StableDiffusion3Pipeline around tests/tiny_models' random-weight transformers, with
    no VAE and no text encoders (collection never decodes; prompts come as precomputed embeddings)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    from tiny_models import diffusers_flux, diffusers_sd3

    none = dict(vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if kind == "flux":
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=diffusers_flux(seed), **none)
    else:
        pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=diffusers_sd3(seed),
                                        text_encoder_3=None, tokenizer_3=None, **none)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_embeddings(kind: str, texts: list[str]) -> PromptEmbeddings:
    from tiny_models import FLUX_CFG, SD3_CFG

    if kind == "flux":
        return bag_of_words_embeddings(texts, 12, FLUX_CFG["ctx_dim"], FLUX_CFG["vec_dim"])
    return bag_of_words_embeddings(texts, 12, SD3_CFG["ctx_dim"], SD3_CFG["pooled"])
