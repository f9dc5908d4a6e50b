"""Slot-MLLM's object-centric slot tokenizer (``tokenizer/slot-*``).

Chi et al. 2025, "Slot-MLLM: Object-Centric Visual Tokenization for Multimodal LLM"
(arXiv 2505.17726), §3 (code KU-AGI/Slot-MLLM), built on the SEED-LLaMA tokenizer
(``tokenizers_vis.seed``):

* a frozen image encoder (DINOv2 ViT-L/14 in the paper; the ``teacher`` spec here);
* a Q-Former whose cross-attention layers are **slot attention** (Locatello et al. 2020,
  §2.1; Slot-MLLM's ``"morph"`` slot config: one iteration, no GRU): softmax over the N
  queries (slots) for every image patch, then a weighted mean over the patches each slot won;
  the query self-attention is causal (``use_causal: true``), as in SEED;
* **residual VQ** (SoundStream / RQ-VAE; ``tokenizers_vis.quantizers.rvq``): 4 levels sharing
  **one** 8192 x 32 codebook, between ``Linear-Tanh-Linear`` projections (the reference's
  ``vector_quantize_pytorch.ResidualVQ(dim=768, codebook_dim=32, shared_codebook=True)``
  projects once around the residual chain too); legacy VQ losses as in SEED;
* a diffusion decoder conditioned on the (reconstructed) slots through cross-attention (the
  paper's SD-2.1-unCLIP + slot adapter; here ``tokenizers_vis.diffusion_decoder``).

Token serialisation (Slot-MLLM ``ImageTokenizer.encode``: ``ids.view(B, -1)`` of the
``(B, N, levels)`` RVQ indices): a 1D sequence of ``N * levels`` ids, **slot-major,
level-minor** -- position ``n * levels + d`` holds level ``d`` of slot ``n``; every id indexes
the one shared codebook, so ``vocab_size = codebook_size``. Not ``ordered``.

Stages (``stage``; ``forward(images, captions=None) -> (recon, losses)``), following the
paper's two stages with the loss terms that do not need pretrained LLM/CLIP parts:

* **1** (continuous slots): the decoder is conditioned on the continuous slots; diffusion loss
  (trains Q-Former + decoder), generation-embedding MSE of the slots to the teacher's pooled
  features, ITC on the mean slot when captions are given;
* **2** (quantisation): the Q-Former runs without gradient; RVQ loss, reconstruction of the
  continuous slots from the quantised ones (MSE -- the slots condition the decoder, so their
  scale matters), generation MSE and diffusion loss on the reconstructed slots;
* **3** (decoder, tiny scale only, as SEED's stage 3): the diffusion loss of the decoder given
  ``decoder_condition(encode(x))``; trains only the decoder (the tiny decoder learns shapes far
  more slowly than the Q-Former learns to encode them);
* **0** (default, joint): stage 2's terms, with the diffusion and generation losses (and ITC
  when captions are given) also reaching the Q-Former through the straight-through RVQ; the
  RVQ and slot-reconstruction losses never do (``QFormerTokenizer._quantize_routed``: they
  would collapse the slots); plus stage 1's generation MSE of the *continuous* slots with
  ``distill_weight``. ``python -m train tokenizer`` runs any stage (captions passed; stages
  chained with ``--init PREVIOUS/final --set stage=N``).

The weights are the constructor's ``*_weight`` arguments (Slot-MLLM stage 1: diffusion 1,
MSE 0.5, ITC 0.5; stage 2: codebook 1, recon 1, generation 0.5, diffusion 0.1). ``recon`` is the
decoder's one-step clean-image estimate from a noised copy (every stage has the diffusion
loss), not a reconstruction from the tokens.

At tiny scale, as for SEED: the generation target is the teacher's pooled patch features
(standardised, ``generation_target``), the decoder is a small pixel diffusion model at
``decoder_size`` trained here, and the ITC text tower is a small word encoder. Slot-MLLM's
captioning loss (needs the LLM) and DINOv2 slot-alignment term are not reproduced.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from generators.transformer import Transformer
from tokenizers_vis.qformer import QFormer
from tokenizers_vis.quantizers.rvq import ResidualVQ
from tokenizers_vis.seed import QFormerTokenizer, mlp_tanh
from zoo.registry import register
from zoo.tokens import Tokens, TokenSpec

SLOT_PAPER = "Slot-MLLM, Chi et al. 2025 (arXiv 2505.17726), §3"


class SlotTokenizer(QFormerTokenizer):
    """Slot tokenizer: images -> N slots x ``num_levels`` residual codes -> diffusion decoder.

    Args (paper values are the class defaults; see ``TINY``):
        image_size, teacher, context_dim, context_pos: as :class:`~tokenizers_vis.seed.SEEDTokenizer`
            (Slot-MLLM: DINOv2 ViT-L/14, 1024-d, at 224 px).
        num_slots, dim, depth, heads, cross_attention_freq, ffn_hidden, ffn_multiple: the slot
            Q-Former (32 slots x 768, BLIP-2 size); ``causal`` its query mask; ``assign_eps`` the
            slot weighted-mean epsilon (1.0 in the reference).
        num_levels, codebook_size, codebook_dim, beta: residual VQ (4 x one shared 8192 x 32).
        kmeans_init, restart_threshold, restart_every: optional codebook maintenance.
        recon_depth: transformer blocks that rebuild continuous slots from quantised ones.
        gen_down, gen_dim, gen_pool: generation head ``Linear-GELU-Linear(dim -> gen_down)`` per
            slot, flattened, ``Linear(N * gen_down, gen_dim)`` (the reference's ``image_down`` +
            ``distill_image_proj``), regressed on the pooled teacher features.
        text_dim, text_depth, text_len, itc_dim, label_smoothing: ITC on the mean slot (0: none).
        vq_weight, recon_weight, gen_weight, itc_weight, diffusion_weight: loss weights.
        distill_weight: in the joint stage 0, the generation MSE of the *continuous* slots (stage
            1's term) with this weight -- it gives a from-scratch Q-Former image-dependent slots
            before the codes separate images (see ``SEEDTokenizer``'s ``distill_weight``).
        decoder_*: the diffusion decoder (cross-attends to the ``dim``-wide slots); ``[]``: none.
        stage: 0 (joint), 1 (continuous), 2 (quantised) or 3 (decoder only).
    """

    def __init__(self, image_size: int = 224, teacher: str = "timm:vit_large_patch14_dinov2",
                 context_dim: int = 1024, context_pos: bool = False,
                 num_slots: int = 32, dim: int = 768, depth: int = 12, heads: int = 12,
                 cross_attention_freq: int = 2, ffn_hidden: int | None = 2048, ffn_multiple: int = 256,
                 causal: bool = True, assign_eps: float = 1.0,
                 num_levels: int = 4, codebook_size: int = 8192, codebook_dim: int = 32, beta: float = 0.25,
                 kmeans_init: bool = False, restart_threshold: float = 0.0, restart_every: int = 100,
                 recon_depth: int = 4, gen_down: int = 32, gen_dim: int = 1024, gen_pool: str = "meanmax",
                 text_dim: int = 0, text_depth: int = 2, text_len: int = 16, itc_dim: int = 256,
                 label_smoothing: float = 0.1,
                 vq_weight: float = 1.0, recon_weight: float = 1.0, gen_weight: float = 0.5,
                 itc_weight: float = 0.5, diffusion_weight: float = 1.0, distill_weight: float = 0.0,
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
            itc_dim=itc_dim, label_smoothing=label_smoothing, cond_dim=dim, decoder_size=decoder_size,
            decoder_channels=decoder_channels, decoder_layers=decoder_layers,
            decoder_attn_levels=decoder_attn_levels, decoder_heads=decoder_heads,
            decoder_groups=decoder_groups, global_cond=global_cond, cond_dropout=cond_dropout,
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, sampler=sampler,
            sample_steps=sample_steps, guidance_scale=guidance_scale, sample_seed=sample_seed,
            gen_pool=gen_pool, gen_dim=gen_dim, prediction_type=prediction_type)
        self.num_slots, self.dim, self.num_levels = int(num_slots), int(dim), int(num_levels)
        self.weights = {"vq": float(vq_weight), "recon": float(recon_weight), "gen": float(gen_weight),
                        "itc": float(itc_weight), "diffusion": float(diffusion_weight),
                        "distill": float(distill_weight)}
        self.qformer = QFormer(num_slots, dim, depth, heads, context_dim, cross_attention_freq, causal=causal,
                               slot=True, assign_eps=assign_eps, ffn_multiple=ffn_multiple, ffn_hidden=ffn_hidden)
        if text_dim:
            self.vision_proj = nn.Linear(dim, itc_dim)
        self.encode_task = mlp_tanh(dim, dim, codebook_dim)
        self.quantizer = ResidualVQ(num_levels, codebook_size, codebook_dim, shared_codebook=True, beta=beta,
                                    l2_norm=False, legacy=True, kmeans_init=kmeans_init,
                                    restart_threshold=restart_threshold, restart_every=restart_every)
        self.decode_task = mlp_tanh(codebook_dim, codebook_dim, dim)
        self.recon_head = Transformer(dim, recon_depth, heads, ffn_multiple, rope="1d",
                                      ffn_hidden=ffn_hidden if ffn_hidden else None)
        # the reference's image_down is Linear-ReLU-Linear-ReLU-Linear (768 -> 256 -> 128 -> 32); one
        # GELU hidden layer here (a ReLU before an 8-wide bottleneck died within 100 steps)
        self.gen_down = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, gen_down))
        self.gen_proj = nn.Linear(num_slots * gen_down, gen_dim)
        self.spec = TokenSpec(kind="discrete", layout="sequence", shape=(num_slots * num_levels,),
                              vocab_size=codebook_size, ordered=False)

    # ---- pieces --------------------------------------------------------------------------
    def slots(self, images: torch.Tensor, fmap: torch.Tensor | None = None) -> torch.Tensor:
        """Continuous slots ``(B, num_slots, dim)`` (the slot Q-Former's outputs)."""
        self.check_images(images)
        if fmap is None:
            fmap = self.teacher_features(images)
        return self.qformer(self.context(fmap))

    def slot_attention(self) -> list:
        """Slot maps ``(B, heads, N_slots, M_patches)`` of the last forward, one per slot layer."""
        return self.qformer.slot_attention()

    def quantize(self, q: torch.Tensor):
        """Slots -> ``(z_q (B, N, codebook_dim), ids (B, N, num_levels), RVQ losses)``.

        ``z_q`` is the sum over levels of the shared codebook's vectors (straight-through)."""
        z = self.encode_task(q)
        z_q, idx, losses = self.quantizer(z.transpose(1, 2).unsqueeze(-1))
        return z_q.squeeze(-1).transpose(1, 2), idx.squeeze(2), losses

    def encode_ids(self, images: torch.Tensor) -> torch.Tensor:
        """RVQ ids ``(B, num_slots, num_levels)`` (the token sequence before serialisation)."""
        return self.quantize(self.slots(images))[1]

    def ids_to_tokens(self, ids: torch.Tensor) -> Tokens:
        """``(B, N, levels)`` -> slot-major, level-minor ``Tokens`` ``(B, N * levels)``."""
        if ids.dim() != 3 or tuple(ids.shape[1:]) != (self.num_slots, self.num_levels):
            raise ValueError(f"expected RVQ ids (B, {self.num_slots}, {self.num_levels}), got {tuple(ids.shape)}")
        return Tokens(ids.reshape(ids.shape[0], -1), self.spec, validate=False)

    def tokens_to_ids(self, tokens: Tokens) -> torch.Tensor:
        ids = self.check_tokens(tokens).data
        return ids.view(ids.shape[0], self.num_slots, self.num_levels)

    def reconstruct_slots(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised codes ``(B, N, codebook_dim)`` -> continuous-slot estimate ``(B, N, dim)``
        (the decoder's condition)."""
        return self.recon_head(self.decode_task(z_q))

    def generation_embedding(self, slots: torch.Tensor) -> torch.Tensor:
        return self.gen_proj(self.gen_down(slots).flatten(1))

    def decoder_condition(self, tokens: Tokens) -> torch.Tensor:
        ids = self.tokens_to_ids(tokens).to(self.gen_proj.weight.device)
        z_q = self.quantizer.lookup(ids.unsqueeze(2)).squeeze(-1).transpose(1, 2)
        return self.reconstruct_slots(z_q)

    # ---- Tokenizer interface ---------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> Tokens:
        return self.ids_to_tokens(self.encode_ids(images))

    def forward(self, images: torch.Tensor, captions=None):
        """One training step of ``self.stage``: ``(recon, losses)``; see the module docstring."""
        s, w = self.stage, self.weights
        if s == 3:  # decoder only: the condition is exactly what decode() will see for the tokens
            self._require_decoder()
            with torch.no_grad():
                cond = self.decoder_condition(self.encode(self.check_images(images)))
            diff, recon = self.diffusion_loss(images, cond)
            return recon, {"diffusion": diff.detach(), "loss": w["diffusion"] * diff}
        fmap = self.teacher_features(self.check_images(images))
        target = self.generation_target(fmap)
        losses: dict = {}
        total = images.new_zeros(())
        with self._grad(s in (0, 1)):
            q = self.slots(images, fmap)
        if s in (0, 1) and captions is not None:
            itc = self.itc_loss(self.vision_proj(q.mean(1)), captions)
            total = total + w["itc"] * itc
            losses["itc"] = itc.detach()
            losses["temp"] = self.temp.detach().clone()
        if s == 1:
            cond = q
        else:
            z_cb, z_sem, _, ql = self._quantize_routed(q, q_grad=s == 0)
            rec_cb = self.reconstruct_slots(z_cb)
            cond = rec_cb if s == 2 else self.reconstruct_slots(z_sem)
            rec = F.mse_loss(rec_cb.float(), q.detach().float())
            total = total + w["vq"] * ql["loss"] + w["recon"] * rec
            losses.update(vq=ql["loss"].detach(), commit=ql["commit"].detach(), codebook=ql["codebook"].detach(),
                          rec_mse=rec.detach(), usage=ql["usage"], perplexity=ql["perplexity"])
        gen_mse = F.mse_loss(self.generation_embedding(cond).float(), target.float())
        total = total + w["gen"] * gen_mse
        losses["gen_mse"] = gen_mse.detach()
        if s == 0 and w["distill"] > 0:  # stage 1's continuous-slot term, kept in the joint mode
            distill = F.mse_loss(self.generation_embedding(q).float(), target.float())
            total = total + w["distill"] * distill
            losses["distill"] = distill.detach()
        recon = None
        if self.decoder is not None:
            diff, recon = self.diffusion_loss(images, cond)
            total = total + w["diffusion"] * diff
            losses["diffusion"] = diff.detach()
        losses["loss"] = total
        return recon, losses


# ---- registered configs ------------------------------------------------------------------------
# Shapes 64x64, teacher eval/shapes-net (8x8x128): 8 slots of width 64 x 4 RVQ levels over one
# shared 1024 x 32 codebook (32 ids per image; k-means init + dead-code restart, checked every 25
# quantiser calls so the check visits every level), (16, 32, 64)-channel UNet at 32x32
# cross-attending to the 8 reconstructed slots at 8x8, predicting x0 (as seed-tiny, see there).
TINY = {"image_size": 64, "teacher": "eval/shapes-net:shapes", "context_dim": 128, "context_pos": True,
        "num_slots": 8, "dim": 64, "depth": 2, "heads": 4, "cross_attention_freq": 1, "ffn_hidden": None,
        "ffn_multiple": 32, "num_levels": 4, "codebook_size": 1024, "codebook_dim": 32, "kmeans_init": True,
        "restart_threshold": 0.03, "restart_every": 25, "recon_depth": 1, "gen_down": 8, "gen_dim": 256,
        "text_dim": 64, "text_depth": 1, "itc_dim": 64, "distill_weight": 0.5,
        "decoder_size": 32, "decoder_channels": [16, 32, 64], "decoder_layers": 1, "decoder_attn_levels": 1,
        "decoder_heads": 4, "decoder_groups": 8, "prediction_type": "sample", "sample_steps": 25}


@register("tokenizer/slot-tiny", paper=SLOT_PAPER, weights={"shapes": "weights/tokenizer-slot-tiny"})
def slot_tiny(**overrides):
    """Tiny Slot-MLLM tokenizer for Shapes 64x64: 8 slots x 4 shared-codebook RVQ levels, 32-px diffusion decoder."""
    return SlotTokenizer(**{**TINY, **overrides})


@register("tokenizer/slot-blip2", paper=SLOT_PAPER)
def slot_blip2(**overrides):
    """Slot-MLLM tokenizer at paper size: BLIP-2-size slot Q-Former (32 x 768) + 4-level RVQ over one
    8192 x 32 codebook; no pixel decoder (the paper's SD-2.1-unCLIP + slot adapter is not included)."""
    return SlotTokenizer(**overrides)
