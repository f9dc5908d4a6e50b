"""LlamaGen-style convolutional VQ tokenizer (``tokenizer/vq-*``).

Sun et al. 2024, "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation"
(LlamaGen, arXiv 2406.06525), §2.1: a taming/VQGAN conv encoder-decoder (GroupNorm + SiLU
ResBlocks, attention at the lowest resolution and in the mid block), a 1x1 ``quant_conv`` to
an 8-d code space, an l2-normalised 16384-entry codebook, and a 1x1 ``post_quant_conv`` back.
VQ-16 (ch_mult [1, 1, 2, 2, 4], 256 px -> 16x16 tokens) has ~72M parameters.

The encoder and decoder are diffusers' ``Encoder`` / ``Decoder`` (same block layout as
LlamaGen's: asymmetric-padded strided-conv downsampling, nearest + conv upsampling,
``num_res_blocks`` ResBlocks per encoder level and one more per decoder level). Losses here
are pixel losses plus the quantizer losses; LPIPS and the PatchGAN (``tokenizers_vis.losses``)
are added by the training script.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Decoder, Encoder

from tokenizers_vis.base import Tokenizer
from tokenizers_vis.quantizers.vq import VectorQuantizer
from zoo.registry import register
from zoo.tokens import Tokens, TokenSpec

LLAMAGEN = "LlamaGen, Sun et al. 2024 (arXiv 2406.06525), §2.1"


class VQTokenizer(Tokenizer):
    """Conv VQ tokenizer: images (B, 3, S, S) in [-1, 1] <-> discrete grid tokens (B, S/f, S/f).

    Args:
        image_size: S; must be divisible by the downsampling factor ``f = 2 ** (len(ch_mult) - 1)``.
        ch, ch_mult: base width and per-level multipliers (level i has ``ch * ch_mult[i]`` channels).
        num_res_blocks: ResBlocks per encoder level (decoder levels get one more, as in taming).
        z_channels: encoder output / decoder input channels (before/after the 1x1 convs).
        codebook_size, codebook_dim: K and the code dimension.
        l2_norm, beta, entropy_weight, entropy_temperature, legacy: see :class:`VectorQuantizer`.
        level_attn: self-attention after every ResBlock of the lowest-resolution level (LlamaGen).
        decoder_level_attn: the same for the decoder's lowest level; ``None`` follows ``level_attn``
            (LDM/MAR's KL-16 decoder has none: ``attn_resolutions=()``).
        ema, kmeans_init, restart_threshold, restart_every: codebook maintenance options of
            :class:`VectorQuantizer` (off by default).
        mid_attn: the one self-attention of the mid block.
        norm_groups: GroupNorm groups (32 in LlamaGen; fewer for thin models).
        l1_weight: optional L1 term added to the L2 reconstruction loss.
        codebook_weight: weight of the quantizer's codebook term (1.0 in LlamaGen).
    """

    def __init__(self, image_size: int = 256, ch: int = 128, ch_mult: list = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 256, codebook_size: int = 16384,
                 codebook_dim: int = 8, l2_norm: bool = True, beta: float = 0.25,
                 entropy_weight: float = 0.0, entropy_temperature: float = 0.01, legacy: bool = False,
                 level_attn: bool = True, mid_attn: bool = True, norm_groups: int = 32,
                 l1_weight: float = 0.0, codebook_weight: float = 1.0,
                 decoder_level_attn: bool | None = None, ema: bool = False, kmeans_init: bool = False,
                 restart_threshold: float = 0.0, restart_every: int = 100):
        super().__init__()
        ch_mult = [int(m) for m in ch_mult]
        if self.config.get("ch_mult") is not None:
            self._zoo_config["ch_mult"] = ch_mult  # the saved config holds a JSON list of ints
        factor = 2 ** (len(ch_mult) - 1)
        if image_size % factor:
            raise ValueError(f"image_size must be divisible by the downsampling factor {factor} "
                             f"(ch_mult={ch_mult}), got {image_size}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        widths = [ch * m for m in ch_mult]
        bad = [c for c in widths if c % norm_groups]
        if bad:
            raise ValueError(f"norm_groups={norm_groups} must divide every block width {widths}; "
                             f"it does not divide {bad}")
        self.image_size = int(image_size)
        self.downsample = factor
        grid = self.image_size // factor
        self.spec = TokenSpec("discrete", "grid", (grid, grid), vocab_size=int(codebook_size))
        self.l1_weight = float(l1_weight)
        self.codebook_weight = float(codebook_weight)

        n = len(ch_mult)
        down = ["DownEncoderBlock2D"] * (n - 1) + ["AttnDownEncoderBlock2D" if level_attn else "DownEncoderBlock2D"]
        dec_attn = level_attn if decoder_level_attn is None else decoder_level_attn
        up = ["AttnUpDecoderBlock2D" if dec_attn else "UpDecoderBlock2D"] + ["UpDecoderBlock2D"] * (n - 1)
        self.encoder = Encoder(in_channels=3, out_channels=z_channels, down_block_types=tuple(down),
                               block_out_channels=tuple(widths), layers_per_block=num_res_blocks,
                               norm_num_groups=norm_groups, act_fn="silu", double_z=False,
                               mid_block_add_attention=mid_attn)
        self.quant_conv = nn.Conv2d(z_channels, codebook_dim, 1)
        self.quantizer = VectorQuantizer(codebook_size, codebook_dim, beta=beta, l2_norm=l2_norm,
                                         entropy_weight=entropy_weight,
                                         entropy_temperature=entropy_temperature, legacy=legacy,
                                         ema=ema, kmeans_init=kmeans_init,
                                         restart_threshold=restart_threshold, restart_every=restart_every)
        self.post_quant_conv = nn.Conv2d(codebook_dim, z_channels, 1)
        self.decoder = Decoder(in_channels=z_channels, out_channels=3, up_block_types=tuple(up),
                               block_out_channels=tuple(widths), layers_per_block=num_res_blocks,
                               norm_num_groups=norm_groups, act_fn="silu",
                               mid_block_add_attention=mid_attn)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's final conv (for the VQGAN adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    # ---- pieces ------------------------------------------------------------------------
    def quantize(self, images: torch.Tensor):
        """images -> (z_q (B, codebook_dim, h, w), indices (B, h, w), quantizer losses)."""
        self.check_images(images)
        return self.quantizer(self.quant_conv(self.encoder(images)))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    # ---- Tokenizer interface -----------------------------------------------------------
    def encode(self, images: torch.Tensor) -> Tokens:
        _, idx, _ = self.quantize(images)
        return Tokens(idx, self.spec, validate=False)

    def decode(self, tokens: Tokens) -> torch.Tensor:
        self.check_tokens(tokens)
        return self.decode_latents(self.quantizer.lookup(tokens.data.to(self.last_layer.device)))

    def reconstruction_loss(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """L2 (+ ``l1_weight`` x L1) pixel loss, shared by every tokenizer built on this one."""
        rec = F.mse_loss(recon, images)
        if self.l1_weight > 0:
            rec = rec + self.l1_weight * F.l1_loss(recon, images)
        return rec

    def forward(self, images: torch.Tensor):
        """Training step: ``(recon, losses)``; ``losses["loss"]`` is the total to back-propagate.

        ``loss = L2 (+ l1_weight * L1) + commit + codebook_weight * codebook + entropy``. The other
        entries are detached scalars for logging; perceptual and adversarial terms are added by
        the training script (see ``tokenizers_vis.losses``).
        """
        z_q, _, q = self.quantize(images)
        recon = self.decode_latents(z_q)
        rec = self.reconstruction_loss(recon, images)
        loss = rec + q["commit"] + self.codebook_weight * q["codebook"] + q["entropy"]
        losses = {"loss": loss, "rec": rec.detach(), "commit": q["commit"].detach(),
                  "codebook": q["codebook"].detach(), "entropy": q["entropy"].detach(),
                  "usage": q["usage"], "perplexity": q["perplexity"]}
        return recon, losses


# ---- registered configs --------------------------------------------------------------------
# Shapes 64x64 at f8 -> 8x8 tokens, thin enough for a CPU: ~0.74M params, ~160M MAC per image.
# A small entropy weight keeps the codebook in use: without it only ~1% of the codes (< 10)
# stayed live in the first 300 steps on Shapes.
# The shipped weights (weights/tokenizer-vq-tiny, recipe and numbers in checkpoints.md) were
# trained with exactly this config.
TINY = dict(image_size=64, ch=16, ch_mult=[1, 2, 2, 4], num_res_blocks=1, z_channels=64,
            codebook_size=1024, codebook_dim=8, l2_norm=True, entropy_weight=0.02,
            level_attn=False, mid_attn=False, norm_groups=8)
# LlamaGen VQ-16 / VQ-8 (vq_model.py ModelArgs defaults: z_channels 256, ch 128, 2 res blocks).
VQ16 = dict(image_size=256, ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=256,
            codebook_size=16384, codebook_dim=8, l2_norm=True, level_attn=True, mid_attn=True,
            norm_groups=32)
VQ8 = {**VQ16, "ch_mult": [1, 2, 2, 4]}


@register("tokenizer/vq-tiny", paper=LLAMAGEN, weights={"shapes": "weights/tokenizer-vq-tiny"})
def vq_tiny(**overrides):
    """Tiny LlamaGen-style VQ for Shapes 64x64: f8 -> 8x8 tokens, codebook 1024 x 8 (l2-norm)."""
    return VQTokenizer(**{**TINY, **overrides})


@register("tokenizer/vq-16", paper=LLAMAGEN, paper_params=72e6)
def vq_16(**overrides):
    """LlamaGen VQ-16: 256 px -> 16x16 tokens, codebook 16384 x 8 (l2-norm), ch 128 x [1,1,2,2,4]."""
    return VQTokenizer(**{**VQ16, **overrides})


@register("tokenizer/vq-8", paper=LLAMAGEN)
def vq_8(**overrides):
    """LlamaGen VQ-8: 256 px -> 32x32 tokens, codebook 16384 x 8 (l2-norm), ch 128 x [1,2,2,4]."""
    return VQTokenizer(**{**VQ8, **overrides})
