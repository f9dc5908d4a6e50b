"""2D neighbourhood attention for MVAR's spatial-Markov scales, without NATTEN.

MVAR (Zhang et al. 2025, arXiv 2505.12742, "spatial-Markov" attention) lets every query
of the largest scales attend only to a ``k x k`` neighbourhood of keys of its own scale
(``k = 7``), computed with NATTEN's ``na2d``. NATTEN windows are *shifted at the borders*
rather than clipped: along each axis of length ``n`` the window of position ``i`` starts at
``clamp(i - k // 2, 0, n - k)``, so every query sees exactly ``k^2`` keys when the map is at
least ``k x k`` (here a side shorter than ``k`` is covered entirely: ``min(k, n)`` keys).

Two implementations with the same numbers:

* :func:`neighborhood_mask` -- the dense boolean ``(N, N)`` mask for
  ``F.scaled_dot_product_attention`` (the reference; ``O(N^2)`` memory per head);
* :func:`neighborhood_attention` -- a gather-based kernel that never forms the ``N x N``
  matrix: logits are computed for the ``k^2`` keys of each query only (one gathered key
  slice per window offset), and the backward pass is written by hand, so forward and
  backward hold ``O(N k^2)`` attention weights plus ``O(N d)`` temporaries -- NATTEN's
  memory profile, in plain PyTorch (any device, no compiled extension).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "neighborhood_attention",
    "neighborhood_attention_dense",
    "neighborhood_index",
    "neighborhood_mask",
    "window_starts",
]


def _check_kernel(kernel: int) -> int:
    kernel = int(kernel)
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"the neighbourhood kernel must be a positive odd int (NATTEN's rule), got {kernel}")
    return kernel


def window_starts(n: int, kernel: int, device=None) -> torch.Tensor:
    """Start of the window of each position ``0..n-1`` along one axis (NATTEN semantics).

    ``clamp(i - kernel // 2, 0, n - kernel)`` with the kernel capped at ``n``: a window never
    leaves the map, it slides inwards at the borders.
    """
    kernel = min(_check_kernel(kernel), n)
    i = torch.arange(n, device=device)
    return (i - kernel // 2).clamp(0, n - kernel)


def neighborhood_index(h: int, w: int, kernel: int, device=None) -> torch.Tensor:
    """Flat (row-major) key indices of every query's window: int64 ``(h*w, kh*kw)``.

    ``kh = min(kernel, h)``, ``kw = min(kernel, w)``; the keys of one query are listed in
    raster order inside its window, all distinct.
    """
    kh, kw = min(_check_kernel(kernel), h), min(kernel, w)
    rows = window_starts(h, kernel, device)[:, None] + torch.arange(kh, device=device)   # (h, kh)
    cols = window_starts(w, kernel, device)[:, None] + torch.arange(kw, device=device)   # (w, kw)
    idx = rows[:, None, :, None] * w + cols[None, :, None, :]                         # (h, w, kh, kw)
    return idx.reshape(h * w, kh * kw)


def neighborhood_mask(h: int, w: int, kernel: int, device=None) -> torch.Tensor:
    """Dense boolean ``(h*w, h*w)`` mask (True = attend) of the same neighbourhoods."""
    idx = neighborhood_index(h, w, kernel, device)
    mask = torch.zeros(h * w, h * w, dtype=torch.bool, device=device)
    return mask.scatter_(1, idx, True)


class _NeighborhoodAttention(torch.autograd.Function):
    """softmax(scale * q k_idx^T) v_idx over the gathered keys; hand-written backward.

    Saved for backward: q, k, v and the ``(B, H, N, K)`` probabilities; each loop iteration
    gathers one ``(B, H, N, d)`` key/value slice (window offset ``j``) and frees it.
    """

    @staticmethod
    def forward(ctx, q, k, v, idx, scale):
        K = idx.shape[1]
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        logits = q.new_empty((*q.shape[:-1], K), dtype=acc)
        for j in range(K):
            logits[..., j] = (q * k.index_select(2, idx[:, j])).sum(-1, dtype=acc)
        p = (logits * scale).softmax(-1)
        out = torch.zeros(v.shape, dtype=acc, device=v.device)
        for j in range(K):
            out += p[..., j, None] * v.index_select(2, idx[:, j])
        ctx.save_for_backward(q, k, v, idx, p)
        ctx.scale = scale
        return out.to(v.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        q, k, v, idx, p = ctx.saved_tensors
        K, scale = idx.shape[1], ctx.scale
        gp = torch.empty_like(p)
        for j in range(K):
            gp[..., j] = (g * v.index_select(2, idx[:, j])).sum(-1, dtype=p.dtype)
        # d softmax: p * (gp - sum(p * gp)); the logits were multiplied by `scale`
        gl = p * (gp - (p * gp).sum(-1, keepdim=True)) * scale
        gq = torch.zeros(q.shape, dtype=p.dtype, device=q.device)
        gk = torch.zeros(k.shape, dtype=p.dtype, device=k.device)
        gv = torch.zeros(v.shape, dtype=p.dtype, device=v.device)
        for j in range(K):
            col = idx[:, j]
            gq += gl[..., j, None] * k.index_select(2, col)
            gk.index_add_(2, col, gl[..., j, None] * q)
            gv.index_add_(2, col, p[..., j, None] * g)
        return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype), None, None


def _check_qkv(q, k, v, h, w):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share a (B, H, N, d) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] != h * w:
        raise ValueError(f"a {h}x{w} map has {h * w} tokens, got N = {q.shape[2]}")


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int,
                           kernel: int | None = None, scale: float | None = None,
                           index: torch.Tensor | None = None) -> torch.Tensor:
    """2D neighbourhood attention over an ``h x w`` map: ``(B, H, N, d)`` in and out.

    ``q, k, v`` hold the ``N = h*w`` tokens in raster order. ``scale`` defaults to
    ``d ** -0.5``. Pass ``kernel``, or a precomputed ``index`` (:func:`neighborhood_index`).
    Memory is ``O(N * kernel^2)`` (see the module docstring).
    """
    _check_qkv(q, k, v, h, w)
    if index is None:
        if kernel is None:
            raise ValueError("neighborhood_attention needs a kernel size or a precomputed index")
        index = neighborhood_index(h, w, kernel, q.device)
    elif index.dim() != 2 or index.shape[0] != h * w:
        raise ValueError(f"index must be (h*w, K) = ({h * w}, K), got {tuple(index.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _NeighborhoodAttention.apply(q, k, v, index.to(q.device), scale)


def neighborhood_attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int,
                                 kernel: int, scale: float | None = None) -> torch.Tensor:
    """The same attention through SDPA with the dense :func:`neighborhood_mask` (reference)."""
    _check_qkv(q, k, v, h, w)
    mask = neighborhood_mask(h, w, kernel, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
