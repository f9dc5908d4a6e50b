"""Token sampling: classifier-free guidance, temperature, top-k / top-p, categorical and bits.

This module is the single sampling entry point of the zoo: every generator calls
:func:`sample_categorical` / :func:`sample_bits` (and continuous heads :func:`flow_step`).
On CUDA tensors these dispatch to the fused Triton kernels of ``generators/kernels`` when
Triton imports and ``ARZOO_KERNELS`` is not ``"0"``; everywhere else the torch code below
runs (it is also the reference the kernels are tested against).

CFG is always ``u + s·(c − u)`` (Ho & Salimans 2022; LlamaGen §2.2 uses this form); VAR's
``(1+t)c − t·u`` is ``s = 1 + t``. ``s`` may be a float or a per-row tensor.

Randomness: categorical draws use the exponential race ``argmax(p_i / E_i)`` with
``E_i ~ Exp(1)`` (the Gumbel-max trick in another guise, as in gpt-fast), i.e. exactly one
exponential per logit from ``generator``; bits use one uniform per bit. The same seeded
``torch.Generator`` therefore always gives the same tokens.

Keyed RNG: with ``seed=`` (an int) the uniforms come instead from the counter-based Philox
stream keyed by (seed, row id, token) of :mod:`generators.kernels.rng` (``E = -log U``), the
stream the kernels use. Then a row's token depends only on its seed, its row id (``rows=``,
default the flattened row index) and its logits, not on the rest of the batch, and the torch
path and the fused kernel give the same ids (up to float rounding of the logits). On CUDA
without ``seed`` the kernels draw a fresh 62-bit seed from ``generator`` on the device (no
host sync), so results are reproducible per generator state but differ from the CPU stream
(same distribution).
"""
from __future__ import annotations

import math
import numbers

import torch

from generators.kernels.rng import philox_uniform


# ---- argument checks (SamplingConfig, the functions below and the kernels share them) --------
# A NaN or inf knob does not fail by itself: it turns every probability into NaN and argmax then
# returns id 0 for every token, silently. So every knob is checked where it enters.
def check_real(value, name: str) -> float:
    """``value`` as a finite float, else ``ValueError`` naming ``name`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_cfg(value, name: str = "cfg"):
    """A guidance scale: any finite float (1 = no guidance, 0 = unconditional, < 0 = guidance
    away from the condition), or a per-row tensor (not checked: that would sync the device)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value
    return check_real(value.item() if isinstance(value, torch.Tensor) else value, name)


def check_temperature(value, name: str = "temperature") -> float:
    value = check_real(value, name)
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (0 = greedy), got {value}")
    return value


def check_top_k(value, name: str = "top_k") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= 0 (0 = off), got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (0 = off), got {value}")
    return int(value)


def check_top_p(value, name: str = "top_p") -> float:
    value = check_real(value, name)
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1] (1 = off), got {value}")
    return value


def check_extra(extra, name: str = "extra") -> dict:
    """Scheme-specific knobs: a dict with string keys whose float values are finite."""
    if not isinstance(extra, dict):
        raise ValueError(f"{name} must be a dict of scheme-specific knobs, got {type(extra).__name__}")
    for key, value in extra.items():
        if not isinstance(key, str):
            raise ValueError(f"{name} keys must be strings, got {key!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}[{key!r}] must be finite, got {value}")
    return extra


_FIELD_CHECKS = {"cfg": check_cfg, "temperature": check_temperature, "top_k": check_top_k,
                 "top_p": check_top_p, "extra": check_extra}


def check_sampling_field(name: str, value):
    """The validated value of :class:`generators.base.SamplingConfig` field ``name``."""
    if name == "cfg_schedule":
        if value not in ("constant", "linear"):
            raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {value!r}")
        return value
    check = _FIELD_CHECKS.get(name)
    return value if check is None else check(value, name)


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
    top_k, top_p = check_top_k(top_k), check_top_p(top_p)
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


def _kernels_for(t: torch.Tensor):
    """The fused-kernel package when ``t`` takes the fused path (CUDA, Triton, ``ARZOO_KERNELS != "0"``), else None."""
    if not t.is_cuda:
        return None
    from generators import kernels
    return kernels if kernels.enabled_for(t) else None


def _draw_seed(generator: torch.Generator | None, device) -> torch.Tensor:
    """A 62-bit kernel seed drawn from ``generator`` as a 1-element tensor on ``device`` (no host sync)."""
    where = generator.device if generator is not None else device
    return torch.randint(0, 2**62, (1,), generator=generator, device=where, dtype=torch.int64).to(device)


