"""TokenFlow: dual-codebook tokenizer with one shared index (``tokenizer/tokenflow-*``).

Qu et al. 2024, "TokenFlow: Unified Image Tokenizer for Multimodal Understanding and Generation"
(arXiv 2412.03069, CVPR 2025), §3; reference code ByteFlow-AI/TokenFlow
(``tokenflow/tokenizer/vq_model.py``). Digest: ``shared/reference/tokenizers.md`` §2.

- **Two encoders** (§3.1). The *semantic* encoder ``E_sem`` is initialised from the semantic
  teacher and trained (TokenFlow: a CLIP ViT-B/16 / ViTamin-XL / SigLIP copy), followed by a
  ``Linear-Tanh-Linear`` "task layer" to ``sem_dim = 32`` channels; the *pixel* encoder
  ``E_pix`` is the LlamaGen/VQGAN conv encoder plus a 1x1 ``quant_conv`` to ``pix_dim = 8``.
  Both maps have the final scale's size and are concatenated to 40 channels.
- **Dual codebook, shared index** (§3.2): :class:`~tokenizers_vis.quantizers.dual.DualCodebook`
  (``C_sem`` K x 32, ``C_pix`` K x 8, each half l2-normalised, ``k* = argmin d_sem + w d_pix``),
  run as TokenFlow's multi-scale residual quantiser
  (:class:`~tokenizers_vis.quantizers.dual.DualMultiScaleVQ`: VAR scales, no ``phi``, random
  drop of one non-first scale with p = 0.1, beta = 0.25).
- **Two decoders** (§3.3). The *semantic* decoder (a ViT with patch size 1 over the 32-d semantic
  half -- 3 layers in TokenFlow -- then ``Linear-Tanh-Linear`` to the teacher's width) is
  trained with ``1 - cos`` to the frozen teacher's patch features; the *pixel* decoder (VQGAN
  conv decoder after a 1x1 ``post_quant_conv``) with L2 (LPIPS and the PatchGAN are added by
  the training script, ``train/tokenizer.py``, from ``tokenizers_vis.losses``).
- **Tokens**: a discrete pyramid (``sum p_k^2`` ids; 561 for CLIP-B at 224 px). The same ids
  feed :meth:`TokenFlowTokenizer.decode` (pixel half -> images: generation) and
  :meth:`TokenFlowTokenizer.semantic_latents` / :meth:`~TokenFlowTokenizer.semantic_features`
  (semantic half -> understanding).

Loss (``forward``): ``L2 (+ l1_weight L1) + mean over scales (codebook + beta commit [+ entropy])
+ semantic_weight * (1 - cos)`` -- the reference's plain sum (weights 1).

The teacher is a constructor argument (``tokenizers_vis.teacher``), held outside the
``state_dict`` and built lazily. ``semantic_encoder="teacher"`` builds the teacher's
*architecture* without weights at construction (so building never loads the teacher) and copies
the teacher's weights into it on the first training forward (a persistent flag,
``semantic_init``, makes this happen once, also across save/load and resume; call
:meth:`~TokenFlowTokenizer.init_semantic_from_teacher` to do it explicitly). For the paper
configs that is a timm ViT (``teacher="timm:<name>@<weights.safetensors>"``); for the tiny Shapes
config it is the Shapes feature network (``eval/shapes-net``, 8x8x128 patch features).
``semantic_encoder="conv"`` uses a thin conv encoder instead (any teacher, or none).

Deviations from the reference (documented choices):

- timm's CLIP ViT-B/16 patch tokens are 768-d (final LayerNorm, no CLIP projection), so the
  semantic decoder predicts 768-d features; the reference distils OpenAI CLIP's 512-d projected
  tokens. The teacher is resized/normalised by ``tokenizers_vis.teacher`` (timm's CLIP mean/std).
- The semantic decoder has no class token (the reference's VQKD ViT carries one it discards).
- With the trainer's ``--ema``, the EMA copy starts from the randomly initialised semantic
  encoder (the teacher copy happens at the first step); train without ``--ema`` or call
  ``init_semantic_from_teacher()`` before training.
- Only the CLIP-B 224 configuration is registered at paper scale; ViTamin-XL 256 and SigLIP 384
  need teacher pieces (second-to-last SigLIP layer, 432-px pixel branch) not modelled here.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Encoder
from timm.models.vision_transformer import Block
from torch import nn

from tokenizers_vis.quantizers.dual import DualMultiScaleVQ
from tokenizers_vis.teacher import TeacherSlot, _TimmTeacher
from tokenizers_vis.vq import VQTokenizer
from zoo.registry import register
from zoo.tokens import Tokens

PAPER = "TokenFlow, Qu et al. 2024 (arXiv 2412.03069), §3 (dual codebook, shared mapping)"
TOKENFLOW_SCALES_B = (1, 2, 4, 6, 8, 10, 12, 14)
SEMANTIC_ENCODERS = ("teacher", "conv")


def _task_layer(cin: int, hidden: int, cout: int) -> nn.Sequential:
    """TokenFlow's ``Linear-Tanh-Linear`` applied per position (1x1 convs on a (B, C, h, w) map)."""
    layer = nn.Sequential(nn.Conv2d(cin, hidden, 1), nn.Tanh(), nn.Conv2d(hidden, cout, 1))
    for m in layer:
        if isinstance(m, nn.Conv2d):  # the reference's trunc_normal(std=0.02), zero bias
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return layer


