"""Fused bitwise sampling for binary tokens (LFQ/BSQ codes, K <= 128 bits per token).

One kernel per batch: CFG on the per-bit logits ``u + s·(c − u)`` with a per-row scale (as
bitwise AR models such as Infinity, Han et al. 2025, §3.3 guide each bit's logit), division
by the temperature, then independent Bernoulli draws ``U < sigmoid(z)`` with ``U`` from the
counter-based Philox keyed by (seed, row id, bit index) — the same stream as the torch
reference :func:`generators.sampling.sample_bits` given ``seed=``. Output: one uint8 per bit,
or packed little-endian into int32 words (bit ``j`` of a row is bit ``j % 32`` of word
``j // 32``): 16 bytes per 128-bit token instead of 128. See :mod:`generators.kernels.packing`
for the torch pack/unpack helpers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from generators.kernels.categorical import (
    _rows_tensor,
    _rowwise,
    _scale_args,
    _seed_tensor,
)
from generators.kernels.common import guided_tile, keyed_uniform, row_keys, row_scale
from generators.sampling import check_temperature

MAX_BITS = 128


@triton.jit
def _bits_kernel(c_ptr, u_ptr, scale_ptr, rows_ptr, seed_ptr, out_ptr,
                 B, K, stride_c, stride_u, stride_o, n_words, scale_val, temperature,
                 HAS_U: tl.constexpr, SCALE_PER_ROW: tl.constexpr, HAS_ROWS: tl.constexpr,
                 GREEDY: tl.constexpr, PACKED: tl.constexpr, ROWS: tl.constexpr, W: tl.constexpr):
    KP: tl.constexpr = W * 32
    rid = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rid < B
    rid64 = rid.to(tl.int64)
    cols = tl.arange(0, KP)
    lmask = rmask[:, None] & (cols[None, :] < K)
    scale = row_scale(scale_ptr, scale_val, rid, rmask, SCALE_PER_ROW, ROWS)
    z = guided_tile(c_ptr, u_ptr, rid64 * stride_c, rid64 * stride_u, scale, temperature, cols, lmask,
                    HAS_U, not GREEDY)
    if GREEDY:
        bit = z > 0.0
    else:
        row_key = row_keys(rows_ptr, rid, rmask, HAS_ROWS)
        u = keyed_uniform(tl.load(seed_ptr), row_key, 0, ROWS, KP)
        bit = u < tl.sigmoid(z)
    bit = bit & lmask
    if PACKED:
        b3 = tl.reshape(bit.to(tl.int32), (ROWS, W, 32))
        words = tl.sum(b3 << tl.arange(0, 32)[None, None, :], axis=2)  # distinct bits: sum == or
        w = tl.arange(0, W)
        tl.store(out_ptr + rid64[:, None] * stride_o + w[None, :], words,
                 mask=rmask[:, None] & (w[None, :] < n_words))
    else:
        tl.store(out_ptr + rid64[:, None] * stride_o + cols[None, :], bit.to(tl.uint8), mask=lmask)


def fused_bits(logits: torch.Tensor, uncond: torch.Tensor | None = None, cfg=1.0, temperature: float = 1.0, *,
               seed, rows=None, packed: bool = False, rows_per_program: int | None = None) -> torch.Tensor:
    """Bernoulli bits from ``(B, K)`` per-bit logits (``K <= 128``).

    Returns uint8 ``(B, K)``, or with ``packed`` int32 ``(B, ceil(K/32))`` words.
    ``temperature == 0`` thresholds the guided logits at 0. ``seed``/``rows`` as in
    :func:`generators.kernels.categorical.fused_categorical`.
    """
    logits = _rowwise(logits, "bit logits")
    B, K = logits.shape
    if not 1 <= K <= MAX_BITS:
        raise ValueError(f"the bitwise kernel takes 1..{MAX_BITS} bits per token, got K={K}")
    if uncond is not None:
        if uncond.shape != logits.shape:
            raise ValueError(f"cond and uncond bit logits must have the same shape, got {tuple(logits.shape)} "
                             f"and {tuple(uncond.shape)}")
        uncond = _rowwise(uncond, "uncond")
    temperature = check_temperature(temperature)
    device = logits.device
    n_words = (K + 31) // 32
    W = 1 << (n_words - 1).bit_length()
    out = (torch.empty(B, n_words, dtype=torch.int32, device=device) if packed
           else torch.empty(B, K, dtype=torch.uint8, device=device))
    if B == 0:
        return out
    scale_t, scale_val, per_row = _scale_args(cfg, B, device)
    rows_t = _rows_tensor(rows, B, device)
    # ~2048 bits per program (one 128-bit row is too little work for a program); 128 registers
    # per thread packed at 16 x 128 bits (sm_90 compile)
    R = rows_per_program or max(1, min(2048 // (W * 32), 1 << (B - 1).bit_length()))
    _bits_kernel[(triton.cdiv(B, R),)](
        logits, uncond if uncond is not None else logits, scale_t if per_row else logits,
        rows_t if rows_t is not None else logits, _seed_tensor(seed, device), out,
        B, K, logits.stride(0), uncond.stride(0) if uncond is not None else 0, out.stride(0), n_words,
        scale_val, float(temperature) if temperature > 0 else 1.0,
        HAS_U=uncond is not None, SCALE_PER_ROW=per_row, HAS_ROWS=rows_t is not None,
        GREEDY=temperature == 0, PACKED=packed, ROWS=R, W=W, num_warps=4)
    return out


__all__ = ["MAX_BITS", "fused_bits"]
