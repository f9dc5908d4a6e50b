"""Layton: discrete 1D tokens decoded by a latent consistency decoder (``tokenizer/layton*``).

Xie et al. 2025, "Layton: Latent Consistency Tokenizer for 1024-pixel Image Reconstruction and
Generation by 256 Tokens" (arXiv 2503.08377). The paper's abstract / §1 give the design; no
reference code was available (digest ``reference/tokenizers.md`` §4), so every detail below that
the abstract does not state is marked **[assume]**.

* **Encoder** (paper: "a transformer encoder"): TiTok-style [assume] -- a ViT over pixel
  patches followed by ``num_tokens`` learned latent queries, full attention, 2D RoPE on the
  patches (queries unrotated, told apart by their learned embeddings); only the query outputs
  are kept.
* **Quantizer** (paper: "a quantized codebook"): ``tokenizers_vis.quantizers.vq.VectorQuantizer``
  with l2-normalised low-dimensional codes (ViT-VQGAN / LlamaGen lookup; beta 0.25) on a
  linear projection of each query [assume: size 16384 x 8 at paper scale].
* **Decoder** (paper: "a latent consistency decoder" that outputs the latent space of a
  pretrained LDM, whose VAE decodes it to pixels): a DiT (``generators.transformer`` blocks,
  adaLN-Zero on the flow time) over the patches of the **frozen KL autoencoder's** latent,
  with the token embeddings appended in-context (FlexTok-style) [assume: the paper initialises
  its decoder from the LDM's denoiser; no pretrained denoiser exists here]. It predicts the
  rectified-flow velocity (``generators.flow``: ``x_t = (1 - t) x + t eps``, ``t = 0`` data,
  ``v = eps - x``) on the KL latent standardised per channel (``generators.latent_norm``,
  fitted once on the first training batch and saved in the checkpoint).

Two training stages (``stage`` constructor argument; ``python -m train.tokenizer --set
stage=... [--init ...]``):

* ``"diffusion"`` (stage A; the paper's "direct application of the LDM as decoder"): encoder,
  codebook and denoiser learn the standard flow-matching denoising loss ``||v - (eps - x)||^2`` at
  logit-normal times (SD3) plus the VQ loss. ``decode`` integrates the probability-flow ODE with
  ``sample_steps`` Euler steps (many-step sampling). The paper reports colour and brightness
  shifts for this decoder; ``eval/decoder_steps.py`` measures them.
* ``"consistency"`` (stage B; the paper's latent consistency decoder): initialised from stage A
  (``--init``), distilled against a **frozen copy of the stage-A model** (``teacher=`` its
  checkpoint folder: encoder, codebook and denoiser, all frozen, kept out of ``parameters()`` and
  of the state dict, rebuilt lazily from that folder -- also when a run resumes), and trained with
  pixel losses through the few-step sampler and the frozen KL decoder. ``decode`` takes
  ``consistency_steps`` (default 2) steps.

**Consistency formulation (stage B).** Consistency distillation (CD; Song et al. 2023,
"Consistency Models", arXiv 2303.01469, Alg. 2) in the latent space as LCM does it (Luo et al. 2023,
arXiv 2310.04378: a coarse "skipping-step" grid over the teacher's time axis), written in the
rectified-flow time of the teacher:

* consistency function ``f_theta(x_t, t) = x_t - t v_theta(x_t, t, c)`` -- the flow's data
  estimate (``flow.predict_x0``): it meets the boundary condition ``f(x, 0) = x`` exactly (the
  flow analogue of LCM's ``c_skip / c_out``) and equals the stage-A model's one-step estimate at
  initialisation;
* grid ``t_n = n / N`` (``N = cd_intervals``); per sample ``n ~ U{1..N}``, ``x_{t_n} = (1 - t_n) x
  + t_n eps``; the teacher takes one Euler step of its probability-flow ODE,
  ``x^_{t_{n-1}} = x_{t_n} + (t_{n-1} - t_n) v_teacher(x_{t_n}, t_n, c_teacher)`` (``c_teacher``:
  the teacher's own tokens of the same image, so the target does not drift as the student's
  codebook moves);
* loss ``cd_weight * lambda * ||f_theta(x_{t_n}, t_n, c) - sg f_theta(x^_{t_{n-1}}, t_{n-1}, sg c)||^2``
  (mean over elements) with ``lambda = 1 / (t_n - t_{n-1}) = N``, the step-size weighting of
  improved consistency training (iCT, Song & Dhariwal 2023, arXiv 2310.14189; the difference of
  two consistency evaluations one grid step apart shrinks with the step, so without it the term
  vanishes next to the pixel loss); the target network is the **stop-gradient of the online
  network** (EMA decay 0, as iCT) instead of CD/LCM's EMA target -- no second copy of the
  denoiser in the state, and
  ``train.tokenizer --ema`` still averages the exported weights. No guidance in the teacher ODE (a
  reconstruction decoder has no CFG); squared L2 (LCM uses Huber, iCT pseudo-Huber).

**Pixel losses through the sampler.** Each stage-B step also draws ``k`` from ``pixel_steps``
(default ``[1, 2]``), runs the ``k``-step consistency sampler (Song et al. 2023, Alg. 1: ``z =
f(eps, 1)``; for each later grid time ``t``: ``z = f((1 - t) z + t eps', t)`` with fresh noise
``eps'``) *with* gradient, decodes ``z`` through the frozen KL decoder (weights are buffers: no
update, but the gradient flows through it) and adds ``pixel_weight * MSE(pixels, image)``.
``forward`` returns these pixels as ``recon`` (with gradient), so ``train.tokenizer
--perceptual-weight / --disc-weight`` add LPIPS / GAN on them too. The gradient reaches the
denoiser, the encoder (straight-through estimator) and -- with ``st_codebook_grad`` (default)
-- the selected codebook vectors.

**The frozen KL autoencoder is inside the checkpoint**
(:class:`tokenizers_vis.latent_vae.LatentVAE`, shared with COMiT): its weights are persistent
buffers, so ``model.safetensors`` is self-contained and loads offline, a retrained ``kl-tiny``
cannot silently change a trained Layton, and the optimiser never sees them. The tiny factory
copies ``tokenizer/kl-tiny:shapes`` in when it builds a fresh model; loading a checkpoint
restores them from the file. (Referencing the KL by name would keep the file ~3 MB smaller but
make it depend on ``weights/`` staying unchanged.) Paper configs build an SD-style
``diffusers.AutoencoderKL`` from its config (nothing downloaded; ``load_vae_weights`` reads a
local diffusers safetensors file).

Deviations from the paper (besides the [assume] items above):

* the decoder is a DiT trained from scratch (tiny) / built from config (paper), not the
  pretrained LDM UNet; flow matching instead of the LDM's DDPM noise schedule, so stage B is
  consistency distillation of a rectified-flow teacher rather than LCM's DDIM-solver CD;
* ``st_codebook_grad`` [assume]: the decoder input is ``z_q + (c - sg c)`` (``c`` the selected
  code vectors): the same value as the straight-through output, but the decoder's gradient also
  reaches the codebook directly, not only through the VQ codebook term -- so the stage-B pixel
  loss trains the codebook, as the paper's "pixel-level supervision" of the tokenizer implies;
* pixel loss: MSE here; LPIPS / GAN come from ``train.tokenizer``'s flags.

Training (tiny, Shapes 64 px; ``train_recon=false`` skips stage A's logging-only KL decode, ~40% of
its step; stage B is ~2x dearer per image, hence the smaller batch)::

    python -m train.tokenizer --model tokenizer/layton-tiny --set stage=diffusion --set train_recon=false \
        --out runs/layton-a --steps 1200 --batch-size 64
    python -m train.tokenizer --model tokenizer/layton-tiny --set stage=consistency \
        --set teacher=runs/layton-a/final --init runs/layton-a/final --out runs/layton-b --steps 500 --batch-size 32
    python -m eval.decoder_steps --tokenizer A=runs/layton-a/final --tokenizer B=runs/layton-b/final --steps 1,2,25

Tokens: ``discrete/sequence`` of ``num_tokens`` ids in ``[0, codebook_size)`` (not ``ordered``:
no prefix is trained to decode). Reconstructions are regenerations from few tokens, so
``semantic_reconstruction = True`` (``train.tokenizer`` adds Shapes attribute agreement).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from generators import flow
from generators.latent_norm import LatentNorm
from generators.transformer import Transformer
from tokenizers_vis.base import Tokenizer
from tokenizers_vis.latent_vae import SD_VAE, LatentVAE, load_shipped_vae
from tokenizers_vis.quantizers.vq import VectorQuantizer
from zoo.registry import register
from zoo.tokens import Tokens, TokenSpec

PAPER = ("Layton, Xie et al. 2025 (arXiv 2503.08377), abstract / §1 (no reference code); consistency "
         "distillation: Song et al. 2023 (arXiv 2303.01469) Alg. 1-2, LCM (Luo et al. 2023, arXiv 2310.04378)")
STAGES = ("diffusion", "consistency")
SAMPLERS = ("euler", "consistency")


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, (H/p)(W/p), C·p·p)`` row-major patches."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x: torch.Tensor, p: int, C: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    B = x.shape[0]
    x = x.reshape(B, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, H, W)


def grid_positions(side: int, extra: int, device=None) -> torch.Tensor:
    """2D RoPE positions: ``side x side`` patches at (row, col), then ``extra`` tokens at (-1, -1)
    (unrotated, see ``generators.transformer``)."""
    idx = torch.arange(side * side, device=device)
    pos = torch.stack((idx // side, idx % side), -1)
    return torch.cat((pos, pos.new_full((extra, 2), -1)))


class _Frozen:
    """Holds a frozen module outside the owner's ``parameters()`` / ``state_dict()`` / ``.to()``."""

    def __init__(self, module: nn.Module | None = None):
        self.module = module