class ConvSemanticEncoder(nn.Module):
    """A thin conv encoder (diffusers/taming ``Encoder``) as ``E_sem`` when no teacher copy is used."""

    def __init__(self, ch: int, ch_mult: list, width: int, norm_groups: int):
        super().__init__()
        n = len(ch_mult)
        self.body = Encoder(in_channels=3, out_channels=width, down_block_types=("DownEncoderBlock2D",) * n,
                            block_out_channels=tuple(ch * m for m in ch_mult), layers_per_block=1,
                            norm_num_groups=norm_groups, act_fn="silu", double_z=False,
                            mid_block_add_attention=False)
        self.patch_dim = int(width)

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


def teacher_architecture(spec: str) -> tuple[nn.Module, int]:
    """Build the architecture of teacher ``spec`` **without** its weights -> (module, channels).

    ``timm:<name>[@file]`` -> a trainable timm model (``patch_features`` as the teacher's);
    a registry name (``eval/shapes-net[:tag]``) or a checkpoint folder -> the model built from
    its config, which must expose ``patch_features`` and ``patch_dim``.
    """
    spec = str(spec)
    if spec in ("", "none"):
        raise ValueError("semantic_encoder='teacher' copies the teacher's architecture, but teacher='none'; "
                         "pass a teacher or use semantic_encoder='conv'")
    if spec.startswith("timm:"):
        m = _TimmTeacher(spec[5:].partition("@")[0], None)
        return m, int(m.model.num_features)
    if Path(spec).is_dir():
        from zoo.checkpoint import build_from_config, read_config

        m = build_from_config(read_config(spec), spec)
    else:
        import zoo

        m = zoo.create(spec.partition(":")[0])
    dim = getattr(m, "patch_dim", None)
    if not hasattr(m, "patch_features") or dim is None:
        raise ValueError(f"teacher {spec!r} ({type(m).__name__}) needs patch_features(images) and patch_dim "
                         f"to be copied as the semantic encoder; use semantic_encoder='conv'")
    return m, int(dim)


class SemanticDecoder(nn.Module):
    """TokenFlow's semantic decoder: a ViT over the ``in_dim`` semantic half with patch size 1
    (learned absolute positions, pre-norm timm blocks), then ``Linear-Tanh-Linear`` to ``out_dim``
    (the teacher's feature width). (B, in_dim, g, g) -> (B, out_dim, g, g)."""

    def __init__(self, in_dim: int, grid: int, dim: int, depth: int, heads: int, out_dim: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"sem_decoder_dim {dim} must be divisible by sem_decoder_heads {heads}")
        self.grid = int(grid)
        self.embed = nn.Linear(in_dim, dim)
        self.pos = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, out_dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B, _, h, w = z.shape
        if (h, w) != (self.grid, self.grid):
            raise ValueError(f"SemanticDecoder expects a {self.grid}x{self.grid} map, got {h}x{w}")
        x = self.embed(z.flatten(2).transpose(1, 2)) + self.pos
        for blk in self.blocks:
            x = blk(x)
        x = self.head(self.norm(x))
        return x.transpose(1, 2).reshape(B, -1, h, w)


