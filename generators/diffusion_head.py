"""DDPM diffusion heads for continuous tokens: MAR's per-token MLP and Hi-MAR's global DiT.

* :class:`GaussianDiffusion` -- the DDPM maths (Ho et al. 2020) with the improved-DDPM
  cosine schedule (Nichol & Dhariwal 2021, §3.2: ``alpha_bar(t) = cos²((t/T + s)/(1 + s)·π/2)``,
  ``s = 0.008``, betas capped at 0.999), epsilon prediction, the fixed-large or learned-range
  variance (Nichol & Dhariwal §3.1) and ADM's timestep respacing (sample with 100 of the
  1000 training steps by re-deriving the betas from ``alpha_bar`` at the kept steps).
* :class:`DiffusionHead` -- MAR's "diffusion loss" (Li et al. 2024, arXiv 2406.11838, §3.2 and
  §5.1): a small MLP (``SimpleMLPAdaLN``: residual blocks with adaLN from ``t_emb + W z``)
  denoises one token conditioned on the transformer's output ``z`` for that token.
  Training repeats every ``(z, target)`` pair ``diffusion_batch_mul`` times with independent
  noise and timesteps (MAR uses 4); the loss is MSE on the noise plus the variational bound
  for the learned variance (MAR's ``learn_sigma=True``), averaged over the masked tokens.
* :class:`DiTDiffusionHead` -- Hi-MAR's global "Diffusion Transformer head" (Zheng et al.
  2025, arXiv 2505.20288, §3.3): the whole token map is denoised jointly by a small DiT whose
  tokens are each modulated (adaLN-Zero) by ``t_emb + W z_i`` with ``z_i`` the transformer's
  output at that position, so attention models dependencies between tokens that the MLP
  head treats as independent. Fixed-large variance, 250 sampling steps in the paper. The
  DiT blocks are :class:`generators.transformer.Transformer` with per-token adaLN
  (RMSNorm/SwiGLU, 2D RoPE instead of DiT's LayerNorm/GELU and sin-cos position table).

Sampling (both heads): ancestral DDPM over the respaced steps; classifier-free guidance
acts on the predicted noise, ``eps = u + s·(c − u)`` (the variance comes from the
conditional branch, as in MAR); ``temperature`` multiplies the noise added at every reverse
step (MAR's ``p_sample``: ``mean + τ·σ_t·ε``; the initial noise is not scaled).

``clip_denoised`` (off by default, as in MAR; on in the tiny configs) clamps the predicted
``x_0`` to the per-channel range of the training targets (a buffer updated in training).
Why: the capped cosine schedule ends at ``alpha_bar ≈ 2e-9``, so the first reverse step
multiplies the noise-prediction error by ``sqrt(1/alpha_bar) ≈ 2e4`` (~350 in the posterior
mean with 100 respaced steps); MAR's own models only sample sensibly after ~80 epochs
(LTH14/mar issues #36, #70), and short CPU training never gets there. With the clamp a
briefly trained head samples its targets (tests/test_diffusion_head.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from generators.transformer import Transformer, find_multiple

VAR_TYPES = ("learned_range", "fixed_large", "fixed_small")


# ---- schedule ------------------------------------------------------------------------------

def cosine_alpha_bar(t: torch.Tensor | float, s: float = 0.008) -> torch.Tensor:
    """Improved-DDPM cosine ``alpha_bar`` at continuous time ``t`` in [0, 1]."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_steps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """Betas ``1 − alpha_bar(t+1)/alpha_bar(t)`` on ``num_steps`` steps (float64), capped."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    i = torch.arange(num_steps, dtype=torch.float64, device="cpu")
    ab = cosine_alpha_bar(torch.cat((i, i[-1:] + 1)) / num_steps)
    return (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)


def space_timesteps(num_steps: int, count: int) -> list[int]:
    """ADM's evenly strided subset of ``count`` steps out of ``num_steps`` (one section):
    ``round(i·(T−1)/(count−1))``, so the first (0) and last (T−1) steps are always kept."""
    if not 1 <= count <= num_steps:
        raise ValueError(f"cannot take {count} sampling steps out of {num_steps} diffusion steps "
                         f"(need 1 <= steps <= {num_steps})")
    if count == 1:
        return [0]
    stride = (num_steps - 1) / (count - 1)
    return [round(i * stride) for i in range(count)]


