"""TopK sparse autoencoder with a separable encoder and decoder (docs/method.md section 2).

    z     = TopK_k( ReLU( W_enc (x/s - b_pre) + b_enc ) )     encoder, frozen after source training
    x_hat = s * ( W_dec z + b_dec )                           decoder, one per risk domain

`b_pre` is the encoder's own copy of the input centring, so swapping in a target-domain decoder (with
its own adapted `b_dec`) never changes which latents fire. Decoder rows are kept unit norm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def topk_relu(pre: Tensor, k: int) -> Tensor:
    """Keep the k largest ReLU'd pre-activations per row, zero the rest."""
    values, indices = pre.relu().topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, indices, values)


class SAEEncoder(nn.Module):
    def __init__(self, d_model: int, d_sae: int, k: int):
        super().__init__()
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in 1..d_sae ({d_sae}), got {k}")
        self.k = k
        self.W_enc = nn.Parameter(torch.empty(d_sae, d_model))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_pre = nn.Parameter(torch.zeros(d_model))

    def preactivations(self, x_scaled: Tensor) -> Tensor:
        return (x_scaled - self.b_pre) @ self.W_enc.T + self.b_enc

    def forward(self, x_scaled: Tensor) -> Tensor:
        return topk_relu(self.preactivations(x_scaled), self.k)


class SAEDecoder(nn.Module):
    def __init__(self, d_model: int, d_sae: int):
        super().__init__()
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_model))
        self.b_dec = nn.Parameter(torch.zeros(d_model))

    def forward(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    @torch.no_grad()
    def normalize_rows_(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))


class TopKSAE(nn.Module):
    """One position's SAE; `scale` is the per-position activation scale s."""

    scale: Tensor  # a buffer, saved with the state dict

    def __init__(self, d_model: int, d_sae: int, k: int, scale: float = 1.0):
        super().__init__()
        self.d_model, self.d_sae = d_model, d_sae
        self.encoder = SAEEncoder(d_model, d_sae, k)
        self.decoder = SAEDecoder(d_model, d_sae)
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows, encoder initialised as its transpose (a standard TopK init)."""
        w = torch.randn(self.d_sae, self.d_model, generator=generator)
        self.decoder.W_dec.copy_(w)
        self.decoder.normalize_rows_()
        self.encoder.W_enc.copy_(self.decoder.W_dec)
        self.encoder.b_enc.zero_()
        self.encoder.b_pre.zero_()
        self.decoder.b_dec.zero_()

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x / self.scale)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z) * self.scale

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encode(x)
        return self.decode(z), z


def fraction_of_variance_explained(x: Tensor, x_hat: Tensor) -> float:
    """1 - residual variance / total variance, over all tokens (the FVE every pack reports)."""
    x, x_hat = x.double(), x_hat.double()
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    return float(1.0 - residual / total)