def cosine_distillation(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean(1 - cos(pred, target))`` over positions of (B, C, h, w) maps (TokenFlow's semantic loss)."""
    if pred.shape != target.shape:
        raise ValueError(f"the semantic decoder gives {tuple(pred.shape)} but the teacher's patch features are "
                         f"{tuple(target.shape)}: set teacher_dim to the teacher's width and make its grid equal "
                         f"the last scale")
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=1)).mean()


class TokenFlowTokenizer(VQTokenizer):
    """TokenFlow tokenizer: images <-> a pyramid of shared ids into a dual (semantic, pixel) codebook.

    Args:
        image_size, ch, ch_mult, num_res_blocks, z_channels, level_attn, mid_attn, norm_groups,
            l1_weight: the pixel branch, as :class:`~tokenizers_vis.vq.VQTokenizer` (its 1x1
            ``quant_conv`` maps to ``pix_dim``). ``image_size / 2**(len(ch_mult)-1)`` must equal
            the last scale.
        codebook_size: K, rows of both codebooks (32768 in TokenFlow's scripts).
        sem_dim, pix_dim: widths of the semantic and pixel codes (32, 8).
        scales: token-map sides coarse to fine (CLIP-B 224: 1, 2, 4, 6, 8, 10, 12, 14).
        pix_weight: ``w`` of the shared-index criterion ``d_sem + w d_pix`` (1.0).
        scale_drop: probability of dropping one non-first scale in a training step (0.1).
        beta, entropy_weight, entropy_temperature: quantiser loss (see ``DualCodebook``).
        teacher: semantic teacher spec (``tokenizers_vis.teacher``); ``"none"`` disables the
            semantic loss.
        teacher_dim: channels of the teacher's patch features (the semantic decoder's output).
        semantic_encoder: ``"teacher"`` (the teacher's architecture, initialised from its weights
            at the first training step, then trained: TokenFlow) or ``"conv"`` (a thin conv
            encoder of width ``sem_conv_ch * ch_mult`` and output ``sem_conv_width``).
        sem_decoder_dim, sem_decoder_depth, sem_decoder_heads: the semantic decoder ViT
            (TokenFlow: 768 / 3 / 12).
        semantic_weight: weight of ``1 - cos`` (1.0).
    """

    def __init__(self, image_size: int = 224, ch: int = 128, ch_mult: list = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 256, codebook_size: int = 32768,
                 sem_dim: int = 32, pix_dim: int = 8, scales: list = TOKENFLOW_SCALES_B,
                 pix_weight: float = 1.0, scale_drop: float = 0.1, beta: float = 0.25,
                 entropy_weight: float = 0.0, entropy_temperature: float = 0.01,
                 teacher: str = "timm:vit_base_patch16_clip_224", teacher_dim: int = 768,
                 semantic_encoder: str = "teacher", sem_conv_ch: int = 16, sem_conv_width: int = 64,
                 sem_decoder_dim: int = 768, sem_decoder_depth: int = 3, sem_decoder_heads: int = 12,
                 semantic_weight: float = 1.0, level_attn: bool = True, mid_attn: bool = True,
                 norm_groups: int = 32, l1_weight: float = 0.0):
        scales = [int(s) for s in scales]
        if self.config.get("scales") is not None:
            self._zoo_config["scales"] = scales  # JSON list in config.json
        if semantic_encoder not in SEMANTIC_ENCODERS:
            raise ValueError(f"semantic_encoder must be one of {SEMANTIC_ENCODERS}, got {semantic_encoder!r}")
        # The parent builds the pixel branch (encoder, 1x1 quant_conv to pix_dim, post_quant_conv,
        # decoder) and a throw-away VectorQuantizer replaced below (codebook_size=2 keeps it tiny).
        super().__init__(image_size=image_size, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                         z_channels=z_channels, codebook_size=2, codebook_dim=pix_dim, level_attn=level_attn,
                         mid_attn=mid_attn, norm_groups=norm_groups, l1_weight=l1_weight)
        grid = self.image_size // self.downsample
        if not scales or scales[-1] != grid:
            raise ValueError(f"the last scale must equal the latent size image_size / {self.downsample} = {grid}, "
                             f"got scales={scales}")
        self.quantizer = DualMultiScaleVQ(codebook_size, sem_dim, pix_dim, scales=scales, pix_weight=pix_weight,
                                          scale_drop=scale_drop, beta=beta, entropy_weight=entropy_weight,
                                          entropy_temperature=entropy_temperature)
        self.spec = self.quantizer.token_spec()
        self.sem_dim, self.pix_dim = int(sem_dim), int(pix_dim)
        self.semantic_weight = float(semantic_weight)
        self.semantic_encoder_kind = semantic_encoder

        # -- semantic branch -----------------------------------------------------------------
        if semantic_encoder == "teacher":
            self.semantic_encoder, enc_dim = teacher_architecture(teacher)
            # set once the teacher's weights were copied in (saved with the model)
            self.register_buffer("semantic_init", torch.zeros((), dtype=torch.bool))
        else:
            self.semantic_encoder = ConvSemanticEncoder(sem_conv_ch, ch_mult, sem_conv_width, norm_groups)
            enc_dim = self.semantic_encoder.patch_dim
        self._semantic_init_cache = False
        self.encode_task_layer = _task_layer(enc_dim, enc_dim, sem_dim)
        self.semantic_decoder = SemanticDecoder(sem_dim, grid, sem_decoder_dim, sem_decoder_depth,
                                                sem_decoder_heads, teacher_dim)
        self.teacher = TeacherSlot(teacher)  # frozen, outside the state_dict, built on first use

    # ---- semantic encoder initialisation -------------------------------------------------------
    @torch.no_grad()
    def init_semantic_from_teacher(self) -> None:
        """Copy the teacher's weights into the semantic encoder (TokenFlow: E_sem starts as the
        teacher) and set ``semantic_init``. Needs ``semantic_encoder="teacher"`` and a teacher."""
        if self.semantic_encoder_kind != "teacher":
            raise ValueError("init_semantic_from_teacher needs semantic_encoder='teacher', got "
                             f"{self.semantic_encoder_kind!r}")
        src = self.teacher.model  # builds (loads) the teacher
        try:
            self.semantic_encoder.load_state_dict(src.state_dict())
        except RuntimeError as e:
            raise ValueError(f"the teacher's weights do not fit the semantic encoder built from {self.teacher.spec!r}: "
                             f"{e}") from None
        self.semantic_init.fill_(True)
        self._semantic_init_cache = True

    def _maybe_init_semantic(self) -> None:
        if self.semantic_encoder_kind != "teacher" or self._semantic_init_cache:
            return
        if bool(self.semantic_init):  # one sync until it is set
            self._semantic_init_cache = True
        elif self.teacher.enabled:
            self.init_semantic_from_teacher()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._semantic_init_cache = False  # re-read the loaded flag

    # ---- pieces ------------------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> the pre-quantisation map ``[E_sem -> sem_dim, E_pix -> pix_dim]`` (B, 40, g, g)."""
        self.check_images(images)
        sem = self.semantic_encoder.patch_features(images)
        g = self.quantizer.size
        if tuple(sem.shape[-2:]) != (g, g):
            raise ValueError(f"the semantic encoder gives a {sem.shape[-2]}x{sem.shape[-1]} map but the last scale is "
                             f"{g}x{g}; pick a teacher whose patch grid matches image_size / {self.downsample}")
        sem = self.encode_task_layer(sem.to(self.last_layer.dtype))
        pix = self.quant_conv(self.encoder(images))
        return torch.cat([sem, pix], dim=1)

    def quantize(self, images: torch.Tensor):
        """images -> (f_hat (B, sem_dim + pix_dim, g, g), list of (B, p, p) ids, quantiser losses)."""
        return self.quantizer(self.features(images))

    def _fhat(self, tokens: Tokens) -> torch.Tensor:
        self.check_tokens(tokens)
        dev = self.last_layer.device
        return self.quantizer.indices_to_fhat([t.to(dev) for t in tokens.data])

    # ---- Tokenizer interface ----------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> Tokens:
        _, idx, _ = self.quantize(images)
        return Tokens(idx, self.spec, validate=False)

    def decode(self, tokens: Tokens) -> torch.Tensor:
        """Generation side: the **pixel** half ``sum_k up(C_pix[ids_k])`` -> pixel decoder -> images."""
        _, pix = self.quantizer.split_fhat(self._fhat(tokens))
        return self.decode_latents(pix)

    def semantic_latents(self, tokens: Tokens) -> torch.Tensor:
        """Understanding side: the **semantic** half ``sum_k up(C_sem[ids_k])`` (B, sem_dim, g, g)
        -- what TokenFlow feeds the multimodal LLM."""
        sem, _ = self.quantizer.split_fhat(self._fhat(tokens))
        return sem

    def semantic_features(self, tokens: Tokens) -> torch.Tensor:
        """The semantic decoder's reconstruction of the teacher's patch features from the same ids
        (B, teacher_dim, g, g)."""
        return self.semantic_decoder(self.semantic_latents(tokens))

    def forward(self, images: torch.Tensor):
        """``(recon, losses)``: ``loss = L2 (+ L1) + quantiser loss + semantic_weight * (1 - cos)``.

        The first training forward with ``semantic_encoder="teacher"`` copies the teacher's weights
        into the semantic encoder (see the module docstring). ``semantic`` is 0 without a teacher.
        """
        if self.training:
            self._maybe_init_semantic()
        f_hat, _, q = self.quantize(images)
        sem_hat, pix_hat = self.quantizer.split_fhat(f_hat)
        recon = self.decode_latents(pix_hat)
        rec = self.reconstruction_loss(recon, images)
        loss = rec + q["loss"]
        if self.teacher.enabled and self.semantic_weight > 0:
            sem = cosine_distillation(self.semantic_decoder(sem_hat), self.teacher(images))
            loss = loss + self.semantic_weight * sem
        else:
            sem = rec.new_zeros(())
        losses = {"loss": loss, "rec": rec.detach(), "semantic": sem.detach(), "commit": q["commit"].detach(),
                  "codebook": q["codebook"].detach(), "entropy": q["entropy"].detach(), "usage": q["usage"],
                  "perplexity": q["perplexity"]}
        return recon, losses


