"""TokenFlow's dual codebook with one shared index, and its multi-scale residual form.

Implements the quantizer of Qu et al. 2024, "TokenFlow: Unified Image Tokenizer for Multimodal
Understanding and Generation" (arXiv 2412.03069), §3.2 ("dual-codebook architecture with shared
mapping") as in the reference code (ByteFlow-AI/TokenFlow, ``tokenflow/tokenizer/vq_model.py``,
``VectorQuantizer`` with ``split=[32, 8]``):

- two tables with the same number of rows K: ``C_sem`` (K x d_sem) and ``C_pix`` (K x d_pix);
- the input vector ``z = [z_sem, z_pix]`` and the codes are l2-normalised **per half**;
- one index per position: ``k* = argmin_k ||z_sem - C_sem[k]||^2 + w * ||z_pix - C_pix[k]||^2``
  (``w = 1`` in the reference code; the paper's ``w_dis``);
- the quantised vector is ``[C_sem[k*], C_pix[k*]]``, so one index tensor reads both halves
  (semantic half for understanding, pixel half for generation);
- loss per quantisation (reference form): ``mse(z_q, sg[z]) + beta * mse(sg[z_q], z)`` over the
  normalised 40-d vectors (+ the optional LlamaGen entropy term on the joint distance), with the
  straight-through output ``z + sg[z_q - z]`` (``z`` the per-half normalised input).

:class:`DualMultiScaleVQ` runs this quantiser VAR-style over a scale pyramid (TokenFlow §3.2,
"multi-scale VQ"; VAR, arXiv 2404.02905, Algorithm 1) with TokenFlow's choices: no ``phi``
refinement and random drop of one non-first scale (p = 0.1) during training. It subclasses
:class:`~tokenizers_vis.quantizers.multiscale.MultiScaleVQ` and reuses its scale list,
area-down / bicubic-up, scale drop, decode side (``indices_to_fhat``, ``fhat_upto``, ...) and
``token_spec``; only the nearest-code rule and the per-scale loss differ.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.quantizers.multiscale import MultiScaleVQ
from tokenizers_vis.quantizers.vq import VectorQuantizer, entropy_loss


class DualCodebook(nn.Module):
    """Two l2-normalised codebooks, ``C_sem`` (K x ``sem_dim``) and ``C_pix`` (K x ``pix_dim``),
    addressed by one shared index (TokenFlow §3.2).

    Args:
        codebook_size: K, rows of both tables.
        sem_dim, pix_dim: widths of the semantic and pixel halves (32 and 8 in TokenFlow).
        pix_weight: ``w`` of ``d_sem + w * d_pix`` (1.0 in the reference code; 0 picks by the
            semantic half alone).
        beta: commitment weight (0.25 in TokenFlow's training script).
        entropy_weight, entropy_temperature: optional LlamaGen/MAGVIT entropy loss on the joint
            distance (TokenFlow's ``entropy_loss_ratio``, 0 by default; tau 0.01).
        usage_window: training batches the rolling usage metric looks back over.

    Input/output vectors are channels-first ``(B, sem_dim + pix_dim, h, w)``, semantic channels
    first. Each table lives in a :class:`VectorQuantizer` (``sem`` / ``pix``, state-dict keys
    ``sem.embedding.weight`` / ``pix.embedding.weight``) whose codebook, lookup and distance code
    is reused; the usage of the shared index is tracked by ``sem``.
    """

    def __init__(self, codebook_size: int, sem_dim: int = 32, pix_dim: int = 8, pix_weight: float = 1.0,
                 beta: float = 0.25, entropy_weight: float = 0.0, entropy_temperature: float = 0.01,
                 usage_window: int = 100):
        super().__init__()
        if sem_dim < 1 or pix_dim < 1:
            raise ValueError(f"DualCodebook needs sem_dim >= 1 and pix_dim >= 1, got {sem_dim}, {pix_dim}")
        if pix_weight < 0:
            raise ValueError(f"pix_weight is a non-negative distance weight, got {pix_weight}")
        self.codebook_size = int(codebook_size)
        self.sem_dim, self.pix_dim = int(sem_dim), int(pix_dim)
        self.dim = self.sem_dim + self.pix_dim
        self.pix_weight = float(pix_weight)
        self.beta = float(beta)
        self.entropy_weight = float(entropy_weight)
        self.entropy_temperature = float(entropy_temperature)
        self.l2_norm = True  # TokenFlow always normalises each half
        # Unit-norm storage and the reference's uniform(-1/K, 1/K) init come with l2_norm=True.
        self.sem = VectorQuantizer(codebook_size, sem_dim, beta=beta, l2_norm=True, usage_window=usage_window)
        self.pix = VectorQuantizer(codebook_size, pix_dim, beta=beta, l2_norm=True, usage_window=0)

    # ---- halves ----------------------------------------------------------------------------
    def split(self, x: torch.Tensor, dim: int = -1):
        """``x`` -> (semantic part, pixel part) along ``dim``."""
        if x.shape[dim] != self.dim:
            raise ValueError(f"DualCodebook expects {self.dim} = {self.sem_dim} + {self.pix_dim} channels "
                             f"along dim {dim}, got shape {tuple(x.shape)}")
        return x.split([self.sem_dim, self.pix_dim], dim=dim)

    def normalize(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """l2-normalise the semantic and the pixel half of ``x`` separately."""
        s, p = self.split(x, dim)
        return torch.cat([F.normalize(s, dim=dim), F.normalize(p, dim=dim)], dim=dim)

    def codebook(self) -> torch.Tensor:
        """``[C_sem, C_pix]`` as one (K, sem_dim + pix_dim) matrix, each half unit-norm."""
        return torch.cat([self.sem.codebook(), self.pix.codebook()], dim=-1)

    # ---- selection -------------------------------------------------------------------------
    def distances(self, z_flat: torch.Tensor):
        """Squared distances ``(d_sem, d_pix)``, each (N, K), of the per-half normalised rows of
        ``z_flat`` (N, sem_dim + pix_dim) to the codes."""
        s, p = self.split(self.normalize(z_flat))
        return (self.sem.distances(s, self.sem.codebook()), self.pix.distances(p, self.pix.codebook()))

    def joint_distance(self, z_flat: torch.Tensor) -> torch.Tensor:
        """``d_sem + w * d_pix`` (N, K): the shared-mapping criterion."""
        d_sem, d_pix = self.distances(z_flat)
        return d_sem + self.pix_weight * d_pix if self.pix_weight else d_sem

    @torch.no_grad()
    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Shared index ``argmin_k d_sem + w * d_pix`` of each row of ``z_flat`` -> (N,) int64."""
        return self.joint_distance(z_flat).argmin(1)

    # ---- lookup (decode side) ------------------------------------------------------------------
    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) ids -> ``[C_sem[k], C_pix[k]]`` as (B, sem_dim + pix_dim, h, w)."""
        return torch.cat([self.sem.lookup(indices), self.pix.lookup(indices)], dim=1)

    def lookup_sem(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) ids -> ``C_sem[k]`` (B, sem_dim, h, w) (understanding)."""
        return self.sem.lookup(indices)

    def lookup_pix(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) ids -> ``C_pix[k]`` (B, pix_dim, h, w) (generation / reconstruction)."""
        return self.pix.lookup(indices)

    # ---- one quantisation ------------------------------------------------------------------------
    def forward(self, z: torch.Tensor, track: bool = True):
        """Quantise ``z`` (B, D, h, w) -> ``(z_q, indices (B, h, w), losses)``.

        ``z_q`` has the value ``[C_sem[k], C_pix[k]]`` and the straight-through gradient of the
        per-half normalised ``z``. ``losses``: ``loss`` = ``codebook`` + ``commit`` + ``entropy``;
        with ``track`` also the detached ``usage`` / ``perplexity`` of the shared index.
        """
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"DualCodebook expects (B, {self.dim}, h, w) features, got {tuple(z.shape)}")
        B, C, h, w = z.shape
        zn = self.normalize(z.movedim(1, -1))  # (B, h, w, D), each half unit-norm
        flat = zn.reshape(-1, C)
        d_sem, d_pix = self.distances(flat.detach())
        d = d_sem + self.pix_weight * d_pix if self.pix_weight else d_sem
        idx = d.argmin(1)
        z_q = F.embedding(idx, self.codebook()).view_as(zn).to(zn.dtype)
        codebook = F.mse_loss(z_q, zn.detach())
        commit = self.beta * F.mse_loss(zn, z_q.detach())
        if self.entropy_weight > 0:
            # the entropy term needs the gradient of the distances w.r.t. the input and codes
            d_g = self.joint_distance(flat)
            ent = self.entropy_weight * entropy_loss(d_g, self.entropy_temperature)
        else:
            ent = z.new_zeros(())
        losses = {"loss": codebook + commit + ent, "codebook": codebook, "commit": commit, "entropy": ent}
        if track:
            losses.update(self.track(idx))
        out = zn + (z_q - zn).detach()
        return out.movedim(-1, 1).contiguous(), idx.view(B, h, w), losses

    # ---- usage metrics (of the shared index) ------------------------------------------------------
    def track(self, idx: torch.Tensor) -> dict:
        """Record a training batch's ids; returns detached ``usage`` / ``perplexity``."""
        return self.sem._track(idx.reshape(-1))

    def usage_stats(self) -> dict:
        return self.sem.usage_stats()

    def reset_usage(self) -> None:
        self.sem.reset_usage()

    def extra_repr(self) -> str:
        return (f"codebook_size={self.codebook_size}, sem_dim={self.sem_dim}, pix_dim={self.pix_dim}, "
                f"pix_weight={self.pix_weight}, beta={self.beta}, entropy_weight={self.entropy_weight}")


class DualMultiScaleVQ(MultiScaleVQ):
    """TokenFlow's multi-scale residual quantisation over a :class:`DualCodebook` (§3.2).

    Args:
        codebook_size, sem_dim, pix_dim, pix_weight, beta, entropy_weight, entropy_temperature:
            see :class:`DualCodebook`.
        scales: square token-map sides coarse to fine; the last is the feature map's size
            (TokenFlow CLIP-B 224 px: 1, 2, 4, 6, 8, 10, 12, 14 -> 561 tokens).
        scale_drop: training-time probability of skipping one uniformly chosen non-first scale
            (0.1 in TokenFlow); see :class:`MultiScaleVQ` (placeholder ids ``-1``).

    At scale ``k`` the residual ``r`` (not detached from the encoder output, as in the reference)
    is area-downsampled to ``p_k``, quantised by the dual codebook (one shared id per position),
    the straight-through code map is bicubic-upsampled and added to the output, and its detached
    value is subtracted from the residual. The loss is the mean over the scales used of each
    scale's own :class:`DualCodebook` loss (the reference's form, not VAR's running-``f_hat``
    loss of :class:`MultiScaleVQ`). The output's value equals ``indices_to_fhat(indices)``.

    ``forward(f)`` returns ``(f_hat, indices, losses)`` like :class:`MultiScaleVQ`; ``losses``
    holds ``loss``/``codebook``/``commit``/``entropy`` and the detached ``usage``/``perplexity``.
    """

    def __init__(self, codebook_size: int, sem_dim: int = 32, pix_dim: int = 8,
                 scales: Sequence[int] = (1, 2, 4, 6, 8, 10, 12, 14), pix_weight: float = 1.0,
                 scale_drop: float = 0.1, beta: float = 0.25, entropy_weight: float = 0.0,
                 entropy_temperature: float = 0.01):
        # The parent's single VectorQuantizer is replaced below (codebook_size=2 keeps it tiny).
        super().__init__(2, sem_dim + pix_dim, scales=scales, phi="none", scale_drop=scale_drop, beta=beta,
                         l2_norm=True)
        self.codebook_size = int(codebook_size)
        self.vq = DualCodebook(codebook_size, sem_dim, pix_dim, pix_weight=pix_weight, beta=beta,
                               entropy_weight=entropy_weight, entropy_temperature=entropy_temperature)

    @property
    def sem_dim(self) -> int:
        return self.vq.sem_dim

    @property
    def pix_dim(self) -> int:
        return self.vq.pix_dim

    def _nearest(self, r: torch.Tensor) -> torch.Tensor:
        B, C, p, q = r.shape
        return self.vq.nearest(r.movedim(1, -1).reshape(-1, C)).view(B, p, q)

    def forward(self, f: torch.Tensor):
        if f.dim() != 4 or f.shape[1] != self.dim or tuple(f.shape[2:]) != (self.size, self.size):
            raise ValueError(f"DualMultiScaleVQ expects (B, {self.dim}, {self.size}, {self.size}) features "
                             f"({self.sem_dim} semantic + {self.pix_dim} pixel channels), got {tuple(f.shape)}")
        B = f.shape[0]
        drop = self._draw_drop()
        self.last_dropped = drop
        residual = f
        f_hat = None
        indices, parts, picked = [], [], []
        for k, p in enumerate(self.scales):
            if k == drop:
                indices.append(torch.full((B, p, p), -1, dtype=torch.long, device=f.device))
                continue
            r = residual if p == self.size else F.interpolate(residual, size=(p, p), mode="area")
            z_q, idx, q = self.vq(r, track=False)
            if p != self.size:
                z_q = F.interpolate(z_q, size=(self.size, self.size), mode="bicubic", align_corners=False)
            f_hat = z_q if f_hat is None else f_hat + z_q
            residual = residual - z_q.detach()
            indices.append(idx)
            parts.append(q)
            picked.append(idx.reshape(-1))
        losses = {key: torch.stack([q[key] for q in parts]).mean()
                  for key in ("loss", "codebook", "commit", "entropy")}
        losses.update(self.vq.track(torch.cat(picked)))
        return f_hat, indices, losses

    def split_fhat(self, f_hat: torch.Tensor):
        """(B, D, H, W) -> (semantic half, pixel half)."""
        return self.vq.split(f_hat, dim=1)

    def extra_repr(self) -> str:
        return (f"codebook_size={self.codebook_size}, sem_dim={self.sem_dim}, pix_dim={self.pix_dim}, "
                f"scales={list(self.scales)}, scale_drop={self.scale_drop}, beta={self.beta}")
