"""UniWeTok: a unified binary tokenizer with 2^128 codes (``tokenizer/uniwetok-*``).

Zhuang et al. 2026, "UniWeTok: An Unified Binary Tokenizer with Codebook Size 2^128 for
Unified Multimodal Large Language Model" (arXiv 2602.14178). What is implemented, and where
each piece comes from:

- **Binary tokens, K = 128 bits per token** (abstract; README: "Group-Wise Lookup-Free
  Quantization"): ``q = sign(z)`` per channel, the ``2^128`` codebook is never built; the
  group-factorised entropy and the commitment loss are those of
  :class:`~tokenizers_vis.quantizers.binary.BinaryQuantizer` (WeTok's group-wise LFQ, groups
  of ``group_size`` bits; WeTok's temperature 0.01 = ``inv_temperature`` 100).
- **Conv-attention hybrid encoder/decoder** (abstract; released inference code,
  ``shallowdream204/BitDance`` ``modeling/vision_encoder/autoencoder_uni.py``): conv ResBlock
  stages, then a few bidirectional transformer blocks with 4 register tokens and 2D RoPE at
  the lowest resolution; the decoder mirrors it (transformer blocks first, then conv stages).
  Here the conv stages are diffusers' ``Encoder``/``Decoder`` (as in
  :class:`~tokenizers_vis.vq.VQTokenizer`) and the blocks are :class:`generators.transformer.Transformer`
  (registers sit at RoPE position -1, i.e. unrotated).
- **SigLu on the encoder output**: ``siglu(x) = 2 * sigmoid(x) - 1`` (= ``tanh(x / 2)``) after
  the last 1x1 conv, exactly as the released encoder ends (``return 2 * torch.sigmoid(x) - 1``).
  It bounds the pre-quantisation latent to (-1, 1) (closed [-1, 1] in floating point, where
  ``sigmoid`` rounds to 0 or 1 beyond |x| ~ 17 in float32). Why it reconciles the two losses
  (abstract: "addresses the optimization conflict between token entropy loss and commitment
  loss"): for an unbounded latent the per-sample entropy term keeps pushing |z| up (sharper
  code posteriors) while the commitment term pulls |z| back to 1; with |z| < 1 both terms push
  |z| towards 1, so their gradients agree (``tests/test_uniwetok.py`` checks this).
- **Pre-Post Distillation (PPD)** (abstract): frozen teacher patch features (a
  :class:`~tokenizers_vis.teacher.TeacherSlot`, outside the state dict, built lazily) are
  regressed from the pre-quantisation latent ``z`` *and* from the binary post-quantisation
  latent ``z_q`` (straight-through), each through its own small projection head.
- **Generative-Aware Prior (GAP)** (abstract): an auxiliary sequence model trained jointly on
  the tokens so that they become easier to generate. Training only: ``encode``/``decode``
  never touch it (its parameters live in the state dict).

Documented deviations (the paper text beyond the abstract was not available; where the
source is silent, these are our choices):

- PPD loss: ``1 - cos`` between a 2-layer 1x1-conv head (``bits -> hidden -> teacher_dim``,
  GELU) of the latent and the teacher feature at each token position (the teacher map is
  resized to the token grid, bilinear with antialiasing). Cosine as in TokenFlow/VA-VAE.
- GAP model: a tiny causal Llama-style transformer over the raster sequence of ±1 codes,
  teacher-forced, predicting each token's ``K`` bits with independent per-bit logits (per-bit
  BCE; the bitwise head of the zoo's binary-token generators). Its inputs and targets are the
  straight-through codes, so the loss also reaches the encoder (``gap_target_grad=False``
  stops it at the targets). A secondary summary of the paper mentions a small *diffusion*
  prior; we use the per-bit BCE prior because it is what the zoo's binary generators model.
- The decoder has no noise injection / adaptive GroupNorm (the released ``GANDecoder``); the
  encoder's transformer runs on the conv output of width ``z_channels`` with integer (row, col)
  RoPE positions (the release rescales positions to a fixed 0.5..7.5 span); ``sign(0) = +1``
  (the release maps 0 to -1: a measure-zero difference).
- The commitment term is kept (weight 0.25, WeTok's); with SigLu it agrees with the entropy
  term instead of fighting it. Set ``commit_weight=0`` for an entropy-only objective.
- Entropy weight 0.00625 = WeTok's 0.1 / 16: WeTok averages the entropy terms over its bit
  groups, :class:`BinaryQuantizer` sums them (16 groups of 8 at K = 128). At 0.1 the entropy
  gradient on the encoder was ~100x the reconstruction gradient on Shapes; 200-step tiny runs
  (batch 16) reached 18.0 dB at 0.1 (PPD weights 1.0), 20.9 dB at 0.00625 and 18.6 dB at 0.002
  (PPD weights 0.5; at 0.002 the bits saturate and the GAP prior predicts 93% of them).
- PPD weights 0.5 each and GAP weight 0.1 are our choices (the paper's are not available).
- The paper's three training stages (resolution adaptation, faces/text data) are data
  schedules, not modules; nothing here implements them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from generators.transformer import Transformer
from tokenizers_vis.binary import BinaryTokenizer
from tokenizers_vis.teacher import TeacherSlot
from zoo.registry import register

PAPER = "UniWeTok, Zhuang et al. 2026 (arXiv 2602.14178): binary 2^128 codes, SigLu, PPD, GAP"


def siglu(x: torch.Tensor) -> torch.Tensor:
    """UniWeTok's SigLu: ``2 * sigmoid(x) - 1`` (= ``tanh(x / 2)``), odd, bounded to (-1, 1).

    The formula is that of the released encoder (BitDance ``autoencoder_uni.py``); slope 1/2
    at 0. In floating point the bound is closed: |siglu(x)| <= 1 for every finite x.
    """
    return 2 * torch.sigmoid(x) - 1


class SigLu(nn.Module):
    """Module form of :func:`siglu`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return siglu(x)


