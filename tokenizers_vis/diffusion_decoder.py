"""Token-conditioned pixel diffusion decoder (SEED / slot tokenizers).

SEED (Ge et al. 2023, arXiv 2307.08041, §2.1) and Slot-MLLM (Chi et al. 2025, arXiv
2505.17726, §3) decode their few semantic tokens by *re-generating* an image with a diffusion
model conditioned on an embedding of the tokens (SD-2.1-unCLIP at paper scale). Here the
denoiser is diffusers' ``UNet2DConditionModel`` (Rombach et al. 2022): the conditioning
sequence ``(B, L, cond_dim)`` enters through cross-attention in the lower-resolution blocks
(the slot adapter of Slot-MLLM is such an extra cross-attention), and -- with ``global_cond``
-- its mean is also projected into the timestep embedding, which is how unCLIP feeds its image
embedding (diffusers ``class_embed_type="projection"``).

Training is the DDPM objective (Ho et al. 2020, Eq. 14): ``x_t = sqrt(a_t) x_0 +
sqrt(1 - a_t) eps`` with a diffusers ``DDPMScheduler`` (cosine ``squaredcos_cap_v2`` betas,
Nichol & Dhariwal 2021, by default) and ``|| eps - eps_theta(x_t, t, c) ||^2`` -- or, with
``prediction_type``, the MSE on ``v`` (Salimans & Ho 2022) or on ``x_0`` itself. (At CPU-sized
budgets the epsilon model left global colour casts and grain after ~1,700 steps on Shapes,
where the x_0 model of the same size got every colour right after 600; see checkpoints.md.)
The condition
is replaced by a learned null sequence with probability ``cond_dropout`` so sampling can use
classifier-free guidance (Ho & Salimans 2022); the conditional and unconditional branches are
one batched UNet call per step. Sampling uses ``DDIMScheduler`` (Song et al. 2021; eta 0,
"trailing" timestep spacing, Lin et al. 2024, which suits few steps) or ``DDPMScheduler``
(ancestral), with a configurable number of steps and a ``torch.Generator`` for the initial noise
and the DDPM noise, so a seeded decode is deterministic.

The schedulers hold no learned state: they are built lazily from the constructor arguments and
are not part of the state dict (a model built on the meta device never builds them).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

SAMPLERS = ("ddim", "ddpm")
PREDICTIONS = ("epsilon", "v_prediction", "sample")


class DiffusionDecoder(nn.Module):
    """Pixel-space conditional diffusion model ``c (B, L, cond_dim) -> images (B, 3, S, S)`` in [-1, 1].

    Args:
        cond_dim: channels of the conditioning sequence (the UNet's ``cross_attention_dim``).
        image_size: S, the side of the images it denoises.
        channels: UNet ``block_out_channels`` (level ``i`` works at ``image_size / 2^i``).
        attn_levels: how many of the lowest-resolution levels have (self- and cross-) attention
            transformer blocks; the mid block always has one. The high-resolution levels are
            plain ResNet levels (attention over 32x32 positions costs most of a CPU step).
        layers_per_block: ResNet layers per UNet level.
        attn_heads: attention heads of the transformer blocks (diffusers' ``attention_head_dim``).
        norm_groups: GroupNorm groups (must divide every channel count).
        global_cond: also add ``Linear(mean_L c)`` to the timestep embedding (unCLIP style).
        cond_dropout: probability of training on the null condition (for CFG).
        num_train_timesteps, beta_schedule, prediction_type: the diffusers scheduler config
            (``prediction_type``: "epsilon" -- the standard objective --, "v_prediction"
            (Salimans & Ho 2022) or "sample" (x0)).
        sampler, sample_steps, guidance_scale: defaults of :meth:`sample`.
    """

    def __init__(self, cond_dim: int, image_size: int = 32, channels: list = (16, 32, 64),
                 layers_per_block: int = 1, attn_levels: int = 1, attn_heads: int = 4, norm_groups: int = 8,
                 global_cond: bool = True, cond_dropout: float = 0.1, num_train_timesteps: int = 1000,
                 beta_schedule: str = "squaredcos_cap_v2", prediction_type: str = "epsilon",
                 sampler: str = "ddim", sample_steps: int = 25, guidance_scale: float = 1.0):
        super().__init__()
        from diffusers import UNet2DConditionModel

        channels = [int(c) for c in channels]
        if not channels or any(c % norm_groups for c in channels):
            raise ValueError(f"DiffusionDecoder needs channels divisible by norm_groups={norm_groups}, "
                             f"got {channels}")
        if image_size % (2 ** (len(channels) - 1)):
            raise ValueError(f"image_size {image_size} is not divisible by the UNet's downsampling "
                             f"2^{len(channels) - 1}")
        if not 0 <= attn_levels <= len(channels):
            raise ValueError(f"attn_levels must be in [0, {len(channels)}], got {attn_levels}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if prediction_type not in PREDICTIONS:
            raise ValueError(f"prediction_type must be one of {PREDICTIONS}, got {prediction_type!r}")
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        if sample_steps < 1 or num_train_timesteps < 2:
            raise ValueError(f"need sample_steps >= 1 and num_train_timesteps >= 2, got {sample_steps}, "
                             f"{num_train_timesteps}")
        self.cond_dim, self.image_size = int(cond_dim), int(image_size)
        self.global_cond, self.cond_dropout = bool(global_cond), float(cond_dropout)
        self.num_train_timesteps, self.beta_schedule = int(num_train_timesteps), beta_schedule
        self.prediction_type = prediction_type
        self.sampler, self.sample_steps, self.guidance_scale = sampler, int(sample_steps), float(guidance_scale)
        plain = len(channels) - attn_levels
        self.unet = UNet2DConditionModel(
            sample_size=image_size, in_channels=3, out_channels=3,
            down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * attn_levels,
            up_block_types=("CrossAttnUpBlock2D",) * attn_levels + ("UpBlock2D",) * plain,
            mid_block_type="UNetMidBlock2DCrossAttn",
            block_out_channels=tuple(channels), layers_per_block=layers_per_block,
            cross_attention_dim=cond_dim, attention_head_dim=attn_heads, norm_num_groups=norm_groups,
            class_embed_type="projection" if global_cond else None,
            projection_class_embeddings_input_dim=cond_dim if global_cond else None)
        # the unconditional "caption" of classifier-free guidance (one row, broadcast to any L)
        self.null_cond = nn.Parameter(torch.randn(1, 1, cond_dim) * 0.02)
        self._train_sched = None
        self._samplers: dict = {}

    # ---- schedulers (built lazily, not in the state dict) --------------------------------
    def _sched_kwargs(self) -> dict:
        return {"num_train_timesteps": self.num_train_timesteps, "beta_schedule": self.beta_schedule,
                "prediction_type": self.prediction_type}

    @property
    def train_scheduler(self):
        if self._train_sched is None:
            from diffusers import DDPMScheduler

            self._train_sched = DDPMScheduler(**self._sched_kwargs(), clip_sample=False)
        return self._train_sched

    def sampling_scheduler(self, sampler: str | None = None):
        """A fresh scheduler for one sampling run (``set_timesteps`` mutates it)."""
        sampler = sampler or self.sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if sampler not in self._samplers:
            from diffusers import DDIMScheduler, DDPMScheduler

            if sampler == "ddim":
                self._samplers[sampler] = DDIMScheduler(**self._sched_kwargs(), clip_sample=True,
                                                        set_alpha_to_one=True, timestep_spacing="trailing")
            else:
                self._samplers[sampler] = DDPMScheduler(**self._sched_kwargs(), clip_sample=True,
                                                        timestep_spacing="trailing")
        return copy.deepcopy(self._samplers[sampler])

    def __getstate__(self):  # deepcopy / pickle: schedulers are rebuilt on demand
        state = self.__dict__.copy()
        state["_train_sched"], state["_samplers"] = None, {}
        return state

    # ---- the denoiser ----------------------------------------------------------------------
    def _check_cond(self, cond: torch.Tensor) -> torch.Tensor:
        if cond.dim() != 3 or cond.shape[-1] != self.cond_dim:
            raise ValueError(f"DiffusionDecoder expects a condition (B, L, {self.cond_dim}), "
                             f"got {tuple(cond.shape)}")
        return cond

    def null(self, batch: int, length: int) -> torch.Tensor:
        return self.null_cond.expand(batch, length, -1)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """One UNet call: the model output (epsilon or v) for noisy images ``x`` at timesteps ``t``."""
        cond = cond.to(x.dtype)
        labels = cond.mean(1) if self.global_cond else None
        return self.unet(x, t, encoder_hidden_states=cond, class_labels=labels).sample

    def loss(self, images: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DDPM training loss on ``images`` (B, 3, S, S) given ``cond``; returns ``(loss, x0_hat)``.

        The loss is the MSE between the UNet output and its ``prediction_type`` target (epsilon:
        the noise, Ho et al. 2020 Eq. 14).

        ``x0_hat`` is the one-step estimate of the clean images from the prediction (a
        training-time "reconstruction"; it is poor at high noise levels by construction)."""
        cond = self._check_cond(cond)
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"DiffusionDecoder denoises {self.image_size}x{self.image_size} images, "
                             f"got {tuple(images.shape[-2:])}")
        B = images.shape[0]
        sched = self.train_scheduler
        noise = torch.randn_like(images)
        t = torch.randint(0, self.num_train_timesteps, (B,), device=images.device)
        x_t = sched.add_noise(images, noise, t)
        if self.training and self.cond_dropout > 0:
            drop = torch.rand(B, device=images.device) < self.cond_dropout
            cond = torch.where(drop[:, None, None], self.null(B, cond.shape[1]).to(cond.dtype), cond)
        pred = self.denoise(x_t, t, cond)
        ab = sched.alphas_cumprod.to(images.device)[t].view(B, 1, 1, 1).to(images.dtype)
        if self.prediction_type == "epsilon":
            target = noise
            x0 = (x_t - (1 - ab).sqrt() * pred) / ab.sqrt()
        elif self.prediction_type == "v_prediction":  # v = sqrt(ab) eps - sqrt(1 - ab) x0
            target = ab.sqrt() * noise - (1 - ab).sqrt() * images
            x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * pred
        else:  # x0 itself
            target, x0 = images, pred
        return F.mse_loss(pred.float(), target.float()), x0.clamp(-1, 1)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: int | None = None, generator: torch.Generator | None = None,
               guidance_scale: float | None = None, sampler: str | None = None, eta: float = 0.0) -> torch.Tensor:
        """Images ``(B, 3, S, S)`` in [-1, 1] from ``cond`` with ``steps`` denoising steps (one UNet
        call each, CFG branches batched). The initial noise (and DDPM's per-step noise) is drawn
        from ``generator`` on its own device, so a seeded call is deterministic."""
        cond = self._check_cond(cond)
        steps = self.sample_steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        g = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        sampler = sampler or self.sampler
        sched = self.sampling_scheduler(sampler)
        dev = cond.device
        sched.set_timesteps(steps, device=dev)
        B, L = cond.shape[:2]
        gdev = generator.device if generator is not None else torch.device("cpu")
        shape = (B, 3, self.image_size, self.image_size)
        x = torch.randn(shape, generator=generator, device=gdev).to(dev, cond.dtype) * sched.init_noise_sigma
        cfg = g != 1.0
        c = torch.cat([cond, self.null(B, L).to(cond.dtype)]) if cfg else cond
        for t in sched.timesteps:
            xin = torch.cat([x, x]) if cfg else x
            tt = t.expand(xin.shape[0]).to(dev)
            out = self.denoise(sched.scale_model_input(xin, t), tt, c)
            if cfg:
                oc, ou = out.chunk(2)
                out = ou + g * (oc - ou)
            if sampler == "ddim":
                x = sched.step(out, t, x, eta=eta, generator=generator).prev_sample
            else:  # ancestral DDPM: the per-step noise comes from ``generator`` too
                x = sched.step(out, t, x, generator=generator).prev_sample
        return x.clamp(-1, 1)
