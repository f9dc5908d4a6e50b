"""Finite Scalar Quantization (FSQ).

Implements Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple"
(arXiv 2309.15505), §3 and its Appendix A code: each of D channels is squashed into a bounded
range and rounded to one of ``L_d`` levels; the implicit codebook is the ``prod(L_d)`` grid.
There is no codebook parameter and no auxiliary loss.

Per dimension d with ``L_d`` levels::

    half   = (L_d - 1) * (1 + eps) / 2
    offset = 0.5 if L_d is even else 0
    shift  = atanh(offset / half)
    bounded = tanh(z + shift) * half - offset     # in (-L_d/2 - ..., L_d/2 - ...)
    z_hat  = round_STE(bounded) / (L_d // 2)      # grid values in [-1, 1]

and the mixed-radix index ``sum_d (z_hat_d * (L_d // 2) + L_d // 2) * prod_{j<d} L_j``.
Suggested levels (paper Table 1): 2^8 [8,6,5]; 2^10 [8,5,5,5]; 2^12 [7,5,5,5,5];
2^14 [8,8,8,6,5]; 2^16 [8,8,8,5,5,5].
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity gradient backward (straight-through estimator)."""
    # round(x) + (x - sg[x]) is exactly round(x) forward; x + sg[round(x) - x] may be off by an ulp
    return torch.round(x).detach() + (x - x.detach())


class FSQ(nn.Module):
    """Finite scalar quantizer over channels-first features ``(B, len(levels), h, w)``.

    Args:
        levels: ``L_d`` per channel, each >= 2.
        eps: widens the tanh range slightly so the extreme levels are reachable (1e-3).

    ``forward(z)`` returns ``(z_q, indices, losses)``: ``z_q`` (B, D, h, w) on the grid with a
    round-STE gradient, ``indices`` (B, h, w) int64 in ``[0, codebook_size)``, and ``losses`` with
    ``loss`` (a zero tensor: FSQ has no auxiliary loss) and the detached metric ``usage``
    (fraction of the ``codebook_size`` codes used in this batch).

    :meth:`codes_to_indices` / :meth:`indices_to_codes` work channels-last (``(..., D)``);
    :meth:`lookup` is the decode-side ``(B, h, w) -> (B, D, h, w)``.
    """

    def __init__(self, levels: list[int], eps: float = 1e-3):
        super().__init__()
        levels = [int(L) for L in levels]
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ needs a non-empty list of levels, each >= 2, got {levels}")
        self.levels = levels
        self.eps = float(eps)
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        # All derived from the Python list, never from tensor data: builds on the meta device.
        half = [(L - 1) * (1 + self.eps) / 2 for L in levels]
        offset = [0.5 if L % 2 == 0 else 0.0 for L in levels]
        shift = [math.atanh(o / h) for o, h in zip(offset, half)]
        basis = [math.prod(levels[:d]) for d in range(self.dim)]
        buf = lambda name, v, dt: self.register_buffer(name, torch.tensor(v, dtype=dt), persistent=False)
        buf("_levels", levels, torch.int64)
        buf("_half_width", [L // 2 for L in levels], torch.int64)
        buf("_basis", basis, torch.int64)
        buf("_half", half, torch.float32)
        buf("_offset", offset, torch.float32)
        buf("_shift", shift, torch.float32)

    # ---- quantization ------------------------------------------------------------------
    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash channels-last ``z`` (..., D) so that rounding yields exactly ``L_d`` values."""
        return torch.tanh(z + self._shift) * self._half - self._offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Channels-last ``z`` (..., D) -> grid values in [-1, 1] with a round-STE gradient."""
        return round_ste(self.bound(z)) / self._half_width

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Grid values (..., D) -> int64 indices (...) in ``[0, codebook_size)``."""
        if codes.shape[-1] != self.dim:
            raise ValueError(f"codes_to_indices expects (..., {self.dim}) codes, got {tuple(codes.shape)}")
        # codes * (L//2) is an integer up to float error: round before the cast
        digits = torch.round(codes.float() * self._half_width).long() + self._half_width
        return (digits * self._basis).sum(-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`codes_to_indices`: int indices (...) -> grid values (..., D)."""
        if indices.dtype.is_floating_point:
            raise ValueError(f"indices_to_codes expects integer indices, got dtype {indices.dtype}")
        digits = (indices.long().unsqueeze(-1) // self._basis) % self._levels
        return (digits - self._half_width).float() / self._half_width

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode-side lookup: indices (B, h, w) -> code values (B, D, h, w)."""
        return self.indices_to_codes(indices).movedim(-1, 1).contiguous()

    # ---- forward -----------------------------------------------------------------------
    def forward(self, z: torch.Tensor):
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"FSQ expects (B, {self.dim}, h, w) features, got {tuple(z.shape)}")
        z = z.movedim(1, -1)  # (B, h, w, D)
        z_q = self.quantize(z).to(z.dtype)
        indices = self.codes_to_indices(z_q.detach())
        with torch.no_grad():
            # scatter rather than bincount: bincount has no meta kernel
            used = indices.new_zeros(self.codebook_size, dtype=torch.bool).index_fill_(0, indices.flatten(), True)
            usage = used.float().mean()
        losses = {"loss": z.new_zeros(()), "usage": usage}
        return z_q.movedim(-1, 1).contiguous(), indices, losses

    def extra_repr(self) -> str:
        return f"levels={self.levels}, eps={self.eps}, codebook_size={self.codebook_size}"
