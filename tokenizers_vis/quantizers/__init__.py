"""Quantizers shared by the named tokenizers (see DESIGN.md, "Tokenizers").

vq          VectorQuantizer (VQ-VAE/VQGAN; l2-normalised low-dim codes, entropy loss, legacy loss
            form, EMA codebook, k-means init, dead-code restart, rolling usage), kmeans
binary      BinaryQuantizer (LFQ / BSQ, group-factorised entropy; usable at K = 128 bits)
fsq         FSQ (finite scalar quantization)
rvq         ResidualVQ (D levels, optional quantizer dropout)
multiscale  MultiScaleVQ (VAR multi-scale residual; TokenFlow variant without phi + scale drop)
kl          KLBottleneck / DiagonalGaussian (continuous latents, MAR KL-16 style)
"""
from tokenizers_vis.quantizers.binary import BinaryQuantizer
from tokenizers_vis.quantizers.fsq import FSQ, round_ste
from tokenizers_vis.quantizers.kl import DiagonalGaussian, KLBottleneck
from tokenizers_vis.quantizers.multiscale import MultiScaleVQ
from tokenizers_vis.quantizers.rvq import ResidualVQ
from tokenizers_vis.quantizers.vq import VectorQuantizer, entropy_loss, kmeans

__all__ = ["FSQ", "BinaryQuantizer", "DiagonalGaussian", "KLBottleneck", "MultiScaleVQ", "ResidualVQ",
           "VectorQuantizer", "entropy_loss", "kmeans", "round_ste"]
