"""Binary-token conv tokenizers: LFQ (MAGVIT-v2) and BSQ (``tokenizer/lfq-*``, ``tokenizer/bsq-*``).

- Yu et al. 2023, MAGVIT-v2 (arXiv 2310.05737), §3.1: lookup-free quantization, ``sign(z)``;
- Zhao et al. 2024, BSQ (arXiv 2406.07548), §3.2-3.3: sign of the unit-sphere projection,
  codes ``±1/sqrt(K)``, group-factorised entropy.

The encoder/decoder are those of :class:`tokenizers_vis.vq.VQTokenizer`; a 1x1 ``quant_conv``
maps to ``bits`` channels, :class:`~tokenizers_vis.quantizers.BinaryQuantizer` binarises them,
and a 1x1 ``post_quant_conv`` maps the code values back. Tokens are a binary grid
``(B, h, w, bits)`` uint8; the ``2^bits`` codebook is never built (decode: ``bits_to_codes``).
"""
from __future__ import annotations

import torch

from tokenizers_vis.quantizers.binary import BinaryQuantizer
from tokenizers_vis.vq import VQTokenizer
from zoo.registry import register
from zoo.tokens import Tokens, TokenSpec

MAGVIT2 = "MAGVIT-v2, Yu et al. 2023 (arXiv 2310.05737), §3.1 (LFQ)"
BSQ = "BSQ, Zhao et al. 2024 (arXiv 2406.07548), §3.2-3.3"


class BinaryTokenizer(VQTokenizer):
    """Conv tokenizer with a lookup-free binary bottleneck: images <-> (B, S/f, S/f, bits) bits.

    Args (others as in :class:`VQTokenizer`):
        bits: K, bits per token. mode: ``"lfq"`` or ``"bsq"``. group_size: bits per entropy group.
        commit_weight, entropy_weight, diversity_gamma, inv_temperature: see :class:`BinaryQuantizer`.
    """

    def __init__(self, image_size: int = 256, ch: int = 128, ch_mult: list = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 256, bits: int = 32, mode: str = "bsq",
                 group_size: int = 8, commit_weight: float = 0.25, entropy_weight: float = 0.1,
                 diversity_gamma: float = 1.0, inv_temperature: float = 100.0,
                 level_attn: bool = True, mid_attn: bool = True, norm_groups: int = 32,
                 l1_weight: float = 0.0):
        super().__init__(image_size=image_size, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                         z_channels=z_channels, codebook_size=2, codebook_dim=bits,
                         level_attn=level_attn, mid_attn=mid_attn, norm_groups=norm_groups,
                         l1_weight=l1_weight)
        self.quantizer = BinaryQuantizer(bits, mode=mode, group_size=group_size,
                                         commit_weight=commit_weight, entropy_weight=entropy_weight,
                                         diversity_gamma=diversity_gamma, inv_temperature=inv_temperature)
        grid = self.image_size // self.downsample
        self.spec = TokenSpec("binary", "grid", (grid, grid), bits=int(bits))

    # quantize() (inherited) returns (z_q (B, bits, h, w), bits (B, h, w, bits) uint8, losses)
    def encode(self, images: torch.Tensor) -> Tokens:
        _, bits, _ = self.quantize(images)
        return Tokens(bits, self.spec, validate=False)

    def decode(self, tokens: Tokens) -> torch.Tensor:
        self.check_tokens(tokens)
        return self.decode_latents(self.quantizer.bits_to_codes(tokens.data.to(self.last_layer.device)))

    def forward(self, images: torch.Tensor):
        """``(recon, losses)``: ``loss = L2 (+ l1) + commit + entropy`` (weights in the quantizer)."""
        z_q, _, q = self.quantize(images)
        recon = self.decode_latents(z_q)
        rec = self.reconstruction_loss(recon, images)
        loss = rec + q["loss"]
        losses = {"loss": loss, "rec": rec.detach(), "commit": q["commit"].detach(),
                  "entropy": q["entropy"].detach(), "sample_entropy": q["sample_entropy"],
                  "codebook_entropy": q["codebook_entropy"], "bit_usage": q["bit_usage"]}
        return recon, losses


# Shapes 64x64, f8 -> 8x8 tokens of 32 bits, 4 entropy groups of 8 bits; thin as vq-tiny.
TINY = dict(image_size=64, ch=16, ch_mult=[1, 2, 2, 4], num_res_blocks=1, z_channels=64, bits=32,
            group_size=8, level_attn=False, mid_attn=False, norm_groups=8)
# BSQ temperature: with u on the unit sphere and codes ±1/sqrt(K), bit b's two logits differ by
# 4 * inv_temp * u_b / sqrt(K), i.e. 4 * inv_temp / K for a typical |u_b| = 1/sqrt(K). The LFQ
# default 100 gives a gap of 12.5 at K = 32 (a saturated softmax, ~zero entropy gradient);
# inv_temp = K = 32 gives a gap of 4 (p ~ 0.98): near one-hot yet still trainable.
BSQ_INV_TEMPERATURE = 32.0


# Entropy weight for the tiny L2-only recipe: 0.1 (BSQ's, next to perceptual + GAN terms)
# dominates a ~0.05 MSE and stalled training at 19 dB; 0.005 keeps every bit in use (bit
# usage 1.0) and reaches 25.1 dB (checkpoints.md).
TINY_ENTROPY_WEIGHT = 0.005


@register("tokenizer/bsq-tiny", paper=BSQ, weights={"shapes": "weights/tokenizer-bsq-tiny"})
def bsq_tiny(**overrides):
    """Tiny BSQ tokenizer for Shapes 64x64: f8 -> 8x8 tokens of 32 bits (inv_temperature 32)."""
    return BinaryTokenizer(**{**TINY, "mode": "bsq", "inv_temperature": BSQ_INV_TEMPERATURE,
                              "entropy_weight": TINY_ENTROPY_WEIGHT, **overrides})


@register("tokenizer/lfq-tiny", paper=MAGVIT2)
def lfq_tiny(**overrides):
    """Tiny LFQ tokenizer for Shapes 64x64: f8 -> 8x8 tokens of 32 bits (inv_temperature 100)."""
    return BinaryTokenizer(**{**TINY, "mode": "lfq", **overrides})
