"""Visual tokenizers (images <-> tokens) and the quantizers they are built from.

Importing this package registers every tokenizer with ``zoo.registry``.
"""
from tokenizers_vis.base import Tokenizer

__all__ = ["Tokenizer"]
import tokenizers_vis.vq  # noqa: F401  registers tokenizer/vq-*
import tokenizers_vis.msvq  # noqa: F401  registers tokenizer/msvq-*
import tokenizers_vis.kl  # noqa: F401  registers tokenizer/kl-*
import tokenizers_vis.binary  # noqa: F401  registers tokenizer/bsq-*, tokenizer/lfq-*
import tokenizers_vis.uniwetok  # noqa: F401  registers tokenizer/uniwetok-*
import tokenizers_vis.tokenflow  # noqa: F401  registers tokenizer/tokenflow-*
import tokenizers_vis.seed  # noqa: F401  registers tokenizer/seed-*
import tokenizers_vis.slot  # noqa: F401  registers tokenizer/slot-*
import tokenizers_vis.flextok  # noqa: F401  registers tokenizer/flextok-*
import tokenizers_vis.comit  # noqa: F401  registers tokenizer/comit-*
import tokenizers_vis.layton  # noqa: F401  registers tokenizer/layton*
