"""Fused flow-matching Euler step with CFG for continuous-token heads.

``x_{t+dt} = x_t + dt · (u + s·(c − u))`` on velocity predictions (flow matching, Lipman et
al. 2023 §2; CFG in velocity space as in SiT / MAR-style heads), with per-row ``s`` and
``dt``: one read of ``x``, ``c``, ``u`` and one write, instead of four torch ops with three
temporaries. Computed in float32, stored in ``x``'s dtype. Torch reference:
:func:`generators.sampling.flow_step`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _flow_kernel(x_ptr, c_ptr, u_ptr, scale_ptr, dt_ptr, out_ptr, N, D, scale_val, dt_val,
                 HAS_U: tl.constexpr, SCALE_PER_ROW: tl.constexpr, DT_PER_ROW: tl.constexpr,
                 BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    row = offs // D
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_U:
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if SCALE_PER_ROW:
            s = tl.load(scale_ptr + row, mask=mask, other=1.0)
        else:
            s = scale_val
        v = u + s * (v - u)
    if DT_PER_ROW:
        dt = tl.load(dt_ptr + row, mask=mask, other=0.0)
    else:
        dt = dt_val
    tl.store(out_ptr + offs, (x + dt * v).to(out_ptr.dtype.element_ty), mask=mask)


def _per_row(val, B: int, device, name: str):
    if isinstance(val, torch.Tensor) and val.dim() > 0:
        if val.numel() != B:
            raise ValueError(f"per-row {name} must have {B} entries (one per row), got shape {tuple(val.shape)}")
        return val.reshape(B).to(device=device, dtype=torch.float32).contiguous(), 0.0, True
    return None, float(val), False


def fused_flow_step(x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor | None = None, cfg=1.0,
                    dt=1.0, *, block: int = 1024) -> torch.Tensor:
    """One guided Euler step on ``(B, ...)`` tensors; ``cfg``/``dt`` floats or ``(B,)`` tensors."""
    if v_cond.shape != x.shape or (v_uncond is not None and v_uncond.shape != x.shape):
        raise ValueError(f"x, v_cond, v_uncond must share one shape, got {tuple(x.shape)}, {tuple(v_cond.shape)}, "
                         f"{None if v_uncond is None else tuple(v_uncond.shape)}")
    B = x.shape[0] if x.dim() else 1
    N = x.numel()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if N == 0:
        return out
    D = N // B
    scale_t, scale_val, s_row = _per_row(cfg, B, x.device, "cfg scale")
    dt_t, dt_val, dt_row = _per_row(dt, B, x.device, "dt")
    xc, cc = x.contiguous(), v_cond.contiguous()
    uc = v_uncond.contiguous() if v_uncond is not None else cc
    _flow_kernel[(triton.cdiv(N, block),)](
        xc, cc, uc, scale_t if s_row else xc, dt_t if dt_row else xc, out, N, D, scale_val, dt_val,
        HAS_U=v_uncond is not None, SCALE_PER_ROW=s_row, DT_PER_ROW=dt_row, BLOCK=block, num_warps=4)
    return out


__all__ = ["fused_flow_step"]
