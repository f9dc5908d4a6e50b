"""Flow-matching utilities shared by continuous-token generators.

Convention (rectified flow / SiT linear path, as xAR uses it: Ren et al. 2025, "Beyond
Next-Token: Next-X Prediction", arXiv 2502.20388, §3.2; Ma et al. 2024 "SiT", §2):
``t ∈ [0, 1]``, **t = 0 is data and t = 1 is pure noise**::

    x_t = (1 − t)·x + t·ε,        ε ~ N(0, I)
    v   = dx_t/dt = ε − x          (the regression target of the network)

From a velocity prediction ``v(x_t, t)`` follow the data estimate ``x̂ = x_t − t·v``, the
noise estimate ``ε̂ = x_t + (1 − t)·v`` and the score ``∇ log p_t(x_t) = −ε̂ / t``.

What is here:

* :func:`interpolate`, :func:`velocity_target`, :func:`predict_x0`, :func:`predict_noise`,
  :func:`score_from_velocity` -- the path above;
* :func:`sample_logit_normal` -- training times ``t = sigmoid(m + s·n)``, ``n ~ N(0, 1)``
  (Esser et al. 2024 "SD3" §3.1; xAR draws one per (sample, entity) with m = 0, s = 1);
* :func:`time_grid` -- the integration grid from 1 to 0 (uniform, optional SD3 time shift,
  optional early stop ``t_stop`` followed by one last step to 0, as in xAR's sampler);
* :func:`cfg_velocity` -- classifier-free guidance on the velocity, ``u + s·(c − u)``;
* :func:`apg` -- adaptive projected guidance (Sadat et al. 2024, arXiv 2410.02416, Alg. 1): CFG
  whose update is clipped in norm and split into the parts parallel / orthogonal to the
  conditional prediction, with the parallel part (the cause of over-saturation) scaled by
  ``eta`` (FlexTok's and COMiT's decoders guide with it);
* :func:`euler_sample` (probability-flow ODE) and :func:`euler_maruyama_sample` (the
  reverse SDE with diffusion ``w(t) = 2t``, SiT §2.3 / xAR's ``euler_maruyama_sampler``)
  over a velocity function; every deterministic Euler update (with its CFG) is
  :func:`generators.sampling.flow_step` (fused kernel on CUDA, float32 arithmetic);
* :class:`TimestepEmbedding` -- DiT's sinusoidal + MLP embedding of ``t`` (t scaled by 1000).

Velocity functions: ``velocity_fn(x, t, i)`` gets the current state, the current time (a
Python float) and the solver step index ``i`` (0 for the first call of a solve, which lets
a caller feed extra context once, e.g. xAR's KV-cache prefill). It returns either the
velocity, or a pair ``(v_cond, v_uncond)`` that the sampler combines with ``cfg``.

Temperature: continuous samplers have no logits, so *temperature is the noise scale*: the
start point is ``x_1 = temperature·ε`` and the Euler–Maruyama sampler also scales its
injected noise by it (``noise_scale``). ``temperature = 1`` is the model's distribution,
``< 1`` concentrates samples towards high-density regions, ``0`` is fully deterministic.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import nn

from generators.sampling import cfg_logits, flow_step

VelocityFn = Callable[[torch.Tensor, float, int], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


# ---- the path ----------------------------------------------------------------------------

def _bcast(t, like: torch.Tensor) -> torch.Tensor:
    """A float, a ``(B,)`` tensor or any tensor broadcastable from the left -> broadcastable to ``like``."""
    if not isinstance(t, torch.Tensor):
        return torch.as_tensor(float(t), dtype=like.dtype, device=like.device)
    t = t.to(like.device, like.dtype)
    return t.reshape(*t.shape, *([1] * (like.dim() - t.dim())))


def interpolate(x: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """``x_t = (1 − t)·x + t·ε``; ``t`` a float or a tensor broadcast from the left of ``x``."""
    if x.shape != noise.shape:
        raise ValueError(f"data and noise must have the same shape, got {tuple(x.shape)} and {tuple(noise.shape)}")
    t = _bcast(t, x)
    return (1 - t) * x + t * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching target ``v = ε − x`` (``d x_t / dt`` of :func:`interpolate`)."""
    return noise - x