# ---- registered configs ------------------------------------------------------------------------------
# Shapes 64x64: pixel branch as msvq-tiny (f8, ch 16) -> 8x8, scales 1,2,3,4,6,8 (130 tokens), K = 1024;
# semantic encoder = a trainable copy of the Shapes feature network (8x8x128 patch features).
TINY = {"image_size": 64, "ch": 16, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 1, "z_channels": 32,
        "codebook_size": 1024, "sem_dim": 32, "pix_dim": 8, "scales": [1, 2, 3, 4, 6, 8], "pix_weight": 1.0,
        "scale_drop": 0.1, "beta": 0.25, "teacher": "eval/shapes-net:shapes", "teacher_dim": 128,
        "semantic_encoder": "teacher", "sem_decoder_dim": 64, "sem_decoder_depth": 2, "sem_decoder_heads": 4,
        "level_attn": False, "mid_attn": False, "norm_groups": 8}
# TokenFlow-B (reference scripts, teacher clipb_224): CLIP ViT-B/16 at 224 px -> 14x14, LlamaGen pixel
# VQ encoder/decoder (ch 128, [1,1,2,2,4], 2 res blocks, z 256), K = 32768, 8 scales -> 561 tokens.
TOKENFLOW_B = {"image_size": 224, "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "z_channels": 256,
               "codebook_size": 32768, "sem_dim": 32, "pix_dim": 8, "scales": list(TOKENFLOW_SCALES_B),
               "pix_weight": 1.0, "scale_drop": 0.1, "beta": 0.25, "teacher": "timm:vit_base_patch16_clip_224",
               "teacher_dim": 768, "semantic_encoder": "teacher", "sem_decoder_dim": 768, "sem_decoder_depth": 3,
               "sem_decoder_heads": 12, "level_attn": True, "mid_attn": True, "norm_groups": 32}


@register("tokenizer/tokenflow-tiny", paper=PAPER, weights={"shapes": "weights/tokenizer-tokenflow-tiny"})
def tokenflow_tiny(**overrides):
    """Tiny TokenFlow for Shapes 64x64: scales (1,2,3,4,6,8) -> 130 shared ids into 1024 x (32 + 8) codes."""
    return TokenFlowTokenizer(**{**TINY, **overrides})


# The paper and the reference do not state the tokenizer's parameter count, so no paper_params.
@register("tokenizer/tokenflow-b", paper=PAPER)
def tokenflow_b(**overrides):
    """TokenFlow-B: CLIP ViT-B/16 224 px semantic encoder + VQGAN pixel branch, 561 ids into 32768 x (32 + 8)."""
    return TokenFlowTokenizer(**{**TOKENFLOW_B, **overrides})
