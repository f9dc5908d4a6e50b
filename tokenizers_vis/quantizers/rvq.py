"""Residual vector quantization (RVQ).

Implements the residual quantizer of

- Zeghidour et al. 2021, "SoundStream" (arXiv 2107.03312), §3.3, Algorithm 1: ``r_0 = z``;
  for ``d = 1..D``: ``q_d = VQ_d(r_{d-1})``, ``r_d = r_{d-1} - q_d``; ``z_hat = sum_d q_d``;
  and its *quantizer dropout* (§3.3, "bitrate scalability"): in training, with some
  probability, only the first ``d' ~ U{1..D}`` levels are used;
- Lee et al. 2022, "Autoregressive Image Generation using Residual Quantization" (RQ-VAE),
  §3.1, whose option of one codebook shared by all levels is ``shared_codebook=True``.

See also /work/shared/reference/tokenizers.md §8 ("RVQ"). Each level is the project's
:class:`~tokenizers_vis.quantizers.vq.VectorQuantizer`; by default with ``l2_norm=False`` so
that ``z_hat`` is exactly the sum of the raw code vectors (a normalised VQ would re-normalise
each residual and the sum identity would no longer describe the input).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from tokenizers_vis.quantizers.vq import VectorQuantizer


class ResidualVQ(nn.Module):
    """Quantize ``(B, dim, h, w)`` features with ``num_levels`` residual VQ levels.

    Args:
        num_levels: D, the number of residual levels.
        codebook_size: K, codes per level.
        dim: code dimension (input channel count).
        shared_codebook: one codebook for every level (RQ-VAE) instead of one per level.
        quantizer_dropout: probability that a training forward uses only the first
            ``d' ~ U{1..D}`` levels (SoundStream §3.3). Never uses 0 levels.
        **vq_kwargs: passed to every :class:`VectorQuantizer` (``beta``, ``entropy_weight``,
            ...); ``l2_norm`` defaults to False here.

    ``forward(z)`` returns ``(z_q, indices, losses)``:

    - ``z_q`` (B, dim, h, w): value ``sum_d q_d``; gradient w.r.t. ``z`` is the identity
      (one straight-through estimator on the sum, so the encoder gradient is not multiplied
      by the number of levels);
    - ``indices`` (B, h, w, D) int64; levels skipped by quantizer dropout hold ``-1``, which
      :meth:`lookup` treats as "contributes nothing";
    - ``losses``: ``loss``/``commit``/``codebook``/``entropy`` are the *mean* over the used
      levels of each level's VQ terms (each level's commitment pulls the residual it saw
      towards its code); ``usage``/``perplexity`` are means over used levels (detached);
      ``levels`` is the number of levels used (a tensor).
    """

    def __init__(self, num_levels: int, codebook_size: int, dim: int, shared_codebook: bool = False,
                 quantizer_dropout: float = 0.0, **vq_kwargs):
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"ResidualVQ needs num_levels >= 1, got {num_levels}")
        if not 0.0 <= quantizer_dropout <= 1.0:
            raise ValueError(f"quantizer_dropout is a probability in [0, 1], got {quantizer_dropout}")
        self.num_levels = int(num_levels)
        self.codebook_size = int(codebook_size)
        self.dim = int(dim)
        self.shared_codebook = bool(shared_codebook)
        self.quantizer_dropout = float(quantizer_dropout)
        vq_kwargs.setdefault("l2_norm", False)
        n = 1 if self.shared_codebook else self.num_levels
        self.quantizers = nn.ModuleList(VectorQuantizer(codebook_size, dim, **vq_kwargs) for _ in range(n))
        self.last_levels = self.num_levels  # levels used by the last forward (for inspection)

    def level(self, d: int) -> VectorQuantizer:
        """The quantizer of level ``d`` (0-based); the same module for all when shared."""
        return self.quantizers[0 if self.shared_codebook else d]

    def _draw_levels(self) -> int:
        if not self.training or self.quantizer_dropout <= 0:
            return self.num_levels
        if float(torch.rand(())) >= self.quantizer_dropout:
            return self.num_levels
        return int(torch.randint(1, self.num_levels + 1, ()))  # U{1..D}, never 0

    def forward(self, z: torch.Tensor):
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"ResidualVQ expects (B, {self.dim}, h, w) features, got {tuple(z.shape)}")
        B, _, h, w = z.shape
        used = self._draw_levels()
        self.last_levels = used
        residual = z
        z_hat = torch.zeros_like(z)
        idx_all = torch.full((B, h, w, self.num_levels), -1, dtype=torch.long, device=z.device)
        per_level = []
        for d in range(used):
            vq = self.level(d)
            _, idx, losses = vq(residual)
            q = vq.lookup(idx).to(z.dtype)  # exact code values (no STE rounding)
            idx_all[..., d] = idx
            z_hat = z_hat + q
            # Detached: the residual chain only chooses codes; codebooks learn from their losses.
            residual = residual - q.detach()
            per_level.append(losses)
        out = {k: torch.stack([l[k] for l in per_level]).mean()
               for k in ("loss", "commit", "codebook", "entropy", "usage", "perplexity")}
        out["levels"] = torch.tensor(used)
        # Straight-through on the sum: forward value z_hat, gradient identity w.r.t. z.
        z_q = z + (z_hat - z).detach()
        return z_q, idx_all, out

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """``sum_d C_d[indices[..., d]]``: (B, h, w, D) -> (B, dim, h, w); ``-1`` entries add nothing."""
        if indices.dim() != 4 or indices.shape[-1] != self.num_levels:
            raise ValueError(f"ResidualVQ.lookup expects (B, h, w, {self.num_levels}) indices, "
                             f"got {tuple(indices.shape)}")
        if indices.dtype.is_floating_point:
            raise ValueError(f"lookup expects integer code indices, got dtype {indices.dtype}")
        out = None
        for d in range(self.num_levels):
            idx = indices[..., d]
            q = self.level(d).lookup(idx.clamp_min(0)) * (idx >= 0).unsqueeze(1)
            out = q if out is None else out + q
        return out

    def extra_repr(self) -> str:
        return (f"num_levels={self.num_levels}, codebook_size={self.codebook_size}, dim={self.dim}, "
                f"shared_codebook={self.shared_codebook}, quantizer_dropout={self.quantizer_dropout}")
