"""Token sampling: classifier-free guidance, temperature, top-k / top-p, categorical and bits.

This module is the single sampling entry point of the zoo: every generator calls
:func:`sample_categorical` / :func:`sample_bits`, so fused kernels (``generators/kernels``)
can later replace them on CUDA behind the same signatures.

CFG is always ``u + s·(c − u)`` (Ho & Salimans 2022; LlamaGen §2.2 uses this form); VAR's
``(1+t)c − t·u`` is ``s = 1 + t``. ``s`` may be a float or a per-row tensor.

Randomness: categorical draws use the exponential race ``argmax(p_i / E_i)`` with
``E_i ~ Exp(1)`` (the Gumbel-max trick in another guise, as in gpt-fast), i.e. exactly one
exponential per logit from ``generator``; bits use one uniform per bit. The same seeded
``torch.Generator`` therefore always gives the same tokens.
"""
from __future__ import annotations

import torch


def _row_scale(scale, like: torch.Tensor):
    """A float, or a per-row tensor (B,) reshaped to broadcast over ``like`` (B, ...)."""
    if isinstance(scale, torch.Tensor) and scale.dim() > 0:
        if scale.shape[0] != like.shape[0]:
            raise ValueError(f"per-row CFG scale has {scale.shape[0]} rows, logits have {like.shape[0]}")
        return scale.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))
    return float(scale)


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance ``u + s·(c − u)``; ``scale`` is a float or a (B,) tensor."""
    if cond.shape != uncond.shape:
        raise ValueError(f"cond and uncond logits must have the same shape, got {tuple(cond.shape)} "
                         f"and {tuple(uncond.shape)}")
    s = _row_scale(scale, cond)
    return uncond + s * (cond - uncond)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set filtered-out logits (last dim) to ``-inf``.

    ``top_k > 0`` keeps exactly ``k`` entries per row (ties broken by index order of
    ``torch.topk``). ``top_p < 1`` then keeps the minimal set of most probable entries whose
    probability mass (renormalised after top-k) is ``>= top_p``; at least one entry is kept.
    """
    V = logits.shape[-1]
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    out = logits
    if 0 < top_k < V:
        vals, idx = torch.topk(out, top_k, dim=-1)
        out = torch.full_like(out, float("-inf")).scatter(-1, idx, vals)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = sorted_logits.float().softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        # drop an entry once the more probable ones already reach top_p (first one always kept)
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_categorical(logits: torch.Tensor, *, uncond: torch.Tensor | None = None, cfg=1.0,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ids from ``(..., V)`` logits -> int64 ``(...)``.

    Order: CFG (when ``uncond`` is given) -> temperature -> top-k -> top-p -> draw.
    ``temperature == 0`` returns the argmax of the guided logits (filters cannot change it).
    """
    if uncond is not None:
        logits = cfg_logits(logits, uncond, cfg)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(-1)


def sample_bits(logits: torch.Tensor, *, uncond: torch.Tensor | None = None, cfg=1.0,
                temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent Bernoulli bits from per-bit logits ``(..., K)`` -> uint8 ``(..., K)``.

    CFG is applied per bit on the logits (as bitwise AR models such as Infinity do);
    ``temperature`` divides the logits; ``temperature == 0`` thresholds at 0.
    """
    if uncond is not None:
        logits = cfg_logits(logits, uncond, cfg)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return (logits > 0).to(torch.uint8)
    p = torch.sigmoid(logits.float() / temperature)
    u = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype)
    return (u < p).to(torch.uint8)


__all__ = ["cfg_logits", "filter_logits", "sample_categorical", "sample_bits"]
