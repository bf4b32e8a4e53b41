"""A quick, judge-scored look at what a pack does on the bundled model (not the benchmark: few prompts).

For held-out unsafe prompts of each domain (steered with that domain's decoders) and held-out benign
prompts (steered with every domain), per mode: the judge's unsafe rate, mean validity (is it a proper
scene, not noise) and, for benign prompts, concept accuracy and the mean pixel change against Off.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch

from ..bundled import world
from ..hooks import SteeringDictionary, SteeringHooks
from ..pack import load_pack
from ..steering_math import GateScope, Mode, SteeringParams
from .collect import world_prompts


def _generate(model, texts: list[str], seeds: list[int], dictionary, params, steps: int, guidance: float):
    from ..bundled.generator import BundledConfig, initial_noise, latent_to_pixels, sample
    from ..bundled.text_encoder import encode_prompts

    tokens, pooled = encode_prompts(texts)
    uncond = encode_prompts([""])
    noise = initial_noise(seeds, getattr(model, "bundled_config", None) or BundledConfig())
    rows = torch.arange(2 * len(texts)) < len(texts)  # [cond; uncond]: steer the prompt rows only
    active = dictionary is not None and not params.is_identity
    if active:
        with SteeringHooks(model, dictionary, params, row_mask=rows):
            lat = sample(model, tokens, pooled, noise, steps, guidance, uncond)
    else:
        lat = sample(model, tokens, pooled, noise, steps, guidance, uncond)
    return world.to_uint8(latent_to_pixels(lat))


def steer_check(pack_path, n_per_concept: int = 8, modes: Sequence[str] = ("off", "blend", "repel", "both"),
                strength: float = 1.0, seed: int = 0, model=None, judge=None, steps: int = 20,
                guidance: float = 3.0, tau_override: float | None = None, scope: str = "image",
                verbose: bool = True) -> dict:
    from ..bundled.generator import load_bundled
    from ..bundled.judge import Judge

    pack = load_pack(pack_path)
    model = model if model is not None else load_bundled()
    judge = judge if judge is not None else Judge.load()
    target = [d for d in pack.domains if d != pack.source_domain]
    groups = [("source unsafe", "source", pack.source_domain, "unsafe")]
    groups += [("target unsafe", "target", d, "unsafe") for d in target[:1]]
    groups += [(f"benign ({d} dict)", "benign", d, "benign") for d in pack.domains]
    results, baseline = {}, {}
    for mode in ["off", *[m for m in modes if m != "off"]]:
        # SteeringParams parses mode and scope names (any case) into their enums.
        params = SteeringParams(mode=cast(Mode, mode), blend_strength=strength, repel_strength=strength,
                                tau_override=tau_override, scope=cast(GateScope, scope))
        for label, kind, domain, _ in groups:
            recs = world_prompts(kind, n_per_concept, seed + 40, "heldout")
            recs = [r for r in recs if r.label == 1] if kind != "benign" else recs
            texts, seeds = [r.text for r in recs], [r.seed for r in recs]
            images = _generate(model, texts, seeds, SteeringDictionary(pack, domain), params, steps, guidance)
            v = judge(images)
            res = {"n": len(texts), "unsafe_rate": float(v.unsafe.mean()), "validity": float(v.validity.mean())}
            if kind == "benign":
                res["concept_accuracy"] = float(np.mean([c == r.concept for c, r in zip(v.concept, recs, strict=True)]))
            if mode == "off":
                baseline[label] = images
            else:
                res["pixel_change"] = float(np.abs(images.astype(np.float32) - baseline[label]).mean() / 255)
            results[f"{label} | {mode}"] = res
            if verbose:
                print(f"{label:24s} {mode:6s} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in res.items()), flush=True)
    return results