def predict_x0(x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
    """Data estimate ``x̂ = x_t − t·v`` (exact when ``v`` is the true conditional velocity)."""
    return x_t - _bcast(t, x_t) * v


def predict_noise(x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
    """Noise estimate ``ε̂ = x_t + (1 − t)·v``."""
    return x_t + (1 - _bcast(t, x_t)) * v


def score_from_velocity(v: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
    """Score ``∇ log p_t(x_t) = −ε̂ / t`` of the linear path (undefined at ``t = 0``)."""
    return -predict_noise(x_t, v, t) / _bcast(t, x_t)


# ---- training times ---------------------------------------------------------------------

def sample_logit_normal(shape, mean: float = 0.0, std: float = 1.0, *, generator: torch.Generator | None = None,
                        device=None, eps: float = 1e-6) -> torch.Tensor:
    """``t = sigmoid(mean + std·n)``, ``n ~ N(0, 1)``, clamped into ``[eps, 1 − eps]`` ⊂ (0, 1).

    The median is ``sigmoid(mean)``; ``mean = 0, std = 1`` is xAR's (and SD3's) default.
    """
    if std < 0:
        raise ValueError(f"logit-normal std must be >= 0, got {std}")
    n = torch.randn(tuple(shape) if not isinstance(shape, int) else (shape,), generator=generator,
                    device=device)
    return torch.sigmoid(mean + std * n).clamp(eps, 1 - eps)


# ---- integration grid -------------------------------------------------------------------

def shift_time(t, shift: float):
    """SD3 time shift ``t' = s·t / (1 + (s − 1)·t)`` (``s > 1`` spends more steps near noise)."""
    if shift <= 0:
        raise ValueError(f"time shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def time_grid(num_steps: int, *, t_stop: float = 0.0, shift: float = 1.0, device=None,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``num_steps + 1`` decreasing times from 1 to 0 (so ``num_steps`` velocity evaluations).

    ``t_stop = 0``: uniform in t. ``t_stop > 0``: ``num_steps`` uniform points from 1 down to
    ``t_stop``, then 0 (xAR/SiT's Euler–Maruyama grid, ``t_stop = 0.04``: the SDE stops at
    ``t_stop`` and one last deterministic step lands on 0). ``shift`` warps every point with
    :func:`shift_time` (endpoints fixed).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 <= t_stop < 1:
        raise ValueError(f"t_stop must be in [0, 1), got {t_stop}")
    if t_stop > 0 and num_steps > 1:
        ts = torch.cat((torch.linspace(1.0, t_stop, num_steps, dtype=dtype), torch.zeros(1, dtype=dtype)))
    else:
        ts = torch.linspace(1.0, 0.0, num_steps + 1, dtype=dtype)
    if shift != 1.0:
        ts = shift_time(ts, shift)
    return ts.to(device)


# ---- guidance and solver steps ----------------------------------------------------------

def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance on the velocity, ``u + s·(c − u)`` (the zoo's one CFG form).

    The drift of the Euler–Maruyama sampler is affine in ``v`` with weights summing to one,
    so guiding the velocity equals guiding the drift (what xAR's code does).
    """
    return cfg_logits(v_cond, v_uncond, scale)  # the same formula as on logits


def apg(cond: torch.Tensor, uncond: torch.Tensor, scale, *, eta: float = 0.0,
        norm_threshold: float = 0.0) -> torch.Tensor:
    """Adaptive projected guidance (Sadat et al. 2024, arXiv 2410.02416, §4 / Alg. 1), per sample.

    ``d = c − u``; if ``norm_threshold > 0``, ``d`` is rescaled to norm at most the threshold
    (§4.2, "rescaling"); ``d = d_⊥ + eta·d_∥`` with ``d_∥`` the projection of ``d`` on ``c``
    (§4.1); returns ``c + (scale − 1)·d``. With ``eta = 1`` and no threshold it equals
    :func:`cfg_velocity`. Norms and projections are taken over all non-batch dimensions.
    Deviation: the paper's optional momentum on ``d`` (§4.3) is not implemented (its
    authors' default for flow models is off).
    """
    if not 0.0 <= eta <= 1.0 or norm_threshold < 0:
        raise ValueError(f"apg: expected 0 <= eta <= 1 and norm_threshold >= 0, got {eta}, {norm_threshold}")
    dims = tuple(range(1, cond.dim()))
    c32, d = cond.float(), (cond - uncond).float()
    if norm_threshold > 0:
        norm = torch.linalg.vector_norm(d, dim=dims, keepdim=True)
        d = d * torch.clamp(norm_threshold / norm.clamp_min(1e-12), max=1.0)
    unit = c32 / torch.linalg.vector_norm(c32, dim=dims, keepdim=True).clamp_min(1e-12)
    d_par = (d * unit).sum(dim=dims, keepdim=True) * unit
    d = (d - d_par) + eta * d_par
    return (c32 + (scale - 1.0) * d).to(cond.dtype)


def _split(out):
    """A velocity function's output -> ``(v_cond, v_uncond or None)``."""
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(f"a velocity function returns v or (v_cond, v_uncond), got {len(out)} tensors")
        return out[0], out[1]
    return out, None


def _guided(v_cond, v_uncond, cfg):
    return v_cond if v_uncond is None else cfg_velocity(v_cond, v_uncond, cfg)


@torch.no_grad()
def euler_sample(velocity_fn: VelocityFn, x: torch.Tensor, timesteps: torch.Tensor, *, cfg=1.0) -> torch.Tensor:
    """Integrate the probability-flow ODE ``dx/dt = v`` along ``timesteps`` (from 1 towards 0).

    ``x`` is the start point (noise times the temperature); one ``velocity_fn`` call per
    interval. Exact for fields linear in ``x`` along the straight path, e.g. the velocity of
    a point mass ``v = (x − x0)/t`` lands on ``x0`` in any number of steps.
    """
    ts = [float(t) for t in timesteps]
    for i, (t, t_next) in enumerate(itertools.pairwise(ts)):
        v_c, v_u = _split(velocity_fn(x, t, i))
        x = flow_step(x, v_c, v_u, cfg, t_next - t)
    return x


@torch.no_grad()
def euler_maruyama_sample(velocity_fn: VelocityFn, x: torch.Tensor, timesteps: torch.Tensor, *, cfg=1.0,
                          noise_scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reverse-time SDE sampler with diffusion ``w(t) = 2t`` (SiT §2.3; xAR's sampler).

    Every interval but the last: ``x ← x + dt·(v − ½·w·score) + noise_scale·√(w·|dt|)·n``,
    with ``score`` from :func:`score_from_velocity` and ``v`` guided by ``cfg``. The last
    interval (to ``timesteps[-1]``, normally 0) is one deterministic Euler step with ``v``,
    i.e. ``x̂ = x − t·v``, the posterior-mean estimate of the data. (xAR's code instead takes
    the SDE *drift* without noise on that step, which leaves ``t·ε̂`` of noise in the sample
    when ``t_stop = 0.04``; the plain ODE step is the unbiased choice.)
    """
    ts = [float(t) for t in timesteps]
    n = len(ts) - 1
    for i, (t, t_next) in enumerate(itertools.pairwise(ts)):
        v_c, v_u = _split(velocity_fn(x, t, i))
        dt = t_next - t
        if i == n - 1 or t <= 0:
            x = flow_step(x, v_c, v_u, cfg, dt)
            continue
        v = _guided(v_c, v_u, cfg).to(x.dtype)
        w = 2.0 * t
        drift = v - 0.5 * w * score_from_velocity(v, x, t)
        x = x + dt * drift
        if noise_scale:
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + noise_scale * math.sqrt(w * abs(dt)) * z
    return x


SAMPLERS = {"euler": euler_sample, "euler_maruyama": euler_maruyama_sample}


def sample(velocity_fn: VelocityFn, noise: torch.Tensor, *, num_steps: int, sampler: str = "euler",
           cfg=1.0, temperature: float = 1.0, t_stop: float | None = None, shift: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Start at ``temperature·noise`` (t = 1) and integrate to t = 0 with ``sampler``.

    ``t_stop`` defaults to 0 for ``euler`` and 0.04 for ``euler_maruyama`` (xAR/SiT).
    Makes exactly ``num_steps`` calls of ``velocity_fn``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if t_stop is None:
        t_stop = 0.04 if sampler == "euler_maruyama" else 0.0
    ts = time_grid(num_steps, t_stop=t_stop, shift=shift)
    x = noise * temperature
    if sampler == "euler":
        return euler_sample(velocity_fn, x, ts, cfg=cfg)
    return euler_maruyama_sample(velocity_fn, x, ts, cfg=cfg, noise_scale=temperature, generator=generator)


# ---- time embedding ---------------------------------------------------------------------

class TimestepEmbedding(nn.Module):
    """``t ∈ [0, 1]`` of any shape -> ``(..., dim)``: sinusoids of ``time_scale·t`` then an MLP.

    DiT's ``TimestepEmbedder`` (Peebles & Xie 2023, §3.2), as xAR uses it with ``t·1000``
    (xAR's code truncates ``1000·t`` to an integer first; we keep it continuous).
    """

    def __init__(self, dim: int, freq_dim: int = 256, time_scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        if freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {freq_dim}")
        self.freq_dim, self.time_scale, self.max_period = freq_dim, time_scale, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def sinusoids(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                          / half)
        ang = (t.float() * self.time_scale).unsqueeze(-1) * freqs
        return torch.cat((ang.cos(), ang.sin()), -1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        w = self.mlp[0].weight
        return self.mlp(self.sinusoids(torch.as_tensor(t, device=w.device)).to(w.dtype))


__all__ = [
    "SAMPLERS",
    "TimestepEmbedding",
    "apg",
    "cfg_velocity",
    "euler_maruyama_sample",
    "euler_sample",
    "interpolate",
    "predict_noise",
    "predict_x0",
    "sample",
    "sample_logit_normal",
    "score_from_velocity",
    "shift_time",
    "time_grid",
    "velocity_target",
]
