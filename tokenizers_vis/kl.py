"""KL (diagonal-Gaussian) continuous tokenizer (``tokenizer/kl-*``), MAR's KL-16 style.

Li et al. 2024, "Autoregressive Image Generation without Vector Quantization" (MAR,
arXiv 2406.11838), §5.1: the LDM-style KL VAE (Rombach et al. 2022, §3) with 16 latent
channels at stride 16 (ch 128, ch_mult [1, 1, 2, 2, 4], 2 ResBlocks, attention at the lowest
resolution and in the mid block). The encoder/decoder are those of
:class:`tokenizers_vis.vq.VQTokenizer`; the bottleneck is
:class:`~tokenizers_vis.quantizers.KLBottleneck` (1x1 conv to mean/logvar moments).

Tokens are a continuous grid ``(B, h, w, latent_channels)``: ``encode`` is the posterior
*mode* times ``scale_factor`` (deterministic); ``forward`` samples the posterior (reparameterised).
``kl-16`` reproduces the reference layout (LTH14/mar ``models/vae.py``): the encoder emits
``2 * z_channels`` (``double_z``) into the 1x1 moments conv, and the decoder has attention only
in its mid block (``attn_resolutions=()``). Counted from that code: 66,456,019 parameters (the
paper states none); ours matches exactly.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from tokenizers_vis.quantizers.kl import KLBottleneck
from tokenizers_vis.vq import VQTokenizer
from zoo.registry import register
from zoo.tokens import Tokens, TokenSpec

MAR = "MAR, Li et al. 2024 (arXiv 2406.11838), §5.1 (KL-16 tokenizer)"


class KLTokenizer(VQTokenizer):
    """Conv VAE: images (B, 3, S, S) <-> continuous grid tokens (B, S/f, S/f, latent_channels).

    Args (others as in :class:`VQTokenizer`):
        z_channels: encoder output / decoder input channels.
        latent_channels: C of the latent (16 for MAR's KL-16).
        kl_weight: weight of the KL term (1e-6 in LDM/MAR).
        scale_factor: multiplies the latent handed out by ``encode`` (MAR KL-16: 0.2325).
        double_z: encoder emits ``2 * z_channels`` into the moments conv (LDM / MAR layout).
        decoder_level_attn: see :class:`VQTokenizer` (MAR's decoder: False).
    """

    def __init__(self, image_size: int = 256, ch: int = 128, ch_mult: list = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 16, latent_channels: int = 16,
                 kl_weight: float = 1e-6, scale_factor: float = 1.0, level_attn: bool = True,
                 mid_attn: bool = True, norm_groups: int = 32, l1_weight: float = 0.0,
                 double_z: bool = False, decoder_level_attn: bool | None = None):
        super().__init__(image_size=image_size, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                         z_channels=z_channels, codebook_size=2, codebook_dim=latent_channels,
                         level_attn=level_attn, mid_attn=mid_attn, norm_groups=norm_groups,
                         l1_weight=l1_weight, decoder_level_attn=decoder_level_attn)
        enc_out = 2 * z_channels if double_z else z_channels
        if double_z:  # LDM's encoder emits 2*z_channels (mean/logvar-sized) before the 1x1 conv
            self.encoder.conv_out = nn.Conv2d(self.encoder.conv_out.in_channels, enc_out, 3, padding=1)
        # KLBottleneck holds its own 1x1 moments conv, so the parent's quant_conv is not used.
        self.quant_conv = nn.Identity()
        self.quantizer = KLBottleneck(enc_out, latent_channels, kl_weight=kl_weight,
                                      scale_factor=scale_factor)
        grid = self.image_size // self.downsample
        self.spec = TokenSpec("continuous", "grid", (grid, grid), dim=int(latent_channels))

    def quantize(self, images: torch.Tensor, sample: bool = False,
                 generator: torch.Generator | None = None):
        """images -> (scaled latent (B, C, h, w), bottleneck losses)."""
        self.check_images(images)
        return self.quantizer(self.encoder(images), sample=sample, generator=generator)

    def decode_latents(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, C, h, w) -> images."""
        return self.decoder(self.post_quant_conv(self.quantizer.unscale(latent)))

    def encode(self, images: torch.Tensor) -> Tokens:
        latent, _ = self.quantize(images, sample=False)
        return Tokens(latent.movedim(1, -1).contiguous(), self.spec, validate=False)

    def decode(self, tokens: Tokens) -> torch.Tensor:
        self.check_tokens(tokens)
        return self.decode_latents(tokens.data.to(self.last_layer.device).movedim(-1, 1))

    def forward(self, images: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None):
        """``(recon, losses)`` from a posterior sample: ``loss = L2 (+ l1) + kl_weight * KL``."""
        latent, q = self.quantize(images, sample=sample, generator=generator)
        recon = self.decode_latents(latent)
        rec = self.reconstruction_loss(recon, images)
        loss = rec + q["loss"]
        return recon, {"loss": loss, "rec": rec.detach(), "kl": q["kl"].detach()}


# Shapes 64x64, f8 -> 8x8x8 continuous latent; encoder/decoder as thin as vq-tiny.
TINY = dict(image_size=64, ch=16, ch_mult=[1, 2, 2, 4], num_res_blocks=1, z_channels=16,
            latent_channels=8, level_attn=False, mid_attn=False, norm_groups=8)
# MAR KL-16 (LDM AutoencoderKL, embed_dim 16, ch 128, ch_mult [1,1,2,2,4]); scale 0.2325 (MAR).
KL16 = dict(image_size=256, ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=16,
            latent_channels=16, scale_factor=0.2325, level_attn=True, mid_attn=True, norm_groups=32,
            double_z=True, decoder_level_attn=False)
# Counted from LTH14/mar models/vae.py (AutoencoderKL(embed_dim=16, ch_mult=(1,1,2,2,4))); the
# paper states no count.
KL16_PARAMS = 66_456_019


@register("tokenizer/kl-tiny", paper=MAR, weights={"shapes": "weights/tokenizer-kl-tiny"})
def kl_tiny(**overrides):
    """Tiny KL VAE for Shapes 64x64: f8 -> continuous 8x8 tokens of 8 channels."""
    return KLTokenizer(**{**TINY, **overrides})


@register("tokenizer/kl-16", paper=MAR, paper_params=KL16_PARAMS)
def kl_16(**overrides):
    """MAR KL-16: 256 px, f16 -> continuous 16x16 tokens of 16 channels (scale 0.2325)."""
    return KLTokenizer(**{**KL16, **overrides})
