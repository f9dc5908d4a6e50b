"""Visual tokenizers (images <-> tokens) and the quantizers they are built from.

Importing this package registers every tokenizer with ``zoo.registry``.
"""
from tokenizers_vis.base import Tokenizer

__all__ = ["Tokenizer"]
import tokenizers_vis.vq  # noqa: F401  registers tokenizer/vq-*
