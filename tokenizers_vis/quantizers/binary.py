"""Binary (lookup-free) quantizers: LFQ, BSQ and group-wise LFQ, usable at K = 128 bits.

Implements

- Yu et al. 2023, "Language Model Beats Diffusion -- Tokenizer is Key to Visual Generation"
  (MAGVIT-v2, arXiv 2310.05737), §3.1 "Lookup-Free Quantization": ``q = sign(z)`` per channel,
  the implicit codebook is ``{-1, +1}^K``; commitment plus the entropy penalty
  ``E[H(p(z))] - gamma * H(E[p(z)])`` with ``p(c | z) ∝ exp(2 * inv_temp * <z, c>)``;
- Zhao et al. 2024, "Image and Video Tokenization with Binary Spherical Quantization"
  (BSQ, arXiv 2406.07548), §3.2-3.3: project to the unit sphere ``u = z / ||z||`` and quantize
  to ``sign(u) / sqrt(K)``; the entropy terms are *factorised over groups of bits* so their cost
  is ``O(K / g * 2^g)`` instead of ``O(2^K)``;
- WeTok group-wise LFQ ("GQ"): LFQ whose entropy is computed independently per group of
  ``group_size`` bits (same factorisation as BSQ, without the sphere projection).

The full ``2^K`` codebook is **never materialised**: every tensor built here has at most
``2^group_size`` entries along any code axis (``group_size <= 16``). The token is the bit vector
itself (``bits`` (B, h, w, K) uint8, little-endian as in :mod:`zoo.tokens`); group ids for a
G-way factorised head come from :meth:`BinaryQuantizer.group_ids`.

Why the factorisation is exact for the per-sample term: the logits ``2 * inv_temp * <z, c>``
are a sum of per-bit terms, so the softmax over ``{-1, 1}^K`` is a product of independent
per-bit (or per-group) distributions and its entropy is the sum of the group entropies. The
codebook (batch-average) term is an approximation: it is the sum of the group marginals'
entropies, an upper bound of the joint entropy (BSQ §3.3).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.tokens import bits_to_groups, groups_to_bits

MODES = ("lfq", "bsq")


class BinaryQuantizer(nn.Module):
    """Quantize channels-first features ``(B, bits, h, w)`` to one bit per channel.

    Args:
        bits: K, the number of channels / bits per token (e.g. 18 for MAGVIT-v2, 128 for WeTok).
        mode: ``"lfq"`` (MAGVIT-v2: codes ``±1``) or ``"bsq"`` (BSQ: l2-normalise over the K
            channels first, codes ``±1/sqrt(K)``).
        group_size: g, bits per entropy group (K must be divisible by g; ``g <= 16`` so that a
            group's ``2^g`` code table stays small). Also the group size of :meth:`group_ids`.
        commit_weight: weight of ``mean((z - sg[q])^2)`` (``u`` instead of ``z`` for BSQ);
            0.25 as in the lucidrains LFQ defaults.
        entropy_weight: weight of the entropy penalty (0.1); 0 skips computing it.
        diversity_gamma: gamma, weight of the codebook-entropy (diversity) term (1.0).
        inv_temperature: inverse temperature of the code softmax (100).

    ``forward(z)`` returns ``(z_q, bits, losses)``:

    - ``z_q`` (B, K, h, w): the code values with a straight-through gradient (identity w.r.t.
      ``z`` for LFQ; ``1/sqrt(K)`` times identity w.r.t. ``u = z / ||z||`` for BSQ, as the
      reference scales the straight-through code);
    - ``bits`` (B, h, w, K) uint8 in {0, 1}, ``bit = q > 0`` (``sign(0) = +1``);
    - ``losses``: ``loss`` = ``commit + entropy`` (both already weighted) and the detached
      metrics ``sample_entropy``, ``codebook_entropy`` (in nats, summed over groups; computed in
      training only -- 0 in eval mode or under ``no_grad``) and
      ``bit_usage`` = mean over bits of ``2 * min(p1, 1 - p1)`` where p1 is the fraction of tokens
      in the batch with that bit set: 1 when every bit is balanced, 0 when every bit is constant.
    """

    def __init__(self, bits: int, mode: str = "lfq", group_size: int = 8, commit_weight: float = 0.25,
                 entropy_weight: float = 0.1, diversity_gamma: float = 1.0, inv_temperature: float = 100.0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"BinaryQuantizer mode must be one of {MODES}, got {mode!r}")
        if bits < 1:
            raise ValueError(f"BinaryQuantizer needs bits >= 1, got {bits}")
        if not 1 <= group_size <= 16:
            # 2^g codes per group are tabulated; above 16 that table is what we must avoid
            raise ValueError(f"group_size must be in [1, 16] (2^group_size codes are tabulated), got {group_size}")
        if bits % group_size:
            raise ValueError(f"bits ({bits}) must be divisible by group_size ({group_size})")
        self.bits = int(bits)
        self.mode = mode
        self.group_size = int(group_size)
        self.num_groups = self.bits // self.group_size
        self.commit_weight = float(commit_weight)
        self.entropy_weight = float(entropy_weight)
        self.diversity_gamma = float(diversity_gamma)
        self.inv_temperature = float(inv_temperature)
        # Value of a "+1" bit: 1 for LFQ, 1/sqrt(K) for BSQ (a unit-norm code).
        self.scale = 1.0 if mode == "lfq" else 1.0 / math.sqrt(self.bits)
        # The 2^g codes of one group, (2^g, g) in {-1, +1}; code c has bit b = (c >> b) & 1, the
        # same little-endian order as zoo.tokens.bits_to_groups. Not persistent: it is derived.
        codes = groups_to_bits(torch.arange(2 ** self.group_size).unsqueeze(-1), self.group_size)
        self.register_buffer("_group_codes", codes.float() * 2 - 1, persistent=False)

    # ---- code <-> bits -----------------------------------------------------------------
    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """Decode-side lookup: bits (B, h, w, K) in {0, 1} -> code values (B, K, h, w).

        Values are ``±1`` (LFQ) or ``±1/sqrt(K)`` (BSQ).
        """
        if bits.shape[-1] != self.bits:
            raise ValueError(f"bits_to_codes expects (..., {self.bits}) bits, got {tuple(bits.shape)}")
        if bits.dtype.is_floating_point:
            raise ValueError(f"bits_to_codes expects integer/bool bits, got dtype {bits.dtype}")
        q = (bits.float() * 2 - 1) * self.scale
        return q.movedim(-1, 1).contiguous()

    def group_ids(self, bits: torch.Tensor) -> torch.Tensor:
        """(..., K) bits -> (..., K // group_size) int64 group ids in ``[0, 2^group_size)``."""
        return bits_to_groups(bits, self.group_size)

    def from_group_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`group_ids`: (..., G) ids -> (..., G * group_size) uint8 bits."""
        return groups_to_bits(ids, self.group_size)

    # ---- forward -----------------------------------------------------------------------
    def forward(self, z: torch.Tensor):
        if z.dim() != 4 or z.shape[1] != self.bits:
            raise ValueError(f"BinaryQuantizer expects (B, {self.bits}, h, w) features, got {tuple(z.shape)}")
        z = z.movedim(1, -1)  # (B, h, w, K)
        if self.mode == "bsq":
            z = F.normalize(z, dim=-1)  # u on the unit sphere (BSQ §3.2)
        pos = z >= 0  # sign(0) = +1 so every token has a code
        q = torch.where(pos, self.scale, -self.scale).to(z.dtype)
        commit = self.commit_weight * F.mse_loss(z, q.detach())
        # The entropy terms tabulate 2^group_size codes per group and token (2 MiB per token at
        # g = 16): only training needs them, so encode / eval skip them.
        if self.entropy_weight > 0 and self.training and torch.is_grad_enabled():
            sample_h, codebook_h = self.entropies(z)
            ent = self.entropy_weight * (sample_h - self.diversity_gamma * codebook_h)
        else:
            sample_h = codebook_h = ent = z.new_zeros(())
        bits = pos.to(torch.uint8)
        with torch.no_grad():
            p1 = bits.reshape(-1, self.bits).float().mean(0)
            bit_usage = (2 * torch.minimum(p1, 1 - p1)).mean()
        # straight-through estimator: forward value q. LFQ: gradient identity w.r.t. z. BSQ: the
        # reference (bsq-vit) straight-throughs sign(u) and then multiplies by 1/sqrt(K), so the
        # gradient w.r.t. u is scaled by 1/sqrt(K) too. Written q + s·(z - sg[z]) rather than
        # z + sg[q - z] so the forward value is exactly q (no rounding).
        z_q = q + self.scale * (z - z.detach())
        losses = {"loss": commit + ent, "commit": commit, "entropy": ent,
                  "sample_entropy": sample_h.detach(), "codebook_entropy": codebook_h.detach(),
                  "bit_usage": bit_usage}
        return z_q.movedim(-1, 1).contiguous(), bits, losses

    def entropies(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Group-factorised ``(sample_entropy, codebook_entropy)`` of channels-last ``z`` (..., K).

        Per group g, ``p_g(c) = softmax_c(2 * inv_temp * <z_g, scale * code_c>)`` over the group's
        ``2^group_size`` codes only. ``sample_entropy = mean_tokens sum_g H(p_g)``,
        ``codebook_entropy = sum_g H(mean_tokens p_g)``. ``z`` is ``u`` (already normalised) for BSQ.
        """
        zg = z.float().reshape(-1, self.num_groups, self.group_size)  # (N, G, g)
        logits = (2 * self.inv_temperature * self.scale) * torch.einsum("ngb,cb->ngc", zg, self._group_codes)
        logp = F.log_softmax(logits, dim=-1)  # (N, G, 2^g)
        p = logp.exp()
        sample = -(p * logp).sum(-1).sum(-1).mean()
        avg = p.mean(0)  # (G, 2^g)
        # clamp: codes nobody picks have avg 0 and 0 * log 0 must be 0, not NaN
        codebook = -(avg * avg.clamp_min(1e-12).log()).sum()
        return sample, codebook

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, mode={self.mode!r}, group_size={self.group_size}, "
                f"commit_weight={self.commit_weight}, entropy_weight={self.entropy_weight}, "
                f"diversity_gamma={self.diversity_gamma}, inv_temperature={self.inv_temperature}")
