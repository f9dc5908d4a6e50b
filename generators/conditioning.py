"""Class and text conditioning with a null condition for classifier-free guidance.

* :class:`ClassEmbedder` -- LlamaGen/DiT label embedding: a table of ``num_classes + 1``
  rows, the last one the null class; during training each label is replaced by the null
  class with probability ``dropout`` (CFG training, Ho & Salimans 2022).
* :class:`TextEncoderBase` -- the text-encoder interface: ``forward(text_ids (B, L)) ->
  (B, L, D)`` and ``null(batch) -> (B, L, D)``. Users with weights can wrap a pretrained
  T5 / CLIP text encoder (LlamaGen t2i uses FLAN-T5-XL, 120 tokens) by subclassing it and
  projecting its features to ``dim``; the zoo ships :class:`WordTextEncoder`, a small
  bidirectional transformer over word ids trained from scratch with the generator
  (Shapes captions, ``zoo.data.text``).
* :class:`ConditionEncoder` -- turns a :class:`generators.base.Condition` into a fixed-length
  prefix ``(B, P, D)``: the class token first, then ``text_len`` text tokens. ``P`` is fixed
  per model so a KV-cache layout is static; a model with neither class nor text gets one
  learned start token (unconditional generation).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from generators.base import Condition
from generators.transformer import Transformer

PAD = 0  # padding word id (zoo.data.text uses 0 too)


class ClassEmbedder(nn.Module):
    """Labels ``(B,)`` -> ``(B, dim)``; ``-1`` (or a dropped label) maps to the null row."""

    def __init__(self, num_classes: int, dim: int, dropout: float = 0.1):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    @property
    def null_index(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """``drop`` (B,) bool forces rows to the null class; otherwise random in training."""
        labels = torch.as_tensor(labels, device=self.table.weight.device)
        if labels.dim() != 1:
            raise ValueError(f"class labels must be (B,), got shape {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"class labels must be integers, got dtype {labels.dtype}")
        if labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < -1 or hi >= self.num_classes:
                raise ValueError(f"class labels must lie in [0, {self.num_classes}) or be -1 (null), "
                                 f"got values in [{lo}, {hi}]")
        idx = torch.where(labels < 0, torch.full_like(labels, self.null_index), labels.long())
        if drop is None and self.training and self.dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout
        if drop is not None:
            idx = torch.where(drop, torch.full_like(idx, self.null_index), idx)
        return self.table(idx)

    def null(self, batch: int) -> torch.Tensor:
        idx = torch.full((batch,), self.null_index, dtype=torch.long, device=self.table.weight.device)
        return self.table(idx)


class TextEncoderBase(nn.Module):
    """Interface of a caption encoder: word ids ``(B, L)`` -> features ``(B, L, dim)``.

    Subclasses set ``dim`` and ``max_len`` and implement :meth:`forward` and :meth:`null`
    (the unconditional caption, used for CFG and caption dropout). A pretrained T5/CLIP
    encoder fits by tokenising with its own tokenizer, padding/truncating to ``max_len``
    and projecting to ``dim``.
    """

    dim: int
    max_len: int

    def forward(self, text_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def null(self, batch: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class WordTextEncoder(TextEncoderBase):
    """A small bidirectional transformer over word ids, trained with the generator.

    Padding id 0 is never attended to; an all-padding row is the null caption and gets the
    learned null sequence (the same one :meth:`null` returns and caption dropout uses).
    Shorter inputs are right-padded to ``max_len``.
    """

    def __init__(self, vocab_size: int, max_len: int, dim: int, depth: int = 2, heads: int = 4,
                 ffn_multiple: int = 64, dropout: float = 0.0):
        super().__init__()
        self.vocab_size, self.max_len, self.dim = vocab_size, max_len, dim
        self.embed = nn.Embedding(vocab_size, dim)
        self.encoder = Transformer(dim, depth, heads, ffn_multiple, rope="1d", dropout=dropout)
        self.null_seq = nn.Parameter(torch.zeros(max_len, dim))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.null_seq, std=0.02)

    def _check(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2:
            raise ValueError(f"text ids must be (B, L), got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"text ids must be integer word ids, got dtype {ids.dtype}")
        if ids.shape[1] > self.max_len:
            raise ValueError(f"captions are limited to {self.max_len} word ids, got {ids.shape[1]}")
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"word ids must lie in [0, {self.vocab_size}), got values in [{lo}, {hi}]")
        if ids.shape[1] < self.max_len:
            ids = nn.functional.pad(ids, (0, self.max_len - ids.shape[1]), value=PAD)
        return ids.long()

    def forward(self, text_ids: torch.Tensor) -> torch.Tensor:
        ids = self._check(text_ids.to(self.embed.weight.device))
        keep = ids != PAD                                      # (B, L)
        empty = ~keep.any(1)                                   # all-padding rows: null caption
        # let empty rows attend to everything so SDPA never sees a fully-masked row
        attn = (keep | empty[:, None])[:, None, None, :]       # (B, 1, 1, L)
        h = self.encoder(self.embed(ids), mask=attn)
        null = self.null_seq.to(h.dtype).expand_as(h)
        return torch.where(empty[:, None, None], null, h)

    def null(self, batch: int) -> torch.Tensor:
        return self.null_seq.unsqueeze(0).expand(batch, -1, -1)


class ConditionEncoder(nn.Module):
    """``Condition`` -> prefix ``(B, P, dim)``: ``[class token] + [text_len text tokens]``.

    A part the model was built with but the condition omits (``labels=None`` or
    ``text=None``) is null for every row, so one model serves class grids and caption
    grids. During training class and caption are dropped to null independently with
    probability ``dropout`` (CFG training).
    """

    def __init__(self, dim: int, num_classes: int | None = None, text_vocab_size: int | None = None,
                 text_len: int = 16, dropout: float = 0.1, text_depth: int = 2, text_heads: int = 4,
                 text_encoder: TextEncoderBase | None = None):
        super().__init__()
        self.dim, self.dropout = dim, dropout
        self.classes = ClassEmbedder(num_classes, dim, dropout) if num_classes else None
        if text_encoder is None and text_vocab_size:
            text_encoder = WordTextEncoder(text_vocab_size, text_len, dim, text_depth, text_heads)
        if text_encoder is not None and text_encoder.dim != dim:
            raise ValueError(f"text encoder gives {text_encoder.dim}-dim features, the generator needs {dim}")
        self.text = text_encoder
        self.start = None
        if self.classes is None and self.text is None:  # unconditional: one learned start token
            self.start = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.normal_(self.start, std=0.02)

    @property
    def prefix_len(self) -> int:
        if self.start is not None:
            return 1
        return (1 if self.classes is not None else 0) + (self.text.max_len if self.text is not None else 0)

    @property
    def conditional(self) -> bool:
        return self.start is None

    def forward(self, cond: Condition | None, batch: int | None = None) -> torch.Tensor:
        cond = cond if cond is not None else Condition()
        if cond.labels is not None and self.classes is None:
            raise ValueError("this generator was built without classes (num_classes=None) but got labels")
        if cond.text is not None and self.text is None:
            raise ValueError("this generator was built without text (text_vocab_size=None) but got text")
        if batch is None:
            batch = cond.batch_size
        for name, t in (("labels", cond.labels), ("text", cond.text)):
            if t is not None and t.shape[0] != batch:
                raise ValueError(f"condition {name} have batch {t.shape[0]}, expected {batch}")
        if self.start is not None:
            return self.start.expand(batch, -1, -1)
        parts = []
        if self.classes is not None:
            parts.append((self.classes(cond.labels) if cond.labels is not None
                          else self.classes.null(batch)).unsqueeze(1))
        if self.text is not None:
            if cond.text is None:
                parts.append(self.text.null(batch))
            else:
                t = self.text(cond.text)
                if self.training and self.dropout > 0:  # caption dropout, independent of classes
                    drop = torch.rand(batch, device=t.device) < self.dropout
                    t = torch.where(drop[:, None, None], self.text.null(batch).to(t.dtype), t)
                parts.append(t)
        return torch.cat(parts, 1)

    def null_condition(self, batch: int) -> torch.Tensor:
        """The unconditional prefix ``(B, P, dim)`` (null class and null caption) for CFG."""
        return self.forward(Condition(), batch)


__all__ = ["ClassEmbedder", "TextEncoderBase", "WordTextEncoder", "ConditionEncoder", "PAD"]
