"""COMiT: recurrent crop-by-crop message tokenizer with a flow-matching decoder (``tokenizer/comit-*``).

Davtyan et al. 2026, "Communication-Inspired Tokenization for Structured Image Representations"
(COMiT, arXiv 2602.20731); reference code Araachie/comit (``comit/comit.py``: ``tokenize``,
``detokenize``, ``prepare_crops``; ``components/predictor/dit.py``: ``RuledDiT``). Written from
that description, not copied.

**One predictor encodes and decodes.** A DiT (:class:`MessageDiT`) works in the latent space of a
frozen KL autoencoder and reads one sequence ``[offset token, image-latent patches, message
tokens, (N update queries)]``:

* *encoding* (:meth:`COMiT.tokenize`): the message starts as the **prior code** ``K // 2`` at
  every one of its ``N`` positions. The image is cut into a 3x3 grid of overlapping crops (paper:
  96x96 px crops at stride 80 on 256 px = 12-cell crops at stride 10 on the 32x32 SD latent;
  tiny: 4-cell crops at stride 2 on the 8x8 latent of ``tokenizer/kl-tiny``, i.e. 32 px at stride
  16). For each crop in the chosen order the predictor gets the crop's latent as the clean input
  at **t = 1**, the current message and the **offset from the previous crop** (normalised crop
  centres in [-1, 1]; the first offset is 0), and its N query tokens output a message update
  that is FSQ-quantised and **replaces** the message (length N after every crop; nothing is
  appended). The decode offset is ``global centre (0, 0) - last crop centre``.
* *decoding* (:meth:`COMiT.decode`): flow matching from Gaussian noise at **t = 0** to data at
  **t = 1** (``x_t = t x + (1 - t) eps``, velocity ``x - eps``), Euler steps, the predictor's
  image tokens giving the velocity, conditioned on the message and the decode offset. Guidance is
  APG (adaptive projected guidance, Sadat et al. 2024) with the **empty (prior) message** as the
  unconditional input: norm threshold 2.5, eta 0, momentum -0.5 (the reference's defaults).

Order of the crops (``order=``): ``"raster"`` (0..8), ``"random"`` (a per-image permutation
from a seeded generator) or ``"adaptive"`` (the reference's greedy policy: start with the centre
crop; after each crop decode a one-step Euler reconstruction (no guidance) of the current
message, take the squared pixel error summed over channels, average-pool it over the crop
windows (:func:`adaptive_next_crop`) and observe next the unused crop with the largest error),
or an explicit list of crop indices (shared, or one row per image).

Tokens: a sequence of N discrete ids into the ``prod(levels)`` FSQ codes (paper: 256 x
[8,8,8,5,5,5] = 64,000 codes). Not ``ordered`` (the update queries attend causally to each
other, but no prefix of the message is trained to decode on its own). The decode offset is not
part of the tokens: ``decode(tokens)`` uses the offset of the default encoding (raster, all 9
crops: ``-centre(crop 8)``); pass ``offset=`` (from :meth:`tokenize`) for other orders or
fewer crops. ``tokenize(..., history=True)`` returns the message after every crop (for
reconstruction vs. crops seen, ``eval/comit_crops.py``).

Training (:meth:`COMiT.forward`; the reference release has no training code, so the recipe is the
paper's description plus [assume] choices): per batch a number of crops ``k`` uniform in
``[min_crops, max_crops]``, per image a random crop order; the k recurrent encoding steps are
back-propagated through (FSQ round-STE, optional per-sample ``drop_quant_p`` as in the FlexTok
FSQ the reference copies); the final message is replaced by the prior message with probability
``cond_dropout`` (for guidance); loss = flow-matching velocity MSE on the (scaled) KL latents of
the whole image at ``t ~ U(0, 1)`` + ``repa_weight`` x REPA-style alignment (``1 - cos``) of an
MLP projection of the predictor's image tokens after block ``repr_layer`` to the frozen teacher's
patch features of the image (tiny: ``eval/shapes-net:shapes``, the project's Shapes feature
network, 128 x 8 x 8; paper: DINOv2 [assume], the digest's reading of "semantic representation
alignment"). FSQ has no codebook loss. ``recon`` is the one-step clean-latent estimate
``x_t + (1 - t) v`` decoded by the VAE, without gradient.

Flow convention. ``generators/flow.py`` uses the opposite time (``s = 0`` data, ``s = 1``
noise, velocity ``eps - x``). Here ``s = 1 - t`` and ``v_flow = -v_comit``: training uses
``flow.interpolate(x, eps, 1 - t)`` (:func:`comit_interpolate`), sampling runs
``flow.euler_sample`` over ``flow.time_grid`` (s from 1 to 0 = t from 0 to 1) with the velocity
function returning ``-v``; APG is odd in its inputs (``apg(-c, -u) = -apg(c, u)``), so guiding
before the sign flip is exact.

The frozen VAE is **inside** the checkpoint: its weights are registered as buffers of
``self.vae`` (:class:`tokenizers_vis.latent_vae.LatentVAE`, shared with Layton), so
``model.safetensors`` is self-contained (loads offline with no other checkpoint; a retrained
``kl-tiny`` cannot silently change it), the optimiser never sees them, and ``parameters()``
counts the predictor (+ REPA projector) only -- the quantity the paper's 174M / 610M / 900M are
(the reference's ``RuledDiT`` alone). The tiny factory copies the shipped
``tokenizer/kl-tiny:shapes`` weights in when it builds a fresh model; loading a COMiT checkpoint
restores them from the file. Paper configs build an SD-style ``diffusers.AutoencoderKL`` from
config (nothing downloaded; :meth:`COMiT.load_vae_weights` reads a local diffusers-format
safetensors file, e.g. sd-vae-ft-ema's).

Deviations from the reference code (besides the training recipe above):

* blocks reuse ``generators.transformer.Block`` (RMSNorm, SwiGLU with hidden ~ 8/3 d, no output
  bias) instead of LayerNorm + GELU MLP (ratio 4): the same parameter count to within ~1%. As in
  the reference, image tokens and message tokens have separate adaLN-Zero maps of the time
  embedding (:class:`StreamBlock` adds the message map) and the offset token is unmodulated and
  ungated;
* the reference's offset-prediction head (``c_final_layer``, unused at inference) is omitted;
  the REPA projector is a 2-layer MLP (d -> d -> teacher dim) [assume: training code not released];
* FSQ token corruption (``corrupt_tokens_p``) is not implemented; ``drop_quant_p`` is;
* the ODE is integrated with fixed-step Euler (the reference's torchdiffeq default); the
  reference's ``odeint_adjoint`` and its optional global crop (``global_crop=True``) are not
  reproduced;
* APG momentum is applied here (``flow.apg`` has none): the running difference
  ``d <- (c - u) + momentum * d`` is passed to ``flow.apg`` as ``uncond = c - d``;
* ``guidance = 1`` means no guidance (one predictor call per step; the reference's
  ``cfg_weight = 0`` fast path, whose output equals guidance 1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from generators import flow
from tokenizers_vis.base import Tokenizer
from tokenizers_vis.comit_predictor import MessageDiT, StreamBlock
from tokenizers_vis.latent_vae import SD_SCALE, LatentVAE, load_shipped_vae
from tokenizers_vis.quantizers.fsq import FSQ, round_ste
from tokenizers_vis.teacher import TeacherSlot
from zoo.registry import register
from zoo.tokens import Tokens, TokenSpec

PAPER = ("COMiT, Davtyan et al. 2026 (arXiv 2602.20731); reference Araachie/comit (comit.py tokenize / "
         "detokenize, predictor/dit.py RuledDiT)")
ORDERS = ("raster", "random", "adaptive")
GRID = 3  # crops per side
CENTRE_CROP = 4  # the adaptive policy starts here (reference prepare_crops, global_crop=False)


# ---- the flow path in COMiT's time (t = 0 noise, t = 1 data) --------------------------------

def comit_interpolate(x: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """``x_t = t x + (1 - t) eps`` (t = 0: noise, t = 1: data) = ``flow.interpolate`` at ``s = 1 - t``."""
    t = t if not isinstance(t, torch.Tensor) else t.to(x.dtype)
    return flow.interpolate(x, noise, 1 - t)


def comit_velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``d x_t / dt = x - eps`` (= ``-flow.velocity_target``)."""
    return -flow.velocity_target(x, noise)


