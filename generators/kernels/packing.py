"""Pack/unpack binary tokens to/from int32 words (torch; the layout of the bitwise kernel).

Bit ``j`` of a ``K``-bit token is bit ``j % 32`` (LSB first) of word ``j // 32``; unused
high bits of the last word are 0. Pure torch, no Triton import.
"""
from __future__ import annotations

import torch


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """``(..., K)`` 0/1 values -> int32 ``(..., ceil(K/32))``."""
    K = bits.shape[-1]
    n = (K + 31) // 32
    b = torch.nn.functional.pad(bits.to(torch.int64), (0, 32 * n - K)).reshape(*bits.shape[:-1], n, 32)
    words = (b << torch.arange(32, device=bits.device, dtype=torch.int64)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_bits(words: torch.Tensor, K: int) -> torch.Tensor:
    """int32 ``(..., ceil(K/32))`` words -> uint8 ``(..., K)`` bits."""
    n = (K + 31) // 32
    if words.shape[-1] != n:
        raise ValueError(f"{K} bits need {n} int32 words per token, got {words.shape[-1]}")
    shifts = torch.arange(32, device=words.device, dtype=torch.int64)
    bits = (words.to(torch.int64)[..., None] >> shifts) & 1
    return bits.reshape(*words.shape[:-1], 32 * n)[..., :K].to(torch.uint8)


__all__ = ["pack_bits", "unpack_bits"]
