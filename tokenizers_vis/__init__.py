"""Visual tokenizers (images <-> tokens) and the quantizers they are built from.

Importing this package registers every tokenizer with ``zoo.registry``.
"""
from tokenizers_vis.base import Tokenizer

__all__ = ["Tokenizer"]
import tokenizers_vis.vq  # noqa: F401  registers tokenizer/vq-*
import tokenizers_vis.msvq  # noqa: F401  registers tokenizer/msvq-*
import tokenizers_vis.kl  # noqa: F401  registers tokenizer/kl-*
import tokenizers_vis.binary  # noqa: F401  registers tokenizer/bsq-*, tokenizer/lfq-*
