"""Quantizers shared by the named tokenizers (see DESIGN.md, "Tokenizers")."""
from tokenizers_vis.quantizers.vq import VectorQuantizer, entropy_loss

__all__ = ["VectorQuantizer", "entropy_loss"]