def _grid_positions(h: int, w: int, prefix: int, device=None) -> torch.Tensor:
    """(prefix + h*w, 2) RoPE positions: ``prefix`` unrotated slots (-1), then (row, col) raster."""
    idx = torch.arange(h * w, device=device)
    grid = torch.stack((idx // w, idx % w), -1)
    return torch.cat((torch.full((prefix, 2), -1, device=device, dtype=grid.dtype), grid))


class GridAttention(nn.Module):
    """Bidirectional transformer blocks over a (B, C, h, w) map, with register tokens.

    The conv-attention hybrid's attention stage (released UniWeTok encoder/decoder: 4 register
    tokens, 2D RoPE, non-causal). Registers are dropped on the way out.
    """

    def __init__(self, dim: int, depth: int, heads: int, ffn_multiple: int = 256, registers: int = 4):
        super().__init__()
        self.transformer = Transformer(dim, depth, heads, ffn_multiple, rope="2d")
        self.registers = nn.Parameter(torch.randn(int(registers), dim) * 0.02) if registers else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        r = 0 if self.registers is None else self.registers.shape[0]
        if r:
            t = torch.cat((self.registers.to(t.dtype).expand(B, -1, -1), t), 1)
        t = self.transformer(t, _grid_positions(h, w, r, x.device))
        return t[:, r:].transpose(1, 2).reshape(B, C, h, w)


class GenerativePrior(nn.Module):
    """GAP sequence model: a tiny causal transformer predicting each token's bits (training only).

    Teacher-forced on the raster sequence of codes ``(B, N, K)`` (±1 floats; they may carry
    straight-through gradients): the input is ``[BOS, code_0 .. code_{N-2}]`` and the output at
    slot ``i`` gives ``K`` independent bit logits for token ``i`` (as the zoo's raster AR
    generator with a bitwise head does).
    """

    def __init__(self, bits: int, grid: tuple, dim: int, depth: int, heads: int, ffn_multiple: int = 256):
        super().__init__()
        self.bits, self.grid = int(bits), (int(grid[0]), int(grid[1]))
        self.embed = nn.Linear(self.bits, dim, bias=False)
        self.bos = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.transformer = Transformer(dim, depth, heads, ffn_multiple, rope="2d")
        self.head = nn.Linear(dim, self.bits, bias=False)
        for lin in (self.embed, self.head):
            nn.init.normal_(lin.weight, std=0.02)

    def positions(self, device=None) -> torch.Tensor:
        """BOS unrotated, then the (row, col) of tokens 0 .. N-2 (each input sits at its own place)."""
        h, w = self.grid
        return _grid_positions(h, w, 1, device)[:-1]

    def logits(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes`` (B, N, K) in ±1 -> bit logits (B, N, K), causal (token i sees tokens < i)."""
        B, N, K = codes.shape
        if K != self.bits or N != self.grid[0] * self.grid[1]:
            raise ValueError(f"GenerativePrior expects codes (B, {self.grid[0] * self.grid[1]}, {self.bits}), "
                             f"got {tuple(codes.shape)}")
        x = torch.cat((self.bos.to(codes.dtype).expand(B, -1, -1), self.embed(codes[:, :-1])), 1)
        h = self.transformer(x, self.positions(codes.device), is_causal=True)
        return self.head(h)

    def forward(self, codes: torch.Tensor, target_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-bit BCE (nats per bit) of the teacher-forced prior, and its bit accuracy (detached)."""
        logits = self.logits(codes)
        targets = (codes + 1) / 2  # exactly {0, 1} forward; straight-through grads if codes carry them
        if not target_grad:
            targets = targets.detach()
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float())
        with torch.no_grad():
            acc = ((logits > 0) == (targets > 0.5)).float().mean()
        return loss, acc


def _distill_head(bits: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(bits, hidden, 1), nn.GELU(), nn.Conv2d(hidden, out, 1))


def cosine_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean(1 - cos)`` over positions between (B, C, h, w) maps; the teacher is resized to (h, w)."""
    if teacher.shape[0] != student.shape[0] or teacher.shape[1] != student.shape[1]:
        raise ValueError(f"teacher features {tuple(teacher.shape)} do not match the projected student "
                         f"features {tuple(student.shape)} in batch or channels (check teacher_dim)")
    if teacher.shape[-2:] != student.shape[-2:]:
        down = teacher.shape[-2] > student.shape[-2]
        teacher = F.interpolate(teacher, size=student.shape[-2:], mode="bilinear", align_corners=False,
                                antialias=down)
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=1)).mean()


class UniWeTokTokenizer(BinaryTokenizer):
    """UniWeTok: images (B, 3, S, S) <-> binary grid tokens (B, S/f, S/f, bits), ``bits`` = 128.

    Encoder: diffusers conv stages -> :class:`GridAttention` (``attn_blocks``) -> 1x1 conv to
    ``bits`` -> :func:`siglu` -> :class:`BinaryQuantizer` (LFQ, sign). Decoder: 1x1 conv ->
    :class:`GridAttention` -> diffusers conv stages. ``encode``/``decode`` are those of
    :class:`BinaryTokenizer` (tokens are uint8 bits; ``decode`` maps bits to ±1 codes).

    Args (the conv ones as in :class:`~tokenizers_vis.vq.VQTokenizer`):
        bits, group_size, commit_weight, entropy_weight, diversity_gamma, inv_temperature:
            the binary quantizer (see :class:`~tokenizers_vis.quantizers.binary.BinaryQuantizer`).
        attn_blocks, attn_heads, attn_ffn_multiple, registers: the transformer stage at the
            lowest resolution, on each side (width ``z_channels``); ``attn_blocks=0`` is pure conv.
        teacher: the frozen semantic teacher spec (see :mod:`tokenizers_vis.teacher`); ``"none"``
            turns PPD off and builds no projection heads.
        teacher_dim: channels of the teacher's ``patch_features`` (the heads' output width).
        distill_hidden: hidden width of each PPD head (default ``teacher_dim``).
        pre_distill_weight, post_distill_weight: PPD weights on the pre-/post-quantisation terms.
        gap_weight: GAP loss weight; gap_dim, gap_depth, gap_heads, gap_ffn_multiple: its size
            (``gap_depth=0`` builds no prior); gap_target_grad: let the GAP loss reach the
            encoder through its targets as well as its inputs.

    ``forward(images) -> (recon, losses)``: ``loss = L2 (+ l1) + commit + entropy
    + pre_distill_weight * distill_pre + post_distill_weight * distill_post + gap_weight * gap``;
    the other entries are detached scalars for logging.
    """

    def __init__(self, image_size: int = 256, ch: int = 128, ch_mult: list = (1, 1, 2, 2, 4, 4),
                 num_res_blocks: int = 2, z_channels: int = 512, bits: int = 128, group_size: int = 8,
                 commit_weight: float = 0.25, entropy_weight: float = 0.00625, diversity_gamma: float = 1.0,
                 inv_temperature: float = 100.0, norm_groups: int = 32, l1_weight: float = 0.0,
                 attn_blocks: int = 2, attn_heads: int = 16, attn_ffn_multiple: int = 256, registers: int = 4,
                 teacher: str = "none", teacher_dim: int = 768, distill_hidden: int | None = None,
                 pre_distill_weight: float = 0.5, post_distill_weight: float = 0.5,
                 gap_weight: float = 0.1, gap_dim: int = 256, gap_depth: int = 2, gap_heads: int = 4,
                 gap_ffn_multiple: int = 256, gap_target_grad: bool = True):
        super().__init__(image_size=image_size, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                         z_channels=z_channels, bits=bits, mode="lfq", group_size=group_size,
                         commit_weight=commit_weight, entropy_weight=entropy_weight,
                         diversity_gamma=diversity_gamma, inv_temperature=inv_temperature,
                         level_attn=False, mid_attn=False, norm_groups=norm_groups, l1_weight=l1_weight)
        for name, v in (("attn_blocks", attn_blocks), ("gap_depth", gap_depth), ("registers", registers)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if attn_blocks and (z_channels % attn_heads or (z_channels // attn_heads) % 4):
            raise ValueError(f"z_channels ({z_channels}) must split into attn_heads ({attn_heads}) heads whose "
                             f"width is a multiple of 4 (2D RoPE)")
        self.enc_attn = GridAttention(z_channels, attn_blocks, attn_heads, attn_ffn_multiple, registers) \
            if attn_blocks else None
        self.dec_attn = GridAttention(z_channels, attn_blocks, attn_heads, attn_ffn_multiple, registers) \
            if attn_blocks else None

        # PPD: the teacher stays outside the state dict and is only built when a loss needs it
        self.teacher = TeacherSlot(teacher)
        self.pre_distill_weight = float(pre_distill_weight)
        self.post_distill_weight = float(post_distill_weight)
        self.teacher_dim = int(teacher_dim)
        self.pre_head = self.post_head = None
        if self.teacher.enabled:
            hidden = int(distill_hidden or teacher_dim)
            self.pre_head = _distill_head(bits, hidden, self.teacher_dim)
            self.post_head = _distill_head(bits, hidden, self.teacher_dim)

        # GAP: training-only sequence prior over the token grid
        self.gap_weight = float(gap_weight)
        self.gap_target_grad = bool(gap_target_grad)
        self.prior = GenerativePrior(bits, self.spec.shape, gap_dim, gap_depth, gap_heads, gap_ffn_multiple) \
            if gap_depth else None

    # ---- pieces ------------------------------------------------------------------------
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latent ``z = siglu(conv1x1(attn(conv_stages(x))))``, (B, bits, h, w) in [-1, 1]."""
        self.check_images(images)
        h = self.encoder(images)
        if self.enc_attn is not None:
            h = self.enc_attn(h)
        return siglu(self.quant_conv(h))

    def quantize(self, images: torch.Tensor):
        """images -> (z_q (B, bits, h, w) ±1 straight-through, bits (B, h, w, bits) uint8, losses)."""
        return self.quantizer(self.encode_latent(images))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        h = self.post_quant_conv(z_q)
        if self.dec_attn is not None:
            h = self.dec_attn(h)
        return self.decoder(h)

    def distill_losses(self, images: torch.Tensor, z: torch.Tensor, z_q: torch.Tensor) -> dict:
        """PPD terms ``{"distill_pre", "distill_post"}`` (only those with a positive weight; {} without a teacher)."""
        want_pre = self.pre_head is not None and self.pre_distill_weight > 0
        want_post = self.post_head is not None and self.post_distill_weight > 0
        if not (want_pre or want_post):
            return {}
        target = self.teacher(images)
        if target.shape[1] != self.teacher_dim:
            raise ValueError(f"teacher {self.teacher.spec!r} gives {target.shape[1]}-channel patch features, "
                             f"but this tokenizer was built with teacher_dim={self.teacher_dim}")
        out = {}
        if want_pre:
            out["distill_pre"] = cosine_distill_loss(self.pre_head(z), target)
        if want_post:
            out["distill_post"] = cosine_distill_loss(self.post_head(z_q), target)
        return out

    def semantic_features(self, tokens) -> torch.Tensor:
        """Understanding side: the PPD **post**-quantisation head on the tokens' ±1 codes,
        (B, teacher_dim, h, w) -- the tokens' prediction of the teacher's patch features (the map
        ``distill_post`` trains; the pre head needs the continuous latent, which tokens lack).
        Counterpart of ``TokenFlowTokenizer.semantic_features``; used by ``eval/semantic.py``."""
        if self.post_head is None:
            raise ValueError(f"{self.registry_name or type(self).__name__} was built with teacher='none': "
                             f"no post-distillation head, so no semantic features")
        self.check_tokens(tokens)
        return self.post_head(self.quantizer.bits_to_codes(tokens.data.to(self.last_layer.device)))

    def gap_loss(self, z_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GAP: per-bit BCE of the causal prior on the raster sequence of codes ``z_q`` (B, bits, h, w)."""
        if self.prior is None:
            raise RuntimeError("this tokenizer was built with gap_depth=0 (no generative prior)")
        codes = z_q.flatten(2).transpose(1, 2)  # (B, h*w, bits), raster order as Tokens.to_sequence
        return self.prior(codes, target_grad=self.gap_target_grad)

    # ---- training ----------------------------------------------------------------------
    def forward(self, images: torch.Tensor):
        """``(recon, losses)``; see the class docstring for the total."""
        z = self.encode_latent(images)
        z_q, _, q = self.quantizer(z)
        recon = self.decode_latents(z_q)
        rec = self.reconstruction_loss(recon, images)
        loss = rec + q["loss"]
        logs = {"rec": rec.detach(), "commit": q["commit"].detach(), "entropy": q["entropy"].detach(),
                "sample_entropy": q["sample_entropy"], "codebook_entropy": q["codebook_entropy"],
                "bit_usage": q["bit_usage"], "z_abs": z.detach().abs().mean()}
        for k, v in self.distill_losses(images, z, z_q).items():
            w = self.pre_distill_weight if k == "distill_pre" else self.post_distill_weight
            loss = loss + w * v
            logs[k] = v.detach()
        if self.prior is not None and self.gap_weight > 0:
            gap, acc = self.gap_loss(z_q)
            loss = loss + self.gap_weight * gap
            logs["gap"], logs["gap_acc"] = gap.detach(), acc
        return recon, {"loss": loss, **logs}


# ---- registered configs --------------------------------------------------------------------
# Shapes 64x64, f8 -> 8x8 tokens x 128 bits, conv widths as vq-tiny
# (ch 16 x [1, 2, 2, 4]); 2 transformer blocks (width 64, 4 heads) each side at 8x8; PPD from the
# shipped Shapes feature network (128-d patch features on the same 8x8 grid); a 2-layer GAP.
# Entropy groups of 8 bits (16 groups, WeTok's g): groups of 4 would make a CPU step ~25%
# cheaper (1.8 s vs 2.5 s per batch of 32), but the bits saturated faster and a 200-step run
# reached 17.3 dB instead of 20.9 dB.
TINY = {"image_size": 64, "ch": 16, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 1, "z_channels": 64,
        "bits": 128, "group_size": 8, "norm_groups": 8, "attn_blocks": 2, "attn_heads": 4,
        "attn_ffn_multiple": 64, "registers": 4, "teacher": "eval/shapes-net:shapes",
        "teacher_dim": 128, "distill_hidden": 128, "gap_dim": 64, "gap_depth": 2, "gap_heads": 4,
        "gap_ffn_multiple": 64}
# 256 px -> 8x8 tokens x 128 bits: the README's "256x256 images into just 64 tokens (32x
# downsampling)". The widths are NOT published (the release ships weights, not the config):
# ch 128 x [1, 1, 2, 2, 4, 4], 2 ResBlocks per level, 2 transformer blocks of width 512 / 16 heads
# (the release's attn_blocks=2, n_heads=16 defaults) are our plausible choice -> no paper_params.
# Teacher: pass e.g. teacher="timm:vit_base_patch16_clip_224@/path/weights.safetensors" (768-d).
F32 = {"image_size": 256, "ch": 128, "ch_mult": [1, 1, 2, 2, 4, 4], "num_res_blocks": 2,
       "z_channels": 512, "bits": 128, "group_size": 8, "norm_groups": 32, "attn_blocks": 2,
       "attn_heads": 16, "attn_ffn_multiple": 256, "registers": 4, "teacher": "none",
       "teacher_dim": 768, "gap_dim": 512, "gap_depth": 4, "gap_heads": 8}


@register("tokenizer/uniwetok-tiny", paper=PAPER, weights={"shapes": "weights/tokenizer-uniwetok-tiny"})
def uniwetok_tiny(**overrides):
    """Tiny UniWeTok for Shapes 64x64: f8 -> 8x8 tokens x 128 bits, SigLu, PPD (shapes-net), GAP."""
    return UniWeTokTokenizer(**{**TINY, **overrides})


@register("tokenizer/uniwetok-f32", paper=PAPER)
def uniwetok_f32(**overrides):
    """UniWeTok-style 256 px -> 8x8 tokens x 128 bits (f32); widths unpublished, ours (no paper_params)."""
    return UniWeTokTokenizer(**{**F32, **overrides})
