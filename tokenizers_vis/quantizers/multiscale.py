"""VAR-style multi-scale residual quantization.

Implements the quantizer of

- Tian et al. 2024, "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
  Prediction" (VAR, arXiv 2404.02905), §3.2 and Algorithm 1 (multi-scale VQVAE encoding) /
  Algorithm 2 (reconstruction): one shared codebook quantizes the area-downsampled residual at
  each scale ``p_k``; the code map is bicubic-upsampled to the final size, passed through a
  residual conv ``phi`` and subtracted from the residual; ``f_hat`` is the sum of all scales;
- Qu et al. 2024, "TokenFlow" (arXiv 2412.03069), §3.2: the same scheme without ``phi``
  (``phi="none"``) and with *random scale drop* (``scale_drop=0.1``).

See /work/shared/reference/tokenizers.md §8 ("VAR multi-scale residual") and §2.

``phi`` selection (``phi="shared4"``, VAR's ``PhiPartiallyShared``): there are 4 convs; scale
``k`` (0-based, of ``K``) has fraction ``t = k / (K - 1)`` (``t = 0`` when ``K == 1``) and uses
the conv whose tick is nearest to ``t``, the ticks being 4 evenly spaced points in
``[1/(3*4), 1 - 1/(3*4)] = [1/12, 11/12]`` (float64 distances, first minimum wins, ticks
computed as ``numpy.linspace`` does, so exact ties resolve as in VAR: for the 10 VAR scales the
convs used are ``[0, 0, 1, 1, 1, 2, 2, 3, 3, 3]``). Each ``phi`` is
``0.5 * x + 0.5 * conv(x)`` (VAR's ``quant_resi = 0.5``).

Loss (VAR): for every scale ``k`` with running sum ``f_hat_k``,
``beta * mse(sg[f_hat_k], f) + mse(f_hat_k, sg[f])``, averaged over the scales used; the
output is ``f + sg[f_hat - f]`` (straight-through, identity gradient to the encoder).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizers_vis.quantizers.vq import VectorQuantizer
from zoo.tokens import TokenSpec

VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PHI_CHOICES = ("shared4", "none")
NUM_SHARED_PHI = 4


class Phi(nn.Module):
    """VAR's ``Phi``: ``(1 - r) * x + r * conv_k(x)`` with ``r = 0.5`` (residual refinement)."""

    def __init__(self, dim: int, kernel: int = 3, ratio: float = 0.5):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"phi_kernel must be a positive odd int (same-size conv), got {kernel}")
        self.ratio = float(ratio)
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1.0 - self.ratio) + self.conv(x) * self.ratio


def phi_index(k: int, num_scales: int, num_phi: int = NUM_SHARED_PHI) -> int:
    """Which of ``num_phi`` shared convs scale ``k`` (0-based) uses; see the module docstring."""
    t = k / (num_scales - 1) if num_scales > 1 else 0.0
    lo, hi = 1.0 / (3 * num_phi), 1.0 - 1.0 / (3 * num_phi)
    if num_phi == 1:
        return 0
    # Built like numpy.linspace (start + i * step, last = stop exactly) so that the exact ties
    # (e.g. k/(K-1) = 2/9 and 7/9 for K = 10) fall the same way as in VAR's float arithmetic.
    step = (hi - lo) / (num_phi - 1)
    ticks = [lo + i * step for i in range(num_phi - 1)] + [hi]
    dists = [abs(tk - t) for tk in ticks]
    return dists.index(min(dists))


