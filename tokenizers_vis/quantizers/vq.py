"""Nearest-neighbour vector quantizer (VQ-VAE / VQGAN / LlamaGen VQ).

Implements the quantizer of

- van den Oord et al. 2017, "Neural Discrete Representation Learning" (VQ-VAE), §3.1-3.2:
  nearest code, straight-through gradient, codebook + commitment losses (beta = 0.25);
- Esser et al. 2021, "Taming Transformers" (VQGAN): the ``legacy`` loss form of its
  ``VectorQuantizer2`` puts beta on the codebook term instead of the commitment term;
- Yu et al. 2022, "Vector-quantized Image Modeling with Improved VQGAN" (ViT-VQGAN), §3.2:
  l2-normalised, low-dimensional ("factorised") codes;
- Sun et al. 2024, "Autoregressive Model Beats Diffusion: Llama for Scalable Image
  Generation" (LlamaGen), §2.1: codebook 16384 x 8 with l2-norm, beta 0.25, and the optional
  MAGVIT-style entropy loss ``mean_i H(p_i) - H(mean_i p_i)`` with ``p = softmax(-d / tau)``.

Structure for later extensions (EMA codebook, k-means init, dead-code restart): the pieces are
separate methods -- :meth:`codebook` (the effective code vectors), :meth:`distances`,
:meth:`_losses`, :meth:`_track` (usage bookkeeping) -- so a subclass can replace the update
rule without touching the lookup.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def entropy_loss(distances: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """MAGVIT / LlamaGen entropy penalty ``mean_i H(p_i) - H(mean_i p_i)``, ``p_i = softmax(-d_i / tau)``.

    ``distances`` is (N, K). The first term is low when each vector is confidently assigned; the
    second (subtracted) term is high when the batch spreads over many codes. The minimum,
    ``-log K``, is reached by confident assignments spread uniformly over all K codes.
    """
    logits = -distances.float().reshape(-1, distances.shape[-1]) / temperature
    logp = F.log_softmax(logits, dim=-1)
    p = logp.exp()
    sample_entropy = -(p * logp).sum(-1).mean()
    avg = p.mean(0)
    # clamp avoids log(0) = -inf times 0 = NaN for codes nobody picks
    avg_entropy = -(avg * avg.clamp_min(1e-12).log()).sum()
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    """Map channels-first features ``(B, dim, h, w)`` to their nearest codebook entries.

    Args:
        codebook_size: K, the number of codes.
        dim: code dimension (the channel count of the input).
        beta: commitment weight (0.25 in VQ-VAE / LlamaGen).
        l2_norm: l2-normalise inputs and codes before the lookup (ViT-VQGAN / LlamaGen); then
            squared distance is ``2 - 2 cos`` and the quantized output lies on the unit sphere.
        entropy_weight: weight of :func:`entropy_loss` (0 disables it; LlamaGen's default).
        entropy_temperature: tau of the entropy loss softmax (0.01 as in LlamaGen).
        legacy: taming's legacy form, beta on the codebook term instead of the commitment term.
        usage_window: number of recent training batches the usage metric looks back over.

    ``forward`` returns ``(z_q, indices, losses)``; ``losses`` holds ``commit``, ``codebook``,
    ``entropy`` (already weighted), ``loss`` (their sum) and the detached metrics ``usage``
    (fraction of codes used in the last ``usage_window`` training batches) and ``perplexity``
    (exp of the entropy of this batch's code histogram).
    """

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, l2_norm: bool = True,
                 entropy_weight: float = 0.0, entropy_temperature: float = 0.01,
                 legacy: bool = False, usage_window: int = 100):
        super().__init__()
        if codebook_size < 2 or dim < 1:
            raise ValueError(f"VectorQuantizer needs codebook_size >= 2 and dim >= 1, got "
                             f"codebook_size={codebook_size}, dim={dim}")
        self.codebook_size = int(codebook_size)
        self.dim = int(dim)
        self.beta = float(beta)
        self.l2_norm = bool(l2_norm)
        self.entropy_weight = float(entropy_weight)
        self.entropy_temperature = float(entropy_temperature)
        self.legacy = bool(legacy)
        # Same parameter name as LlamaGen/taming (``embedding.weight``) to ease weight porting.
        self.embedding = nn.Embedding(self.codebook_size, self.dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / self.codebook_size, 1.0 / self.codebook_size)
            if self.l2_norm:
                # As LlamaGen: store unit-norm codes. Raw codes of norm ~1/K would make the
                # gradient through the normalisation ~K times larger than the step Adam takes.
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # Rolling usage: one row of "code was used" flags per recent training batch. Not
        # persistent, so checkpoints stay loadable whatever the window.
        self.usage_window = int(usage_window)
        self.register_buffer("_used", torch.zeros(self.usage_window, self.codebook_size, dtype=torch.bool),
                             persistent=False)
        self._slot = 0  # python int: no .item() / device sync, works on meta

    # ---- codebook ----------------------------------------------------------------------
    def codebook(self) -> torch.Tensor:
        """The effective (K, dim) code vectors (unit-norm when ``l2_norm``)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def distances(self, z_flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Squared euclidean distances (N, K) between rows of ``z_flat`` and ``codes``."""
        z_flat, codes = z_flat.float(), codes.float()
        # ||z||^2 + ||e||^2 - 2 z.e, with the matmul done by addmm (one pass, no (N, K, d) tensor)
        return torch.addmm((z_flat * z_flat).sum(1, keepdim=True) + (codes * codes).sum(1),
                           z_flat, codes.t(), beta=1.0, alpha=-2.0)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for ``indices`` (B, h, w) -> (B, dim, h, w), normalised when ``l2_norm``."""
        if indices.dtype.is_floating_point:
            raise ValueError(f"lookup expects integer code indices, got dtype {indices.dtype}")
        return F.embedding(indices.long(), self.codebook()).movedim(-1, 1).contiguous()

    # ---- forward -----------------------------------------------------------------------
    def forward(self, z: torch.Tensor):
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"VectorQuantizer expects (B, {self.dim}, h, w) features, got {tuple(z.shape)}")
        B, C, h, w = z.shape
        z = z.movedim(1, -1)  # (B, h, w, C)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        codes = self.codebook()
        z_flat = z.reshape(-1, C)
        d = self.distances(z_flat, codes)
        idx = d.argmin(1)
        z_q = F.embedding(idx, codes).view_as(z).to(z.dtype)
        losses = self._losses(z, z_q, d)
        losses.update(self._track(idx))
        # straight-through estimator: forward value z_q, gradient identity w.r.t. z
        z_q = z + (z_q - z).detach()
        return z_q.movedim(-1, 1).contiguous(), idx.view(B, h, w), losses

    def _losses(self, z: torch.Tensor, z_q: torch.Tensor, d: torch.Tensor) -> dict:
        commit = F.mse_loss(z, z_q.detach())  # pulls the encoder to its code
        codebook = F.mse_loss(z_q, z.detach())  # pulls the code to the encoder output
        if self.legacy:  # taming's legacy form: beta weights the codebook term
            codebook = self.beta * codebook
        else:
            commit = self.beta * commit
        if self.entropy_weight > 0:
            ent = self.entropy_weight * entropy_loss(d, self.entropy_temperature)
        else:
            ent = z.new_zeros(())
        return {"loss": commit + codebook + ent, "commit": commit, "codebook": codebook, "entropy": ent}

    @torch.no_grad()
    def _track(self, idx: torch.Tensor) -> dict:
        hist = torch.bincount(idx, minlength=self.codebook_size).float()
        p = hist / hist.sum().clamp_min(1)
        perplexity = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
        if self.training and self.usage_window > 0:
            self._used[self._slot] = hist > 0
            self._slot = (self._slot + 1) % self.usage_window
        return {"usage": self.usage(), "perplexity": perplexity}

    def usage(self) -> torch.Tensor:
        """Fraction of codes picked at least once in the last ``usage_window`` training batches."""
        return self._used.any(0).float().mean()

    def reset_usage(self) -> None:
        self._used.zero_()
        self._slot = 0

    def extra_repr(self) -> str:
        return (f"codebook_size={self.codebook_size}, dim={self.dim}, beta={self.beta}, "
                f"l2_norm={self.l2_norm}, entropy_weight={self.entropy_weight}, legacy={self.legacy}")