class Layton(Tokenizer):
    """Layton tokenizer: images ``(B, 3, S, S)`` in [-1, 1] <-> ``num_tokens`` VQ ids (module docstring).

    Args:
        image_size, patch_size: encoder input and its pixel patches.
        num_tokens: latent queries = tokens per image (paper: 256 at 1024 px).
        enc_dim, enc_depth, enc_heads: the encoder ViT.
        codebook_size, code_dim, beta: the l2-normalised VQ (``VectorQuantizer``); ``vq_options``:
            further ``VectorQuantizer`` keyword arguments (e.g. ``restart_threshold``).
        st_codebook_grad: let the decoder's gradient reach the selected codes (module docstring).
        vae, vae_config: the frozen KL autoencoder (``tokenizers_vis.latent_vae.LatentVAE``:
            ``"tokenizer/kl-*"`` or ``"diffusers:sd"``).
        latent_norm: ``"channel"`` (per-channel standardisation of the KL latent, fitted on the
            first training batch) or ``"none"``.
        latent_patch: patch side on the KL latent grid for the denoiser.
        dec_dim, dec_depth, dec_heads: the denoiser (DiT with in-context token conditioning).
        ffn_multiple: SwiGLU hidden width rounding for both transformers.
        stage: ``"diffusion"`` (stage A) or ``"consistency"`` (stage B).
        t_mean, t_std: logit-normal flow times of stage A.
        sample_steps: Euler steps of the many-step (stage A) decoder.
        consistency_steps: steps of the consistency decoder (stage B).
        time_shift: SD3 shift of the sampling time grids (1 = uniform).
        teacher: stage B: the stage-A checkpoint (folder, or ``name:tag``) distilled from.
        cd_intervals, cd_weight: consistency distillation grid ``N`` and loss weight.
        pixel_steps, pixel_weight: sampler step counts drawn for the pixel loss, and its weight.
        train_recon: stage A: ``forward`` also returns the decoded one-step estimate (one KL decode
            per step, ~40% of a tiny CPU step; ``False``: ``recon`` is ``None``, for speed).
        sample_seed: noise seed of ``decode`` when no generator is given (deterministic decodes).
    """

    semantic_reconstruction = True  # decode regenerates from few tokens (train/tokenizer.py)

    def __init__(self, image_size: int = 64, patch_size: int = 8, num_tokens: int = 32,
                 enc_dim: int = 64, enc_depth: int = 2, enc_heads: int = 4,
                 codebook_size: int = 1024, code_dim: int = 8, beta: float = 0.25, vq_options: dict | None = None,
                 st_codebook_grad: bool = True, vae: str = "tokenizer/kl-tiny", vae_config: dict | None = None,
                 latent_norm: str = "channel", latent_patch: int = 1, dec_dim: int = 64, dec_depth: int = 4,
                 dec_heads: int = 4, ffn_multiple: int = 32, stage: str = "diffusion",
                 t_mean: float = 0.0, t_std: float = 1.0, sample_steps: int = 25, consistency_steps: int = 2,
                 time_shift: float = 1.0, teacher: str = "", cd_intervals: int = 10, cd_weight: float = 1.0,
                 pixel_steps: list = (1, 2), pixel_weight: float = 1.0, train_recon: bool = True,
                 sample_seed: int = 0):
        super().__init__()
        pixel_steps = [int(k) for k in pixel_steps]
        if self.config.get("pixel_steps") is not None:
            self._zoo_config["pixel_steps"] = pixel_steps  # a JSON list in the saved config
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if not pixel_steps or min(pixel_steps) < 1 or sample_steps < 1 or consistency_steps < 1 or cd_intervals < 1:
            raise ValueError(f"need pixel_steps >= 1 (non-empty), sample_steps, consistency_steps, cd_intervals >= 1; "
                             f"got {pixel_steps}, {sample_steps}, {consistency_steps}, {cd_intervals}")
        self.image_size, self.patch_size = int(image_size), int(patch_size)
        self.grid = self.image_size // self.patch_size
        self.num_patches = self.grid * self.grid
        self.num_tokens = int(num_tokens)
        self.stage, self.st_codebook_grad = stage, bool(st_codebook_grad)
        self.t_mean, self.t_std, self.time_shift = float(t_mean), float(t_std), float(time_shift)
        self.sample_steps, self.consistency_steps = int(sample_steps), int(consistency_steps)
        self.cd_intervals, self.cd_weight = int(cd_intervals), float(cd_weight)
        self.pixel_steps, self.pixel_weight = pixel_steps, float(pixel_weight)
        self.train_recon = bool(train_recon)
        self.sample_seed = int(sample_seed)
        self.teacher = str(teacher or "")

        # frozen KL autoencoder (weights as buffers) and the standardisation of its latent
        self.vae = LatentVAE(vae, vae_config)
        f = self.vae.factor
        if self.image_size % f:
            raise ValueError(f"image_size {image_size} is not divisible by the VAE's factor {f}")
        self.latent_size, self.latent_channels = self.image_size // f, self.vae.channels
        if self.latent_size % latent_patch:
            raise ValueError(f"latent side {self.latent_size} is not divisible by latent_patch {latent_patch}")
        self.latent_patch = int(latent_patch)
        self.latent_grid = self.latent_size // self.latent_patch
        self.latent_norm = LatentNorm(self.latent_channels, latent_norm)
        self._norm_fitted = False  # python copy of latent_norm.fitted (no device sync once set)

        # encoder: pixel patches | latent queries -> query outputs -> VQ
        self.patch_embed = nn.Linear(3 * self.patch_size ** 2, enc_dim)
        self.queries = nn.Parameter(torch.empty(self.num_tokens, enc_dim))
        self.encoder = Transformer(enc_dim, enc_depth, enc_heads, ffn_multiple, rope="2d")
        self.to_code = nn.Linear(enc_dim, code_dim)
        self.quantizer = VectorQuantizer(codebook_size, code_dim, beta=beta, l2_norm=True, **(vq_options or {}))

        # denoiser: latent patches | token embeddings, adaLN-Zero on the flow time
        lp_values = self.latent_channels * self.latent_patch ** 2
        self.from_code = nn.Linear(code_dim, dec_dim)
        self.token_pos = nn.Parameter(torch.empty(self.num_tokens, dec_dim))
        self.latent_embed = nn.Linear(lp_values, dec_dim)
        self.time_embed = flow.TimestepEmbedding(dec_dim)
        self.decoder = Transformer(dec_dim, dec_depth, dec_heads, ffn_multiple, rope="2d", adaln_dim=dec_dim)
        self.to_velocity = nn.Linear(dec_dim, lp_values)

        self.spec = TokenSpec("discrete", "sequence", (self.num_tokens,), vocab_size=self.quantizer.codebook_size)
        self._teacher = _Frozen()
        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.queries, self.token_pos):
            nn.init.trunc_normal_(p, std=0.02)
        for m in (self.patch_embed, self.to_code, self.from_code, self.latent_embed):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        nn.init.zeros_(self.to_velocity.weight)  # DiT: the output layer starts at zero
        nn.init.zeros_(self.to_velocity.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen
        return self

    @property
    def device(self) -> torch.device:
        return self.queries.device

    # ---- the KL latent space ------------------------------------------------------------------
    @torch.no_grad()
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> the standardised KL latent ``(B, C, h, w)`` the denoiser works on. The first
        training call fits the per-channel statistics (``latent_norm``) on that batch."""
        z = self.vae.encode(images.to(self.device)).float()
        if self.latent_norm.mode != "none" and not self._norm_fitted:
            if bool(self.latent_norm.fitted):
                self._norm_fitted = True
            elif self.training:
                self.latent_norm.fit(z.movedim(1, -1))
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    for b in (self.latent_norm.mean, self.latent_norm.std):
                        torch.distributed.broadcast(b, 0)  # every rank uses rank 0's statistics
                self._norm_fitted = True
        return self.latent_norm.normalize(z.movedim(1, -1)).movedim(-1, 1)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised latent -> pixels through the frozen KL decoder (differentiable in ``z``)."""
        z = self.latent_norm.denormalize(z.movedim(1, -1)).movedim(-1, 1)
        return self.vae.decode(z)

    # ---- encoder + quantizer ------------------------------------------------------------------
    def encoder_forward(self, images: torch.Tensor) -> torch.Tensor:
        """The latent queries' outputs ``(B, N, enc_dim)`` (patch outputs are dropped, TiTok)."""
        B = images.shape[0]
        x = torch.cat((self.patch_embed(patchify(images, self.patch_size)),
                       self.queries.to(images.dtype).expand(B, -1, -1)), 1)
        h = self.encoder(x, grid_positions(self.grid, self.num_tokens, x.device))
        return h[:, self.num_patches:]

    def quantize(self, images: torch.Tensor):
        """Images -> ``(codes (B, N, code_dim) for the decoder, ids (B, N), VQ losses)``."""
        z = self.to_code(self.encoder_forward(images))                 # (B, N, D)
        z_q, ids, losses = self.quantizer(z.transpose(1, 2).unsqueeze(-1))
        z_q, ids = z_q.squeeze(-1).transpose(1, 2), ids.squeeze(-1)
        if self.st_codebook_grad:
            c = F.embedding(ids, self.quantizer.codebook()).to(z_q.dtype)
            z_q = z_q + (c - c.detach())  # same value; the decoder's gradient also reaches the codes
        return z_q, ids, losses

    def codes_from_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, N)`` -> code vectors ``(B, N, code_dim)``."""
        return self.quantizer.lookup(ids.unsqueeze(-1)).squeeze(-1).transpose(1, 2)

    def condition(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors -> the denoiser's in-context token embeddings ``(B, N, dec_dim)``."""
        return self.from_code(codes.to(self.from_code.weight.dtype)) + self.token_pos

    # ---- denoiser -----------------------------------------------------------------------------
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Predicted flow velocity ``(B, C, h, w)`` of the standardised latent ``x_t`` at times ``t (B,)``."""
        B, C, h, w = x_t.shape
        x = torch.cat((self.latent_embed(patchify(x_t, self.latent_patch).to(cond.dtype)), cond), 1)
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
        t = t.expand(B) if t.dim() == 0 else t
        out = self.decoder(x, grid_positions(self.latent_grid, cond.shape[1], x.device), cond=self.time_embed(t))
        return unpatchify(self.to_velocity(out[:, :self.latent_grid ** 2]), self.latent_patch, C, h, w)

    def consistency_function(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``f(x_t, t) = x_t - t v(x_t, t)`` (``flow.predict_x0``): ``f(x, 0) = x`` exactly."""
        return flow.predict_x0(x_t, self.velocity(x_t, t, cond), t)

    def _times(self, steps: int) -> list[float]:
        return [float(t) for t in flow.time_grid(steps, shift=self.time_shift)]

    def consistency_sample(self, cond: torch.Tensor, noise: torch.Tensor, steps: int,
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """Multistep consistency sampling (Song et al. 2023, Alg. 1) from ``noise`` at ``t = 1``:
        ``steps`` denoiser calls at the first ``steps`` times of the grid; between calls the
        estimate is re-noised to the next time with fresh noise from ``generator``. Keeps the
        autograd graph (the stage-B pixel loss back-propagates through it)."""
        ts = self._times(steps)[:-1]
        B = noise.shape[0]
        x, z = noise, None
        for i, t in enumerate(ts):
            if i:
                eps = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
                x = flow.interpolate(z, eps, t)
            z = self.consistency_function(x, torch.full((B,), t, device=x.device, dtype=x.dtype), cond)
        return z

    @torch.no_grad()
    def sample_latents(self, cond: torch.Tensor, *, steps: int | None = None, sampler: str | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Token embeddings -> standardised latents: ``"euler"`` (probability-flow ODE, the stage-A
        decoder; default ``sample_steps``) or ``"consistency"`` (default ``consistency_steps``)."""
        sampler = sampler or ("euler" if self.stage == "diffusion" else "consistency")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if steps is None:
            steps = self.sample_steps if sampler == "euler" else self.consistency_steps
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        B = cond.shape[0]
        if generator is None:
            generator = torch.Generator(cond.device).manual_seed(self.sample_seed)
        L, C = self.latent_size, self.latent_channels
        noise = torch.randn((B, C, L, L), generator=generator, device=cond.device, dtype=cond.dtype)
        if sampler == "consistency":
            return self.consistency_sample(cond, noise, int(steps), generator)

        def velocity_fn(x, t, i):
            return self.velocity(x, torch.full((B,), t, device=x.device, dtype=x.dtype), cond)

        return flow.sample(velocity_fn, noise, num_steps=int(steps), shift=self.time_shift)

    # ---- Tokenizer interface ------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> Tokens:
        _, ids, _ = self.quantize(images)
        return Tokens(ids, self.spec, validate=False)

    @torch.no_grad()
    def decode(self, tokens: Tokens, steps: int | None = None, *, sampler: str | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Tokens -> images ``(B, 3, S, S)`` clamped to [-1, 1]. Stage A: ``steps`` (default
        ``sample_steps``) Euler steps; stage B: ``steps`` (default ``consistency_steps``, 1-2)
        consistency steps; ``sampler`` overrides the kind. Noise from ``generator`` (default:
        seeded with ``sample_seed``, so a decode is a function of the tokens)."""
        ids = self.check_tokens(tokens).data.to(self.device)
        cond = self.condition(self.codes_from_ids(ids))
        z = self.sample_latents(cond, steps=steps, sampler=sampler, generator=generator)
        return self.decode_latents(z).clamp(-1, 1)

    # ---- training -----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor):
        """One training step of the current ``stage``: ``(recon, losses)`` (module docstring).

        Stage A: ``loss = flow + vq``; ``recon`` = the one-step data estimate ``x_t - t v`` through
        the KL decoder, **without** gradient (no pixel path is trained in stage A; ``None`` with
        ``train_recon=False``).
        Stage B: ``loss = cd_weight·consistency + pixel_weight·pixel + vq``; ``recon`` = the
        few-step decode **with** gradient (``train.tokenizer``'s LPIPS / GAN terms act on it).
        """
        images = self.check_images(images)
        x0 = self.latents(images)
        codes, _, q = self.quantize(images)
        cond = self.condition(codes)
        losses = {"vq": q["loss"].detach(), "usage": q["usage"]}
        if self.stage == "diffusion":
            fm, x0_hat = self.flow_loss(x0, cond, return_estimate=True)
            losses.update(loss=fm + q["loss"], flow=fm.detach())
            if not self.train_recon:
                return None, losses
            with torch.no_grad():
                return self.decode_latents(x0_hat.detach()), losses
        cd = self.consistency_loss(images, x0, cond)
        pix, recon = self.pixel_loss(images, cond)
        losses.update(loss=self.cd_weight * cd + self.pixel_weight * pix + q["loss"],
                      consistency=cd.detach(), pixel=pix.detach())
        return recon, losses

    def flow_loss(self, x0: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor | None = None,
                  t: torch.Tensor | None = None, return_estimate: bool = False):
        """Stage A: ``||v(x_t, t, c) - (eps - x0)||^2`` at logit-normal ``t`` (with
        ``return_estimate``, also the one-step data estimate ``x_t - t v``)."""
        B = x0.shape[0]
        noise = torch.randn_like(x0) if noise is None else noise
        t = flow.sample_logit_normal(B, self.t_mean, self.t_std, device=x0.device) if t is None else t
        x_t = flow.interpolate(x0, noise, t)
        v = self.velocity(x_t, t, cond)
        loss = F.mse_loss(v.float(), flow.velocity_target(x0, noise).float())
        return (loss, flow.predict_x0(x_t, v, t)) if return_estimate else loss

    # -- stage B
    def set_teacher(self, model: "Layton") -> None:
        """Use ``model`` (a stage-A Layton, e.g. a copy of this one before stage B) as the frozen
        teacher; it is kept outside this module's parameters and state dict."""
        if not isinstance(model, Layton) or model.stage != "diffusion":
            got = f"a Layton at stage {model.stage!r}" if isinstance(model, Layton) else type(model).__name__
            raise ValueError(f"the teacher must be a stage-A (stage='diffusion') Layton, got {got}")
        if (model.latent_size, model.latent_channels, model.vae.spec) != (self.latent_size, self.latent_channels,
                                                                          self.vae.spec):
            raise ValueError("the teacher works in another latent space (VAE or latent size differ)")
        self._teacher.module = model.eval().requires_grad_(False)

    @property
    def teacher_model(self) -> "Layton":
        """The frozen stage-A teacher, built on first use from ``teacher`` (a checkpoint folder or a
        registry ``name:tag``)."""
        if self._teacher.module is None:
            if not self.teacher:
                raise ValueError("stage='consistency' distils a frozen stage-A model: pass --set teacher=DIR "
                                 "(the stage-A checkpoint folder, usually the same as --init)")
            if Path(self.teacher).is_dir():
                from zoo.checkpoint import load_pretrained

                model = load_pretrained(self.teacher)
            else:
                import zoo

                model = zoo.create(self.teacher)
            self.set_teacher(model)
        return self._teacher.module

    def _teacher_on(self, device) -> "Layton":
        t = self.teacher_model
        if t.device != device:
            t.to(device)
        if self.latent_norm.mode != "none" and not torch.allclose(t.latent_norm.mean.to(device), self.latent_norm.mean):
            raise ValueError("the teacher standardises the KL latent differently (initialise stage B from the "
                             "teacher's checkpoint with --init)")
        return t

    def consistency_loss(self, images: torch.Tensor, x0: torch.Tensor, cond: torch.Tensor,
                         noise: torch.Tensor | None = None, n: torch.Tensor | None = None) -> torch.Tensor:
        """Consistency distillation (module docstring): ``N ||f(x_{t_n}, t_n, c) - sg f(x^_{t_{n-1}},
        t_{n-1}, sg c)||^2`` with ``x^`` one Euler step of the frozen teacher's ODE."""
        B, N = x0.shape[0], self.cd_intervals
        teacher = self._teacher_on(x0.device)
        noise = torch.randn_like(x0) if noise is None else noise
        n = torch.randint(1, N + 1, (B,), device=x0.device) if n is None else n
        t_hi, t_lo = n.to(x0.dtype) / N, (n - 1).to(x0.dtype) / N
        x_hi = flow.interpolate(x0, noise, t_hi)
        with torch.no_grad():
            t_cond = teacher.condition(teacher.quantize(images)[0])
            v_teacher = teacher.velocity(x_hi, t_hi, t_cond)
            x_lo = x_hi + (t_lo - t_hi).view(B, 1, 1, 1) * v_teacher
            target = self.consistency_function(x_lo, t_lo, cond.detach())  # target network = sg(online)
        pred = self.consistency_function(x_hi, t_hi, cond)
        return N * F.mse_loss(pred.float(), target.float())  # lambda = 1 / (t_n - t_{n-1})

    def pixel_loss(self, images: torch.Tensor, cond: torch.Tensor, steps: int | None = None,
                   generator: torch.Generator | None = None):
        """``(MSE(pixels, images), pixels)`` with ``pixels`` = the frozen KL decoder applied to the
        ``steps``-step consistency sample (default: drawn from ``pixel_steps``); both with gradient."""
        if steps is None:
            steps = self.pixel_steps[int(torch.randint(len(self.pixel_steps), ()))]
        B, L, C = images.shape[0], self.latent_size, self.latent_channels
        noise = torch.randn((B, C, L, L), generator=generator, device=images.device, dtype=cond.dtype)
        z = self.consistency_sample(cond, noise, int(steps), generator)
        recon = self.decode_latents(z)
        return F.mse_loss(recon.float(), images.float()), recon

    # ---- paper VAE weights --------------------------------------------------------------------
    def load_vae_weights(self, source) -> None:
        """Copy frozen KL weights in, strictly (:meth:`LatentVAE.load_weights`: a module with the
        same state-dict names, or a local ``.safetensors`` file)."""
        self.vae.load_weights(source)


# Shapes 64x64 -> kl-tiny 8x8x8 latent (f8); 8-px pixel patches (64) + 32 latent queries; VQ 1024 x 8
# (l2; k-means init + dead-code restart as seed-tiny: after 30 steps without them 25 codes were in use);
# encoder 2 x 64 wide, denoiser 4 x 64 wide over the 64 latent cells + 32 token slots. Sized so
# that the fp32 checkpoint with the embedded kl-tiny (2.9 MB of its 4.8 MB) stays under 5 MB.
TINY = dict(image_size=64, patch_size=8, num_tokens=32, enc_dim=64, enc_depth=2, enc_heads=4,
            codebook_size=1024, code_dim=8,
            vq_options={"kmeans_init": True, "restart_threshold": 0.03, "restart_every": 50},
            vae="tokenizer/kl-tiny", latent_norm="channel", latent_patch=1,
            dec_dim=64, dec_depth=4, dec_heads=4, ffn_multiple=32, sample_steps=25, consistency_steps=2,
            cd_intervals=10, pixel_steps=[1, 2])
TINY_VAE_WEIGHTS = "tokenizer/kl-tiny:shapes"
# Paper: 1024 px -> 256 tokens. [assume] everything the abstract does not state: SDXL-style f8
# AutoencoderKL (4 channels, 128x128 latent), DiT-XL-sized denoiser on 2x2 latent patches (4,096
# cells), ViT-L encoder on 32-px patches (1,024 patches), VQ 16384 x 8 (LlamaGen), LCM's 50-interval
# skipping-step grid.
PAPER_CFG = dict(image_size=1024, patch_size=32, num_tokens=256, enc_dim=1024, enc_depth=24, enc_heads=16,
                 codebook_size=16384, code_dim=8, vae="diffusers:sd", vae_config=dict(SD_VAE), latent_norm="channel",
                 latent_patch=2, dec_dim=1152, dec_depth=28, dec_heads=16, ffn_multiple=256, sample_steps=50,
                 consistency_steps=2, cd_intervals=50, pixel_steps=[1, 2])


@register("tokenizer/layton-tiny", paper=PAPER, weights={"shapes": "weights/tokenizer-layton-tiny"})
def layton_tiny(**overrides):
    """Tiny Layton for Shapes 64x64: 32 VQ ids (1,024 codes), flow / consistency DiT decoder on kl-tiny latents."""
    return load_shipped_vae(Layton(**{**TINY, **overrides}), TINY_VAE_WEIGHTS)


@register("tokenizer/layton", paper=PAPER)
def layton(**overrides):
    """Layton (paper scale, sizes [assume]): 1024 px -> 256 VQ ids, latent consistency decoder on an SD-style VAE."""
    return Layton(**{**PAPER_CFG, **overrides})


__all__ = ["Layton", "grid_positions", "patchify", "unpatchify"]
