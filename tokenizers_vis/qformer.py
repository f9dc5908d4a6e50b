"""Q-Former blocks shared by the SEED and slot tokenizers.

A Q-Former (BLIP-2, Li et al. 2023, arXiv 2301.12597, §3.1) is a stack of transformer
blocks over ``N`` learned query embeddings: self-attention among the queries, cross-attention
from the queries to frozen image-encoder patch features (every ``cross_attention_freq``
blocks, 2 in BLIP-2), and a feed-forward network. Two variants are used in the zoo:

* **causal** query self-attention (SEED, Ge et al. 2023, arXiv 2307.08041, §2.1.1): query
  ``i`` attends to queries ``j <= i`` (a lower-triangular mask over the queries), while its
  cross-attention to the image patches stays full. Query outputs ``i < j`` then do not depend
  on query ``j`` at all (``tests/test_qformer.py``).
* **slot** cross-attention (Slot Attention, Locatello et al. 2020, arXiv 2006.15055, §2.1, as
  Slot-MLLM, Chi et al. 2025, arXiv 2505.17726, uses inside its Q-Former -- its ``"morph"``
  slot config): the attention logits of each head are normalised with a softmax **over the
  queries (slots)**, so every image patch distributes one unit of attention across the slots
  (slots compete for patches); each slot then takes the weighted mean of the values,
  ``w = a / (sum_patches a + assign_eps)`` (``assign_eps = 1`` in Slot-MLLM's code, ~0 in
  Locatello et al.).

Differences from BLIP-2's BERT layers (post-LayerNorm, GELU, biases): the blocks are pre-norm
with the zoo's shared ``RMSNorm`` / ``SwiGLU`` / ``Attention`` (``generators/transformer.py``),
so causality and the masks are those of the shared attention. The query positions are the
learned query embeddings themselves (no extra position table), as in BLIP-2.

Also here: fixed 2D sin-cos position features for patch grids (MAE, He et al. 2022, App. A)
and the image-text contrastive loss of BLIP (Li et al. 2022, arXiv 2201.12086, §3.2), with
BLIP/ALBEF's soft targets over in-batch duplicates and SEED's label smoothing 0.1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from generators.transformer import Attention, RMSNorm, SwiGLU, causal_mask


class CrossAttention(nn.Module):
    """Queries ``(B, N, dim)`` attend to a context ``(B, M, context_dim)``: softmax over the M keys."""

    def __init__(self, dim: int, context_dim: int, heads: int, qkv_bias: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wkv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.wo = nn.Linear(dim, dim, bias=False)

    def _qkv(self, x: torch.Tensor, context: torch.Tensor):
        B, N, _ = x.shape
        if context.dim() != 3 or context.shape[0] != B:
            raise ValueError(f"cross-attention context must be (B={B}, M, {self.wkv.in_features}), "
                             f"got {tuple(context.shape)}")
        q = self.wq(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.wkv(context).view(B, context.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x, context)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
        return self.wo(out.transpose(1, 2).reshape(x.shape))


class SlotCrossAttention(CrossAttention):
    """Slot attention as a cross-attention layer (see the module docstring).

    ``last_attn`` keeps the latest slot-normalised map ``(B, heads, N_slots, M_patches)``:
    for every batch row, head and patch it sums to 1 over the slots.
    """

    def __init__(self, dim: int, context_dim: int, heads: int, qkv_bias: bool = False,
                 assign_eps: float = 1.0):
        super().__init__(dim, context_dim, heads, qkv_bias)
        if assign_eps < 0:
            raise ValueError(f"assign_eps must be >= 0, got {assign_eps}")
        self.assign_eps = float(assign_eps)
        self.last_attn: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x, context)
        logits = (q @ k.transpose(-1, -2).to(q.dtype)) / math.sqrt(self.head_dim)  # (B, H, N, M)
        attn = logits.float().softmax(dim=-2)  # over the slots: each patch's column sums to 1
        self.last_attn = attn.detach()
        # weighted mean over the patches a slot won; eps keeps an empty slot's update small
        w = attn / (attn.sum(-1, keepdim=True) + max(self.assign_eps, 1e-8))
        out = w.to(v.dtype) @ v
        return self.wo(out.transpose(1, 2).reshape(x.shape))


class QFormerBlock(nn.Module):
    """Pre-norm block: query self-attention (optionally masked), optional cross-attention, SwiGLU.

    ``cross`` is ``"full"`` (standard), ``"slot"`` (:class:`SlotCrossAttention`) or ``None``
    (no cross-attention in this block, as in every other BLIP-2 layer).
    """

    def __init__(self, dim: int, heads: int, context_dim: int, cross: str | None = "full",
                 ffn_multiple: int = 256, ffn_hidden: int | None = None, assign_eps: float = 1.0,
                 qkv_bias: bool = False):
        super().__init__()
        if cross not in ("full", "slot", None):
            raise ValueError(f"cross must be 'full', 'slot' or None, got {cross!r}")
        self.attention_norm = RMSNorm(dim)
        self.attention = Attention(dim, heads, qkv_bias)
        self.cross = None
        if cross is not None:
            self.cross_norm = RMSNorm(dim)
            self.cross = (SlotCrossAttention(dim, context_dim, heads, qkv_bias, assign_eps) if cross == "slot"
                          else CrossAttention(dim, context_dim, heads, qkv_bias))
        self.ffn_norm = RMSNorm(dim)
        self.feed_forward = SwiGLU(dim, ffn_hidden, ffn_multiple)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), mask=mask)
        if self.cross is not None:
            x = x + self.cross(self.cross_norm(x), context)
        return x + self.feed_forward(self.ffn_norm(x))


class QFormer(nn.Module):
    """``num_queries`` learned queries read a context sequence through a stack of :class:`QFormerBlock`.

    Args:
        num_queries: N (32 in BLIP-2 / SEED / Slot-MLLM).
        dim, depth, heads: query width, number of blocks, attention heads.
        context_dim: channels of the context (image patch features; 1408 for EVA ViT-g).
        cross_attention_freq: block ``i`` cross-attends when ``i % freq == 0`` (2 in BLIP-2).
        causal: lower-triangular query self-attention (SEED's causal Q-Former).
        slot: slot cross-attention (softmax over queries) instead of the standard one.
        assign_eps: slot weighted-mean epsilon (see :class:`SlotCrossAttention`).
        ffn_multiple, ffn_hidden: SwiGLU width (``ffn_hidden`` overrides the 2/3·4·dim rule).
        context_norm: RMSNorm over the context channels first (BLIP-2's ``ln_vision``).

    ``forward(context (B, M, context_dim), query_embeds=None) -> (B, N, dim)``;
    ``query_embeds`` (B, N, dim) replaces the learned queries (tests perturb them).
    """

    def __init__(self, num_queries: int, dim: int, depth: int, heads: int, context_dim: int,
                 cross_attention_freq: int = 2, causal: bool = False, slot: bool = False,
                 assign_eps: float = 1.0, ffn_multiple: int = 256, ffn_hidden: int | None = None,
                 context_norm: bool = True, qkv_bias: bool = False):
        super().__init__()
        if num_queries < 1 or depth < 1 or cross_attention_freq < 1:
            raise ValueError(f"QFormer needs num_queries, depth, cross_attention_freq >= 1, got "
                             f"{num_queries}, {depth}, {cross_attention_freq}")
        self.num_queries, self.dim, self.causal = int(num_queries), int(dim), bool(causal)
        self.context_dim = int(context_dim)
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.context_norm = RMSNorm(context_dim) if context_norm else None
        kind = "slot" if slot else "full"
        self.blocks = nn.ModuleList(
            QFormerBlock(dim, heads, context_dim, kind if i % cross_attention_freq == 0 else None,
                         ffn_multiple, ffn_hidden, assign_eps, qkv_bias)
            for i in range(depth))
        self.norm = RMSNorm(dim)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def slot_attention(self) -> list:
        """The latest slot maps ``(B, H, N, M)`` of every slot cross-attention block (empty if none)."""
        return [b.cross.last_attn for b in self.blocks if isinstance(b.cross, SlotCrossAttention)]

    def forward(self, context: torch.Tensor, query_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if context.dim() != 3 or context.shape[-1] != self.context_dim:
            raise ValueError(f"QFormer expects a context (B, M, {self.context_dim}), got {tuple(context.shape)}")
        B = context.shape[0]
        if query_embeds is None:
            x = self.query_tokens.expand(B, -1, -1)
        else:
            if tuple(query_embeds.shape) != (B, self.num_queries, self.dim):
                raise ValueError(f"query_embeds must be (B={B}, {self.num_queries}, {self.dim}), "
                                 f"got {tuple(query_embeds.shape)}")
            x = query_embeds
        x = x.to(context.dtype)
        if self.context_norm is not None:
            context = self.context_norm(context)
        mask = causal_mask(self.num_queries, x.device) if self.causal else None
        for blk in self.blocks:
            x = blk(x, context, mask)
        return self.norm(x)


# ---- helpers --------------------------------------------------------------------------------

def sincos_2d(h: int, w: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 2D sin-cos position features ``(h*w, dim)`` (MAE): half the channels encode the row,
    half the column, each as sin/cos at ``dim/4`` frequencies ``10000^(-i/(dim/4))``."""
    if dim % 4:
        raise ValueError(f"2D sin-cos positions need dim divisible by 4, got {dim}")
    n = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(n, dtype=torch.float32, device=device) / n))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                            torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
    ay, ax = ys.reshape(-1, 1) * omega, xs.reshape(-1, 1) * omega
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], 1).to(dtype)


