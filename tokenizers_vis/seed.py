"""SEED: 1D causal Q-Former tokens decoded by a diffusion model (``tokenizer/seed-*``).

Ge et al. 2023, "Planting a SEED of Vision in Large Language Model" (arXiv 2307.08041), §2.1,
and its SEED-LLaMA tokenizer (Ge et al. 2023, arXiv 2310.01218, §2.1; code AILab-CVC/SEED):

* a **frozen image encoder** gives patch features (EVA-CLIP ViT-g/14 in the paper; here the
  ``teacher`` spec of ``tokenizers_vis.teacher`` -- ``eval/shapes-net:shapes`` 8x8x128 for the
  tiny config);
* a **causal Q-Former** (§2.1.1): N learned queries (32) whose self-attention is
  lower-triangular and whose cross-attention to the patches is full;
* **stage 1** (§2.1.1): image-text contrastive learning (BLIP-2 ITC) on the **last** query's
  output -- under the causal mask the only one that has seen every query;
* **stage 2** (§2.1.2): ``Linear-Tanh-Linear`` down to 32-d, a VQ codebook of 8192 codes (no
  l2 norm, uniform(-1/K, 1/K) init, taming's *legacy* loss ``||sg(z_q) - z||^2 +
  0.25 ||z_q - sg(z)||^2``), ``Linear-Tanh-Linear`` back up; a transformer "recon" head
  regresses the continuous causal embeddings (``1 - cos``) and a transformer + **reverse
  Q-Former** regresses the **generation embedding** (MSE); loss ``5 L_vq + 2 L_rec + 0.5 L_gen``;
  the Q-Former is frozen;
* **decoder**: an off-the-shelf SD-2.1-unCLIP conditioned on the generation embedding (not
  trained, not part of SEED's parameters).

The zoo's tiny version keeps every piece but the pretrained parts:

* the generation-embedding target (SD-unCLIP's CLIP-ViT-H image embedding at paper scale) is
  the teacher's pooled patch features ``[mean, max]`` (for ``eval/shapes-net`` exactly its
  256-d Shapes-FID embedding);
* the decoder is a small pixel diffusion model (``tokenizers_vis.diffusion_decoder``) at
  ``decoder_size`` (32 px, upsampled bilinearly to ``image_size`` = 64: CPU cost), trained here
  as **stage 3** with the epsilon loss on images given the generation embedding of their tokens;
* the ITC text tower is ``generators.conditioning.WordTextEncoder`` over Shapes caption words
  (``zoo.data.text``), mean-pooled over the caption's words (BLIP-2 uses its BERT [CLS]).

Stages (``stage`` constructor argument; ``forward(images, captions=None) -> (recon, losses)``):

* **1** (Q-Former): ITC on the last query (when ``captions`` are given) and, at tiny scale,
  ``distill_weight x`` MSE of the generation head applied to the *continuous* causal
  embeddings (a from-scratch Q-Former needs a caption-free signal; SEED's starts from BLIP-2);
  trains the Q-Former, the text tower and the generation head. ``recon`` is ``None``.
* **2** (codebook): ``5 L_vq + 2 (1 - cos) + 0.5 MSE``; the Q-Former runs without gradient (as
  frozen); trains the projections, codebook, recon head and generation head. ``recon`` is ``None``.
* **3** (decoder, tiny scale only): the epsilon loss of the diffusion decoder given the
  detached generation embedding of the image's tokens; trains only the decoder.
* **0** (default, joint): all terms at once. Each part learns from its own stage's loss; the
  Q-Former also gets the generation-embedding gradient through the straight-through codes,
  but never the VQ / recon gradients (``QFormerTokenizer._quantize_routed``: they collapse it
  to a constant that they then reconstruct perfectly).

``python -m train tokenizer`` runs any stage: it passes the Shapes captions (for ITC) and chains
stages with ``--init PREVIOUS/final --set stage=N``.

``recon`` of stages 0/3 is the decoder's one-step estimate of the clean image from a noised
copy (upsampled to ``image_size``), *not* a reconstruction from the tokens: use
``decode(encode(x))`` for that.

Tokens: ``discrete/sequence`` of ``num_queries`` ids. The queries are causal, but prefixes are
not shown to decode meaningfully, so ``ordered=False``. Reconstructions are semantic
re-generations: measure attribute agreement (``zoo.data.shapes.detect``), not PSNR.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from generators.conditioning import WordTextEncoder
from generators.transformer import Transformer
from tokenizers_vis.base import Tokenizer
from tokenizers_vis.diffusion_decoder import DiffusionDecoder
from tokenizers_vis.qformer import (
    QFormer,
    contrastive_loss,
    feature_map_to_tokens,
    pooled_target,
)
from tokenizers_vis.quantizers.vq import VectorQuantizer
from tokenizers_vis.teacher import TeacherSlot
from zoo.registry import register
from zoo.tokens import Tokens, TokenSpec

SEED_PAPER = "SEED, Ge et al. 2023 (arXiv 2307.08041), §2.1; SEED-LLaMA tokenizer (arXiv 2310.01218)"


def mlp_tanh(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """SEED's ``Linear-Tanh-Linear`` projection (``encode_task_layer`` / ``decode_task_layer``)."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))


