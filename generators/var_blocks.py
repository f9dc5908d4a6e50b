"""VAR's transformer blocks (``models/basic_var.py`` layout), shared by VAR and MVAR
(:mod:`generators.var`): q/v-biased L2-normalised attention that runs an :class:`AttnPlan`
(block-causal mask, per-scale neighbourhoods, or KV-cached decoding), the GELU MLP, the adaLN
block and the adaLN-before-head."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from generators.mvar_attention import neighborhood_attention
from generators.transformer import KVCache, modulate


# ---- blocks (VAR's basic_var.py layout) --------------------------------------------------------

class DropPath(nn.Module):
    """Stochastic depth (per sample) on a residual branch."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


@dataclass
class AttnPlan:
    """How attention runs in one trunk call (the same plan for every layer).

    ``kind="mask"``: one SDPA over all ``T`` tokens with the boolean ``mask`` ``(T, T)``
    (VAR training; the dense reference of any scheme).
    ``kind="scales"``: each segment ``(start, end, h, w, index)`` attends only within itself
    (MVAR); ``index`` (``(n, K)`` key indices, see :func:`neighborhood_index`) selects
    neighbourhood attention, ``None`` full attention inside the segment; ``dense`` computes
    neighbourhoods through a dense SDPA mask instead of the gather kernel.
    ``kind="cache"``: VAR cached decoding: the new tokens' K/V are written at cache slots
    ``slots = (start, end)`` and the queries attend to slots ``[0, end)``.
    """

    kind: str
    mask: torch.Tensor | None = None
    segments: tuple = ()
    slots: tuple | None = None
    dense: bool = False


class VARAttention(nn.Module):
    """VAR's self-attention: ``mat_qkv`` without bias plus learned q/v biases (k bias is 0),
    L2-normalised q/k with a per-head learnable scale (``attn_l2_norm``; else the scale is
    ``0.25/sqrt(head_dim)``), output ``proj`` with bias. Runs an :class:`AttnPlan`."""

    def __init__(self, dim: int, heads: int, l2_norm: bool = True, drop: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim, self.l2_norm = heads, dim // heads, l2_norm
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        if l2_norm:  # VAR: exp(scale_mul) starts at 4 and is capped at 100
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.kv_cache: KVCache | None = None
        self.last_kv_len = 0  # keys present in the last call (diagnostics / tests)

    def forward(self, x: torch.Tensor, plan: AttnPlan) -> torch.Tensor:
        B, T, C = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        q, k, v = F.linear(x, self.mat_qkv.weight, bias).view(B, T, 3, self.heads, self.head_dim) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        if self.l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(math.log(100.0)).exp()
            k = F.normalize(k, dim=-1)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(self.head_dim)
        if plan.kind == "cache":
            if self.kv_cache is None:
                raise RuntimeError("a cached plan needs setup_cache() first")
            start, end = plan.slots
            kc, vc = self.kv_cache.update(torch.arange(start, end, device=x.device), k, v)
            k, v = kc[:, :, :end].to(q.dtype), vc[:, :, :end].to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        elif plan.kind == "mask":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, scale=scale)
        elif plan.kind == "scales":
            parts = []
            for a, b, h, w, index in plan.segments:
                qs, ks, vs = q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]
                if index is None:
                    parts.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale))
                elif plan.dense:
                    mask = torch.zeros(b - a, b - a, dtype=torch.bool, device=x.device)
                    mask.scatter_(1, index, True)
                    parts.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale))
                else:
                    parts.append(neighborhood_attention(qs, ks, vs, h, w, scale=scale, index=index))
            out = torch.cat(parts, 2) if len(parts) > 1 else parts[0]
        else:
            raise ValueError(f"unknown attention plan {plan.kind!r}")
        self.last_kv_len = k.shape[2]
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, T, C)))


class FFN(nn.Module):
    """VAR's MLP: ``fc2(gelu_tanh(fc1 x))``, hidden ``round(mlp_ratio * dim)``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))


class VARBlock(nn.Module):
    """VAR's ``AdaLNSelfAttn``: LayerNorm (no affine) + adaLN from the class vector.

    ``ada_lin(c)`` gives ``(γ1, γ2, scale1, scale2, shift1, shift2)``;
    ``x += γ1 · attn(LN(x)(1+scale1)+shift1)``, ``x += γ2 · ffn(LN(x)(1+scale2)+shift2)``.
    (generators.transformer.Block is LlamaGen-style -- RMSNorm, SwiGLU, no biases, gate order
    shift/scale/gate -- and cannot express VAR's attention, so VAR gets its own block.)
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, cond_dim: int | None = None,
                 norm_eps: float = 1e-6, l2_norm: bool = True, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.dim = dim
        self.attn = VARAttention(dim, heads, l2_norm, drop)
        self.ffn = FFN(dim, round(dim * mlp_ratio), drop)
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 6 * dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, plan: AttnPlan) -> torch.Tensor:
        g1, g2, s1, s2, b1, b2 = self.ada_lin(cond).view(-1, 1, 6, self.dim).unbind(2)
        x = x + self.drop_path(self.attn(modulate(self.ln_wo_grad(x), b1, s1), plan) * g1)
        return x + self.drop_path(self.ffn(modulate(self.ln_wo_grad(x), b2, s2)) * g2)


class AdaLNBeforeHead(nn.Module):
    """VAR's final norm: ``LN(x)·(1 + scale) + shift`` with (scale, shift) from the class."""

    def __init__(self, dim: int, cond_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x, cond):
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.dim).unbind(2)
        return modulate(self.ln_wo_grad(x), shift, scale)


class VARTrunk(nn.Module):
    """The block stack; one call = one forward step (``eval.bench`` counts these calls)."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 l2_norm: bool = True, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.dim, self.depth, self.heads = dim, depth, heads
        # stochastic depth rises linearly from 0 to drop_path over the blocks (VAR)
        rates = [drop_path * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList(VARBlock(dim, heads, mlp_ratio, dim, norm_eps, l2_norm, drop, r)
                                    for r in rates)

    def setup_cache(self, batch: int, max_len: int, dtype=None, device=None) -> None:
        p = next(self.parameters())
        for b in self.blocks:
            b.attn.kv_cache = KVCache(batch, self.heads, max_len, self.dim // self.heads,
                                      dtype or p.dtype, device or p.device)

    def clear_cache(self) -> None:
        for b in self.blocks:
            b.attn.kv_cache = None

    @property
    def cache_len(self) -> int | None:
        c = self.blocks[0].attn.kv_cache if len(self.blocks) else None
        return None if c is None else c.max_len

    def forward(self, x: torch.Tensor, cond: torch.Tensor, plan: AttnPlan) -> torch.Tensor:
        for b in self.blocks:
            x = b(x, cond, plan)
        return x