# ---- crops ---------------------------------------------------------------------------------

def crop_centres(latent_size: int, crop: int, stride: int) -> torch.Tensor:
    """Normalised (x, y) centres in [-1, 1] of the 3x3 crops, raster order (9, 2) (reference
    ``prepare_crops``: ``(left + size / 2) / (S / 2) - 1``, x first)."""
    half = latent_size / 2
    out = [((c * stride + crop / 2) / half - 1, (r * stride + crop / 2) / half - 1)
           for r in range(GRID) for c in range(GRID)]
    return torch.tensor(out, dtype=torch.float32)


def adaptive_next_crop(error: torch.Tensor, used: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """The reference's adaptive policy: ``error`` (B, H, W) squared error map, ``used`` (B, 9) bool
    -> (B,) index of the unused crop whose ``window``-sized window (at ``stride``) has the largest
    mean error (average pooling over the 3x3 crop windows, used crops excluded)."""
    scores = F.avg_pool2d(error.float().unsqueeze(1), window, stride).flatten(1)  # (B, 9)
    if scores.shape[1] != GRID * GRID:
        raise ValueError(f"error map {tuple(error.shape[-2:])} with window {window} / stride {stride} "
                         f"gives {scores.shape[1]} windows, not {GRID * GRID}")
    return scores.masked_fill(used, float("-inf")).argmax(1)


# ---- the tokenizer -----------------------------------------------------------------------------

class COMiT(Tokenizer):
    """COMiT tokenizer: images (B, 3, S, S) <-> N FSQ ids; see the module docstring.

    Args:
        image_size: S.
        vae, vae_config: the frozen autoencoder (:class:`tokenizers_vis.latent_vae.LatentVAE`).
        latent_scale, latent_shift: the predictor sees ``(z - shift) * scale`` of the VAE latent
            ``z`` (SD: 0.18215; kl-tiny latents measured std 1.06 on Shapes: 1.0).
        crop, stride: crop side and stride on the latent grid; ``2 * stride + crop`` must equal
            the latent side (3x3 crops).
        crop_space: ``"pixel"`` (the reference: each ``crop * f`` px crop is VAE-encoded on its
            own) or ``"latent"`` (crops of the whole image's latent: one VAE pass).
        num_tokens, levels: message length N and FSQ levels per token (paper 256, [8,8,8,5,5,5]).
        dim, depth, heads, ffn_hidden, patch_size, qkv_bias: the predictor (:class:`MessageDiT`).
        teacher, teacher_dim, repr_layer, repa_weight: REPA-style alignment of the image tokens
            after block ``repr_layer`` (0-based) to the teacher's patch features
            (``tokenizers_vis.teacher``; ``"none"`` or weight 0: off).
        cond_dropout: probability of training the decoder on the prior (empty) message.
        drop_quant_p: per-sample probability of skipping FSQ rounding in training (FlexTok FSQ).
        min_crops, max_crops: range of the number of crops observed per training batch.
        sample_steps, guidance, apg_norm_threshold, apg_eta, apg_momentum: decoding defaults
            (``guidance`` 1 = none).
        sample_seed: seeds the decode noise and the random / adaptive orders when no generator
            is given (deterministic decodes).

    Built directly, the VAE has random weights: ``zoo.create("tokenizer/comit-tiny")`` copies the
    shipped kl-tiny weights in, :meth:`load_vae_weights` loads others, a checkpoint restores its own.
    """

    semantic_reconstruction = True  # decode re-generates from a message (train/tokenizer.py)

    def __init__(self, image_size: int = 64, vae: str = "tokenizer/kl-tiny", vae_config: dict | None = None,
                 latent_scale: float = 1.0, latent_shift: float = 0.0, crop: int = 4, stride: int = 2,
                 crop_space: str = "latent", num_tokens: int = 16, levels: list = (4, 4, 4, 3, 3, 3),
                 dim: int = 96, depth: int = 4, heads: int = 4, ffn_hidden: int | None = None,
                 patch_size: int = 1, qkv_bias: bool = True, teacher: str = "eval/shapes-net:shapes",
                 teacher_dim: int = 128, repr_layer: int = 1, repa_weight: float = 0.5,
                 cond_dropout: float = 0.1, drop_quant_p: float = 0.0, min_crops: int = 1, max_crops: int = 9,
                 sample_steps: int = 25, guidance: float = 1.0, apg_norm_threshold: float = 2.5,
                 apg_eta: float = 0.0, apg_momentum: float = -0.5, sample_seed: int = 0):
        super().__init__()
        if crop_space not in ("pixel", "latent"):
            raise ValueError(f"crop_space must be 'pixel' or 'latent', got {crop_space!r}")
        if not 1 <= min_crops <= max_crops <= GRID * GRID:
            raise ValueError(f"need 1 <= min_crops <= max_crops <= 9, got {min_crops}, {max_crops}")
        if not 0 <= repr_layer < depth:
            raise ValueError(f"repr_layer must be a block index in [0, {depth}), got {repr_layer}")
        self.image_size = int(image_size)
        self.vae = LatentVAE(vae, vae_config)
        f = self.vae.factor
        if self.image_size % f:
            raise ValueError(f"image_size {image_size} is not divisible by the VAE's factor {f}")
        self.latent_size = self.image_size // f
        if 2 * stride + crop != self.latent_size or crop % patch_size or self.latent_size % patch_size:
            raise ValueError(f"3x3 crops need 2 * stride + crop == latent side {self.latent_size} and crop, side "
                             f"divisible by patch_size {patch_size}; got crop {crop}, stride {stride}")
        self.crop, self.stride, self.crop_space = int(crop), int(stride), crop_space
        self.latent_scale, self.latent_shift = float(latent_scale), float(latent_shift)
        self.fsq = FSQ(list(levels))
        self.num_tokens = int(num_tokens)
        self.spec = TokenSpec("discrete", "sequence", (self.num_tokens,), vocab_size=self.fsq.codebook_size)
        self.predictor = MessageDiT(self.vae.channels, patch_size, dim, depth, heads, self.num_tokens,
                                    self.fsq.dim, ffn_hidden, qkv_bias)
        self.teacher = TeacherSlot(teacher)
        self.repr_layer, self.repa_weight = int(repr_layer), float(repa_weight)
        self.repa_proj = None
        if self.teacher.enabled and repa_weight > 0:
            self.repa_proj = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, teacher_dim))
        self.cond_dropout, self.drop_quant_p = float(cond_dropout), float(drop_quant_p)
        self.min_crops, self.max_crops = int(min_crops), int(max_crops)
        self.sample_steps, self.guidance = int(sample_steps), float(guidance)
        self.apg_norm_threshold, self.apg_eta, self.apg_momentum = (float(apg_norm_threshold), float(apg_eta),
                                                                    float(apg_momentum))
        self.sample_seed = int(sample_seed)
        self.register_buffer("centres", crop_centres(self.latent_size, crop, stride), persistent=False)

    # ---- plumbing ---------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen
        return self

    @property
    def prior_index(self) -> int:
        """The "prior" / empty code, ``K // 2`` (reference ``sample_prior_messages``)."""
        return self.fsq.codebook_size // 2

    def prior_message(self, batch: int, device=None) -> torch.Tensor:
        """(B, N, D) codes of the empty message: code ``K // 2`` at every position (also the
        unconditional input of guidance)."""
        ids = torch.full((batch, self.num_tokens), self.prior_index, dtype=torch.long, device=device)
        return self.fsq.indices_to_codes(ids)

    def quantize_message(self, update: torch.Tensor) -> torch.Tensor:
        """FSQ of a message update (round-STE; in training, per-sample skip with ``drop_quant_p``)."""
        if self.training and self.drop_quant_p > 0:
            bounded = self.fsq.bound(update.float())
            keep = torch.rand(update.shape[0], 1, 1, device=update.device) < self.drop_quant_p
            return torch.where(keep, bounded, round_ste(bounded)) / self.fsq._half_width
        return self.fsq.quantize(update.float())

    def _rng(self, generator, device) -> torch.Generator:
        if generator is not None:
            return generator
        return torch.Generator(device=device).manual_seed(self.sample_seed)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> the predictor's latent ``(z - shift) * scale`` (B, C, L, L)."""
        return (self.vae.encode(images) - self.latent_shift) * self.latent_scale

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.latent_scale + self.latent_shift)

    def crop_latents(self, images: torch.Tensor, full: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 9, C, crop, crop) latents of the 3x3 crops in raster order (``crop_space``)."""
        c, s = self.crop, self.stride
        if self.crop_space == "latent":
            full = self.latents(images) if full is None else full
            return torch.stack([full[:, :, r * s:r * s + c, q * s:q * s + c]
                                for r in range(GRID) for q in range(GRID)], 1)
        f = self.vae.factor
        pix = torch.stack([images[:, :, r * s * f:(r * s + c) * f, q * s * f:(q * s + c) * f]
                           for r in range(GRID) for q in range(GRID)], 1)
        B = images.shape[0]
        return self.latents(pix.flatten(0, 1)).unflatten(0, (B, GRID * GRID))

    # ---- encoding ----------------------------------------------------------------------------
    def observe(self, crop: torch.Tensor, message: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """One encoding step: the crop's latent at t = 1, the current message and the offset from
        the previous crop -> the new (FSQ-quantised) message, which replaces the old one."""
        t = torch.ones(crop.shape[0], device=crop.device)
        upd = self.predictor(crop, t, message, offset, update_message=True, velocity=False)["message"]
        return self.quantize_message(upd)

    def _explicit_order(self, order, B: int, device) -> torch.Tensor:
        o = torch.as_tensor(order, dtype=torch.long, device=device)
        if o.dim() == 1:
            o = o.expand(B, -1)
        if o.dim() != 2 or o.shape[0] != B or not 1 <= o.shape[1] <= GRID * GRID:
            raise ValueError(f"an explicit order is (k,) or (B, k) crop indices with 1 <= k <= 9, got {tuple(o.shape)}")
        if int(o.min()) < 0 or int(o.max()) >= GRID * GRID:
            raise ValueError("crop indices must lie in [0, 9)")
        if any(len(set(row)) != len(row) for row in o.tolist()):
            raise ValueError("an explicit order may not repeat a crop")
        return o

    def one_step_reconstruction(self, message: torch.Tensor, offset: torch.Tensor, generator) -> torch.Tensor:
        """One Euler step from noise at t = 0 without guidance, decoded to pixels (the adaptive
        policy's current reconstruction)."""
        z = self.sample_latents(message, offset, steps=1, guidance=1.0, generator=generator)
        return self.decode_latents(z)

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor, order="raster", num_crops: int | None = None, *,
                 generator: torch.Generator | None = None, history: bool = False) -> dict:
        """Encode crop by crop (reference ``tokenize``). Returns a dict:

        ``ids`` (B, N) int64, ``codes`` (B, N, D), ``offset`` (B, 2) the decode offset (global
        centre - last crop), ``order`` (B, k) the crops observed; with ``history`` also
        ``steps``: a list of k dicts ``{"ids", "codes", "offset"}``, the message after each crop
        and the decode offset as if encoding stopped there.
        """
        images = self.prepare_images(images)
        B, dev = images.shape[0], images.device
        k = GRID * GRID if num_crops is None else int(num_crops)
        if isinstance(order, str) and order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS} or a list of crop indices, got {order!r}")
        if not 1 <= k <= GRID * GRID:
            raise ValueError(f"num_crops must be in [1, 9], got {k}")
        gen = self._rng(generator, dev)
        crops = self.crop_latents(images)
        rows = torch.arange(B, device=dev)
        if order == "raster":
            plan = torch.arange(k, device=dev).expand(B, -1)
        elif order == "random":
            plan = torch.rand(B, GRID * GRID, generator=gen, device=dev).argsort(1)[:, :k]
        elif order == "adaptive":
            plan = None
        else:
            plan = self._explicit_order(order, B, dev)
            k = plan.shape[1] if num_crops is None else k
            if plan.shape[1] < k:
                raise ValueError(f"the explicit order lists {plan.shape[1]} crops, fewer than num_crops={k}")
            plan = plan[:, :k]
        msg = self.prior_message(B, dev)
        used = torch.zeros(B, GRID * GRID, dtype=torch.bool, device=dev)
        chosen, steps, prev = [], [], None
        f = self.vae.factor
        for i in range(k):
            if plan is not None:
                idx = plan[:, i]
            elif i == 0:
                idx = torch.full((B,), CENTRE_CROP, dtype=torch.long, device=dev)
            else:
                rec = self.one_step_reconstruction(msg, -prev, gen)
                err = (rec.float() - images.float()).pow(2).sum(1)
                idx = adaptive_next_crop(err, used, self.crop * f, self.stride * f)
            used[rows, idx] = True
            chosen.append(idx)
            loc = self.centres[idx]
            offset = torch.zeros_like(loc) if prev is None else loc - prev
            msg = self.observe(crops[rows, idx], msg, offset)
            prev = loc
            if history:
                steps.append({"ids": self.fsq.codes_to_indices(msg), "codes": msg, "offset": -loc})
        out = {"ids": self.fsq.codes_to_indices(msg), "codes": msg, "offset": -prev,
               "order": torch.stack(chosen, 1)}
        if history:
            out["steps"] = steps
        return out

    def encode(self, images: torch.Tensor, order="raster", num_crops: int | None = None, *,
               generator: torch.Generator | None = None) -> Tokens:
        """Images -> Tokens (B, N) of FSQ ids (default: raster order, all 9 crops)."""
        out = self.tokenize(images, order, num_crops, generator=generator)
        return Tokens(out["ids"], self.spec, validate=False)

    # ---- decoding ----------------------------------------------------------------------------
    def default_offset(self, batch: int, device=None) -> torch.Tensor:
        """The decode offset of the default encoding (raster, 9 crops): ``-centre(crop 8)``."""
        return (-self.centres[GRID * GRID - 1]).to(device).expand(batch, 2)

    @torch.no_grad()
    def sample_latents(self, codes: torch.Tensor, offset: torch.Tensor, *, steps: int | None = None,
                       guidance: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Euler integration of the flow from noise (t = 0) to the latent (t = 1), APG-guided
        with the prior message as the unconditional input when ``guidance != 1``."""
        steps = self.sample_steps if steps is None else int(steps)
        cfg = self.guidance if guidance is None else float(guidance)
        B, dev = codes.shape[0], codes.device
        L, C = self.latent_size, self.vae.channels
        noise = torch.randn(B, C, L, L, generator=self._rng(generator, dev), device=dev)
        dtype = next(self.predictor.parameters()).dtype
        noise, codes, offset = noise.to(dtype), codes.to(dtype), offset.to(dev, dtype)
        guided = cfg != 1.0
        if guided:
            cond_in = torch.cat([codes, self.prior_message(B, dev).to(dtype)])
            off_in = torch.cat([offset, offset])
        state = {"avg": None}

        def velocity(x, s, i):
            t = torch.full((B,), 1.0 - s, device=dev, dtype=dtype)  # flow.py time s -> COMiT time t
            if not guided:
                v = self.predictor(x, t, codes, offset)["velocity"]
                return -v
            v_c, v_u = self.predictor(torch.cat([x, x]), torch.cat([t, t]), cond_in, off_in)["velocity"].chunk(2)
            d = v_c - v_u
            if self.apg_momentum:
                d = d if state["avg"] is None else d + self.apg_momentum * state["avg"]
                state["avg"] = d
            # flattened to (B, D): flow.apg takes per-sample norms over the non-batch dims
            v = flow.apg(v_c.flatten(1), (v_c - d).flatten(1), cfg, eta=self.apg_eta,
                         norm_threshold=self.apg_norm_threshold)
            return -v.view_as(v_c)

        return flow.euler_sample(velocity, noise, flow.time_grid(steps, device=dev))

    @torch.no_grad()
    def decode(self, tokens: Tokens, *, steps: int | None = None, cfg: float | None = None,
               offset: torch.Tensor | None = None, generator: torch.Generator | None = None,
               seed: int | None = None) -> torch.Tensor:
        """Tokens -> images: ``steps`` Euler steps (default ``sample_steps``), guidance ``cfg``
        (default ``guidance``; 1 = none), decode ``offset`` (B, 2) (default: the raster/9-crop
        one), noise from ``generator`` or a generator seeded with ``seed`` / ``sample_seed``."""
        self.check_tokens(tokens)
        dev = self.centres.device
        ids = tokens.data.to(dev)
        B = ids.shape[0]
        if generator is None and seed is not None:
            generator = torch.Generator(device=dev).manual_seed(int(seed))
        offset = self.default_offset(B, dev) if offset is None else torch.as_tensor(offset, device=dev).expand(B, 2)
        z = self.sample_latents(self.fsq.indices_to_codes(ids), offset, steps=steps, guidance=cfg,
                                generator=generator)
        return self.decode_latents(z)

    # ---- training ----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor):
        """``(recon, losses)``: flow-matching velocity MSE (+ REPA) after a random number of crops
        in a random order (module docstring). ``recon`` is the decoded one-step estimate."""
        images = self.check_images(images)
        B, dev = images.shape[0], images.device
        with torch.no_grad():
            full = self.latents(images)
            crops = self.crop_latents(images, full)
        k = int(torch.randint(self.min_crops, self.max_crops + 1, ()).item())
        plan = torch.rand(B, GRID * GRID, device=dev).argsort(1)[:, :k]
        rows = torch.arange(B, device=dev)
        msg, prev = self.prior_message(B, dev), None
        for i in range(k):
            idx = plan[:, i]
            loc = self.centres[idx]
            msg = self.observe(crops[rows, idx], msg, torch.zeros_like(loc) if prev is None else loc - prev)
            prev = loc
        if self.cond_dropout > 0:
            drop = torch.rand(B, 1, 1, device=dev) < self.cond_dropout
            msg = torch.where(drop, self.prior_message(B, dev), msg)
        t = torch.rand(B, device=dev)
        noise = torch.randn_like(full)
        x_t = comit_interpolate(full, noise, t)
        use_repa = self.repa_proj is not None and self.repa_weight > 0
        out = self.predictor(x_t, t, msg, -prev, repr_layer=self.repr_layer if use_repa else None)
        v = out["velocity"]
        fm = F.mse_loss(v.float(), comit_velocity_target(full, noise).float())
        losses = {"flow": fm.detach(), "crops": torch.tensor(float(k))}
        loss = fm
        if use_repa:
            rep = self.repa_loss(out["repr"], images)
            loss = loss + self.repa_weight * rep
            losses["repa"] = rep.detach()
        losses["loss"] = loss
        with torch.no_grad():
            x1 = x_t + (1 - t.view(B, 1, 1, 1)) * v  # one-step clean estimate
            recon = self.decode_latents(x1.detach())
        return recon, losses

    def repa_loss(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """``1 - cos`` between the projected image tokens (B, T, dim) and the teacher's patch
        features of ``images``, resized (area) to the token grid."""
        g = int(round(math.sqrt(tokens.shape[1])))
        target = self.teacher(images)
        if target.shape[-2:] != (g, g):
            target = F.adaptive_avg_pool2d(target, (g, g))
        target = target.flatten(2).transpose(1, 2)
        pred = self.repa_proj(tokens)
        if pred.shape[-1] != target.shape[-1]:
            raise ValueError(f"REPA: teacher features have {target.shape[-1]} channels, teacher_dim is "
                             f"{pred.shape[-1]}")
        return 1 - F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()

    # ---- paper VAE weights ---------------------------------------------------------------------
    def load_vae_weights(self, source) -> None:
        """Copy frozen VAE weights in (:meth:`LatentVAE.load_weights`: a module with the same
        state-dict names, or a local ``.safetensors`` file). Strict."""
        self.vae.load_weights(source)


# Shapes 64x64 -> kl-tiny 8x8x8 latents; 3x3 crops of 4x4 cells at stride 2 (32 px at stride 16, the
# paper's 96/80 px on 256 is 0.375/0.3125 of the side); 16 tokens x FSQ-6 [4,4,4,3,3,3] (1,728 codes:
# the paper's levels halved, parity kept) so that a tiny AR generator's vocabulary stays small.
TINY = dict(image_size=64, vae="tokenizer/kl-tiny", latent_scale=1.0, crop=4, stride=2, crop_space="latent",
            num_tokens=16, levels=[4, 4, 4, 3, 3, 3], dim=96, depth=4, heads=4, patch_size=1,
            teacher="eval/shapes-net:shapes", teacher_dim=128, repr_layer=1, repa_weight=0.5,
            sample_steps=25, guidance=1.0)
TINY_VAE_WEIGHTS = "tokenizer/kl-tiny:shapes"
# Paper: 256 px, SD VAE (f8, 4 ch, 32x32 latent), patch 2, 96 px crops at stride 80 encoded in pixel
# space, 256 tokens x FSQ [8,8,8,5,5,5]; README decode defaults 10 steps, cfg 7.5 (APG). REPA layer
# (0-based) and DINOv2-B teacher follow REPA (Yu et al. 2025) [assume].
PAPER_BASE = dict(image_size=256, vae="diffusers:sd", latent_scale=SD_SCALE, crop=12, stride=10,
                  crop_space="pixel", num_tokens=256, levels=[8, 8, 8, 5, 5, 5], patch_size=2,
                  teacher="timm:vit_base_patch14_dinov2.lvd142m", teacher_dim=768, repa_weight=0.5,
                  sample_steps=10, guidance=7.5)
COMIT_B = {**PAPER_BASE, "dim": 768, "depth": 12, "heads": 12, "repr_layer": 3}
COMIT_L = {**PAPER_BASE, "dim": 1024, "depth": 24, "heads": 16, "repr_layer": 7}
COMIT_XL = {**PAPER_BASE, "dim": 1152, "depth": 28, "heads": 16, "repr_layer": 7}


@register("tokenizer/comit-tiny", paper=PAPER, weights={"shapes": "weights/tokenizer-comit-tiny"})
def comit_tiny(**overrides):
    """Tiny COMiT for Shapes 64x64: 3x3 latent crops -> 16 FSQ-6 ids (1,728 codes), flow decoder on kl-tiny latents."""
    cfg = {**TINY, **overrides}
    model = COMiT(**cfg)
    if cfg["vae"] == TINY["vae"] and not cfg.get("vae_config"):  # an overridden VAE stays random
        load_shipped_vae(model, TINY_VAE_WEIGHTS)
    return model


# The reference README's model sizes (the RuledDiT predictor: 12 / 24 / 28 layers).
@register("tokenizer/comit-b", paper=PAPER, paper_params=174e6)
def comit_b(**overrides):
    """COMiT-B: 12-layer predictor on SD-VAE latents, 256 px -> 256 FSQ ids (64,000 codes)."""
    return COMiT(**{**COMIT_B, **overrides})


@register("tokenizer/comit-l", paper=PAPER, paper_params=610e6)
def comit_l(**overrides):
    """COMiT-L: 24-layer predictor on SD-VAE latents, 256 px -> 256 FSQ ids (64,000 codes)."""
    return COMiT(**{**COMIT_L, **overrides})


@register("tokenizer/comit-xl", paper=PAPER, paper_params=900e6)
def comit_xl(**overrides):
    """COMiT-XL: 28-layer predictor on SD-VAE latents, 256 px -> 256 FSQ ids (64,000 codes)."""
    return COMiT(**{**COMIT_XL, **overrides})


__all__ = ["COMiT", "MessageDiT", "StreamBlock", "adaptive_next_crop", "comit_interpolate",
           "comit_velocity_target", "crop_centres"]