def _masked_mean(h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    keep = (ids != 0).to(h.dtype).unsqueeze(-1)
    # an empty caption (all padding) falls back to the mean over all positions (the null sequence)
    keep = torch.where(keep.sum(1, keepdim=True) > 0, keep, torch.ones_like(keep))
    return (h * keep).sum(1) / keep.sum(1)


class QFormerTokenizer(Tokenizer):
    """What SEED and the slot tokenizer share: the frozen teacher, the ITC text tower, the
    diffusion decoder and the seeded decode. Subclasses build the rest in their constructor."""

    image_size: int
    stage: int

    # ---- construction helpers ---------------------------------------------------------------
    def _build_common(self, *, image_size, teacher, context_dim, context_pos, stages, stage,
                      text_dim, text_depth, text_len, itc_dim, label_smoothing,
                      cond_dim, decoder_size, decoder_channels, decoder_layers, decoder_attn_levels,
                      decoder_heads, decoder_groups, global_cond, cond_dropout, num_train_timesteps,
                      beta_schedule, sampler, sample_steps, guidance_scale, sample_seed, gen_pool,
                      gen_dim=None, prediction_type="epsilon"):
        if int(stage) not in stages:
            raise ValueError(f"{type(self).__name__}: stage must be one of {sorted(stages)}, got {stage!r}")
        self.image_size, self.stage = int(image_size), int(stage)
        self.context_dim, self.context_pos = int(context_dim), bool(context_pos)
        self.gen_pool, self.sample_seed = gen_pool, int(sample_seed)
        pooled_target(torch.zeros(1, 4, 1, 1), gen_pool)  # validates the mode early
        # running statistics that standardise the generation target (see generation_target)
        self.register_buffer("gen_mean", torch.zeros(cond_dim if gen_dim is None else gen_dim))
        self.register_buffer("gen_var", torch.ones(cond_dim if gen_dim is None else gen_dim))
        self.register_buffer("gen_count", torch.zeros((), dtype=torch.long))
        # Frozen image encoder: outside the state dict, built on first use (tokenizers_vis.teacher).
        self.teacher = TeacherSlot(teacher)
        self.text_len, self.label_smoothing = int(text_len), float(label_smoothing)
        self.text_encoder = None
        if text_dim:
            from zoo.data.text import vocab_size

            self.text_encoder = WordTextEncoder(vocab_size(), text_len, text_dim, text_depth,
                                                heads=max(1, text_dim // 32), ffn_multiple=32)
            self.text_proj = nn.Linear(text_dim, itc_dim)
            self.temp = nn.Parameter(torch.tensor(0.07))  # BLIP-2: learnable, clamped to [1e-3, 0.5]
        self.decoder_size = int(decoder_size)
        self.decoder = None
        if decoder_channels:
            self.decoder = DiffusionDecoder(
                cond_dim, decoder_size, decoder_channels, decoder_layers, decoder_attn_levels, decoder_heads,
                decoder_groups, global_cond, cond_dropout, num_train_timesteps, beta_schedule,
                prediction_type, sampler, sample_steps, guidance_scale)

    # ---- teacher features -----------------------------------------------------------------
    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's ``(B, C, h, w)`` patch features (no gradient)."""
        fmap = self.teacher(images)
        if fmap.dim() != 4 or fmap.shape[1] != self.context_dim:
            raise ValueError(f"{self.registry_name or type(self).__name__}: teacher {self.teacher.spec!r} gave "
                             f"features {tuple(fmap.shape)}, expected (B, context_dim={self.context_dim}, h, w)")
        return fmap

    def context(self, fmap: torch.Tensor) -> torch.Tensor:
        return feature_map_to_tokens(fmap, self.context_pos)

    def generation_target(self, fmap: torch.Tensor) -> torch.Tensor:
        """The tiny-scale generation-embedding target: pooled teacher features (see module doc),
        standardised per channel with running statistics.

        As SD-unCLIP standardises the CLIP image embeddings it is conditioned on (its
        ``StableUnCLIPImageNormalizer``, fixed mean/std). Here the statistics are estimated
        while training (cumulative mean over the first 100 training batches, then an EMA with
        momentum 0.01) and kept as buffers. Without it the per-channel offsets of the pooled
        features (mean square ~5x their variance for ``eval/shapes-net``) dominate the MSE, and
        fitting them first drives the Q-Former to image-independent outputs.
        """
        t = pooled_target(fmap, self.gen_pool).float()
        if t.shape[1] != self.gen_mean.shape[0]:
            raise ValueError(f"the pooled teacher features ({self.gen_pool}) have {t.shape[1]} channels, "
                             f"but gen_dim is {self.gen_mean.shape[0]}")
        if self.training:
            with torch.no_grad():
                self.gen_count += 1
                m = max(1.0 / float(self.gen_count), 0.01)
                self.gen_mean.lerp_(t.mean(0), m)
                self.gen_var.lerp_(t.var(0, unbiased=False) if t.shape[0] > 1 else self.gen_var, m)
        return (t - self.gen_mean) * torch.rsqrt(self.gen_var + 1e-5)

    # ---- ITC (stage 1) ----------------------------------------------------------------------
    def caption_ids(self, captions) -> torch.Tensor:
        """Captions (list of str, or word ids (B, L)) -> word ids (B, text_len) on the model's device."""
        if isinstance(captions, torch.Tensor):
            ids = captions.long()
        else:
            from zoo.data.text import encode

            ids = encode(list(captions), max_len=self.text_len, truncate=True)
        return ids.to(self.text_proj.weight.device)

    def itc_loss(self, image_feat: torch.Tensor, captions) -> torch.Tensor:
        """BLIP-2 ITC between ``image_feat`` (B, itc_dim) and the captions' features."""
        if self.text_encoder is None:
            raise ValueError(f"{type(self).__name__} was built without a text encoder (text_dim=0): "
                             f"no image-text contrastive stage")
        ids = self.caption_ids(captions)
        if ids.shape[0] != image_feat.shape[0]:
            raise ValueError(f"got {ids.shape[0]} captions for {image_feat.shape[0]} images")
        text = self.text_proj(_masked_mean(self.text_encoder(ids), ids))
        same = (ids[:, None, :] == ids[None, :, :]).all(-1)  # identical captions are positives too
        return contrastive_loss(image_feat, text, self.temp.clamp(1e-3, 0.5), same, self.label_smoothing)

    # ---- decoder ----------------------------------------------------------------------------
    def _require_decoder(self) -> DiffusionDecoder:
        if self.decoder is None:
            raise RuntimeError(f"{self.registry_name or type(self).__name__} has no pixel decoder "
                               f"(decoder_channels=[]): at paper scale the tokens are decoded by "
                               f"SD-2.1-unCLIP (diffusers StableUnCLIPImg2ImgPipeline) from "
                               f"decoder_condition(tokens), which is not part of this model")
        return self.decoder

    def _to_decoder_res(self, images: torch.Tensor) -> torch.Tensor:
        if self.decoder_size == images.shape[-1]:
            return images
        return F.interpolate(images, size=(self.decoder_size, self.decoder_size), mode="bilinear",
                             antialias=True, align_corners=False)

    def _to_image_res(self, images: torch.Tensor) -> torch.Tensor:
        if self.decoder_size == self.image_size:
            return images
        return F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                             align_corners=False).clamp(-1, 1)

    def diffusion_loss(self, images: torch.Tensor, cond: torch.Tensor):
        """``(epsilon loss, x0 estimate at image_size)`` of the decoder on ``images`` given ``cond``."""
        loss, x0 = self._require_decoder().loss(self._to_decoder_res(images), cond)
        return loss, self._to_image_res(x0)

    def decoder_condition(self, tokens: Tokens) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, tokens: Tokens, *, steps: int | None = None, seed: int | None = None,
               generator: torch.Generator | None = None, guidance_scale: float | None = None,
               sampler: str | None = None) -> torch.Tensor:
        """Sample images ``(B, 3, image_size, image_size)`` in [-1, 1] for ``tokens``.

        A semantic re-generation: ``steps`` denoising steps of ``sampler`` ("ddim"/"ddpm";
        defaults from the config) with noise from ``generator``, or else from a generator seeded
        with ``seed`` (default: the config's ``sample_seed``), so ``decode`` is deterministic.
        """
        dec = self._require_decoder()
        cond = self.decoder_condition(tokens)
        if generator is None:
            generator = torch.Generator().manual_seed(self.sample_seed if seed is None else int(seed))
        out = dec.sample(cond, steps=steps, generator=generator, guidance_scale=guidance_scale, sampler=sampler)
        return self._to_image_res(out)

    @staticmethod
    def _grad(enabled: bool):
        return contextlib.nullcontext() if enabled else torch.no_grad()

    def quantize(self, q: torch.Tensor):  # pragma: no cover - interface
        raise NotImplementedError

    def _quantize_routed(self, q: torch.Tensor, q_grad: bool):
        """Quantise ``q`` twice over the same codes, with different gradient routes:

        ``(z_q_cb, z_q_sem, ids, losses)``. ``z_q_cb`` comes from ``encode_task(sg(q))``: the VQ
        losses and the reconstruction of ``q`` train the projections and codebook but never the
        Q-Former -- as in SEED's stage 2, where it is frozen; letting those losses reach it makes
        it collapse to a constant, which they then reconstruct perfectly (seen in the joint mode:
        ``rec_cos -> 0`` with ``gen_mse`` stuck at the target variance). ``z_q_sem`` has the same
        values with a straight-through path into ``q`` (when ``q_grad``): the semantic losses
        (generation embedding, diffusion) may train the Q-Former through it.
        """
        z_q, ids, losses = self.quantize(q.detach())
        if not q_grad:
            return z_q, z_q, ids, losses
        z = self.encode_task(q)
        return z_q, z + (z_q.detach() - z).detach(), ids, losses


class SEEDTokenizer(QFormerTokenizer):
    """SEED tokenizer: images -> ``num_queries`` causal discrete tokens -> diffusion decoder.

    Args (paper values are the class defaults; see ``TINY`` for the Shapes config):
        image_size: input side (224 in SEED).
        teacher: frozen image encoder spec (``tokenizers_vis.teacher``); ``context_dim`` its channels.
        context_pos: add 2D sin-cos positions to the patch features (the tiny conv teacher's
            features carry little position information; ViT features already do).
        num_queries, dim, depth, heads, cross_attention_freq, ffn_hidden, ffn_multiple: the
            causal Q-Former (BLIP-2: 32 queries, 768, 12 layers, 12 heads, cross-attention every
            2nd layer; ``ffn_hidden=2048`` SwiGLU has BERT's 3072-GELU FFN parameter count).
        codebook_size, codebook_dim, beta: VQ (8192 x 32, beta 0.25 on the codebook term: legacy).
        kmeans_init, restart_threshold, restart_every: optional codebook maintenance
            (:class:`VectorQuantizer`; off in SEED).
        recon_depth: transformer blocks of the recon head (4 in SEED).
        gen_blocks, gen_depth, gen_queries, gen_dim: generation head -- ``gen_blocks`` transformer
            blocks, then a reverse Q-Former of ``gen_depth`` blocks with ``gen_queries`` queries
            (1 in SEED-LLaMA), projected to ``gen_dim`` (1024 = unCLIP's image embedding).
        gen_pool: pooling of the teacher features that makes the tiny generation target.
        text_dim, text_depth, text_len, itc_dim, label_smoothing: ITC (0 disables the text tower;
            ``itc_dim`` 256 and smoothing 0.1 as SEED).
        vq_weight, recon_weight, gen_weight, itc_weight, diffusion_weight: loss weights
            (SEED stage 2: 5, 2, 0.5).
        distill_weight: weight of the tiny-scale Q-Former distillation (stages 0 and 1): the
            generation head applied to the *continuous* causal embeddings, MSE to the generation
            target (0 in SEED, whose Q-Former comes pretrained from BLIP-2 + ITC). Without it a
            from-scratch Q-Former gives near-identical outputs for every image, every image gets
            the same codes, and the straight-through gradient cannot separate them.
        decoder_size, decoder_channels, decoder_layers, decoder_heads, decoder_groups,
            global_cond, cond_dropout, num_train_timesteps, beta_schedule, prediction_type,
            sampler, sample_steps, guidance_scale, sample_seed: the diffusion decoder
            (:class:`DiffusionDecoder`); ``decoder_channels=[]`` builds none (paper scale).
        stage: 0 (joint), 1, 2 or 3 (module docstring).
    """

    def __init__(self, image_size: int = 224, teacher: str = "timm:eva_giant_patch14_clip_224",
                 context_dim: int = 1408, context_pos: bool = False,
                 num_queries: int = 32, dim: int = 768, depth: int = 12, heads: int = 12,
                 cross_attention_freq: int = 2, ffn_hidden: int | None = 2048, ffn_multiple: int = 256,
                 codebook_size: int = 8192, codebook_dim: int = 32, beta: float = 0.25,
                 kmeans_init: bool = False, restart_threshold: float = 0.0, restart_every: int = 100,
                 recon_depth: int = 4, gen_blocks: int = 4, gen_depth: int = 12, gen_queries: int = 1,
                 gen_dim: int = 1024, gen_pool: str = "meanmax",
                 text_dim: int = 0, text_depth: int = 2, text_len: int = 16, itc_dim: int = 256,
                 label_smoothing: float = 0.1,
                 vq_weight: float = 5.0, recon_weight: float = 2.0, gen_weight: float = 0.5,
                 itc_weight: float = 1.0, diffusion_weight: float = 1.0, distill_weight: float = 0.0,
                 decoder_size: int = 32, decoder_channels: list = (), decoder_layers: int = 1,
                 decoder_attn_levels: int = 1, decoder_heads: int = 4, decoder_groups: int = 8, global_cond: bool = True,
                 cond_dropout: float = 0.1, num_train_timesteps: int = 1000,
                 beta_schedule: str = "squaredcos_cap_v2", prediction_type: str = "epsilon",
                 sampler: str = "ddim", sample_steps: int = 25,
                 guidance_scale: float = 1.0, sample_seed: int = 0, stage: int = 0):
        super().__init__()
        self._build_common(
            image_size=image_size, teacher=teacher, context_dim=context_dim, context_pos=context_pos,
            stages=(0, 1, 2, 3), stage=stage, text_dim=text_dim, text_depth=text_depth, text_len=text_len,
            itc_dim=itc_dim, label_smoothing=label_smoothing, cond_dim=gen_dim, decoder_size=decoder_size,
            decoder_channels=decoder_channels, decoder_layers=decoder_layers,
            decoder_attn_levels=decoder_attn_levels, decoder_heads=decoder_heads,
            decoder_groups=decoder_groups, global_cond=global_cond, cond_dropout=cond_dropout,
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, sampler=sampler,
            sample_steps=sample_steps, guidance_scale=guidance_scale, sample_seed=sample_seed,
            gen_pool=gen_pool, gen_dim=gen_dim, prediction_type=prediction_type)
        self.num_queries, self.dim = int(num_queries), int(dim)
        self.weights = {"vq": float(vq_weight), "recon": float(recon_weight), "gen": float(gen_weight),
                        "itc": float(itc_weight), "diffusion": float(diffusion_weight),
                        "distill": float(distill_weight)}
        self.qformer = QFormer(num_queries, dim, depth, heads, context_dim, cross_attention_freq,
                               causal=True, ffn_multiple=ffn_multiple, ffn_hidden=ffn_hidden)
        if text_dim:
            self.vision_proj = nn.Linear(dim, itc_dim)
        self.encode_task = mlp_tanh(dim, dim, codebook_dim)
        self.quantizer = VectorQuantizer(codebook_size, codebook_dim, beta=beta, l2_norm=False, legacy=True,
                                         kmeans_init=kmeans_init, restart_threshold=restart_threshold,
                                         restart_every=restart_every)
        self.decode_task = mlp_tanh(codebook_dim, codebook_dim, dim)
        ffn_h = ffn_hidden if ffn_hidden else None
        self.recon_head = Transformer(dim, recon_depth, heads, ffn_multiple, rope="1d", ffn_hidden=ffn_h)
        self.gen_head = Transformer(dim, gen_blocks, heads, ffn_multiple, rope="1d", ffn_hidden=ffn_h)
        self.reverse_qformer = QFormer(gen_queries, dim, gen_depth, heads, dim, cross_attention_freq,
                                       ffn_multiple=ffn_multiple, ffn_hidden=ffn_hidden)
        self.gen_proj = nn.Linear(dim, gen_dim)
        self.spec = TokenSpec(kind="discrete", layout="sequence", shape=(num_queries,),
                              vocab_size=codebook_size, ordered=False)

    # ---- pieces --------------------------------------------------------------------------
    def causal_embeddings(self, images: torch.Tensor, fmap: torch.Tensor | None = None) -> torch.Tensor:
        """The causal Q-Former outputs ``(B, num_queries, dim)``."""
        self.check_images(images)
        if fmap is None:
            fmap = self.teacher_features(images)
        return self.qformer(self.context(fmap))

    def contrastive_feature(self, q: torch.Tensor) -> torch.Tensor:
        """SEED stage 1's image feature: the **last** causal query, projected (B, itc_dim)."""
        return self.vision_proj(q[:, -1])

    def quantize(self, q: torch.Tensor):
        """Causal embeddings -> ``(z_q (B, N, codebook_dim), ids (B, N), VQ losses)``."""
        z = self.encode_task(q)
        z_q, idx, losses = self.quantizer(z.transpose(1, 2).unsqueeze(-1))
        return z_q.squeeze(-1).transpose(1, 2), idx.squeeze(-1), losses

    def generation_embedding(self, up: torch.Tensor) -> torch.Tensor:
        """Up-projected codes ``(B, N, dim)`` -> generation embedding ``(B, gen_queries, gen_dim)``."""
        return self.gen_proj(self.reverse_qformer(self.gen_head(up)))

    def codes(self, tokens: Tokens) -> torch.Tensor:
        ids = self.check_tokens(tokens).data.to(self.gen_proj.weight.device)
        return self.quantizer.lookup(ids.unsqueeze(-1)).squeeze(-1).transpose(1, 2)

    def decoder_condition(self, tokens: Tokens) -> torch.Tensor:
        """The decoder's condition for ``tokens``: their generation embedding ``(B, gen_queries, gen_dim)``."""
        return self.generation_embedding(self.decode_task(self.codes(tokens)))

    # ---- Tokenizer interface ---------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> Tokens:
        _, idx, _ = self.quantize(self.causal_embeddings(images))
        return Tokens(idx, self.spec, validate=False)

    def forward(self, images: torch.Tensor, captions=None):
        """One training step of ``self.stage``: ``(recon or None, losses)``; see the module docstring."""
        s, w = self.stage, self.weights
        fmap = self.teacher_features(self.check_images(images))
        losses: dict = {}
        total = images.new_zeros(())
        with self._grad(s in (0, 1)):
            q = self.causal_embeddings(images, fmap)
        if s == 1 and captions is None and w["distill"] <= 0:
            raise ValueError("SEED stage 1 (image-text contrastive) needs captions: call "
                             "forward(images, captions=[...]) (the caption strings or word ids), or "
                             "build the model with distill_weight > 0")
        if s in (0, 1) and captions is not None:
            itc = self.itc_loss(self.contrastive_feature(q), captions)
            total = total + w["itc"] * itc
            losses["itc"] = itc.detach()
            losses["temp"] = self.temp.detach().clone()
        if s in (0, 1) and w["distill"] > 0:
            distill = F.mse_loss(self.generation_embedding(q).mean(1).float(), self.generation_target(fmap).float())
            total = total + w["distill"] * distill
            losses["distill"] = distill.detach()
        recon = None
        if s in (0, 2, 3):
            with self._grad(s in (0, 2)):
                z_cb, z_sem, _, ql = self._quantize_routed(q, q_grad=s == 0)
                gen = self.generation_embedding(self.decode_task(z_sem))
            if s in (0, 2):
                pred = self.recon_head(self.decode_task(z_cb))
                rec = (1 - F.cosine_similarity(pred.float(), q.detach().float(), dim=-1)).mean()
                gen_mse = F.mse_loss(gen.mean(1).float(), self.generation_target(fmap).float())
                total = total + w["vq"] * ql["loss"] + w["recon"] * rec + w["gen"] * gen_mse
                losses.update(vq=ql["loss"].detach(), commit=ql["commit"].detach(),
                              codebook=ql["codebook"].detach(), rec_cos=rec.detach(), gen_mse=gen_mse.detach(),
                              usage=ql["usage"], perplexity=ql["perplexity"])
            if s in (0, 3) and self.decoder is not None:
                diff, recon = self.diffusion_loss(images, gen.detach())
                total = total + w["diffusion"] * diff
                losses["diffusion"] = diff.detach()
            elif s == 3:
                self._require_decoder()
        losses["loss"] = total
        return recon, losses


# ---- registered configs ------------------------------------------------------------------------
# Shapes 64x64, teacher eval/shapes-net (8x8x128 patch features): 8 causal queries of width 64,
# codebook 1024 x 32 (k-means init + dead-code restart: without them one code took every query
# within 20 steps), generation target = the teacher's 256-d pooled features, and a
# (16, 32, 64)-channel pixel UNet at 32x32 with attention only at 8x8 (3x cheaper per step than
# attention at 16x16 too), upsampled to 64. ~1.56M parameters, ~1.1M of them UNet. The UNet
# predicts x0 ("sample"), not epsilon: on the same trained tokenizer, after ~1,500 decoder steps
# of batch 32, epsilon samples kept colour casts and grain (colour agreement with the input 0.28,
# count 0.63 on 128 Shapes test images) while x0 samples got colour and count right on 128/128
# (shape 0.54, still rising); v-prediction was in between (colour 0.95, shape 0.28).
TINY = {"image_size": 64, "teacher": "eval/shapes-net:shapes", "context_dim": 128, "context_pos": True,
        "num_queries": 8, "dim": 64, "depth": 2, "heads": 4, "cross_attention_freq": 1, "ffn_hidden": None,
        "ffn_multiple": 32, "codebook_size": 1024, "codebook_dim": 32, "kmeans_init": True,
        "restart_threshold": 0.03, "restart_every": 50, "recon_depth": 1, "gen_blocks": 1, "gen_depth": 1,
        "gen_queries": 1, "gen_dim": 256, "text_dim": 64, "text_depth": 1, "itc_dim": 64, "distill_weight": 1.0,
        "decoder_size": 32, "decoder_channels": [16, 32, 64], "decoder_layers": 1, "decoder_attn_levels": 1,
        "decoder_heads": 4, "decoder_groups": 8, "prediction_type": "sample", "sample_steps": 25}


@register("tokenizer/seed-tiny", paper=SEED_PAPER, weights={"shapes": "weights/tokenizer-seed-tiny"})
def seed_tiny(**overrides):
    """Tiny SEED for Shapes 64x64: 8 causal Q-Former tokens, codebook 1024 x 32, 32-px diffusion decoder."""
    return SEEDTokenizer(**{**TINY, **overrides})


@register("tokenizer/seed-blip2", paper=SEED_PAPER)
def seed_blip2(**overrides):
    """SEED at paper size: BLIP-2-size causal Q-Former (32 x 768, 12 layers) + VQ 8192 x 32; no pixel
    decoder (the paper decodes with SD-2.1-unCLIP, not part of SEED's parameters)."""
    return SEEDTokenizer(**overrides)
