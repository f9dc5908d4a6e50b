"""Fused categorical sampling: CFG -> temperature -> top-k -> top-p -> Gumbel-max, one kernel.

One program handles ``ROWS`` rows (several when the vocabulary is short) and walks each row
in chunks of ``BLOCK`` columns, so any vocabulary size works (tested up to 65,536; FSQ's
64,000) without holding a row in registers. The guided logits are never written to memory:
every pass re-reads ``cond``/``uncond`` (from L1/L2 after the first pass) and recomputes them.

Passes (each one streaming read of the row):

* no filter: 1 pass, Gumbel-max argmax of ``z + G`` (``z`` guided, tempered logits).
* top-k: a radix select on the float's order-preserving 32-bit key with 8-bit digits
  (``tl.histogram`` of the next digit among keys that share the prefix found so far) finds
  the k-th largest key in at most 4 passes, stopping early once the bin that holds the k-th
  entry holds nothing else that matters (usually after 3); then 1 pass samples. (Short rows
  packed several per program use 4-bit digits and a one-hot count instead: at most 8 cheap
  passes over rows that sit in L1.)
* top-p, sampling only: sort-free *rejection chain*. Let ``c1 = argmax_all(z + G)``. If the
  mass of the entries ranked before ``c1`` (value desc, index asc) is ``< p·M`` then ``c1``
  is in the nucleus and, the nucleus being a prefix of that order, it is also the argmax over
  the nucleus: accept. Otherwise the answer lies before ``c1``: the same pass that measured
  the mass also found ``c2 = argmax(z + G)`` over the entries before ``c1``; repeat. Each
  round accepts with probability >= mass(nucleus)/mass(prefix) >= p, so the expected number
  of extra passes is below ``1/p`` (about 1 at p = 0.9) and the result is exactly the
  Gumbel-max draw from the renormalised nucleus for the given noise.
* top-p with probabilities requested: the threshold itself is needed, found by a radix
  select on the same keys with 4-bit digits and mass-weighted bins (one-hot reduction;
  at most 8 passes), then one pass writes the probabilities and samples.

Why sort-free and not ``tl.sort``: ``tl.sort`` sorts one register-resident block, and a
65,536-entry fp32 row is 256 KB, the whole register file of an SM; a chunked sort would
need a merge across chunks (extra passes, O(log² n) shuffle stages per element) only to read
off one threshold. The selections above need no ordering. Pass counts, measured by a torch
simulation of the same algorithms on ``randn·s`` logits (s = 1, 3, 6; 64 rows; V = 4096,
16384, 65536): top-k (k = 900) radix 2.8-3.0 passes (max 4) + 1 sampling pass; top-p
(p = 0.9) 2.1 passes in all (max 4); top-k + top-p (900, 0.96) radix + 2.05 passes. Only
the first pass must come from HBM: a 16k-vocab fp32 cond+uncond row is 128 KB, and at ~2
programs per SM the rows in flight (~34 MB) stay in the 50 MB L2 of an H100; at 64k
(512 KB/row) the re-reads partly miss L2, halved with bf16 logits. Compiled for sm_90 (no
spills): 48 registers/thread for the plain draw, 96 top-k, 80 top-p, 104 both; speed
itself is unmeasured here (no GPU): ``python -m eval.bench --kernels`` measures it.

Ties (documented contract, same for top-k and top-p): the order is value descending, then
index ascending. Top-k keeps exactly ``k`` entries (the first ``k`` of that order); top-p
keeps the shortest prefix whose mass reaches ``p`` (at least one entry). The torch
reference (``generators.sampling.filter_logits``) breaks ties as ``torch.topk`` /
``torch.sort`` do, so the two agree whenever the boundary value is not tied.

RNG: Gumbel noise from the counter-based Philox keyed by (seed, row id, token)
(``generators.kernels.rng``): the same seed and row id give the same token whatever else is
in the batch, and the torch reference given the same seed draws identical uniforms.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from generators.kernels.common import (
    argmax_update,
    guided_tile,
    gumbel_scores,
    keyed_uniform,
    member,
    order_key,
    row_keys,
    row_scale,
)
from generators.sampling import check_temperature, check_top_k, check_top_p

# ---- passes -----------------------------------------------------------------------------


@triton.jit
def _scan(c_ptr, u_ptr, p_ptr, row_c, row_u, row_p, scale, temperature, V, rmask, seed, row_key,
          m_in, norm, Tk, rk, Tp, rp,
          HAS_TK: tl.constexpr, HAS_TP: tl.constexpr, STATS: tl.constexpr, SAMPLE: tl.constexpr,
          WRITE: tl.constexpr, GREEDY: tl.constexpr, HAS_U: tl.constexpr,
          ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over the kept set (top-k prefix ``(Tk, rk)`` and/or top-p prefix ``(Tp, rp)``).

    ``STATS``: running max ``m`` and mass ``M = Σ exp(z - m)`` of the kept set.
    ``SAMPLE``: Gumbel-max argmax over the kept set (plain argmax of ``z`` when ``GREEDY``).
    ``WRITE``: store ``exp(z - m_in) / norm`` (0 outside the kept set) to ``p_ptr``.
    Returns ``(m, M, argmax index, argmax key)``.
    """
    m = tl.full((ROWS,), float("-inf"), tl.float32)
    mass = tl.zeros((ROWS,), tl.float32)
    best = tl.full((ROWS,), float("-inf"), tl.float32)
    best_idx = tl.zeros((ROWS,), tl.int32)
    best_key = tl.zeros((ROWS,), tl.int64)
    run_k = tl.zeros((ROWS,), tl.int32)
    run_p = tl.zeros((ROWS,), tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        lmask = rmask[:, None] & (cols[None, :] < V)
        z = guided_tile(c_ptr, u_ptr, row_c, row_u, scale, temperature, cols, lmask, HAS_U, not GREEDY)
        key = order_key(z)
        keep = lmask
        if HAS_TK:
            in_k, run_k = member(key, Tk, rk, run_k, lmask)
            keep = keep & in_k
        if HAS_TP:
            in_p, run_p = member(key, Tp, rp, run_p, lmask)
            keep = keep & in_p
        if STATS:
            zk = tl.where(keep, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(zk, axis=1))
            alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
            w = tl.where(zk == float("-inf"), 0.0, tl.exp(zk - m_new[:, None]))
            mass = mass * alpha + tl.sum(w, axis=1)
            m = m_new
        if SAMPLE:
            if GREEDY:
                score = tl.where(keep, z, float("-inf"))
            else:
                score = tl.where(keep, gumbel_scores(z, seed, row_key, start, ROWS, BLOCK), float("-inf"))
            best, best_idx, best_key = argmax_update(score, key, start, best, best_idx, best_key, BLOCK)
        if WRITE:
            p = tl.where(keep, tl.exp(z - m_in[:, None]) / norm[:, None], 0.0)
            tl.store(p_ptr + row_p[:, None] + cols[None, :], p, mask=lmask)
    return m, mass, best_idx, best_key


@triton.jit
def _radix_count(c_ptr, u_ptr, row_c, row_u, scale, temperature, V, rmask, k,
                 HAS_U: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, RB: tl.constexpr):
    """Top-k boundary: the prefix ``(T, r)`` of the order holding exactly ``k`` entries.

    Radix select on the 32-bit order key, most significant digit first, ``RB`` bits per pass:
    histogram the next digit of the keys that match the prefix so far (``tl.histogram`` for
    one row per program, else a one-hot reduction), pick the highest bin
    where the count from the top reaches ``k``. Stops as soon as the chosen bin holds exactly
    the entries still needed (then ``T = lowest key of the bin - 1``, ``r = 0``); after the
    last digit ``T`` is the k-th key and ``r`` the number of its ties to keep.
    """
    NB: tl.constexpr = 1 << RB
    NLEV: tl.constexpr = 32 // RB
    bins = tl.arange(0, NB)
    prefix = tl.zeros((ROWS,), tl.int64)
    above = tl.zeros((ROWS,), tl.int32)
    T = tl.zeros((ROWS,), tl.int64)
    r = tl.zeros((ROWS,), tl.int32)
    done = ~rmask
    level = 0
    while (level < NLEV) & (tl.sum((~done).to(tl.int32), axis=0) > 0):
        shift = 32 - RB * (level + 1)
        hist = tl.zeros((ROWS * NB,), tl.int32)
        h = tl.zeros((ROWS, NB), tl.int32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            lmask = (~done)[:, None] & (cols[None, :] < V)
            z = guided_tile(c_ptr, u_ptr, row_c, row_u, scale, temperature, cols, lmask, HAS_U, True)
            key = order_key(z)
            match = lmask & ((key >> (shift + RB)) == prefix[:, None])
            digit = ((key >> shift) & (NB - 1)).to(tl.int32)
            if ROWS == 1:
                hist += tl.histogram(tl.reshape(digit, (BLOCK,)), NB, mask=tl.reshape(match, (BLOCK,)))
            else:
                # several short rows per program: per-row bins by a one-hot reduction (small RB)
                onehot = match[:, :, None] & (digit[:, :, None] == bins[None, None, :])
                h += tl.sum(onehot.to(tl.int32), axis=1)
        if ROWS == 1:
            h = tl.reshape(hist, (ROWS, NB))
        from_top = tl.cumsum(h, axis=1, reverse=True) + above[:, None]
        crit = (from_top >= k) | (bins[None, :] == 0)
        d = tl.max(tl.where(crit, bins[None, :], 0), axis=1)
        cnt_d = tl.sum(tl.where(bins[None, :] == d[:, None], h, 0), axis=1)
        new_above = above + tl.sum(tl.where(bins[None, :] > d[:, None], h, 0), axis=1)
        new_prefix = prefix * NB + d.to(tl.int64)
        need = k - new_above
        early = ~done & (cnt_d == need)
        last = ~done & ~early & (shift == 0)
        T = tl.where(early, (new_prefix << shift) - 1, tl.where(last, new_prefix, T))
        r = tl.where(early, 0, tl.where(last, need, r))
        prefix = tl.where(done, prefix, new_prefix)
        above = tl.where(done, above, new_above)
        done = done | early | last
        level += 1
    return T, r


@triton.jit
def _radix_mass(c_ptr, u_ptr, row_c, row_u, scale, temperature, V, rmask, m, target, Tk, rk,
                IN_TOPK: tl.constexpr, HAS_U: tl.constexpr,
                ROWS: tl.constexpr, BLOCK: tl.constexpr, RB: tl.constexpr):
    """Top-p boundary: the shortest prefix ``(T, r)`` of the order with mass ``>= target``.

    Same radix select as :func:`_radix_count` but bins carry ``Σ exp(z - m)`` (a one-hot
    reduction, hence the small ``RB``); restricted to the top-k prefix when ``IN_TOPK``.
    Returns ``(T, r, mass of the kept prefix)``.
    """
    NB: tl.constexpr = 1 << RB
    NLEV: tl.constexpr = 32 // RB
    bins = tl.arange(0, NB)
    prefix = tl.zeros((ROWS,), tl.int64)
    above_n = tl.zeros((ROWS,), tl.int32)
    above_m = tl.zeros((ROWS,), tl.float32)
    T = tl.zeros((ROWS,), tl.int64)
    r = tl.zeros((ROWS,), tl.int32)
    kept = tl.zeros((ROWS,), tl.float32)
    done = ~rmask
    level = 0
    while (level < NLEV) & (tl.sum((~done).to(tl.int32), axis=0) > 0):
        shift = 32 - RB * (level + 1)
        hn = tl.zeros((ROWS, NB), tl.int32)
        hm = tl.zeros((ROWS, NB), tl.float32)
        run = tl.zeros((ROWS,), tl.int32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            lmask = (~done)[:, None] & (cols[None, :] < V)
            z = guided_tile(c_ptr, u_ptr, row_c, row_u, scale, temperature, cols, lmask, HAS_U, True)
            key = order_key(z)
            dom = lmask
            if IN_TOPK:
                in_k, run = member(key, Tk, rk, run, lmask)
                dom = dom & in_k
            match = dom & ((key >> (shift + RB)) == prefix[:, None])
            digit = ((key >> shift) & (NB - 1)).to(tl.int32)
            onehot = match[:, :, None] & (digit[:, :, None] == bins[None, None, :])
            w = tl.where(match, tl.exp(z - m[:, None]), 0.0)
            hn += tl.sum(onehot.to(tl.int32), axis=1)
            hm += tl.sum(tl.where(onehot, w[:, :, None], 0.0), axis=1)
        from_top = tl.cumsum(hm, axis=1, reverse=True) + above_m[:, None]
        crit = (from_top >= target[:, None]) | (bins[None, :] == 0)
        d = tl.max(tl.where(crit, bins[None, :], 0), axis=1)
        sel = bins[None, :] == d[:, None]
        cnt_d = tl.sum(tl.where(sel, hn, 0), axis=1)
        mass_d = tl.sum(tl.where(sel, hm, 0.0), axis=1)
        higher = bins[None, :] > d[:, None]
        new_above_n = above_n + tl.sum(tl.where(higher, hn, 0), axis=1)
        new_above_m = above_m + tl.sum(tl.where(higher, hm, 0.0), axis=1)
        new_prefix = prefix * NB + d.to(tl.int64)
        # after the last digit all entries of the bin are ties of weight q each: keep just
        # enough of them (first by index) to reach the target
        q = mass_d / tl.maximum(cnt_d, 1).to(tl.float32)
        need_f = tl.ceil((target - new_above_m) / tl.maximum(q, 1e-30))
        need = tl.minimum(tl.maximum(need_f, 1.0), tl.maximum(cnt_d, 1).to(tl.float32)).to(tl.int32)
        early = ~done & (cnt_d <= 1)
        last = ~done & ~early & (shift == 0)
        T = tl.where(early, (new_prefix << shift) - 1, tl.where(last, new_prefix, T))
        r = tl.where(early, 0, tl.where(last, need, r))
        kept = tl.where(early, new_above_m + mass_d, tl.where(last, new_above_m + need.to(tl.float32) * q, kept))
        prefix = tl.where(done, prefix, new_prefix)
        above_n = tl.where(done, above_n, new_above_n)
        above_m = tl.where(done, above_m, new_above_m)
        done = done | early | last
        level += 1
    return T, r, kept


@triton.jit
def _chain(c_ptr, u_ptr, row_c, row_u, scale, temperature, V, rmask, seed, row_key,
           m, target, cand, cand_key, Tk, rk,
           HAS_TK: tl.constexpr, HAS_U: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Sort-free exact top-p draw by the rejection chain described in the module docstring.

    ``cand``/``cand_key``: the Gumbel-max argmax over the (top-k) domain. A row is done when
    the mass ranked before its candidate is ``< target`` (candidate in the nucleus), or when
    nothing is ranked before it.
    """
    done = ~rmask
    while tl.sum((~done).to(tl.int32), axis=0) > 0:
        before_mass = tl.zeros((ROWS,), tl.float32)
        best = tl.full((ROWS,), float("-inf"), tl.float32)
        best_idx = tl.zeros((ROWS,), tl.int32)
        best_key = tl.zeros((ROWS,), tl.int64)
        run = tl.zeros((ROWS,), tl.int32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            lmask = (~done)[:, None] & (cols[None, :] < V)
            z = guided_tile(c_ptr, u_ptr, row_c, row_u, scale, temperature, cols, lmask, HAS_U, True)
            key = order_key(z)
            dom = lmask
            if HAS_TK:
                in_k, run = member(key, Tk, rk, run, lmask)
                dom = dom & in_k
            before = dom & ((key > cand_key[:, None])
                            | ((key == cand_key[:, None]) & (cols[None, :] < cand[:, None])))
            before_mass += tl.sum(tl.where(before, tl.exp(z - m[:, None]), 0.0), axis=1)
            score = tl.where(before, gumbel_scores(z, seed, row_key, start, ROWS, BLOCK), float("-inf"))
            best, best_idx, best_key = argmax_update(score, key, start, best, best_idx, best_key, BLOCK)
        accept = (before_mass < target) | (best == float("-inf"))
        move = ~done & ~accept
        cand = tl.where(move, best_idx, cand)
        cand_key = tl.where(move, best_key, cand_key)
        done = done | accept
    return cand


# ---- kernel -----------------------------------------------------------------------------


@triton.jit
def _categorical_kernel(c_ptr, u_ptr, scale_ptr, rows_ptr, seed_ptr, ids_ptr, p_ptr,
                        B, V, stride_c, stride_u, stride_p, scale_val, temperature, top_k, top_p,
                        HAS_U: tl.constexpr, SCALE_PER_ROW: tl.constexpr, HAS_ROWS: tl.constexpr,
                        GREEDY: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
                        CHAIN: tl.constexpr, STATS: tl.constexpr, WRITE: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK: tl.constexpr,
                        RB_COUNT: tl.constexpr, RB_MASS: tl.constexpr):
    rid = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rid < B
    rid64 = rid.to(tl.int64)
    row_c = rid64 * stride_c
    row_u = rid64 * stride_u
    row_p = rid64 * stride_p
    scale = row_scale(scale_ptr, scale_val, rid, rmask, SCALE_PER_ROW, ROWS)
    row_key = row_keys(rows_ptr, rid, rmask, HAS_ROWS)
    seed = tl.load(seed_ptr)
    zero_f = tl.zeros((ROWS,), tl.float32)
    Tk = tl.zeros((ROWS,), tl.int64)
    rk = tl.zeros((ROWS,), tl.int32)
    if TOP_K:
        Tk, rk = _radix_count(c_ptr, u_ptr, row_c, row_u, scale, temperature, V, rmask, top_k,
                              HAS_U, ROWS, BLOCK, RB_COUNT)
    m, mass, ids, id_key = _scan(c_ptr, u_ptr, p_ptr, row_c, row_u, row_p, scale, temperature, V, rmask,
                                 seed, row_key, zero_f, zero_f, Tk, rk, Tk, rk,
                                 TOP_K, False, STATS, True, False, GREEDY, HAS_U, ROWS, BLOCK)
    if TOP_P:
        target = top_p * mass
        if CHAIN:
            ids = _chain(c_ptr, u_ptr, row_c, row_u, scale, temperature, V, rmask, seed, row_key,
                         m, target, ids, id_key, Tk, rk, TOP_K, HAS_U, ROWS, BLOCK)
        else:
            Tp, rp, kept = _radix_mass(c_ptr, u_ptr, row_c, row_u, scale, temperature, V, rmask, m, target,
                                       Tk, rk, TOP_K, HAS_U, ROWS, BLOCK, RB_MASS)
            _m, _M, ids, _k = _scan(c_ptr, u_ptr, p_ptr, row_c, row_u, row_p, scale, temperature, V, rmask,
                                    seed, row_key, m, kept, Tk, rk, Tp, rp,
                                    TOP_K, True, False, True, True, GREEDY, HAS_U, ROWS, BLOCK)
    elif WRITE:
        _m, _M, _i, _k = _scan(c_ptr, u_ptr, p_ptr, row_c, row_u, row_p, scale, temperature, V, rmask,
                               seed, row_key, m, mass, Tk, rk, Tk, rk,
                               TOP_K, False, False, False, True, GREEDY, HAS_U, ROWS, BLOCK)
    tl.store(ids_ptr + rid, ids.to(tl.int64), mask=rmask)


# ---- launcher ---------------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def launch_config(B: int, V: int, write_probs: bool = False, top_p: bool = False, top_k: bool = False):
    """``(ROWS, BLOCK, num_warps)`` heuristics (H100-oriented; no autotuning, see the module doc).

    Long rows: one row per program, 2048-column chunks (8 fp32 per thread with 8 warps: two
    16-byte loads per input in flight); 48 registers/thread for the plain draw, ~100 with
    top-k/top-p (sm_90 compile, no spills). The one-hot radix selections (probabilities with
    top-p; top-k over short rows packed several per program) materialise a ``tile x 16``
    one-hot, so they use 1024-value tiles. Short rows: several rows per program so a program
    still streams a full tile.
    """
    one_hot = (write_probs and top_p) or (top_k and V < 2048)
    tile = 1024 if one_hot else 2048
    block = max(16, min(tile, _next_pow2(V)))
    rows = max(1, min(tile // block, _next_pow2(B)))
    return rows, block, 8 if rows * block >= 2048 else 4


def _scale_args(cfg, B: int, device):
    if isinstance(cfg, torch.Tensor) and cfg.dim() > 0:
        if cfg.numel() != B:
            raise ValueError(f"per-row CFG scale must have {B} entries (one per row), got shape {tuple(cfg.shape)}")
        return cfg.reshape(B).to(device=device, dtype=torch.float32).contiguous(), 1.0, True
    return None, float(cfg), False


def _seed_tensor(seed, device):
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1:
            raise ValueError(f"seed tensor must hold one integer, got shape {tuple(seed.shape)}")
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    return torch.tensor([int(seed) & 0x7FFFFFFFFFFFFFFF], dtype=torch.int64, device=device)


def _rows_tensor(rows, B: int, device):
    if rows is None:
        return None
    rows = torch.as_tensor(rows, dtype=torch.int64, device=device).reshape(-1)
    if rows.numel() != B:
        raise ValueError(f"rows must give one RNG row id per row ({B}), got {rows.numel()}")
    return rows.contiguous()


def _rowwise(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"{name} must be (B, V), got shape {tuple(t.shape)}")
    return t if t.stride(-1) == 1 else t.contiguous()


def fused_categorical(logits: torch.Tensor, uncond: torch.Tensor | None = None, cfg=1.0, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, *, seed, rows=None, return_probs: bool = False,
                      block: int | None = None, rows_per_program: int | None = None,
                      num_warps: int | None = None):
    """Sample one id per row of ``(B, V)`` logits with the fused kernel -> int64 ``(B,)``.

    ``uncond`` (same shape; may be the other half of one doubled batch) enables CFG with
    ``cfg`` a float or a ``(B,)`` tensor. ``temperature == 0`` is greedy (argmax of the guided
    logits). ``seed``: int or 1-element int64 tensor on the device (so a seed drawn on the GPU
    needs no host sync); ``rows``: optional ``(B,)`` RNG row ids (default ``0..B-1``).
    ``return_probs`` also returns the float32 ``(B, V)`` distribution that was sampled from.
    ``block``/``rows_per_program``/``num_warps`` override :func:`launch_config`.
    """
    logits = _rowwise(logits, "logits")
    B, V = logits.shape
    if uncond is not None:
        if uncond.shape != logits.shape:
            raise ValueError(f"cond and uncond logits must have the same shape, got {tuple(logits.shape)} "
                             f"and {tuple(uncond.shape)}")
        uncond = _rowwise(uncond, "uncond")
    temperature, top_k, top_p = check_temperature(temperature), check_top_k(top_k), check_top_p(top_p)
    greedy = temperature == 0
    if greedy and return_probs:
        raise ValueError("return_probs needs temperature > 0 (greedy decoding has no distribution)")
    device = logits.device
    ids = torch.empty(B, dtype=torch.int64, device=device)
    if B == 0:
        return (ids, torch.empty(0, V, device=device)) if return_probs else ids
    use_k = (not greedy) and 0 < top_k < V
    use_p = (not greedy) and top_p < 1.0
    probs = torch.empty(B, V, dtype=torch.float32, device=device) if return_probs else None
    scale_t, scale_val, per_row = _scale_args(cfg, B, device)
    rows_t = _rows_tensor(rows, B, device)
    R, BLOCK, warps = launch_config(B, V, return_probs, use_p, use_k)
    BLOCK = block or BLOCK
    R = rows_per_program or R
    if BLOCK & (BLOCK - 1) or BLOCK < 4 or R & (R - 1):
        raise ValueError(f"block must be a power of two >= 4 and rows_per_program a power of two, got {BLOCK}, {R}")
    dummy = logits  # placeholder pointer for disabled inputs (never dereferenced)
    _categorical_kernel[(triton.cdiv(B, R),)](
        logits, uncond if uncond is not None else dummy, scale_t if per_row else dummy,
        rows_t if rows_t is not None else dummy, _seed_tensor(seed, device), ids,
        probs if probs is not None else dummy,
        B, V, logits.stride(0), uncond.stride(0) if uncond is not None else 0,
        probs.stride(0) if probs is not None else 0, scale_val, float(temperature) if not greedy else 1.0,
        int(top_k), float(top_p),
        HAS_U=uncond is not None, SCALE_PER_ROW=per_row, HAS_ROWS=rows_t is not None, GREEDY=greedy,
        TOP_K=use_k, TOP_P=use_p, CHAIN=use_p and not return_probs, STATS=use_p or return_probs,
        WRITE=return_probs, ROWS=R, BLOCK=BLOCK, RB_COUNT=8 if R == 1 else 4, RB_MASS=4,
        num_warps=num_warps or warps)
    return (ids, probs) if return_probs else ids


@triton.jit
def _uniform_kernel(seed_ptr, rows_ptr, out_ptr, B, N, stride, HAS_ROWS: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rid = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rid < B
    row_key = row_keys(rows_ptr, rid, rmask, HAS_ROWS)
    seed = tl.load(seed_ptr)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        u = keyed_uniform(seed, row_key, start, ROWS, BLOCK)
        tl.store(out_ptr + rid.to(tl.int64)[:, None] * stride + cols[None, :], u,
                 mask=rmask[:, None] & (cols[None, :] < N))


def keyed_uniforms(seed, B: int, N: int, rows=None, device="cpu") -> torch.Tensor:
    """The kernels' uniforms ``(B, N)`` for (seed, row id, column), computed by Triton.

    Exists to check :func:`generators.kernels.rng.philox_uniform` against the kernels.
    """
    out = torch.empty(B, N, dtype=torch.float32, device=device)
    rows_t = _rows_tensor(rows, B, device)
    _uniform_kernel[(B,)](_seed_tensor(seed, device), rows_t if rows_t is not None else out, out, B, N, N,
                          HAS_ROWS=rows_t is not None, ROWS=1, BLOCK=64)
    return out


__all__ = ["fused_categorical", "keyed_uniforms", "launch_config"]