def feature_map_to_tokens(fmap: torch.Tensor, positions: bool = True) -> torch.Tensor:
    """``(B, C, h, w)`` patch features -> ``(B, h*w, C)`` row-major tokens (+ sin-cos positions).

    The positions are added after an RMS normalisation of each token (so they are on the same
    scale whatever the encoder's feature magnitude)."""
    if fmap.dim() != 4:
        raise ValueError(f"expected patch features (B, C, h, w), got {tuple(fmap.shape)}")
    _, C, h, w = fmap.shape
    tok = fmap.flatten(2).transpose(1, 2)
    if positions:
        tok = tok * torch.rsqrt(tok.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(tok.dtype)
        tok = tok + sincos_2d(h, w, C, tok.device, tok.dtype)
    return tok


def pooled_target(fmap: torch.Tensor, mode: str = "meanmax") -> torch.Tensor:
    """A global embedding of a ``(B, C, h, w)`` feature map: ``mean`` (C), ``max`` (C) or ``meanmax``
    (2C, [mean, max]; for ``eval/shapes-net`` this is exactly its 256-d Shapes-FID feature)."""
    if mode == "mean":
        return fmap.mean((2, 3))
    if mode == "max":
        return fmap.amax((2, 3))
    if mode == "meanmax":
        return torch.cat([fmap.mean((2, 3)), fmap.amax((2, 3))], 1)
    raise ValueError(f"pool mode must be 'mean', 'max' or 'meanmax', got {mode!r}")


def contrastive_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, temperature: torch.Tensor,
                     same: torch.Tensor | None = None, label_smoothing: float = 0.1) -> torch.Tensor:
    """Symmetric image-text contrastive loss (BLIP-2 ITC, as SEED's stage 1).

    ``image_feat`` / ``text_feat``: (B, E), l2-normalised here. ``temperature``: a scalar.
    ``same`` (B, B) bool marks pairs that are positives (identical captions; the diagonal is
    always positive): targets are uniform over them (BLIP/ALBEF's ``idx``-based targets), then
    smoothed with ``label_smoothing`` towards uniform over the batch.
    """
    if image_feat.shape != text_feat.shape or image_feat.dim() != 2:
        raise ValueError(f"contrastive_loss expects two (B, E) features of one shape, got "
                         f"{tuple(image_feat.shape)} and {tuple(text_feat.shape)}")
    B = image_feat.shape[0]
    i = F.normalize(image_feat.float(), dim=-1)
    t = F.normalize(text_feat.float(), dim=-1)
    logits = i @ t.t() / temperature.float()
    pos = torch.eye(B, dtype=torch.bool, device=logits.device)
    if same is not None:
        pos = pos | same.to(logits.device)
    tgt = pos.float() / pos.float().sum(1, keepdim=True)
    tgt = (1 - label_smoothing) * tgt + label_smoothing / B
    i2t = -(tgt * logits.log_softmax(1)).sum(1).mean()
    t2i = -(tgt.t() * logits.t().log_softmax(1)).sum(1).mean()
    return (i2t + t2i) / 2


__all__ = [
    "CrossAttention",
    "QFormer",
    "QFormerBlock",
    "SlotCrossAttention",
    "contrastive_loss",
    "feature_map_to_tokens",
    "pooled_target",
    "sincos_2d",
]
