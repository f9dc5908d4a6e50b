"""FlexTok: a 1D ordered (coarse-to-fine) tokenizer (``tokenizer/flextok-*``).

Bachmann et al. 2025, "FlexTok: Resampling Images into 1D Token Sequences of Flexible Length"
(arXiv 2502.13967, ICML 2025; code apple/ml-flextok), §3, and the tokenizer that "(1D) Ordered
Tokens Enable Efficient Test-Time Search" (arXiv 2604.15453, SoTo) searches over:

* **encoder** -- a ViT over image patches followed by ``N`` learned **register tokens** appended
  after the patch tokens, under the ``causal_last`` mask of ml-flextok's
  ``BlockWiseSequencePacker``: patches attend to all patches (and never to a register), register
  ``i`` attends to every patch and to registers ``<= i`` (:func:`causal_last_mask`);
* **FSQ** (``tokenizers_vis.quantizers.fsq``) on a linear projection of each register: paper
  levels 8·8·8·5·5·5 = 64,000 implicit codes, one id per register, so the tokens are a
  ``sequence`` of ``N`` ids with ``ordered=True``;
* **nested dropout** (Rippel et al. 2014) in training: per sample keep the first ``k`` registers,
  ``k`` drawn uniformly from the powers of two in ``[1, N]`` (ml-flextok ``MaskedNestedDropout``
  ``size_sampling_mode="pow2"``); the dropped registers are replaced in the decoder's input by a
  learned mask token. Any prefix ``1 <= k <= N`` therefore decodes to a whole image
  (:meth:`FlexTok.decode_prefix`), and because registers are causal the first ``k`` ids of a
  tokenisation equal the tokenisation made with only ``k`` registers (:meth:`FlexTok.encode_ids`);
* **decoder** (``decoder="flow"``, the paper's): a rectified-flow transformer over the noised
  patches followed by the (kept / masked) registers, full attention, the timestep entering by
  adaLN-zero with separate conditions for patches and registers; trained on the velocity
  ``v = eps - x`` of the linear path with logit-normal times (``generators.flow``); decoding
  integrates the ODE from noise with Euler steps (25 by default; SoTo's search configs use 20)
  and guides with CFG + adaptive projected guidance (``generators.flow.apg``: eta 0, norm
  threshold 2.5, scale 7.5 as ml-flextok's ``detokenize`` defaults); the unconditional branch
  replaces all registers by a learned null condition, used in training with probability
  ``cond_dropout`` (ml-flextok ``LearnedNullCond``).

Deviations (every one is a constructor option or a documented choice):

* **Pixel patches, not VAE latents.** The paper encodes FlexTok-VAE latents (f8, 4/8/16 channels)
  with 2x2 patchification; here the encoder and decoder work on pixel patches (``patch_size``:
  8 px at 64 px for the tiny model, 16 px at 256 px for the paper configs, i.e. the paper's token
  grid of 16x16 per 256 px image but 768 instead of 64 values per patch). No ``latent`` option:
  a frozen VAE in the loop would double the tiny model's CPU cost.
* **Tiny default decoder ``"direct"``**: learned patch queries + the registers through a
  transformer, one pass, MSE regression to pixels. Test-time search decodes every candidate
  prefix (hundreds per prompt) on a CPU; a 25-step flow decoder with CFG costs 50 decoder passes
  per image. Direct regression gives the *mean* image of a prefix (blurry for short prefixes)
  where the flow decoder samples a sharp one. ``decoder="flow"`` is the paper's and trains
  through the same ``forward``.
* Transformer blocks are the zoo's (``generators.transformer``: RMSNorm, SwiGLU, 2D RoPE on the
  patches, registers unrotated; they are told apart by learned per-index embeddings), not
  ml-flextok's (LayerNorm, GELU MLP, muP); the patches also carry fixed 2D sin-cos positions
  (``abs_pos``; ml-flextok adds 2D sin-cos position embeddings, ``PositionalEmbeddingAdder``). Patches and registers
  get their separate adaLN conditions as ``t_emb + type_emb`` through one shared adaLN map
  rather than two adaLN maps. Widths are 64·depth with 64-wide heads (768 / 1152 / 1792 for
  d12 / d18 / d28 -- the FlexTok paper's sizing as we read it; ml-flextok ships no config
  files, so this is **[UNVERIFIED]** and no ``paper_params`` is set).
* No REPA loss (the paper's DINOv2-L alignment of decoder features), no momentum in APG
  (ml-flextok uses momentum -0.5; ``generators.flow.apg`` has none).
* Tiny FSQ levels 8·5·5·5 = 1,000 codes (FSQ paper's 2^10 row) instead of 64,000: a
  search over a uniform prior or an AR model on Shapes needs no larger vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from generators.flow import (TimestepEmbedding, apg, cfg_velocity, interpolate, predict_x0, sample,
                             sample_logit_normal, velocity_target)
from generators.transformer import Transformer
from tokenizers_vis.base import Tokenizer
from tokenizers_vis.qformer import sincos_2d
from tokenizers_vis.quantizers.fsq import FSQ
from zoo.registry import register
from zoo.tokens import Tokens, TokenSpec

FLEXTOK_PAPER = "FlexTok, Bachmann et al. 2025 (arXiv 2502.13967), §3"
DECODERS = ("flow", "direct")
KEEP_MODES = ("pow2", "uniform", "none")


def powers_of_two(lo: int, hi: int) -> list[int]:
    """The powers of two in ``[lo, hi]``."""
    out, p = [], 1
    while p <= hi:
        if p >= lo:
            out.append(p)
        p *= 2
    return out


def causal_last_mask(num_patches: int, num_registers: int, device=None) -> torch.Tensor:
    """Boolean ``(P + N, P + N)`` mask (True = may attend) of ml-flextok's ``causal_last`` mode.

    Query ``q`` sees key ``k`` iff ``k < P`` (every patch) or ``k <= q`` (causal). Patch queries
    therefore see exactly the patches; register ``i`` sees all patches and registers ``<= i``.
    """
    T = num_patches + num_registers
    q = torch.arange(T, device=device)[:, None]
    k = torch.arange(T, device=device)[None, :]
    return (k < num_patches) | (k <= q)


class FlexTok(Tokenizer):
    """Images ``(B, 3, S, S)`` in [-1, 1] <-> ``N`` ordered FSQ ids (coarse-to-fine).

    Args (paper values are the class defaults, d18-d18; see the registered configs):
        image_size, patch_size: pixel patches of the encoder and the decoder (``P = (S/p)^2``).
        num_registers: ``N``, the token count (and the largest prefix).
        enc_dim, enc_depth, enc_heads: the encoder ViT.
        dec_dim, dec_depth, dec_heads: the decoder transformer.
        ffn_multiple: SwiGLU hidden width rounding (``generators.transformer.swiglu_hidden``).
        levels: FSQ levels per channel (vocabulary = their product).
        decoder: ``"flow"`` (rectified flow, the paper's) or ``"direct"`` (one-pass regression).
        keep_mode: nested dropout: ``"pow2"`` (k uniform over the powers of two in
            ``[min_keep, N]``, the paper's), ``"uniform"`` (k uniform in ``[min_keep, N]``) or
            ``"none"`` (always all N).
        min_keep: smallest kept prefix in training.
        cond_dropout: flow decoder: probability of training on the null condition (for CFG).
        t_mean, t_std: flow decoder: logit-normal training times ``sigmoid(t_mean + t_std·n)``.
        sample_steps, guidance_scale, use_apg, apg_eta, apg_norm_threshold: flow decoding defaults
            (25 Euler steps, scale 7.5, APG with eta 0 and norm threshold 2.5).
        sample_seed: the noise seed of a flow decode when no ``generator`` is given, so that
            ``decode`` is a deterministic function of the tokens.
        abs_pos: add fixed 2D sin-cos positions to every patch token (encoder patches, decoder
            patch queries / noised patches), as ml-flextok adds them. RoPE alone
            moves no position into the attention *values*, so a register could not say where
            the object it reads is.
    """

    #: decode re-generates the content from few tokens: train.tokenizer adds Shapes attribute agreement
    semantic_reconstruction = True

    def __init__(self, image_size: int = 256, patch_size: int = 16, num_registers: int = 256,
                 enc_dim: int = 1152, enc_depth: int = 18, enc_heads: int = 18,
                 dec_dim: int = 1152, dec_depth: int = 18, dec_heads: int = 18, ffn_multiple: int = 256,
                 levels: list = (8, 8, 8, 5, 5, 5), decoder: str = "flow", keep_mode: str = "pow2",
                 min_keep: int = 1, cond_dropout: float = 0.1, t_mean: float = 0.0, t_std: float = 1.0,
                 sample_steps: int = 25, guidance_scale: float = 7.5, use_apg: bool = True,
                 apg_eta: float = 0.0, apg_norm_threshold: float = 2.5, sample_seed: int = 0,
                 abs_pos: bool = True):
        super().__init__()
        levels = [int(v) for v in levels]
        if self.config.get("levels") is not None:
            self._zoo_config["levels"] = levels  # a JSON list of ints in the saved config
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if keep_mode not in KEEP_MODES:
            raise ValueError(f"keep_mode must be one of {KEEP_MODES}, got {keep_mode!r}")
        if not 1 <= min_keep <= num_registers:
            raise ValueError(f"min_keep must be in [1, num_registers={num_registers}], got {min_keep}")
        if keep_mode == "pow2" and num_registers & (num_registers - 1):
            raise ValueError(f"keep_mode='pow2' needs a power-of-two num_registers, got {num_registers}")
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        self.image_size, self.patch_size = int(image_size), int(patch_size)
        self.grid = self.image_size // self.patch_size
        self.num_patches = self.grid * self.grid
        self.num_registers = int(num_registers)
        self.decoder_kind, self.keep_mode, self.min_keep = decoder, keep_mode, int(min_keep)
        self.cond_dropout, self.t_mean, self.t_std = float(cond_dropout), float(t_mean), float(t_std)
        self.sample_steps, self.guidance_scale = int(sample_steps), float(guidance_scale)
        self.use_apg, self.apg_eta, self.apg_norm_threshold = bool(use_apg), float(apg_eta), float(apg_norm_threshold)
        self.sample_seed, self.abs_pos = int(sample_seed), bool(abs_pos)
        patch_values = 3 * self.patch_size ** 2

        # encoder: patches | registers under the causal_last mask
        self.patch_embed = nn.Linear(patch_values, enc_dim)
        self.registers = nn.Parameter(torch.empty(self.num_registers, enc_dim))
        self.encoder = Transformer(enc_dim, enc_depth, enc_heads, ffn_multiple, rope="2d")
        # FSQ bottleneck
        self.quantizer = FSQ(levels)
        self.to_code = nn.Linear(enc_dim, len(levels))
        self.from_code = nn.Linear(len(levels), dec_dim)
        # decoder-side register slots: per-index embedding, nested-dropout mask token, CFG null
        self.register_pos = nn.Parameter(torch.empty(self.num_registers, dec_dim))
        self.mask_token = nn.Parameter(torch.empty(dec_dim))
        if decoder == "flow":
            self.null_register = nn.Parameter(torch.empty(dec_dim))
            self.noisy_embed = nn.Linear(patch_values, dec_dim)
            self.time_embed = TimestepEmbedding(dec_dim)
            self.type_embed = nn.Parameter(torch.empty(2, dec_dim))  # patches, registers
            self.decoder = Transformer(dec_dim, dec_depth, dec_heads, ffn_multiple, rope="2d", adaln_dim=dec_dim)
        else:
            self.patch_queries = nn.Parameter(torch.empty(self.num_patches, dec_dim))
            self.decoder = Transformer(dec_dim, dec_depth, dec_heads, ffn_multiple, rope="2d")
        self.to_pixels = nn.Linear(dec_dim, patch_values)
        self.spec = TokenSpec("discrete", "sequence", (self.num_registers,),
                              vocab_size=self.quantizer.codebook_size, ordered=True)
        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.registers, self.register_pos, self.mask_token, getattr(self, "null_register", None),
                  getattr(self, "type_embed", None), getattr(self, "patch_queries", None)):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for m in (self.patch_embed, self.to_code, self.from_code, getattr(self, "noisy_embed", None)):
            if m is not None:
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.to_pixels.weight)  # DiT: the output layer starts at zero
        nn.init.zeros_(self.to_pixels.bias)

    # ---- layout helpers ----------------------------------------------------------------------
    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, P, 3·p·p)`` row-major patches."""
        B, p, g = images.shape[0], self.patch_size, self.grid
        x = images.reshape(B, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, g * g, 3 * p * p)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify`."""
        B, p, g = patches.shape[0], self.patch_size, self.grid
        x = patches.reshape(B, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(B, 3, g * p, g * p)

    def _patch_pos(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (B, P, D)`` plus the fixed 2D sin-cos positions (when ``abs_pos``)."""
        if not self.abs_pos:
            return tokens
        return tokens + sincos_2d(self.grid, self.grid, tokens.shape[-1], tokens.device, tokens.dtype)

    def _positions(self, num_registers: int, device) -> torch.Tensor:
        """2D RoPE positions: patches at (row, col), registers at (-1, -1) (unrotated)."""
        idx = torch.arange(self.num_patches, device=device)
        pos = torch.stack((idx // self.grid, idx % self.grid), -1)
        return torch.cat((pos, pos.new_full((num_registers, 2), -1)))

    # ---- encoder + quantizer -----------------------------------------------------------------
    def encoder_forward(self, images: torch.Tensor, num_registers: int | None = None,
                        registers: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder outputs ``(patches (B, P, enc_dim), registers (B, k, enc_dim))``.

        ``num_registers``: run with only the first ``k`` registers (default ``N``); ``registers``:
        override the learned register inputs ``(k, enc_dim)`` or ``(B, k, enc_dim)`` (tests).
        """
        B = images.shape[0]
        k = self.num_registers if num_registers is None else int(num_registers)
        if not 1 <= k <= self.num_registers:
            raise ValueError(f"num_registers must be in [1, {self.num_registers}], got {k}")
        regs = self.registers[:k] if registers is None else registers
        if regs.dim() == 2:
            regs = regs.unsqueeze(0).expand(B, -1, -1)
        if regs.shape[1] != k:
            raise ValueError(f"expected {k} register inputs, got {regs.shape[1]}")
        x = torch.cat((self._patch_pos(self.patch_embed(self.patchify(images))), regs.to(images.dtype)), 1)
        mask = causal_last_mask(self.num_patches, k, x.device)
        h = self.encoder(x, self._positions(k, x.device), mask=mask)
        return h[:, :self.num_patches], h[:, self.num_patches:]

    def quantize(self, images: torch.Tensor, num_registers: int | None = None):
        """images -> ``(codes (B, k, len(levels)) on the FSQ grid, ids (B, k), FSQ losses)``."""
        self.check_images(images)
        _, regs = self.encoder_forward(images, num_registers)
        z = self.to_code(regs)                                   # (B, k, D)
        z_q, ids, losses = self.quantizer(z.transpose(1, 2).unsqueeze(-1))
        return z_q.squeeze(-1).transpose(1, 2), ids.squeeze(-1), losses

    def encode_ids(self, images: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
        """The first ``num_tokens`` ids ``(B, k)`` (default all ``N``), computed with only ``k``
        registers in the encoder -- equal to ``encode(images).data[:, :k]`` (causal registers)."""
        return self.quantize(self.prepare_images(images), num_tokens)[1]

    # ---- decoder -----------------------------------------------------------------------------
    def sample_keep(self, batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Kept prefix length per sample ``(B,)`` for nested dropout (see ``keep_mode``)."""
        N = self.num_registers
        if self.keep_mode == "none":
            return torch.full((batch,), N, dtype=torch.long, device=device)
        if self.keep_mode == "uniform":
            return torch.randint(self.min_keep, N + 1, (batch,), generator=generator).to(device)
        choices = torch.tensor(powers_of_two(self.min_keep, N), dtype=torch.long)
        return choices[torch.randint(len(choices), (batch,), generator=generator)].to(device)

    def decoder_registers(self, codes: torch.Tensor, keep: torch.Tensor | None = None,
                          null: torch.Tensor | None = None) -> torch.Tensor:
        """FSQ codes ``(B, k, D)`` (``k <= N``) -> the decoder's ``N`` register slots ``(B, N, dec_dim)``.

        Slots ``>= k`` -- and, per sample, slots ``>= keep[b]`` -- hold the learned mask token
        (nested dropout); samples with ``null[b]`` get the learned null condition in every slot
        (the CFG unconditional branch). Then the per-index register embedding is added.
        """
        B, k, _ = codes.shape
        N = self.num_registers
        if not 1 <= k <= N:
            raise ValueError(f"a prefix of 1..{N} codes decodes, got {k}")
        h = self.from_code(codes.to(self.from_code.weight.dtype))
        mask = self.mask_token.to(h.dtype)
        if k < N:
            h = torch.cat((h, mask.expand(B, N - k, -1)), 1)
        if keep is not None:
            kept = torch.arange(N, device=h.device)[None, :] < keep.to(h.device)[:, None]
            h = torch.where(kept[..., None], h, mask)
        if null is not None:
            h = torch.where(null.to(h.device)[:, None, None], self.null_register.to(h.dtype), h)
        return h + self.register_pos.to(h.dtype)

    def _decoder_pass(self, patch_tokens: torch.Tensor, regs: torch.Tensor, t: torch.Tensor | None = None):
        """Transformer over ``patch tokens | register slots``; returns per-patch outputs ``(B, P, 3·p·p)``."""
        B, P = patch_tokens.shape[:2]
        x = torch.cat((self._patch_pos(patch_tokens), regs), 1)
        cond = None
        if t is not None:
            types = torch.cat((self.type_embed[0].expand(P, -1), self.type_embed[1].expand(regs.shape[1], -1)))
            cond = self.time_embed(t)[:, None, :] + types[None].to(x.dtype)
        h = self.decoder(x, self._positions(regs.shape[1], x.device), cond=cond)
        return self.to_pixels(h[:, :P])

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, regs: torch.Tensor) -> torch.Tensor:
        """Flow decoder: predicted velocity ``(B, P, 3·p·p)`` of noised patches ``x_t`` at times ``t (B,)``."""
        return self._decoder_pass(self.noisy_embed(x_t), regs, t)

    def decode_registers(self, regs: torch.Tensor, *, steps: int | None = None, guidance_scale: float | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Register slots ``(B, N, dec_dim)`` -> images ``(B, 3, S, S)`` clamped to [-1, 1]."""
        B = regs.shape[0]
        if self.decoder_kind == "direct":
            out = self._decoder_pass(self.patch_queries.expand(B, -1, -1).to(regs.dtype), regs)
            return self.unpatchify(out).clamp(-1, 1)
        steps = self.sample_steps if steps is None else int(steps)
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        if generator is None:
            generator = torch.Generator(regs.device).manual_seed(self.sample_seed)
        noise = torch.randn((B, self.num_patches, 3 * self.patch_size ** 2), generator=generator,
                            device=regs.device, dtype=regs.dtype)
        null = self.null_register.to(regs.dtype) + self.register_pos.to(regs.dtype)
        uncond = null.expand(B, -1, -1)

        def velocity_fn(x, t, i):
            tt = torch.full((B,), t, device=x.device, dtype=x.dtype)
            if scale == 1.0:
                return self.velocity(x, tt, regs)
            v = self.velocity(torch.cat((x, x)), torch.cat((tt, tt)), torch.cat((regs, uncond)))
            v_c, v_u = v.chunk(2)
            if self.use_apg:
                return apg(v_c, v_u, scale, eta=self.apg_eta, norm_threshold=self.apg_norm_threshold)
            return cfg_velocity(v_c, v_u, scale)

        x0 = sample(velocity_fn, noise, num_steps=steps, sampler="euler")
        return self.unpatchify(x0).clamp(-1, 1)

    @torch.no_grad()
    def decode_prefix(self, ids: torch.Tensor, generator: torch.Generator | None = None, **decode_kw) -> torch.Tensor:
        """Decode the first ``k`` ids ``(B, k)`` (any ``1 <= k <= N``) to images ``(B, 3, S, S)`` in
        [-1, 1]; registers ``k..N-1`` get the mask token. ``decode_kw``: ``steps``,
        ``guidance_scale`` (flow decoder). ``decode(tokens) == decode_prefix(tokens.data)``."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"decode_prefix expects integer ids (B, k), got "
                             f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        k = ids.shape[1]
        if not 1 <= k <= self.num_registers:
            raise ValueError(f"decode_prefix: k must be in [1, {self.num_registers}], got {k}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.spec.vocab_size):
            raise ValueError(f"decode_prefix: ids must lie in [0, {self.spec.vocab_size}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        dev = self.mask_token.device
        codes = self.quantizer.indices_to_codes(ids.to(dev))
        return self.decode_registers(self.decoder_registers(codes), generator=generator, **decode_kw)

    # ---- Tokenizer interface -----------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> Tokens:
        _, ids, _ = self.quantize(images)
        return Tokens(ids, self.spec, validate=False)

    def decode(self, tokens: Tokens, generator: torch.Generator | None = None, **decode_kw) -> torch.Tensor:
        ids = self.check_tokens(tokens).data
        return self.decode_prefix(ids, generator=generator, **decode_kw)

    def forward(self, images: torch.Tensor):
        """Training step: ``(recon, losses)``.

        Nested dropout keeps ``keep[b]`` registers per sample. ``"direct"``: ``loss`` = pixel MSE of
        the one-pass reconstruction. ``"flow"``: ``loss`` = MSE of the predicted velocity to
        ``eps - x`` at logit-normal times (registers replaced by the null condition with
        probability ``cond_dropout``); ``recon`` is the one-step estimate ``x_t - t·v``.
        """
        self.check_images(images)
        B = images.shape[0]
        codes, _, q = self.quantize(images)
        keep = self.sample_keep(B, images.device) if self.training else None
        losses = {"usage": q["usage"]}
        if keep is not None:
            losses["keep_mean"] = keep.float().mean()
        if self.decoder_kind == "direct":
            regs = self.decoder_registers(codes, keep)
            out = self._decoder_pass(self.patch_queries.expand(B, -1, -1).to(regs.dtype), regs)
            recon = self.unpatchify(out)
            mse = F.mse_loss(recon.float(), images.float())
            losses.update(loss=mse, mse=mse.detach())
            return recon, losses
        null = None
        if self.training and self.cond_dropout:
            null = torch.rand(B, device=images.device) < self.cond_dropout
        regs = self.decoder_registers(codes, keep, null)
        x = self.patchify(images)
        noise = torch.randn_like(x)
        t = sample_logit_normal(B, self.t_mean, self.t_std, device=x.device).to(x.dtype)
        x_t = interpolate(x, noise, t)
        v = self.velocity(x_t, t, regs)
        flow = F.mse_loss(v.float(), velocity_target(x, noise).float())
        recon = self.unpatchify(predict_x0(x_t, v, t))
        losses.update(loss=flow, flow=flow.detach())
        return recon, losses


@torch.no_grad()
def prefix_metrics(model: FlexTok, images: torch.Tensor, ks=None, batch_size: int = 64,
                   attributes: bool = True, **decode_kw) -> dict:
    """PSNR (on [0, 1], mean over images) and, with ``attributes``, Shapes attribute agreement
    (``eval.recon.attribute_agreement``) of ``decode_prefix(encode(x)[:, :k])`` per prefix ``k``
    (default: the powers of two up to N). Returns ``{k: {"psnr", "attribute_agreement"}}``."""
    ks = powers_of_two(1, model.num_registers) if ks is None else [int(k) for k in ks]
    def to_u8(x):
        return list(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())

    dev = model.mask_token.device
    ids = torch.cat([model.encode(images[i:i + batch_size].to(dev)).data for i in range(0, len(images), batch_size)])
    out = {}
    for k in ks:
        recon = torch.cat([model.decode_prefix(ids[i:i + batch_size, :k], **decode_kw).cpu()
                           for i in range(0, len(images), batch_size)])
        mse = ((images.float().clamp(-1, 1) - recon.float()) / 2).pow(2).flatten(1).mean(1)
        row = {"psnr": float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())}
        if attributes:
            from eval.recon import attribute_agreement
            row["attribute_agreement"] = attribute_agreement(to_u8(images), to_u8(recon))
        out[k] = row
    return out


# ---- registered configs ------------------------------------------------------------------------
# Shapes 64x64: 8-px pixel patches (8x8 = 64 patches), 32 registers, FSQ 8·5·5·5 = 1,000 codes,
# encoder and direct decoder 2 blocks x 128 wide (4 heads of 32), 0.87M parameters. Sized for ~2,000 steps
# at batch 64 on 2 CPU cores: measured 0.77 s/step (model alone, 1 thread) and 0.85 s/step through
# `python -m train.tokenizer` (data included), on a 2-core machine that two other training jobs kept busy.
TINY = dict(image_size=64, patch_size=8, num_registers=32, enc_dim=128, enc_depth=2, enc_heads=4,
            dec_dim=128, dec_depth=2, dec_heads=4, ffn_multiple=32, levels=[8, 5, 5, 5], decoder="direct")


def _paper(enc_depth: int, dec_depth: int) -> dict:
    # width 64·d, 64-wide heads (see the module docstring: [UNVERIFIED] against a released config)
    return dict(image_size=256, patch_size=16, num_registers=256, enc_dim=64 * enc_depth, enc_depth=enc_depth,
                enc_heads=enc_depth, dec_dim=64 * dec_depth, dec_depth=dec_depth, dec_heads=dec_depth,
                levels=[8, 8, 8, 5, 5, 5], decoder="flow")


@register("tokenizer/flextok-tiny", paper=FLEXTOK_PAPER, weights={"shapes": "weights/tokenizer-flextok-tiny"})
def flextok_tiny(**overrides):
    """Tiny FlexTok for Shapes 64x64: 32 ordered registers, FSQ 8·5·5·5 (1,000 codes), one-pass decoder."""
    return FlexTok(**{**TINY, **overrides})


@register("tokenizer/flextok-d12-d12", paper=FLEXTOK_PAPER)
def flextok_d12_d12(**overrides):
    """FlexTok d12-d12: 256 px, 256 registers, FSQ 64,000 codes, rectified-flow decoder (pixel patches)."""
    return FlexTok(**{**_paper(12, 12), **overrides})


@register("tokenizer/flextok-d18-d18", paper=FLEXTOK_PAPER)
def flextok_d18_d18(**overrides):
    """FlexTok d18-d18: 256 px, 256 registers, FSQ 64,000 codes, rectified-flow decoder (pixel patches)."""
    return FlexTok(**{**_paper(18, 18), **overrides})


@register("tokenizer/flextok-d18-d28", paper=FLEXTOK_PAPER)
def flextok_d18_d28(**overrides):
    """FlexTok d18-d28 (SoTo's tokenizer): 256 px, 256 registers, FSQ 64,000 codes, rectified-flow decoder."""
    return FlexTok(**{**_paper(18, 28), **overrides})