class GaussianDiffusion:
    """DDPM on a (possibly respaced) beta schedule, epsilon-predicting (not an nn.Module).

    ``timestep_map[i]`` is the original training step of respaced step ``i``: the network
    always sees original timesteps (ADM/MAR ``_WrappedModel``). All tables are float64 on
    the CPU; :meth:`_at` gathers rows on the input's device and dtype.
    """

    def __init__(self, betas: torch.Tensor, timestep_map=None, var_type: str = "learned_range"):
        if var_type not in VAR_TYPES:
            raise ValueError(f"var_type must be one of {VAR_TYPES}, got {var_type!r}")
        b = torch.as_tensor(betas, dtype=torch.float64, device="cpu")
        if b.dim() != 1 or not bool(((b > 0) & (b <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.var_type = var_type
        self.betas = b
        self.num_steps = T = b.numel()
        self.timestep_map = torch.as_tensor(list(range(T)) if timestep_map is None else list(timestep_map),
                                            dtype=torch.long, device="cpu")
        a = 1 - b
        ab = torch.cumprod(a, 0)
        ab_prev = torch.cat((torch.ones(1, dtype=torch.float64), ab[:-1]))
        self.alphas_cumprod, self.alphas_cumprod_prev = ab, ab_prev
        self.sqrt_ab, self.sqrt_1m_ab = ab.sqrt(), (1 - ab).sqrt()
        self.sqrt_recip_ab, self.sqrt_recipm1_ab = (1 / ab).sqrt(), (1 / ab - 1).sqrt()
        # posterior q(x_{t-1} | x_t, x_0)
        self.posterior_variance = b * (1 - ab_prev) / (1 - ab)
        # log clipped: the posterior variance is 0 at t = 0
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat((pv[1:2], pv[1:]))) if T > 1 \
            else torch.log(b.clone())
        self.posterior_mean_coef1 = b * ab_prev.sqrt() / (1 - ab)
        self.posterior_mean_coef2 = (1 - ab_prev) * a.sqrt() / (1 - ab)
        self.log_betas = b.log()
        fixed_large = torch.cat((pv[1:2], b[1:])) if T > 1 else b.clone()
        self.fixed_large_log_variance = fixed_large.log()
        self._cache: dict = {}

    @classmethod
    def cosine(cls, num_steps: int = 1000, var_type: str = "learned_range") -> GaussianDiffusion:
        with torch.device("cpu"):  # tables stay real even inside a meta-device build
            return cls(cosine_betas(num_steps), var_type=var_type)

    def respaced(self, count: int) -> GaussianDiffusion:
        """The schedule restricted to ``count`` evenly strided steps (ADM ``SpacedDiffusion``):
        new betas ``1 − ab[k_i]/ab[k_{i−1}]`` keep ``alpha_bar`` equal at the kept steps."""
        keep = space_timesteps(self.num_steps, count)
        with torch.device("cpu"):
            ab = self.alphas_cumprod[keep]
            prev = torch.cat((torch.ones(1, dtype=torch.float64), ab[:-1]))
            return GaussianDiffusion(1 - ab / prev, self.timestep_map[keep].tolist(), self.var_type)

    # ---- table lookup -------------------------------------------------------------------
    def _at(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rows ``t`` (N,) of table ``name``, shaped (N, 1, ...) to broadcast over ``x``."""
        key = (name, x.device, x.dtype)
        arr = self._cache.get(key)
        if arr is None:
            arr = self._cache[key] = getattr(self, name).to(device=x.device, dtype=x.dtype)
        return arr[t.to(x.device)].reshape(-1, *([1] * (x.dim() - 1)))

    # ---- forward process ----------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample ``q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 − ab_t) I)`` with the given noise."""
        return self._at("sqrt_ab", t, x0) * x0 + self._at("sqrt_1m_ab", t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of ``q(x_{t−1} | x_t, x_0)``."""
        mean = self._at("posterior_mean_coef1", t, xt) * x0 + self._at("posterior_mean_coef2", t, xt) * xt
        return (mean, self._at("posterior_variance", t, xt),
                self._at("posterior_log_variance_clipped", t, xt))

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self._at("sqrt_recip_ab", t, xt) * xt - self._at("sqrt_recipm1_ab", t, xt) * eps

    # ---- reverse process ----------------------------------------------------------------
    def split_output(self, out: torch.Tensor, channels: int):
        """Network output -> (eps, var_values or None); learned variance doubles the channels."""
        if self.var_type == "learned_range":
            if out.shape[-1] != 2 * channels:
                raise ValueError(f"a learned-variance head must output {2 * channels} channels, "
                                 f"got {out.shape[-1]}")
            return out[..., :channels], out[..., channels:]
        if out.shape[-1] != channels:
            raise ValueError(f"expected {channels} output channels, got {out.shape[-1]}")
        return out, None

    def p_mean_variance(self, eps: torch.Tensor, var_values: torch.Tensor | None, xt: torch.Tensor,
                        t: torch.Tensor, clip: torch.Tensor | None = None):
        """``p(x_{t−1} | x_t)``: (mean, log-variance, predicted x_0) from the predicted noise.

        ``clip`` (per-channel bound, broadcast over the last dim) clamps the predicted ``x_0``
        before the posterior mean (ADM's ``clip_denoised`` with the data range instead of ±1).
        """
        if self.var_type == "learned_range":
            # var_values in [-1, 1] interpolate log-variance between beta~_t and beta_t
            lo = self._at("posterior_log_variance_clipped", t, xt)
            hi = self._at("log_betas", t, xt)
            frac = (var_values + 1) / 2
            log_var = frac * hi + (1 - frac) * lo
        elif self.var_type == "fixed_large":
            log_var = self._at("fixed_large_log_variance", t, xt).expand_as(xt)
        else:
            log_var = self._at("posterior_log_variance_clipped", t, xt).expand_as(xt)
        x0 = self.predict_x0(xt, t, eps)
        if clip is not None:
            bound = clip.to(x0.dtype)
            x0 = torch.maximum(torch.minimum(x0, bound), -bound)
        mean, _, _ = self.q_posterior(x0, xt, t)
        return mean, log_var, x0

    # ---- training -----------------------------------------------------------------------
    def training_losses(self, out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> dict:
        """Per-row losses (N,) from the network output at ``(x_t, t)``.

        ``mse``: mean squared error of the predicted noise. ``vb`` (learned variance only):
        the variational-bound term in bits with the mean detached, so it trains only the
        variance (Nichol & Dhariwal §3.1, ``L_hybrid``; MAR uses weight 1).
        """
        C = x0.shape[-1]
        eps, var_values = self.split_output(out, C)
        dims = tuple(range(1, x0.dim()))
        terms = {"mse": (eps - noise).pow(2).mean(dims)}
        if var_values is not None:
            mean, log_var, _ = self.p_mean_variance(eps.detach(), var_values, xt, t)
            true_mean, _, true_log_var = self.q_posterior(x0, xt, t)
            kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dims) / math.log(2.0)
            nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dims) / math.log(2.0)
            terms["vb"] = torch.where(t.to(kl.device) == 0, nll, kl)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """ADM's decoder likelihood at t = 0: Gaussian mass of the bin of width 2/255 around ``x``
    (the outermost bins at ±1 extend to ±∞). Kept as in MAR although latents are not 8-bit."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = torch.special.ndtr(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = torch.special.ndtr(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus,
                            torch.where(x > 0.999, log_one_minus_cdf_min,
                                        torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return log_probs


# ---- networks --------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (original) timestep -> 2-layer MLP (DiT / MAR)."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].bias)

    def features(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32,
                                                                     device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat((torch.cos(args), torch.sin(args)), -1)
        if self.freq_dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        w = self.mlp[0].weight
        return self.mlp(self.features(t).to(w.dtype))


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


class AdaLNResBlock(nn.Module):
    """MAR ``ResBlock``: ``x + gate · MLP(modulate(LN(x), shift, scale))``, adaLN from ``y``."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.ada(y).chunk(3, -1)
        return x + gate * self.mlp(_modulate(self.norm(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """MAR's denoising MLP: ``x_t (N, C)``, ``t (N,)``, ``z (N, Dz)`` -> ``(N, out)``.

    ``input_proj`` to ``width``; ``depth`` :class:`AdaLNResBlock` modulated by
    ``y = t_emb + cond_embed(z)``; a final adaLN LayerNorm and a zero-initialised linear.
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, cond_dim: int, depth: int):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.blocks = nn.ModuleList(AdaLNResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, out_channels)
        for m in [self.cond_embed, self.input_proj, *[b.mlp[i] for b in self.blocks for i in (0, 2)]]:
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        # adaLN-Zero: every modulation and the output start at zero (the block is the identity)
        for lin in [b.ada[1] for b in self.blocks] + [self.final_ada[1], self.out]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = self.time_embed(t) + self.cond_embed(z)
        h = self.input_proj(x)
        for blk in self.blocks:
            h = blk(h, y)
        shift, scale = self.final_ada(y).chunk(2, -1)
        return self.out(_modulate(self.final_norm(h), shift, scale))


class DiTNet(nn.Module):
    """Hi-MAR's global denoiser: ``x_t (B, L, C)``, ``t (B,)``, ``z (B, L, Dz)`` -> ``(B, L, out)``.

    Each token ``i`` is modulated by its own ``c_i = t_emb + W z_i`` (adaLN-Zero in every
    block and the final norm); the blocks attend over the whole map with 2D RoPE.
    """

    def __init__(self, in_channels: int, cond_dim: int, width: int, depth: int, heads: int,
                 grid: tuple, out_channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        # SwiGLU width with the parameters of DiT's GELU MLP of ratio ``mlp_ratio``
        hidden = find_multiple(int(2 * mlp_ratio * width / 3), 8)
        self.blocks = Transformer(width, depth, heads, rope="2d", adaln_dim=width, qkv_bias=True,
                                  norm_eps=1e-6, ffn_hidden=hidden)
        self.x_embed = nn.Linear(in_channels, width)
        self.c_embed = nn.Linear(cond_dim, width)
        self.time_embed = TimestepEmbedder(width)
        self.out = nn.Linear(width, out_channels)
        for m in (self.x_embed, self.c_embed):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def positions(self, device=None) -> torch.Tensor:
        h, w = self.grid
        idx = torch.arange(h * w, device=device)
        return torch.stack((idx // w, idx % w), -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        L = self.grid[0] * self.grid[1]
        if x.dim() != 3 or x.shape[1] != L or z.shape[:2] != x.shape[:2]:
            raise ValueError(f"DiT head over a {self.grid[0]}x{self.grid[1]} map expects x (B, {L}, C) and "
                             f"z (B, {L}, Dz), got {tuple(x.shape)} and {tuple(z.shape)}")
        c = self.time_embed(t)[:, None] + self.c_embed(z)
        h = self.blocks(self.x_embed(x), self.positions(x.device), cond=c)
        return self.out(h)


# ---- heads -----------------------------------------------------------------------------------

def _randn(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Gaussian noise drawn from ``generator`` (on its own device), moved to ``device``."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


class _DDPMHead(nn.Module):
    """Shared training / sampling of a denoiser ``net(x_t, t, z)`` over the last dim ``C``."""

    net: nn.Module

    def __init__(self, token_dim: int, num_steps: int, sampling_steps: int, var_type: str,
                 clip_denoised: bool = False):
        super().__init__()
        self.token_dim = int(token_dim)
        self.clip_denoised = clip_denoised
        # Largest |target| per channel seen in training: the clamp range of clip_denoised.
        self.register_buffer("target_absmax", torch.zeros(self.token_dim))
        self.num_steps, self.sampling_steps = int(num_steps), int(sampling_steps)
        self.var_type = var_type
        self.train_diffusion = GaussianDiffusion.cosine(self.num_steps, var_type)
        space_timesteps(self.num_steps, self.sampling_steps)  # validate early
        self._gen: dict[int, GaussianDiffusion] = {}

    @property
    def out_channels(self) -> int:
        return self.token_dim * (2 if self.var_type == "learned_range" else 1)

    def gen_diffusion(self, steps: int | None = None) -> GaussianDiffusion:
        """The respaced sampling schedule (``steps`` defaults to ``sampling_steps``)."""
        steps = int(steps or self.sampling_steps)
        if steps not in self._gen:
            self._gen[steps] = self.train_diffusion.respaced(steps)
        return self._gen[steps]

    def _check(self, target: torch.Tensor, z: torch.Tensor) -> None:
        if target.shape[-1] != self.token_dim:
            raise ValueError(f"diffusion head targets need {self.token_dim} channels, got {tuple(target.shape)}")

    def diffusion_loss(self, target: torch.Tensor, z: torch.Tensor, weight: torch.Tensor | None = None) -> dict:
        """One DDPM training step on rows of ``target`` (N, ..., C) conditioned on ``z``.

        ``t`` is uniform over the training steps and the noise standard normal (global RNG,
        so ``torch.manual_seed`` makes the loss reproducible). ``weight`` (N,) averages the
        per-row losses (MAR: 1 on masked tokens, 0 elsewhere); otherwise a plain mean.
        """
        self._check(target, z)
        if self.training:
            with torch.no_grad():
                seen = target.detach().abs().reshape(-1, self.token_dim).amax(0)
                self.target_absmax.copy_(torch.maximum(self.target_absmax, seen.to(self.target_absmax)))
        d = self.train_diffusion
        t = torch.randint(0, d.num_steps, (target.shape[0],), device=target.device)
        noise = torch.randn_like(target)
        xt = d.q_sample(target, t, noise)
        terms = d.training_losses(self.net(xt, t, z), target, xt, t, noise)
        out = {}
        for k, v in terms.items():
            if weight is None:
                out[k] = v.mean()
            else:
                w = weight.to(v.dtype)
                out[k] = (v * w).sum() / w.sum().clamp(min=1.0)
        return out

    @torch.no_grad()
    def sample(self, z: torch.Tensor, z_uncond: torch.Tensor | None = None, cfg: float = 1.0,
               temperature: float = 1.0, generator: torch.Generator | None = None,
               steps: int | None = None) -> torch.Tensor:
        """Ancestral DDPM sampling of tokens ``(N, ..., C)`` given the conditions ``z``.

        With ``z_uncond`` (same shape as ``z``) every step runs both branches on the same
        ``x_t`` and guides the noise, ``eps = u + cfg·(c − u)`` (no shortcut at ``cfg = 1``);
        the variance is the conditional branch's. ``temperature`` scales the noise added at
        each reverse step (MAR). The network is called once per respaced step. With
        ``clip_denoised`` the predicted ``x_0`` is clamped to the training targets' range.
        """
        d = self.gen_diffusion(steps)
        shape = (*z.shape[:-1], self.token_dim)
        clip = self.target_absmax if self.clip_denoised and bool((self.target_absmax > 0).all()) else None
        p = next(self.parameters())
        x = _randn(shape, generator, z.device, p.dtype)
        for i in reversed(range(d.num_steps)):
            t = torch.full((z.shape[0],), i, device=z.device, dtype=torch.long)
            t_net = d.timestep_map.to(z.device)[t]
            if z_uncond is not None:
                out = self.net(torch.cat((x, x)), torch.cat((t_net, t_net)), torch.cat((z, z_uncond)))
                oc, ou = out.chunk(2)
                ec, vc = d.split_output(oc, self.token_dim)
                eu, _ = d.split_output(ou, self.token_dim)
                eps, var_values = eu + cfg * (ec - eu), vc
            else:
                eps, var_values = d.split_output(self.net(x, t_net, z), self.token_dim)
            mean, log_var, _ = d.p_mean_variance(eps, var_values, x, t, clip)
            if i > 0:
                x = mean + torch.exp(0.5 * log_var) * _randn(shape, generator, z.device, x.dtype) * temperature
            else:
                x = mean
        return x


class DiffusionHead(_DDPMHead):
    """MAR's per-token diffusion head (``DiffLoss``): tokens (N, C) given conditions (N, Dz).

    Args:
        token_dim: channels per token (C). cond_dim: channels of ``z``.
        width, depth: the MLP (MAR-B 1024 x 6, L 1280 x 8, H 1536 x 12).
        num_steps: training diffusion steps (1000); sampling_steps: respaced steps (100).
        learn_sigma: learned-range variance with the VB term (MAR: True).
        clip_denoised: clamp the predicted x_0 to the training targets' range while sampling
            (not in MAR; see the module docstring).
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int = 1024, depth: int = 3,
                 num_steps: int = 1000, sampling_steps: int = 100, learn_sigma: bool = True,
                 clip_denoised: bool = False):
        super().__init__(token_dim, num_steps, sampling_steps, "learned_range" if learn_sigma else "fixed_large",
                         clip_denoised)
        self.net = SimpleMLPAdaLN(token_dim, width, self.out_channels, cond_dim, depth)

    def loss(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None,
             batch_mul: int = 1) -> dict:
        """``target`` (N, C), ``z`` (N, Dz), ``mask`` (N,) (1 = counts): each row repeated
        ``batch_mul`` times with its own noise and timestep (MAR ``diffusion_batch_mul``)."""
        if target.dim() != 2 or z.dim() != 2 or target.shape[0] != z.shape[0]:
            raise ValueError(f"DiffusionHead.loss takes target (N, C) and z (N, Dz), got "
                             f"{tuple(target.shape)} and {tuple(z.shape)}")
        if batch_mul > 1:
            target, z = target.repeat(batch_mul, 1), z.repeat(batch_mul, 1)
            mask = mask.repeat(batch_mul) if mask is not None else None
        return self.diffusion_loss(target, z, mask)


class DiTDiffusionHead(_DDPMHead):
    """Hi-MAR's global DiT head: a whole ``(B, h, w, C)`` map given per-token ``z`` (B, h, w, Dz).

    Args:
        token_dim, cond_dim: channels of tokens and of ``z``; grid: (h, w) of the map.
        width, depth, heads, mlp_ratio: the DiT (Hi-MAR-B 512 x 6, 8 heads; H 768 x 12).
        num_steps / sampling_steps: 1000 / 250 in Hi-MAR; learn_sigma: False in Hi-MAR.
        clip_denoised: as in :class:`DiffusionHead`.
    """

    def __init__(self, token_dim: int, cond_dim: int, grid: tuple, width: int = 512, depth: int = 6,
                 heads: int = 8, mlp_ratio: float = 4.0, num_steps: int = 1000, sampling_steps: int = 250,
                 learn_sigma: bool = False, clip_denoised: bool = False):
        super().__init__(token_dim, num_steps, sampling_steps, "learned_range" if learn_sigma else "fixed_large",
                         clip_denoised)
        self.grid = (int(grid[0]), int(grid[1]))
        self.net = DiTNet(token_dim, cond_dim, width, depth, heads, self.grid, self.out_channels, mlp_ratio)

    def _flat(self, x: torch.Tensor, what: str) -> torch.Tensor:
        h, w = self.grid
        if x.dim() != 4 or tuple(x.shape[1:3]) != (h, w):
            raise ValueError(f"DiT head expects {what} of shape (B, {h}, {w}, ·), got {tuple(x.shape)}")
        return x.reshape(x.shape[0], h * w, x.shape[-1])

    def loss(self, target: torch.Tensor, z: torch.Tensor, batch_mul: int = 1) -> dict:
        """DDPM loss on whole maps ``target`` (B, h, w, C) given ``z`` (B, h, w, Dz); every
        position counts (Hi-MAR's ``GlobalDiffLoss`` ignores the mask)."""
        x, zz = self._flat(target, "targets"), self._flat(z, "conditions")
        if batch_mul > 1:
            x, zz = x.repeat(batch_mul, 1, 1), zz.repeat(batch_mul, 1, 1)
        return self.diffusion_loss(x, zz)

    @torch.no_grad()
    def sample(self, z, z_uncond=None, cfg=1.0, temperature=1.0, generator=None, steps=None):
        """Maps ``(B, h, w, C)`` from per-token conditions ``z`` (B, h, w, Dz); see
        :meth:`_DDPMHead.sample`."""
        B = z.shape[0]
        zz = self._flat(z, "conditions")
        zu = self._flat(z_uncond, "unconditional conditions") if z_uncond is not None else None
        x = super().sample(zz, zu, cfg, temperature, generator, steps)
        return x.reshape(B, *self.grid, self.token_dim)


__all__ = [
    "DiTDiffusionHead",
    "DiTNet",
    "DiffusionHead",
    "GaussianDiffusion",
    "SimpleMLPAdaLN",
    "TimestepEmbedder",
    "cosine_alpha_bar",
    "cosine_betas",
    "discretized_gaussian_log_likelihood",
    "normal_kl",
    "space_timesteps",
]
