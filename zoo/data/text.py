"""A fixed word-level vocabulary for Shapes captions and a tiny tokenizer for it.

Captions of the embedded Shapes domain (``zoo.data.shapes``) follow the GenEval prompt
templates (Ghosh et al., 2023, "GenEval: An Object-Focused Framework for Evaluating
Text-to-Image Alignment": single object, two objects, counting, colours, position, colour
attribution) with COCO objects swapped for coloured shapes, so a
closed vocabulary of a few dozen words covers every caption. The word list is fixed on
purpose: text-conditioned checkpoints store word ids, so the ids must never move. New words
may only be appended at the end.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch

PAD = 0
UNK = 1

# Spelled out here (not imported from shapes.py) so the ids are pinned independently of any
# change to the dataset module; tests check that the two stay in agreement.
_COLOR_WORDS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
                "white")
_SHAPE_WORDS = ("circle", "square", "triangle")

VOCAB: list[str] = (
    ["<pad>", "<unk>"]
    + ["a", "an", "one", "two", "three", "four", "and", "left", "right", "of", "above", "below"]
    + list(_COLOR_WORDS)
    + list(_SHAPE_WORDS)
    + [w + "s" for w in _SHAPE_WORDS]
)
WORD_TO_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}

_SPLIT = re.compile(r"[\s,]+")


def vocab_size() -> int:
    """Number of word ids, PAD and UNK included (the size of a text embedding table)."""
    return len(VOCAB)


def tokenize(caption: str) -> list[str]:
    """Lower-case ``caption`` and split it on whitespace and commas."""
    if not isinstance(caption, str):
        raise TypeError(f"tokenize: expected a str caption, got {type(caption).__name__}")
    return [w for w in _SPLIT.split(caption.strip().lower()) if w]


def encode(captions: Sequence[str] | str, max_len: int = 16, truncate: bool = False) -> torch.Tensor:
    """Word ids of ``captions`` as a LongTensor (B, max_len), right-padded with ``PAD``.

    Unknown words become ``UNK``. A caption with more than ``max_len`` words raises
    ``ValueError`` unless ``truncate=True`` (then its first ``max_len`` words are kept).
    A single string is treated as a batch of one.
    """
    if isinstance(captions, str):
        captions = [captions]
    if max_len < 1:
        raise ValueError(f"encode: max_len must be >= 1, got {max_len}")
    out = torch.full((len(captions), max_len), PAD, dtype=torch.long)
    for i, cap in enumerate(captions):
        words = tokenize(cap)
        if len(words) > max_len:
            if not truncate:
                raise ValueError(f"encode: caption {i} has {len(words)} words but max_len is "
                                 f"{max_len} (pass truncate=True to cut it): {cap!r}")
            words = words[:max_len]
        if words:
            out[i, :len(words)] = torch.tensor([WORD_TO_ID.get(w, UNK) for w in words])
    return out


def decode(ids: torch.Tensor | Iterable[Iterable[int]]) -> list[str]:
    """Captions from word ids (B, L) or a single row (L,); ``PAD`` ids are dropped."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2:
            raise ValueError(f"decode: expected ids of shape (B, L) or (L,), got {tuple(ids.shape)}")
        rows = ids.tolist()
    else:
        rows = [list(r) for r in ids]
    out = []
    for row in rows:
        words = []
        for t in row:
            t = int(t)
            if t == PAD:
                continue
            if not 0 <= t < len(VOCAB):
                raise ValueError(f"decode: id {t} is outside the vocabulary [0, {len(VOCAB)})")
            words.append(VOCAB[t])
        out.append(" ".join(words))
    return out


__all__ = ["PAD", "UNK", "VOCAB", "WORD_TO_ID", "vocab_size", "tokenize", "encode", "decode"]
