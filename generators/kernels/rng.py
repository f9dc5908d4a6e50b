"""Counter-based RNG shared by the fused kernels and the torch reference.

Every random number the samplers use is a pure function of ``(seed, row, column)``:
Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) with
key ``(seed_lo, seed_hi)`` and counter ``(column // 4, row, 0, 0)``; column ``j`` takes the
output word ``j % 4``, converted to a float in ``[0, 1)`` exactly as Triton's ``tl.rand``
does. Using all four words of a Philox call quarters the integer work per token, which keeps
the generator off the critical path of a bandwidth-bound kernel. Inside a kernel this is
``tl.randint4x(seed, (row << 32) + column // 4)``; :func:`philox_uniform` recomputes the same
bits with int64 torch ops, so the torch reference and the kernels draw identical uniforms and
hence identical tokens (up to float rounding of the logits), and a row's draw never depends on
which other rows share its batch.

Pure torch: importing this module does not import Triton.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_TO_UNIT = 4.6566127342e-10  # Triton's uint_to_uniform_float scale for 32-bit draws
PHILOX_ROUNDS = 10


def _mul_hi_lo(a: int, b: torch.Tensor):
    """High and low 32-bit words of ``a * b`` for a 32-bit constant ``a`` and uint32 values in int64.

    The full product needs 64 unsigned bits, so ``b`` is split into 16-bit halves to stay
    inside int64.
    """
    b_hi, b_lo = b >> 16, b & 0xFFFF
    t = a * b_lo  # < 2**48
    x = a * b_hi + (t >> 16)  # < 2**49
    return x >> 16, ((x & 0xFFFF) << 16 | (t & 0xFFFF))


def philox4x32(seed, c0: torch.Tensor, c1: torch.Tensor):
    """The four 32-bit output words (int64 tensors in [0, 2**32)) of Philox4x32-10.

    Key ``(seed mod 2**32, seed >> 32)``, counter ``(c0, c1, 0, 0)``; the round function and
    constants are those of Triton's ``philox_impl``. ``seed`` is a Python int reduced mod 2**63
    (the kernels receive it as a non-negative int64).
    """
    seed = int(seed) & 0x7FFFFFFFFFFFFFFF
    c0, c1 = torch.broadcast_tensors(torch.as_tensor(c0, dtype=torch.int64) & _M32,
                                     torch.as_tensor(c1, dtype=torch.int64) & _M32)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def bits_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit draws: int32 view, fold negatives, scale."""
    x = torch.where(x >= 2**31, x - 2**32, x)  # reinterpret as int32
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * torch.tensor(_TO_UNIT, dtype=torch.float32)


def philox_uniform(seed, rows, n: int, device=None) -> torch.Tensor:
    """Uniforms in [0, 1) of shape ``(len(rows), n)``: entry ``(i, j)`` keyed by ``(seed, rows[i], j)``.

    ``rows`` are non-negative row ids (< 2**31); ``seed`` a Python int (mod 2**63).
    """
    rows = torch.as_tensor(rows, dtype=torch.int64, device=device).reshape(-1, 1)
    if rows.numel() and int(rows.min()) < 0:
        raise ValueError(f"row ids must be >= 0, got min {int(rows.min())}")
    quads = torch.arange((n + 3) // 4, dtype=torch.int64, device=rows.device).reshape(1, -1)
    words = philox4x32(seed, quads, rows)
    bits = torch.stack(words, dim=-1).reshape(rows.shape[0], -1)[:, :n]
    return bits_to_uniform(bits)


__all__ = ["PHILOX_ROUNDS", "bits_to_uniform", "philox4x32", "philox_uniform"]
