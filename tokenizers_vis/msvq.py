"""VAR's multi-scale residual VQVAE (``tokenizer/msvq-*``).

Tian et al. 2024, "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
Prediction" (VAR, arXiv 2404.02905), §3.2 and Algorithms 1-2: a taming/VQGAN conv
encoder-decoder (the same layout as :class:`tokenizers_vis.vq.VQTokenizer`: attention in the
lowest-resolution level and the mid block) with a 3x3 ``quant_conv`` / ``post_quant_conv``
around a :class:`~tokenizers_vis.quantizers.MultiScaleVQ`. The tokens are a *pyramid* of
``(B, p_k, p_k)`` id maps (``sum p_k^2`` tokens, 680 for VAR's 256-px list); decoding sums the
phi-refined upsampled code maps (``indices_to_fhat``) and runs the decoder.

VAR's VQVAE (``vae_ch160v4096z32``): vocab 4096, Cvae 32, ch 160, ch_mult [1, 1, 2, 2, 4],
2 ResBlocks per level, f16 on 256 px, scales (1, 2, 3, 4, 5, 6, 8, 10, 13, 16).
"""
from __future__ import annotations

import torch.nn as nn

from tokenizers_vis.quantizers.multiscale import VAR_SCALES, MultiScaleVQ
from tokenizers_vis.vq import VQTokenizer
from zoo.registry import register
from zoo.tokens import Tokens

VAR = "VAR, Tian et al. 2024 (arXiv 2404.02905), §3.2 (multi-scale VQVAE)"


class MultiScaleVQTokenizer(VQTokenizer):
    """Conv encoder/decoder around a VAR multi-scale residual VQ: images <-> pyramid tokens.

    Args (those not listed are as in :class:`VQTokenizer`):
        z_channels: encoder output / decoder input channels (VAR: ``Cvae``).
        codebook_size, codebook_dim: K and the code dimension (VAR: 4096, 32).
        scales: token-map sides coarse to fine; the last must equal ``image_size / f``.
        phi, phi_kernel, scale_drop, beta, l2_norm: see :class:`MultiScaleVQ`.
        quant_conv_kernel: kernel of ``quant_conv`` / ``post_quant_conv`` (3 in VAR).
        l1_weight: optional L1 term added to the L2 reconstruction loss.
    """

    def __init__(self, image_size: int = 256, ch: int = 160, ch_mult: list = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 32, codebook_size: int = 4096,
                 codebook_dim: int = 32, scales: list = VAR_SCALES, phi: str = "shared4",
                 phi_kernel: int = 3, scale_drop: float = 0.0, beta: float = 0.25,
                 l2_norm: bool = False, quant_conv_kernel: int = 3, level_attn: bool = True,
                 mid_attn: bool = True, norm_groups: int = 32, l1_weight: float = 0.0):
        scales = [int(s) for s in scales]
        if self.config.get("scales") is not None:
            self._zoo_config["scales"] = scales  # JSON list in config.json
        # The parent builds encoder/decoder/1x1 convs and a VectorQuantizer we replace below
        # (codebook_size=2 keeps the throw-away codebook tiny).
        super().__init__(image_size=image_size, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                         z_channels=z_channels, codebook_size=2, codebook_dim=codebook_dim,
                         level_attn=level_attn, mid_attn=mid_attn, norm_groups=norm_groups,
                         l1_weight=l1_weight)
        grid = self.image_size // self.downsample
        if scales[-1] != grid:
            raise ValueError(f"the last scale must equal the latent size image_size / {self.downsample} = "
                             f"{grid}, got scales={scales}")
        if quant_conv_kernel < 1 or quant_conv_kernel % 2 == 0:
            raise ValueError(f"quant_conv_kernel must be a positive odd int, got {quant_conv_kernel}")
        pad = quant_conv_kernel // 2
        self.quant_conv = nn.Conv2d(z_channels, codebook_dim, quant_conv_kernel, padding=pad)
        self.post_quant_conv = nn.Conv2d(codebook_dim, z_channels, quant_conv_kernel, padding=pad)
        self.quantizer = MultiScaleVQ(codebook_size, codebook_dim, scales=scales, phi=phi,
                                      phi_kernel=phi_kernel, scale_drop=scale_drop, beta=beta,
                                      l2_norm=l2_norm)
        self.spec = self.quantizer.token_spec()

    # quantize() (inherited) returns (f_hat, list of (B, p, p) ids, quantizer losses)
    def encode(self, images) -> Tokens:
        _, idx, _ = self.quantize(images)
        return Tokens(idx, self.spec, validate=False)

    def decode(self, tokens: Tokens):
        self.check_tokens(tokens)
        dev = self.last_layer.device
        return self.decode_latents(self.quantizer.indices_to_fhat([t.to(dev) for t in tokens.data]))

    def forward(self, images):
        """``(recon, losses)``: ``loss = L2 (+ l1_weight * L1) + VAR's multi-scale VQ loss``."""
        f_hat, _, q = self.quantize(images)
        recon = self.decode_latents(f_hat)
        rec = self.reconstruction_loss(recon, images)
        loss = rec + q["loss"]
        losses = {"loss": loss, "rec": rec.detach(), "commit": q["commit"].detach(),
                  "codebook": q["codebook"].detach(), "usage": q["usage"], "perplexity": q["perplexity"]}
        return recon, losses


# Shapes 64x64, f8 -> 8x8 latent, 6 scales (1+4+9+16+36+64 = 130 tokens); as thin as vq-tiny.
TINY = dict(image_size=64, ch=16, ch_mult=[1, 2, 2, 4], num_res_blocks=1, z_channels=32,
            codebook_size=1024, codebook_dim=16, scales=[1, 2, 3, 4, 6, 8], level_attn=False,
            mid_attn=False, norm_groups=8)
VAR_VAE = dict(image_size=256, ch=160, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=32,
               codebook_size=4096, codebook_dim=32, scales=list(VAR_SCALES), level_attn=True,
               mid_attn=True, norm_groups=32)


@register("tokenizer/msvq-tiny", paper=VAR, weights={"shapes": "weights/tokenizer-msvq-tiny"})
def msvq_tiny(**overrides):
    """Tiny VAR multi-scale VQ for Shapes 64x64: f8, scales (1,2,3,4,6,8) -> 130 tokens, V=1024."""
    return MultiScaleVQTokenizer(**{**TINY, **overrides})


# ~109M is the commonly cited size of VAR's VQVAE (VAR's training log prints "VAE=108.95"M);
# this build counts 108.95M.
@register("tokenizer/msvq-var", paper=VAR, paper_params=109e6)
def msvq_var(**overrides):
    """VAR's VQVAE: 256 px, f16, scales (1,...,16) -> 680 tokens, V=4096, Cvae=32, ch 160."""
    return MultiScaleVQTokenizer(**{**VAR_VAE, **overrides})