class MultiScaleVQ(nn.Module):
    """Multi-scale residual VQ over a ``(B, dim, H, W)`` map with ``H == W == scales[-1]``.

    Args:
        codebook_size: K of the one codebook shared by all scales.
        dim: code dimension (channels of ``f``).
        scales: side lengths ``p_k`` of the square token maps, coarse to fine; the last is the
            feature map's size. VAR's 256-px list gives 680 tokens.
        phi: ``"shared4"`` (VAR) or ``"none"`` (TokenFlow).
        phi_kernel: kernel size of the phi convs (3 in VAR).
        scale_drop: training-time probability (TokenFlow: 0.1) of skipping one uniformly chosen
            scale other than the first. The skipped scale's code map is not added to ``f_hat``
            nor subtracted from the residual, and its index tensor is a placeholder filled with
            ``-1`` (so the pyramid keeps its shape and :meth:`indices_to_fhat` of the returned
            indices still reproduces ``f_hat``; ``-1`` marks "no tokens here").
            :attr:`last_dropped` holds the skipped scale (or None).
        beta: commitment weight.
        l2_norm: choose codes by cosine (l2-normalised residual and codes) and use unit-norm
            codes, as the normalised :class:`VectorQuantizer`; False in VAR.

    ``forward(f)`` returns ``(f_hat, indices, losses)`` with ``indices`` a list of
    ``(B, p_k, p_k)`` int64 tensors and ``losses`` holding ``loss``/``commit``/``codebook``
    (means over the scales used), ``usage`` and ``perplexity`` (detached).
    """

    def __init__(self, codebook_size: int, dim: int, scales: Sequence[int] = VAR_SCALES,
                 phi: str = "shared4", phi_kernel: int = 3, scale_drop: float = 0.0,
                 beta: float = 0.25, l2_norm: bool = False):
        super().__init__()
        scales = tuple(int(s) for s in scales)
        if not scales or min(scales) < 1 or any(a > b for a, b in zip(scales, scales[1:])):
            raise ValueError(f"scales must be a non-empty non-decreasing list of positive ints, got {scales}")
        if phi not in PHI_CHOICES:
            raise ValueError(f"phi must be one of {PHI_CHOICES}, got {phi!r}")
        if not 0.0 <= scale_drop <= 1.0:
            raise ValueError(f"scale_drop is a probability in [0, 1], got {scale_drop}")
        self.codebook_size = int(codebook_size)
        self.dim = int(dim)
        self.scales = scales
        self.phi_mode = phi
        self.scale_drop = float(scale_drop)
        self.beta = float(beta)
        # The VQ module holds the codebook and the distance/usage code; its own loss is unused
        # because VAR's loss compares the running f_hat (not each scale's code) with f.
        self.vq = VectorQuantizer(codebook_size, dim, beta=beta, l2_norm=l2_norm)
        self.phis = (nn.ModuleList(Phi(dim, phi_kernel) for _ in range(NUM_SHARED_PHI))
                     if phi == "shared4" else None)
        self.last_dropped: int | None = None

    # ---- helpers ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.scales[-1]

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    def token_spec(self) -> TokenSpec:
        return TokenSpec("discrete", "pyramid", [(p, p) for p in self.scales], vocab_size=self.codebook_size)

    def phi(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Apply scale ``k``'s phi (identity when ``phi="none"``)."""
        if self.phis is None:
            return x
        return self.phis[phi_index(k, self.num_scales)](x)

    def scale_contribution(self, k: int, idx: torch.Tensor) -> torch.Tensor:
        """``z_k = phi_k(bicubic_up(C[idx]))``: (B, p_k, p_k) -> (B, dim, H, W); ``-1`` -> zeros."""
        p = self.scales[k]
        if idx.dim() != 3 or tuple(idx.shape[1:]) != (p, p):
            raise ValueError(f"scale {k} expects indices (B, {p}, {p}), got {tuple(idx.shape)}")
        valid = idx >= 0
        h = self.vq.lookup(idx.clamp_min(0)) * valid.unsqueeze(1)
        if p != self.size:
            h = F.interpolate(h, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return self.phi(k, h)

    def _nearest(self, r: torch.Tensor) -> torch.Tensor:
        """Nearest-code ids of (B, dim, p, p) -> (B, p, p)."""
        B, C, p, q = r.shape
        flat = r.movedim(1, -1).reshape(-1, C)
        if self.vq.l2_norm:
            flat = F.normalize(flat, dim=-1)
        return self.vq.distances(flat, self.vq.codebook()).argmin(1).view(B, p, q)

    def _draw_drop(self) -> int | None:
        if not self.training or self.scale_drop <= 0 or self.num_scales < 2:
            return None
        if float(torch.rand(())) >= self.scale_drop:
            return None
        return int(torch.randint(1, self.num_scales, ()))  # never the first scale

    # ---- encode ----------------------------------------------------------------------------
    def forward(self, f: torch.Tensor):
        if f.dim() != 4 or f.shape[1] != self.dim or tuple(f.shape[2:]) != (self.size, self.size):
            raise ValueError(f"MultiScaleVQ expects (B, {self.dim}, {self.size}, {self.size}) features, "
                             f"got {tuple(f.shape)}")
        B = f.shape[0]
        drop = self._draw_drop()
        self.last_dropped = drop
        f_ng = f.detach()
        f_rest = f_ng.clone()
        f_hat = torch.zeros_like(f)
        indices, commit, codebook, picked = [], [], [], []
        for k, p in enumerate(self.scales):
            if k == drop:
                indices.append(torch.full((B, p, p), -1, dtype=torch.long, device=f.device))
                continue
            r = f_rest if p == self.size else F.interpolate(f_rest, size=(p, p), mode="area")
            with torch.no_grad():
                idx = self._nearest(r)
            z_k = self.scale_contribution(k, idx)
            f_hat = f_hat + z_k
            f_rest = f_rest - z_k.detach()  # the residual only selects codes: no gradient
            commit.append(self.beta * F.mse_loss(f_hat.detach(), f))
            codebook.append(F.mse_loss(f_hat, f_ng))
            indices.append(idx)
            picked.append(idx.reshape(-1))
        commit_m = torch.stack(commit).mean()
        codebook_m = torch.stack(codebook).mean()
        losses = {"loss": commit_m + codebook_m, "commit": commit_m, "codebook": codebook_m}
        losses.update(self.vq._track(torch.cat(picked)))
        # Straight-through: value f_hat, identity gradient to the encoder.
        out = f + (f_hat - f).detach()
        return out, indices, losses

    # ---- decode / generator side --------------------------------------------------------------
    def _check_list(self, indices, upto: int | None = None) -> list:
        n = self.num_scales if upto is None else upto
        if isinstance(indices, torch.Tensor) or len(indices) < n:
            got = "one tensor" if isinstance(indices, torch.Tensor) else f"{len(indices)} scales"
            raise ValueError(f"expected a list of at least {n} per-scale index tensors, got {got}")
        return list(indices)

    def indices_to_fhat(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decode side (VAR Algorithm 2): ``f_hat = sum_k phi_k(up(C[r_k]))`` -> (B, dim, H, W)."""
        indices = self._check_list(indices)
        if len(indices) != self.num_scales:
            raise ValueError(f"expected {self.num_scales} scales {list(self.scales)}, got {len(indices)}")
        f_hat = None
        for k, idx in enumerate(indices):
            z_k = self.scale_contribution(k, idx)
            f_hat = z_k if f_hat is None else f_hat + z_k
        return f_hat

    def fhat_upto(self, indices: Sequence[torch.Tensor], k: int) -> torch.Tensor:
        """The VAR generator's input for scale ``k`` (1 <= k < K): the accumulated f_hat of scales
        ``< k`` area-downsampled to ``(p_k, p_k)`` (VAR's ``idxBl_to_var_input``) -> (B, dim, p_k, p_k).
        Only ``indices[:k]`` are read."""
        if not 1 <= k < self.num_scales:
            raise ValueError(f"fhat_upto needs 1 <= k < {self.num_scales}, got {k}")
        indices = self._check_list(indices, k)
        f_hat = None
        for j in range(k):
            z_j = self.scale_contribution(j, indices[j])
            f_hat = z_j if f_hat is None else f_hat + z_j
        return self.down(f_hat, k)

    def generator_inputs(self, indices: Sequence[torch.Tensor]) -> list:
        """``[fhat_upto(indices, k) for k in 1..K-1]`` in one pass (teacher-forcing inputs)."""
        indices = self._check_list(indices, self.num_scales - 1)
        outs, f_hat = [], None
        for k in range(1, self.num_scales):
            z = self.scale_contribution(k - 1, indices[k - 1])
            f_hat = z if f_hat is None else f_hat + z
            outs.append(self.down(f_hat, k))
        return outs

    def add_scale(self, f_hat: torch.Tensor | None, k: int, idx: torch.Tensor) -> torch.Tensor:
        """Sampling step: ``f_hat + z_k`` for freshly predicted ids of scale ``k`` (f_hat None = zeros)."""
        z = self.scale_contribution(k, idx)
        return z if f_hat is None else f_hat + z

    def down(self, f_hat: torch.Tensor, k: int) -> torch.Tensor:
        """Area-downsample a full-size map to scale ``k``'s size (identity at full size)."""
        p = self.scales[k]
        return f_hat if p == self.size else F.interpolate(f_hat, size=(p, p), mode="area")

    def extra_repr(self) -> str:
        return (f"codebook_size={self.codebook_size}, dim={self.dim}, scales={list(self.scales)}, "
                f"phi={self.phi_mode!r}, scale_drop={self.scale_drop}, beta={self.beta}")