def _keyed_uniforms(seed: int, rows, like: torch.Tensor) -> torch.Tensor:
    """Uniforms shaped like ``like`` (..., n) from the keyed stream; ``rows`` ids of the leading entries."""
    n = like.shape[-1]
    lead = like.shape[:-1]
    if rows is None:
        rows = torch.arange(like.numel() // max(n, 1), device=like.device)
    else:
        rows = torch.as_tensor(rows, device=like.device)
        if tuple(rows.shape) != tuple(lead) and rows.numel() != like.numel() // max(n, 1):
            raise ValueError(f"rows must hold one RNG row id per row {tuple(lead)}, got shape {tuple(rows.shape)}")
    return philox_uniform(int(seed), rows.reshape(-1), n, device=like.device).reshape(like.shape)


def _flat_rows(x: torch.Tensor | None, n: int):
    return None if x is None else x.reshape(-1, n)


def _flat_scale(scale, like: torch.Tensor):
    """A float, or a per-row scale of the leading dim expanded to every flattened row of ``like``."""
    s = _row_scale(scale, like)
    if isinstance(s, float):
        return s
    return s.reshape(-1, *([1] * (like.dim() - 2))).expand(like.shape[:-1]).reshape(-1)


def _flat_ids(rows) -> torch.Tensor | None:
    return None if rows is None else torch.as_tensor(rows).reshape(-1)


def categorical_probs(logits: torch.Tensor, *, uncond: torch.Tensor | None = None, cfg=1.0,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The float32 distribution ``(..., V)`` that :func:`sample_categorical` draws from (``temperature > 0``)."""
    if uncond is not None:
        logits = cfg_logits(logits, uncond, check_cfg(cfg))
    if not check_temperature(temperature) > 0:
        raise ValueError(f"categorical_probs needs temperature > 0, got {temperature}")
    return filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)


def sample_categorical(logits: torch.Tensor, *, uncond: torch.Tensor | None = None, cfg=1.0,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       generator: torch.Generator | None = None, seed: int | None = None,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
    """Draw ids from ``(..., V)`` logits -> int64 ``(...)``.

    Order: CFG (when ``uncond`` is given) -> temperature -> top-k -> top-p -> draw.
    ``temperature == 0`` returns the argmax of the guided logits (filters cannot change it).
    ``seed``/``rows``: keyed RNG (module docstring); without ``seed`` the CPU path draws from
    ``generator`` exactly as before. CUDA tensors go through the fused kernel.
    """
    cfg, temperature = check_cfg(cfg), check_temperature(temperature)
    top_k, top_p = check_top_k(top_k), check_top_p(top_p)
    kern = _kernels_for(logits)
    if kern is not None:
        V = logits.shape[-1]
        if uncond is not None and uncond.shape != logits.shape:
            raise ValueError(f"cond and uncond logits must have the same shape, got {tuple(logits.shape)} "
                             f"and {tuple(uncond.shape)}")
        ids = kern.fused_categorical(
            _flat_rows(logits, V), _flat_rows(uncond, V), _flat_scale(cfg, logits), temperature, top_k, top_p,
            seed=seed if seed is not None else _draw_seed(generator, logits.device),
            rows=_flat_ids(rows))
        return ids.reshape(logits.shape[:-1])
    if uncond is not None:
        logits = cfg_logits(logits, uncond, cfg)
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(-1)
    if seed is None:
        race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    else:
        race = -torch.log(_keyed_uniforms(seed, rows, probs))
    return (probs / race).argmax(-1)


def sample_bits(logits: torch.Tensor, *, uncond: torch.Tensor | None = None, cfg=1.0,
                temperature: float = 1.0, generator: torch.Generator | None = None, seed: int | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
    """Independent Bernoulli bits from per-bit logits ``(..., K)`` -> uint8 ``(..., K)``.

    CFG is applied per bit on the logits (as bitwise AR models such as Infinity do);
    ``temperature`` divides the logits; ``temperature == 0`` thresholds at 0. ``seed``/``rows``:
    keyed RNG (bit ``j`` of row ``r`` uses uniform ``(seed, r, j)``). CUDA tensors with
    ``K <= 128`` go through the fused bitwise kernel.
    """
    cfg, temperature = check_cfg(cfg), check_temperature(temperature)
    kern = _kernels_for(logits)
    K = logits.shape[-1] if logits.dim() else 0
    if kern is not None and 1 <= K <= 128:
        if uncond is not None and uncond.shape != logits.shape:
            raise ValueError(f"cond and uncond logits must have the same shape, got {tuple(logits.shape)} "
                             f"and {tuple(uncond.shape)}")
        bits = kern.fused_bits(
            _flat_rows(logits, K), _flat_rows(uncond, K), _flat_scale(cfg, logits), temperature,
            seed=seed if seed is not None else _draw_seed(generator, logits.device),
            rows=_flat_ids(rows))
        return bits.reshape(logits.shape)
    if uncond is not None:
        logits = cfg_logits(logits, uncond, cfg)
    if temperature == 0:
        return (logits > 0).to(torch.uint8)
    p = torch.sigmoid(logits.float() / temperature)
    if seed is None:
        u = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype)
    else:
        u = _keyed_uniforms(seed, rows, p)
    return (u < p).to(torch.uint8)


def flow_step(x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor | None = None, cfg=1.0,
              dt=1.0) -> torch.Tensor:
    """One Euler step of a flow-matching ODE with CFG on the velocity: ``x + dt·(u + s·(c − u))``.

    For continuous-token heads (flow matching, Lipman et al. 2023 §2; guidance on the
    predicted velocity as in SiT/MAR-style heads). ``cfg`` and ``dt`` are floats or per-row
    ``(B,)`` tensors; computed in float32 and returned in ``x``'s dtype. CUDA tensors go
    through the fused kernel (one read of each input, one write).
    """
    if v_cond.shape != x.shape or (v_uncond is not None and v_uncond.shape != x.shape):
        raise ValueError(f"x, v_cond, v_uncond must share one shape, got {tuple(x.shape)}, {tuple(v_cond.shape)}, "
                         f"{None if v_uncond is None else tuple(v_uncond.shape)}")
    cfg = check_cfg(cfg)
    kern = _kernels_for(x)
    if kern is not None:
        return kern.fused_flow_step(x, v_cond, v_uncond, cfg, dt)
    v = v_cond.float()
    if v_uncond is not None:
        v = cfg_logits(v, v_uncond.float(), cfg)
    return (x.float() + _row_scale(dt, v) * v).to(x.dtype)


__all__ = [
    "categorical_probs",
    "check_sampling_field",
    "cfg_logits",
    "filter_logits",
    "flow_step",
    "sample_bits",
    "sample_categorical",
]
