"""Shared transformer blocks for every AR generator in the zoo.

A Llama-style decoder as used by LlamaGen (Sun et al. 2024, arXiv 2406.06525, §2.2) and its
descendants (NAR, xAR): RMSNorm pre-norm, SwiGLU feed-forward, no biases, rotary position
embeddings (1D or 2D), SDPA attention with an arbitrary mask, a static gpt-fast-style KV
cache, and optional adaLN modulation (DiT, Peebles & Xie 2023, §3.2; VAR) from a condition
vector.

Positions are **explicit**: every call passes one integer position per token, ``(T,)`` for
1D RoPE or ``(T, 2)`` = (row, col) for 2D RoPE (``(B, T[, 2])`` for per-sample orders), so
raster, diagonal (NAR), cell (xAR) or scale orders all reuse the same code. A token whose
position has any negative coordinate is **not rotated** (identity rotation): that is how
condition/prefix tokens are placed (they carry no spatial position). This differs from
LlamaGen's code, which multiplies prefix queries/keys by a zero rotation (cos = sin = 0);
identity keeps the prefix keys informative. ``prefix_rope="zero"`` (on :class:`RotaryEmbedding`
and :class:`Transformer`) reproduces LlamaGen's behaviour -- the prefix's queries and keys
become 0, so a prefix query attends uniformly and every query scores 0 against a prefix key --
for weights converted from LlamaGen / NAR (``zoo.convert``).

The KV cache is indexed by *cache slots* (``input_pos``), which are separate from the RoPE
positions: a generator chooses the slot layout once (prefix first, then tokens in some
fixed order) and writes any set of slots per step (one token, a diagonal, a scale).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of ``k`` that is >= ``n``."""
    return n if n % k == 0 else n + k - n % k


def swiglu_hidden(dim: int, multiple: int = 256) -> int:
    """LlamaGen/Llama SwiGLU width: 2/3 of 4·dim rounded up to ``multiple``."""
    return find_multiple(int(2 * 4 * dim / 3), multiple)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019); computed in float32 for stability."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y * self.weight if self.weight is not None else y


class SwiGLU(nn.Module):
    """Gated FFN ``w2(silu(w1 x) * w3 x)`` (Shazeer 2020), hidden = :func:`swiglu_hidden`."""

    def __init__(self, dim: int, hidden: int | None = None, multiple: int = 256, dropout: float = 0.0):
        super().__init__()
        hidden = hidden or swiglu_hidden(dim, multiple)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


# ---- rotary embeddings -----------------------------------------------------------------

