"""TEST ONLY: helper nodes the SafeDIG server tests link into a temporary ComfyUI. Never shipped.

- TEST_ONLY_SafeDIG_RandomConditioning: a seeded random CONDITIONING (no text encoder weights exist for
  the tiny test checkpoints). `nonce` changes nothing but the cache key, to force a sampler to run again.
- TEST_ONLY_SafeDIG_RandomCLIP: a CLIP whose encoding of a text is seeded random conditioning (the same as
  RandomConditioning for that text), for Build / Adapt Dictionary on the tiny checkpoints.
- TEST_ONLY_SafeDIG_HookCount: counts forward hooks (SafeDIG's and any) on every module of a MODEL and
  reports the diffusion model's id(), as UI text, after the optional `samples` input is computed.
"""

import hashlib
import json
import os
import sys

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))
if _REPO not in sys.path:
    sys.path.append(_REPO)


class RandomConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text": ("STRING", {"default": "a prompt"}),
            "context_dim": ("INT", {"default": 40, "min": 1, "max": 8192}),
            "pooled_dim": ("INT", {"default": 24, "min": 0, "max": 8192}),
            "tokens": ("INT", {"default": 6, "min": 1, "max": 512}),
            "nonce": ("INT", {"default": 0, "min": 0, "max": 2**31}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "_for_testing/safedig"

    def make(self, text, context_dim, pooled_dim, tokens, nonce):
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
        g = torch.Generator().manual_seed(seed)
        cond = torch.randn(1, tokens, context_dim, generator=g)
        extra = {"pooled_output": torch.randn(1, pooled_dim, generator=g)} if pooled_dim else {}
        return ([[cond, extra]],)


def random_conditioning(text, context_dim, pooled_dim, tokens):
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, tokens, context_dim, generator=g)
    return cond, (torch.randn(1, pooled_dim, generator=g) if pooled_dim else None)


class _RandomClip:
    def __init__(self, context_dim, pooled_dim, tokens):
        self.dims = (context_dim, pooled_dim, tokens)

    def tokenize(self, text, **kwargs):
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        cond, pooled = random_conditioning(tokens["text"], *self.dims)
        return [[cond, {**({"pooled_output": pooled} if pooled is not None else {}), **(add_dict or {})}]]


class RandomCLIP:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "context_dim": ("INT", {"default": 40, "min": 1, "max": 8192}),
            "pooled_dim": ("INT", {"default": 24, "min": 0, "max": 8192}),
            "tokens": ("INT", {"default": 6, "min": 1, "max": 512}),
        }}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "make"
    CATEGORY = "_for_testing/safedig"

    def make(self, context_dim, pooled_dim, tokens):
        return (_RandomClip(context_dim, pooled_dim, tokens),)


class HookCount:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}, "optional": {"samples": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "count"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing/safedig"

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # always run

    def count(self, model, samples=None):
        from safedig_core.hooks import safedig_hooks

        root = model.model
        forward = sum(len(m._forward_hooks) for m in root.modules())
        pre = sum(len(m._forward_pre_hooks) for m in root.modules())
        report = {"safedig_hooks": len(safedig_hooks(root)), "forward_hooks": forward, "forward_pre_hooks": pre,
                  "diffusion_model_id": id(root.diffusion_model), "modules": sum(1 for _ in root.modules())}
        return {"ui": {"text": (json.dumps(report),)}}


NODE_CLASS_MAPPINGS = {
    "TEST_ONLY_SafeDIG_RandomConditioning": RandomConditioning,
    "TEST_ONLY_SafeDIG_HookCount": HookCount,
    "TEST_ONLY_SafeDIG_RandomCLIP": RandomCLIP,
}
