"""Per-channel standardisation of continuous tokens inside a generator (``latent_norm=``).

Flow matching (xAR) and DDPM heads (MAR, Hi-MAR) add unit-variance noise, so they work best
on unit-variance targets. MAR multiplies its KL-16 latents by one constant (``vae_scale``
0.2325, unit variance overall); the zoo's small KL tokenizers have channels whose standard
deviations differ by 16x (``kl-tiny``: 0.10 to 1.61), which no single constant fixes.

``latent_norm="channel"``: the generator keeps the mean and standard deviation of each token
channel as buffers (fitted once from the training tokens by :meth:`LatentNorm.fit`, which
``train.generator`` calls through ``Generator.fit_latent_stats``; saved in the checkpoint),
trains on ``(x - mean) / std`` and maps its samples back, so the token contract is unchanged:
tokens in and out are the tokenizer's. ``"none"`` (the paper configs) is the identity.
"""
from __future__ import annotations

import torch
from torch import nn

MODES = ("none", "channel")


class LatentNorm(nn.Module):
    def __init__(self, dim: int, mode: str = "none"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"latent_norm must be one of {MODES}, got {mode!r}")
        self.mode = mode
        if mode == "channel":
            self.register_buffer("mean", torch.zeros(dim))
            self.register_buffer("std", torch.ones(dim))
            self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, tokens: torch.Tensor) -> None:
        """Statistics over every token of ``tokens`` (..., dim)."""
        if self.mode == "none":
            return
        x = tokens.detach().reshape(-1, tokens.shape[-1]).double()
        if x.shape[-1] != self.mean.numel() or x.shape[0] < 2:
            raise ValueError(f"latent_norm.fit needs (..., {self.mean.numel()}) tokens, got {tuple(tokens.shape)}")
        self.mean.copy_(x.mean(0).to(self.mean))
        self.std.copy_(x.std(0).clamp_min(1e-6).to(self.std))
        self.fitted.fill_(True)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return x
        return (x - self.mean.to(x)) / self.std.to(x)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return x
        return x * self.std.to(x) + self.mean.to(x)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