class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021) from explicit integer positions.

    ``ndim=1``: positions ``(T,)`` or ``(B, T)``; all ``head_dim/2`` channel pairs rotate with
    the position. ``ndim=2`` (LlamaGen's 2D RoPE): positions ``(T, 2)`` or ``(B, T, 2)`` =
    (row, col); the first half of the head dim rotates with the row, the second half with
    the column, each half with its own ``head_dim/4`` frequencies. Channel pairs are
    interleaved ``(x[2i], x[2i+1])``. Negative positions mean "no rotation" (prefix tokens);
    with ``prefix="zero"`` they get LlamaGen's all-zero table instead (cos = sin = 0: the
    rotated query/key is 0).
    """

    PREFIX_MODES = ("none", "zero")

    def __init__(self, head_dim: int, ndim: int = 1, base: float = 10000.0, prefix: str = "none"):
        super().__init__()
        if ndim not in (1, 2):
            raise ValueError(f"RotaryEmbedding supports ndim 1 or 2, got {ndim}")
        if head_dim % (2 * ndim):
            raise ValueError(f"{ndim}D RoPE needs a head dim divisible by {2 * ndim}, got {head_dim}")
        if prefix not in self.PREFIX_MODES:
            raise ValueError(f"prefix rotation must be one of {self.PREFIX_MODES}, got {prefix!r}")
        self.head_dim, self.ndim, self.base = head_dim, ndim, base
        self.prefix = prefix

    def inv_freq(self, device=None) -> torch.Tensor:
        """Per-axis frequencies ``base^(-2i/span)``, span = head_dim / ndim channels per axis.

        Computed on the fly (no buffer) so models built on the meta device stay usable.
        """
        span = self.head_dim // self.ndim
        return self.base ** (-torch.arange(0, span, 2, dtype=torch.float32, device=device) / span)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` -> ``(cos, sin)``, each ``(T, head_dim/2)`` or ``(B, T, head_dim/2)``."""
        if not isinstance(positions, torch.Tensor):
            positions = torch.as_tensor(positions)
        if self.ndim == 1:
            if positions.dim() not in (1, 2):
                raise ValueError(f"1D RoPE takes positions (T,) or (B, T), got {tuple(positions.shape)}")
            pos = positions.unsqueeze(-1)
        else:
            if positions.dim() not in (2, 3) or positions.shape[-1] != 2:
                raise ValueError(f"2D RoPE takes (row, col) positions (T, 2) or (B, T, 2), "
                                 f"got {tuple(positions.shape)}")
            pos = positions
        inv = self.inv_freq(positions.device)
        pf = pos.float()
        # (..., ndim, span/2) -> (..., head_dim/2): rows' angles then columns' angles.
        ang = (pf.unsqueeze(-1) * inv).flatten(-2)
        cos, sin = ang.cos(), ang.sin()
        none = (pos < 0).any(-1, keepdim=True)  # prefix tokens: identity rotation
        if self.prefix == "zero":  # LlamaGen: zero table rows, prefix queries/keys become 0
            cos = torch.where(none, torch.zeros_like(cos), cos)
        else:
            cos = torch.where(none, torch.ones_like(cos), cos)
        sin = torch.where(none, torch.zeros_like(sin), sin)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` (B, H, T, hd) by the angles in cos/sin."""
    if cos.dim() == 2:        # (T, hd/2) -> broadcast over batch and heads
        cos, sin = cos[None, None], sin[None, None]
    else:                     # (B, T, hd/2)
        cos, sin = cos[:, None], sin[:, None]
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1)
    return out.flatten(-2).to(x.dtype)


# ---- KV cache and attention ------------------------------------------------------------

class KVCache(nn.Module):
    """Static key/value cache (gpt-fast style): preallocated ``(B, H, max_len, hd)`` buffers.

    :meth:`update` writes the slots ``input_pos`` (any number, any order: one token, a NAR
    diagonal, a VAR scale) and returns the whole cache; unwritten slots must be masked out
    by the caller's attention mask. Buffers are not persistent (never saved in checkpoints).
    """

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k_cache.shape[2]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if k.shape[0] != self.k_cache.shape[0] or k.shape[1] != self.k_cache.shape[1]:
            raise ValueError(f"KV cache holds (batch, heads) = {tuple(self.k_cache.shape[:2])}, "
                             f"got keys for {tuple(k.shape[:2])}; call setup_cache with this batch")
        if input_pos.dim() != 1 or input_pos.numel() != k.shape[2]:
            raise ValueError(f"input_pos must be (T,) with T = {k.shape[2]} new tokens, "
                             f"got shape {tuple(input_pos.shape)}")
        if input_pos.numel() and int(input_pos.max()) >= self.max_len:
            raise ValueError(f"cache slot {int(input_pos.max())} is beyond the cache length {self.max_len}")
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    ``mask``: boolean (True = attend) or additive float, broadcastable to
    ``(B, H, Tq, Tk)``. In cached mode (``input_pos`` given and a cache set up) the new keys
    and values are written at ``input_pos`` and queries attend over the whole cache; the
    mask then has ``Tk = cache length`` (the :class:`Transformer` slices and pads it).
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = False, attn_dropout: float = 0.0,
                 resid_dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.attn_dropout = attn_dropout
        self.resid_drop = nn.Dropout(resid_dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: tuple | None = None, mask: torch.Tensor | None = None,
                is_causal: bool = False, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos was given but no KV cache is set up (call setup_cache)")
            k, v = self.kv_cache.update(input_pos, k, v)
            is_causal = False  # the caller supplies the row-sliced mask
        out = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=is_causal and mask is None)
        return self.resid_drop(self.wo(out.transpose(1, 2).reshape(B, T, D)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``.

    With ``adaln_dim`` the block is adaLN-Zero (DiT §3.2): a zero-initialised linear map of
    the condition vector gives shift/scale/gate for attention and FFN, so the block is the
    identity at initialisation; the norms then carry no affine weights (the modulation
    replaces them).
    """

    def __init__(self, dim: int, heads: int, ffn_multiple: int = 256, ffn_hidden: int | None = None,
                 dropout: float = 0.0, attn_dropout: float = 0.0, adaln_dim: int | None = None,
                 qkv_bias: bool = False, norm_eps: float = 1e-5):
        super().__init__()
        affine = adaln_dim is None
        self.attention_norm = RMSNorm(dim, norm_eps, affine=affine)
        self.attention = Attention(dim, heads, qkv_bias, attn_dropout, dropout)
        self.ffn_norm = RMSNorm(dim, norm_eps, affine=affine)
        self.feed_forward = SwiGLU(dim, ffn_hidden, ffn_multiple, dropout)
        self.adaln = None
        if adaln_dim is not None:
            self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, 6 * dim))
            nn.init.zeros_(self.adaln[1].weight)
            nn.init.zeros_(self.adaln[1].bias)

    def forward(self, x, rope=None, mask=None, is_causal=False, input_pos=None, cond=None):
        if self.adaln is None:
            x = x + self.attention(self.attention_norm(x), rope, mask, is_causal, input_pos)
            return x + self.feed_forward(self.ffn_norm(x))
        if cond is None:
            raise ValueError("this block uses adaLN: pass cond (B, adaln_dim) or (B, T, adaln_dim)")
        c = cond.unsqueeze(1) if cond.dim() == 2 else cond  # per-sample or per-token condition
        sa, ca, ga, sm, cm, gm = self.adaln(c).chunk(6, -1)
        x = x + ga * self.attention(modulate(self.attention_norm(x), sa, ca), rope, mask, is_causal, input_pos)
        return x + gm * self.feed_forward(modulate(self.ffn_norm(x), sm, cm))


class Transformer(nn.Module):
    """A stack of :class:`Block` with rotary positions, a final norm and an optional cache.

    ``forward(x (B,T,D), positions, mask=None, input_pos=None, cond=None, is_causal=False)``:

    * full mode (``input_pos=None``): attends with ``mask`` (broadcastable to
      ``(B, H, T, T)``), or causally when ``is_causal`` (SDPA fast path), or bidirectionally.
    * cached mode (``input_pos`` = cache slots ``(T,)`` of the new tokens, after
      :meth:`setup_cache`): keys/values are written at those slots; ``mask`` is the mask of
      the *whole* slot layout ``(..., S, S')`` and rows ``mask[..., input_pos, :]`` are used
      (columns beyond ``S'`` up to the cache length are masked out). With ``mask=None`` and
      ``is_causal=True`` slot ``i`` attends to slots ``<= i``.
    * ``positions``: RoPE positions of the T tokens (see :class:`RotaryEmbedding`); with 1D
      RoPE it defaults to ``input_pos`` or ``arange(T)``.
    * ``cond``: the adaLN condition vector when built with ``adaln_dim`` (then a final
      zero-initialised shift/scale also modulates the last norm, as in DiT/VAR).
    * ``prefix_rope``: rotation of tokens at negative positions: ``"none"`` (identity, the
      default) or ``"zero"`` (LlamaGen's zero rotation; see :class:`RotaryEmbedding`).
    """

    def __init__(self, dim: int, depth: int, heads: int, ffn_multiple: int = 256, rope: str | None = "2d",
                 adaln_dim: int | None = None, dropout: float = 0.0, attn_dropout: float = 0.0,
                 rope_base: float = 10000.0, qkv_bias: bool = False, norm_eps: float = 1e-5,
                 ffn_hidden: int | None = None, prefix_rope: str = "none"):
        super().__init__()
        if rope not in ("1d", "2d", None):
            raise ValueError(f"rope must be '1d', '2d' or None, got {rope!r}")
        if prefix_rope not in RotaryEmbedding.PREFIX_MODES:
            raise ValueError(f"prefix_rope must be one of {RotaryEmbedding.PREFIX_MODES}, got {prefix_rope!r}")
        self.dim, self.depth, self.heads = dim, depth, heads
        self.head_dim = dim // heads
        self.rope_kind = rope
        self.rope = (RotaryEmbedding(self.head_dim, 1 if rope == "1d" else 2, rope_base, prefix_rope)
                     if rope else None)
        self.layers = nn.ModuleList(
            Block(dim, heads, ffn_multiple, ffn_hidden, dropout, attn_dropout, adaln_dim, qkv_bias, norm_eps)
            for _ in range(depth))
        self.norm = RMSNorm(dim, norm_eps, affine=adaln_dim is None)
        self.final_adaln = None
        if adaln_dim is not None:
            self.final_adaln = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, 2 * dim))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """LlamaGen init: normal(0, std) linear weights, zero biases; adaLN maps zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in [blk.adaln for blk in self.layers] + [self.final_adaln]:
            if m is not None:
                nn.init.zeros_(m[1].weight)
                nn.init.zeros_(m[1].bias)

    # ---- cache --------------------------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> None:
        """Allocate a static KV cache of ``max_len`` slots in every layer."""
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        for blk in self.layers:
            blk.attention.kv_cache = KVCache(batch, self.heads, max_len, self.head_dim, dtype, device)

    def clear_cache(self) -> None:
        for blk in self.layers:
            blk.attention.kv_cache = None

    @property
    def cache_len(self) -> int | None:
        c = self.layers[0].attention.kv_cache if len(self.layers) else None
        return None if c is None else c.max_len

    def _cache_mask(self, mask, input_pos, is_causal):
        L = self.cache_len
        if L is None:
            raise RuntimeError("input_pos was given but no KV cache is set up (call setup_cache)")
        if mask is None:
            if not is_causal:
                raise ValueError("cached decoding needs a mask over the cache slots or is_causal=True")
            slots = torch.arange(L, device=input_pos.device)
            return (slots[None, :] <= input_pos[:, None])[None, None]
        if mask.dim() < 2:
            raise ValueError(f"mask must have at least 2 dims (..., Tq, Tk), got {tuple(mask.shape)}")
        if input_pos.numel() and int(input_pos.max()) >= mask.shape[-2]:
            raise ValueError(f"mask covers {mask.shape[-2]} query slots, but input_pos reaches "
                             f"{int(input_pos.max())}")
        rows = mask[..., input_pos, :]
        S = rows.shape[-1]
        if S > L:
            raise ValueError(f"mask has {S} key slots, more than the cache length {L}")
        if S < L:  # slots the mask does not describe are never attended
            fill = False if rows.dtype == torch.bool else float("-inf")
            rows = F.pad(rows, (0, L - S), value=fill)
        return rows

    # ---- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        B, T, D = x.shape
        if D != self.dim:
            raise ValueError(f"Transformer(dim={self.dim}) got inputs with {D} channels")
        rope = None
        if self.rope is not None:
            if positions is None:
                if self.rope_kind == "2d":
                    raise ValueError("2D RoPE needs explicit (T, 2) (row, col) positions")
                positions = input_pos if input_pos is not None else torch.arange(T, device=x.device)
            n = positions.shape[-2] if self.rope_kind == "2d" else positions.shape[-1]
            if n != T:
                raise ValueError(f"got {n} positions for {T} tokens")
            rope = self.rope(positions.to(x.device))
        if input_pos is not None:
            input_pos = input_pos.to(x.device)
            mask = self._cache_mask(mask, input_pos, is_causal)
        for blk in self.layers:
            x = blk(x, rope, mask, is_causal, input_pos, cond)
        x = self.norm(x)
        if self.final_adaln is not None:
            c = cond.unsqueeze(1) if cond.dim() == 2 else cond
            shift, scale = self.final_adaln(c).chunk(2, -1)
            x = modulate(x, shift, scale)
        return x


def causal_mask(T: int, device=None) -> torch.Tensor:
    """Boolean lower-triangular mask ``(T, T)``: True where a query may attend a key."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["find_multiple", "swiglu_hidden", "RMSNorm", "SwiGLU", "RotaryEmbedding", "apply_rotary",
           "KVCache", "Attention", "Block", "Transformer", "causal_mask", "modulate", "num_params"]
