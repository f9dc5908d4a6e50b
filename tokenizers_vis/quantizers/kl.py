"""Continuous KL bottleneck: a diagonal-Gaussian posterior (the LDM / MAR "KL" VAE latent).

Implements

- Kingma & Welling 2014, "Auto-Encoding Variational Bayes", §2.4 and Appendix B: the
  reparameterised sample ``z = mu + sigma * eps`` and the closed-form KL to ``N(0, I)``,
  ``0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2)``;
- Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (LDM),
  §3 / Appendix G: ``quant_conv`` (1x1) to ``2 * latent_channels`` moments, logvar clamped to
  ``[-30, 20]``, KL weight ~1e-6, latent ``scale_factor`` applied for the generative model;
- Li et al. 2024, "Autoregressive Image Generation without Vector Quantization" (MAR,
  arXiv 2406.11838), §5.1: the KL-16 tokenizer (16 latent channels at stride 16) built the
  same way.

KL reduction (LDM's ``kl_loss = sum(kl) / batch``): summed over channels and positions,
averaged over the batch.
"""
from __future__ import annotations

import torch
import torch.nn as nn

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian:
    """``N(mean, diag(exp(logvar)))`` over a (B, C, h, w) latent; ``logvar`` clamped to [-30, 20]."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        if mean.shape != logvar.shape:
            raise ValueError(f"mean and logvar must have the same shape, got {tuple(mean.shape)} "
                             f"and {tuple(logvar.shape)}")
        self.mean = mean
        # The clamp keeps exp() finite (upper) and the log-term bounded (lower), as in LDM.
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        """Split (B, 2C, h, w) moments into mean (first C channels) and logvar (last C)."""
        if moments.dim() < 2 or moments.shape[1] % 2:
            raise ValueError(f"moments need an even channel count (mean, logvar), got {tuple(moments.shape)}")
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample ``mean + std * eps`` (differentiable w.r.t. mean and logvar)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over all non-batch dims -> (B,)."""
        kl = 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar)
        return kl.flatten(1).sum(1)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of ``x`` per sample, summed over non-batch dims -> (B,)."""
        log2pi = torch.log(torch.tensor(2.0 * torch.pi, dtype=x.dtype, device=x.device))
        nll = 0.5 * (log2pi + self.logvar + (x - self.mean).pow(2) / self.var)
        return nll.flatten(1).sum(1)


class KLBottleneck(nn.Module):
    """Encoder features ``(B, in_channels, h, w)`` -> Gaussian latent ``(B, latent_channels, h, w)``.

    Args:
        in_channels: encoder output channels.
        latent_channels: C of the latent (16 for MAR's KL-16, 4 for SD's VAE).
        kl_weight: weight of the KL term in ``losses["loss"]`` (1e-6 in LDM/MAR).
        scale_factor: multiplies the latent handed to the generator (e.g. SD's 0.18215) so it
            has about unit variance; :meth:`unscale` undoes it before the decoder.

    ``forward(h, sample=None, generator=None)`` returns ``(latent * scale_factor, losses)`` with
    ``losses = {"loss": kl_weight * kl, "kl": kl}``, ``kl`` the batch mean of the per-sample KL
    summed over channels and positions. ``sample=None`` means sample in training and take the
    mode (mean) in eval. :attr:`last_posterior` keeps the last posterior for inspection.
    """

    def __init__(self, in_channels: int, latent_channels: int, kl_weight: float = 1e-6,
                 scale_factor: float = 1.0):
        super().__init__()
        if in_channels < 1 or latent_channels < 1:
            raise ValueError(f"KLBottleneck needs positive channel counts, got in_channels={in_channels}, "
                             f"latent_channels={latent_channels}")
        if scale_factor == 0:
            raise ValueError("scale_factor must be non-zero (unscale divides by it)")
        self.in_channels = int(in_channels)
        self.latent_channels = int(latent_channels)
        self.kl_weight = float(kl_weight)
        self.scale_factor = float(scale_factor)
        self.quant_conv = nn.Conv2d(self.in_channels, 2 * self.latent_channels, 1)
        self.last_posterior: DiagonalGaussian | None = None

    def posterior(self, h: torch.Tensor) -> DiagonalGaussian:
        if h.dim() != 4 or h.shape[1] != self.in_channels:
            raise ValueError(f"KLBottleneck expects (B, {self.in_channels}, h, w) features, got {tuple(h.shape)}")
        return DiagonalGaussian.from_moments(self.quant_conv(h))

    def forward(self, h: torch.Tensor, sample: bool | None = None,
                generator: torch.Generator | None = None):
        post = self.posterior(h)
        self.last_posterior = post
        if sample is None:
            sample = self.training
        latent = post.sample(generator) if sample else post.mode()
        kl = post.kl().mean()
        return latent * self.scale_factor, {"loss": self.kl_weight * kl, "kl": kl}

    def unscale(self, latent: torch.Tensor) -> torch.Tensor:
        """Generator-side latent -> decoder-side latent (divide by ``scale_factor``)."""
        return latent / self.scale_factor

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, latent_channels={self.latent_channels}, "
                f"kl_weight={self.kl_weight}, scale_factor={self.scale_factor}")
