"""Triton building blocks shared by the fused sampling kernels (imports Triton).

All helpers work on ``(ROWS, BLOCK)`` tiles: ``ROWS`` rows of a batch side by side (several
short rows per program when the vocabulary is small, one row otherwise) and a chunk of
``BLOCK`` columns; per-row state is a ``(ROWS,)`` vector.
"""
from __future__ import annotations

import triton
import triton.language as tl

from generators.kernels.rng import PHILOX_ROUNDS

_ROUNDS = tl.constexpr(PHILOX_ROUNDS)


@triton.jit
def guided_tile(c_ptr, u_ptr, row_c, row_u, scale, inv_temp_div, cols, lmask,
                HAS_U: tl.constexpr, DIV_T: tl.constexpr):
    """Guided, tempered float32 logits ``(u + s·(c − u)) / T`` of one tile; ``-inf`` off the mask.

    CFG is ``u + s·(c − u)`` (Ho & Salimans 2022) with a per-row ``scale``; the division by
    ``T`` (not a multiply by ``1/T``) matches the torch reference's rounding. ``-0`` becomes
    ``+0`` (so the two zeros are one key) and NaN (e.g. ``-inf - -inf`` on a masked vocab
    entry) becomes ``-inf``.
    """
    c = tl.load(c_ptr + row_c[:, None] + cols[None, :], mask=lmask, other=0.0).to(tl.float32)
    if HAS_U:
        u = tl.load(u_ptr + row_u[:, None] + cols[None, :], mask=lmask, other=0.0).to(tl.float32)
        z = u + scale[:, None] * (c - u)
    else:
        z = c
    if DIV_T:
        z = z / inv_temp_div
    z = z + 0.0
    return tl.where(lmask & (z == z), z, float("-inf"))  # noqa: PLR0124  (NaN test)


@triton.jit
def order_key(z):
    """Monotone map float32 -> int64 in [0, 2**32): ``a < b`` iff ``key(a) < key(b)``.

    Flipping the magnitude bits of negative floats makes their signed int32 order match the
    float order; the offset makes the keys non-negative so radix digits are plain shifts.
    """
    b = z.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.int64) + 2147483648


@triton.jit
def keyed_uniform(seed, row_key, start, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """``(ROWS, BLOCK)`` uniforms for columns ``start .. start+BLOCK-1`` (``start % 4 == 0``).

    Column ``j`` of row ``r``: word ``j % 4`` of Philox4x32-10 with counter ``(j // 4, r)``
    and key ``seed`` — the scheme :func:`generators.kernels.rng.philox_uniform` reproduces.
    """
    q = start // 4 + tl.arange(0, BLOCK // 4)
    off = (row_key[:, None] << 32) + q[None, :].to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(seed, off, _ROUNDS)
    # join(join(r0, r2), join(r1, r3))[..., i, j] = r_{2i+j}: flattening puts word w at 4q + w
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (ROWS, BLOCK))
    x = r.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def gumbel_scores(z, seed, row_key, start, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """``z + G`` with ``G = -log(-log U)`` standard Gumbel noise keyed by (seed, row, column).

    ``argmax(z + G)`` over a set is a draw from ``softmax(z)`` restricted to that set
    (Gumbel-max; equivalently the exponential race ``argmax p / E``, ``E = -log U``, used by
    the torch reference, so both pick the same index for the same ``U``).
    """
    u = keyed_uniform(seed, row_key, start, ROWS, BLOCK)
    return z - tl.log(-tl.log(u))


@triton.jit
def member(key, T, r, run, lmask):
    """Membership in a prefix of the order (value desc, index asc): ``key > T`` or one of the
    first ``r`` entries (by index) with ``key == T``.

    ``run`` counts ties at ``T`` in earlier chunks of the row (chunks are scanned in order);
    returns ``(mask, run)``.
    """
    tie = lmask & (key == T[:, None])
    rank = run[:, None] + tl.cumsum(tie.to(tl.int32), axis=1)  # 1-based rank among ties
    keep = lmask & ((key > T[:, None]) | (tie & (rank <= r[:, None])))
    return keep, run + tl.sum(tie.to(tl.int32), axis=1)


@triton.jit
def argmax_update(score, key, start, best, best_idx, best_key, BLOCK: tl.constexpr):
    """Fold one chunk into a running per-row argmax (first index wins ties)."""
    cv, cj = tl.max(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
    ckey = tl.sum(tl.where(tl.arange(0, BLOCK)[None, :] == cj[:, None], key, 0), axis=1)
    upd = cv > best
    return (tl.where(upd, cv, best), tl.where(upd, cj + start, best_idx),
            tl.where(upd, ckey, best_key))


@triton.jit
def row_scale(scale_ptr, scale_val, rid, rmask, PER_ROW: tl.constexpr, ROWS: tl.constexpr):
    """Per-row guidance scale: loaded from ``scale_ptr`` or the scalar ``scale_val`` broadcast."""
    if PER_ROW:
        s = tl.load(scale_ptr + rid, mask=rmask, other=1.0).to(tl.float32)
    else:
        s = tl.zeros((ROWS,), tl.float32) + scale_val
    return s


@triton.jit
def row_keys(rows_ptr, rid, rmask, HAS_ROWS: tl.constexpr):
    """RNG row ids: caller-given (batch-composition independent ids) or the row index."""
    if HAS_ROWS:
        k = tl.load(rows_ptr + rid, mask=rmask, other=0).to(tl.int64)
    else:
        k = rid.to(tl.int64)
    return k
