"""Token embeddings and output heads, chosen by ``spec.kind`` (see DESIGN.md, Generators).

* ``discrete``: ``nn.Embedding(vocab, dim)`` in; linear to ``vocab`` logits out, cross-entropy,
  categorical sampling (LlamaGen, Sun et al. 2024, §2.2).
* ``binary``: a linear map of the ±1 bit vector in (the 2^K codebook is never built); ``K``
  independent per-bit logits out, binary cross-entropy, Bernoulli sampling (the bitwise
  heads of LFQ/BSQ-token models, e.g. Infinity).
* ``continuous``: a linear embedding in; **no head here** -- continuous tokens need a
  flow-matching / diffusion head (xAR, MAR), so :class:`OutputHead` raises
  :class:`~zoo.tokens.IncompatibleTokens`.

Token tensors are flat sequences ``(B, N, *per_token)`` (``Tokens.to_sequence().data``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from generators.sampling import sample_bits, sample_categorical
from zoo.tokens import IncompatibleTokens, TokenSpec


class TokenEmbedding(nn.Module):
    """Token values ``(B, N, *per_token)`` -> ``(B, N, dim)``."""

    def __init__(self, spec: TokenSpec, dim: int):
        super().__init__()
        self.spec, self.kind = spec, spec.kind
        if spec.kind == "discrete":
            self.embed = nn.Embedding(spec.vocab_size, dim)
        elif spec.kind == "binary":
            self.embed = nn.Linear(spec.bits, dim, bias=False)
        else:
            self.embed = nn.Linear(spec.dim, dim)
        nn.init.normal_(self.embed.weight, std=0.02)  # LlamaGen init

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        if self.kind == "discrete":
            return self.embed(data.long())
        w = self.embed.weight
        if self.kind == "binary":
            return self.embed(data.to(w.dtype) * 2 - 1)  # bits {0,1} -> ±1
        return self.embed(data.to(w.dtype))


class OutputHead(nn.Module):
    """Base: ``forward(h) -> logits``; ``loss(h, targets) -> {"loss", "acc"}``; ``sample``."""

    def __new__(cls, *args, **kwargs):
        if cls is OutputHead:  # OutputHead(spec, dim) dispatches on the kind
            cls = _head_class(args[0] if args else kwargs.get("spec"))
        return super().__new__(cls)  # (no required args: copy.deepcopy calls cls.__new__(cls))

    def __init__(self, spec: TokenSpec, dim: int, out: int | None = None, zero_init: bool = True,
                 bias: bool = False):
        super().__init__()
        self.spec = spec
        self.proj = nn.Linear(dim, out, bias=bias)  # bias: VAR's head has one, LlamaGen's not
        if bias:
            nn.init.zeros_(self.proj.bias)
        if zero_init:  # LlamaGen zero-initialises the output layer
            nn.init.zeros_(self.proj.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> dict:
        return self.loss_from_logits(self(h), targets)

    def loss_from_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> dict:
        raise NotImplementedError

    def sample(self, logits: torch.Tensor, **kw) -> torch.Tensor:
        raise NotImplementedError


class CategoricalHead(OutputHead):
    """Linear to ``vocab_size`` logits; cross-entropy; categorical sampling."""

    def __init__(self, spec: TokenSpec, dim: int, zero_init: bool = True, bias: bool = False):
        super().__init__(spec, dim, spec.vocab_size, zero_init, bias)

    def loss_from_logits(self, logits, targets):
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
        loss = F.cross_entropy(logits.float().flatten(0, -2), targets.long().flatten())
        with torch.no_grad():
            acc = (logits.argmax(-1) == targets).float().mean()
        return {"loss": loss, "acc": acc}

    def sample(self, logits, *, uncond=None, cfg=1.0, temperature=1.0, top_k=0, top_p=1.0, generator=None):
        return sample_categorical(logits, uncond=uncond, cfg=cfg, temperature=temperature,
                                  top_k=top_k, top_p=top_p, generator=generator)


class BitHead(OutputHead):
    """Linear to ``K`` independent per-bit logits; binary cross-entropy; Bernoulli sampling.

    ``acc`` is the bit accuracy. ``top_k`` / ``top_p`` do not apply to independent bits and
    are ignored.
    """

    def __init__(self, spec: TokenSpec, dim: int, zero_init: bool = True, bias: bool = False):
        super().__init__(spec, dim, spec.bits, zero_init, bias)

    def loss_from_logits(self, logits, targets):
        if targets.shape != logits.shape:
            raise ValueError(f"bit targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
        t = targets.float()
        loss = F.binary_cross_entropy_with_logits(logits.float(), t)
        with torch.no_grad():
            acc = ((logits > 0).float() == t).float().mean()
        return {"loss": loss, "acc": acc}

    def sample(self, logits, *, uncond=None, cfg=1.0, temperature=1.0, top_k=0, top_p=1.0, generator=None):
        return sample_bits(logits, uncond=uncond, cfg=cfg, temperature=temperature, generator=generator)


def _head_class(spec: TokenSpec):
    if not isinstance(spec, TokenSpec):
        raise TypeError(f"expected a TokenSpec, got {type(spec).__name__}")
    if spec.kind == "discrete":
        return CategoricalHead
    if spec.kind == "binary":
        return BitHead
    raise IncompatibleTokens(
        f"a categorical/bit output head cannot take continuous tokens [{spec.describe()}]: "
        "continuous tokens need a flow-matching or diffusion head (xAR / MAR generators)")


def make_head(spec: TokenSpec, dim: int, zero_init: bool = True, bias: bool = False) -> OutputHead:
    """The output head for ``spec.kind`` (raises IncompatibleTokens for continuous tokens)."""
    return _head_class(spec)(spec, dim, zero_init=zero_init, bias=bias)


__all__ = ["TokenEmbedding", "OutputHead", "CategoricalHead", "BitHead", "make_head"]
