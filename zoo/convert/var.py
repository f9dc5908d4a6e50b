"""VAR's released checkpoints -> arzoo (``arzoo convert --from var``).

FoundationVision/VAR (Tian et al. 2024, arXiv 2404.02905) releases

* ``vae_ch160v4096z32.pth`` -- the multi-scale VQVAE (``models/vqvae.py`` ``VQVAE`` on
  ``models/basic_vae.py`` and ``models/quant.py``) -> ``tokenizer/msvq-var``
  (:class:`tokenizers_vis.msvq.MultiScaleVQTokenizer`);
* ``var_d16.pth`` .. ``var_d30.pth`` -- the transformer (``models/var.py`` ``VAR`` on
  ``models/basic_var.py``) -> ``generator/var-d16`` .. ``var-d30``
  (:class:`generators.var.NextScaleAR`). VAR builds its next-scale input with the VQVAE's
  codebook and phi convs (``vae_quant_proxy``), which the ``.pth`` does not hold: convert the
  VQVAE first and pass it with ``--tokenizer``; its quantizer is copied into the generator's
  frozen ``vq_proxy`` (:meth:`NextScaleAR.attach_tokenizer`).

::

    arzoo convert --from var vae_ch160v4096z32.pth --model tokenizer/msvq-var --out ckpt/msvq-var
    arzoo convert --from var var_d16.pth --model generator/var-d16 --tokenizer ckpt/msvq-var --out ckpt/var-d16

Both files are plain state dicts read with ``torch.load(weights_only=True)``.

Key mapping, VQVAE (VAR name -> arzoo name; arzoo's encoder/decoder are diffusers' ``Encoder`` /
``Decoder``, the same computation as VAR's taming-style ones):

* ``encoder.down.i.block.j.{norm1,conv1,norm2,conv2}`` -> ``encoder.down_blocks.i.resnets.j.*``,
  ``...nin_shortcut`` -> ``...conv_shortcut``; ``encoder.down.i.downsample.conv`` ->
  ``encoder.down_blocks.i.downsamplers.0.conv``;
* ``decoder.up.i.*`` -> ``decoder.up_blocks.(n-1-i).*`` (VAR indexes the decoder levels by
  resolution, highest first; diffusers in execution order, lowest first),
  ``upsample.conv`` -> ``upsamplers.0.conv``;
* ``{encoder,decoder}.mid.block_1 / attn_1 / block_2`` -> ``mid_block.resnets.0 /
  attentions.0 / resnets.1``; ``norm_out`` -> ``conv_norm_out``; ``conv_in`` / ``conv_out`` kept;
* attention (``down.i.attn.j``, ``up.i.attn.j``, ``mid.attn_1``): ``norm`` -> ``group_norm``; the
  fused 1x1 conv ``qkv`` ``(3C, C, 1, 1)`` is split (q, k, v in that order along the output
  channels, as VAR's ``reshape(B, 3, C, H, W)``) and squeezed into the Linear layers
  ``to_q`` / ``to_k`` / ``to_v``; ``proj_out`` -> ``to_out.0`` (squeezed);
* ``quant_conv`` / ``post_quant_conv`` kept (3x3 in both: ``quant_conv_kernel=3``);
* ``quantize.embedding.weight`` -> ``quantizer.vq.embedding.weight``;
  ``quantize.quant_resi.qresi_ls.k.{weight,bias}`` -> ``quantizer.phis.k.conv.*`` (VAR's ``Phi``
  is itself the conv; ``PhiPartiallyShared`` picks conv ``argmin |ticks - k/(K-1)|`` with ticks
  ``linspace(1/12, 11/12, 4)``, which :func:`tokenizers_vis.quantizers.multiscale.phi_index`
  reproduces); ``quantize.ema_vocab_hit_SV`` (training statistics) is dropped.

Key mapping, VAR transformer: ``blocks.i.*`` -> ``transformer.blocks.i.*`` (same sub-names:
``attn.mat_qkv`` / ``q_bias`` / ``v_bias`` / ``scale_mul_1H11`` / ``proj``, ``ffn.fc1`` / ``fc2``,
``ada_lin.1``); ``class_emb.weight`` -> ``class_emb.table.weight`` (both ``num_classes + 1``
rows, the last the null class); ``head.*`` -> ``head.proj.*``; ``word_embed``, ``pos_start``,
``pos_1LC``, ``lvl_embed``, ``head_nm.ada_lin.1`` kept. Dropped buffers: ``lvl_1L``,
``attn_bias_for_masking`` (rebuilt from the spec) and ``blocks.i.attn.zero_k_bias`` (must be
zero). ``vq_proxy.*`` / ``tokenizer_attached`` come from the ``--tokenizer``.
"""
from __future__ import annotations

import re

import torch

from zoo.convert import register, unwrap
from zoo.convert.ldm import ldm_key, squeeze_1x1

# ---- VQVAE -----------------------------------------------------------------------------------

_PHI = re.compile(r"quantize\.quant_resi\.qresi_ls\.(\d+)\.(weight|bias)")
_VAE_DROP = ("quantize.ema_vocab_hit_SV",)


def _split_qkv(state: dict) -> dict:
    """VAR's attention fuses q, k, v in one 1x1 conv ``qkv`` (3C, C, 1, 1): split it into the
    LDM layout's ``q`` / ``k`` / ``v`` (VAR's ``reshape(B, 3, C, H, W)`` order)."""
    out = {}
    for k, v in state.items():
        m = re.fullmatch(r"(.+)\.qkv\.(weight|bias)", k)
        if not m:
            out[k] = v
            continue
        if v.shape[0] % 3 or (m[2] == "weight" and (v.dim() != 4 or tuple(v.shape[2:]) != (1, 1))):
            raise ValueError(f"{k}: expected a (3C, C, 1, 1) conv, got {tuple(v.shape)}")
        for name, part in zip("qkv", v.chunk(3, 0)):
            out[f"{m[1]}.{name}.{m[2]}"] = part.contiguous()
    return out


def vqvae_state(state: dict, num_levels: int) -> dict:
    """A VAR ``VQVAE`` state dict -> :class:`MultiScaleVQTokenizer` names (``num_levels`` =
    ``len(ch_mult)``, to reverse the decoder's level order); the encoder/decoder follow the
    LDM layout (:mod:`zoo.convert.ldm`)."""
    out: dict = {}
    unknown = []
    for k, v in _split_qkv(unwrap(state)).items():
        if k in _VAE_DROP:
            continue
        if m := _PHI.fullmatch(k):
            out[f"quantizer.phis.{m[1]}.conv.{m[2]}"] = v
        elif k == "quantize.embedding.weight":
            out["quantizer.vq.embedding.weight"] = v
        elif re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", k):
            out[k] = v
        elif hit := ldm_key(k, num_levels):
            out[hit[0]] = squeeze_1x1(k, v) if hit[1] else v
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"VAR VQVAE checkpoint: unknown tensors {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return out


@register("var", ("tokenizer/msvq-",))
def convert_vqvae(state: dict, model, tokenizer=None) -> dict:
    """VAR's VQVAE (``vae_ch160v4096z32.pth``) -> ``tokenizer/msvq-*``."""
    if model.quantizer.phis is None:
        raise ValueError("VAR's VQVAE has phi convs (quant_resi): convert into a tokenizer with phi='shared4'")
    return vqvae_state(state, len(model.decoder.up_blocks))


# ---- VAR transformer ---------------------------------------------------------------------------

_VAR_DROP = ("lvl_1L", "attn_bias_for_masking")
_VAR_KEEP = ("word_embed.weight", "word_embed.bias", "pos_start", "pos_1LC", "lvl_embed.weight",
             "head_nm.ada_lin.1.weight", "head_nm.ada_lin.1.bias")
_BLOCK = re.compile(r"blocks\.(\d+)\.(attn\.(mat_qkv\.weight|q_bias|v_bias|scale_mul_1H11|proj\.(weight|bias))"
                    r"|ffn\.fc[12]\.(weight|bias)|ada_lin\.1\.(weight|bias))")


def var_state(state: dict) -> dict:
    """A VAR transformer state dict -> :class:`NextScaleAR` names (without ``vq_proxy``)."""
    state = unwrap(state)
    if any(k.startswith("shared_ada_lin.") or ".ada_gss" in k for k in state):
        raise ValueError("VAR checkpoint trained with shared_aln=True (one shared adaLN): NextScaleAR has "
                         "per-block adaLN only (VAR's released checkpoints use shared_aln=False)")
    out: dict = {}
    unknown = []
    for k, v in state.items():
        if k in _VAR_DROP:
            continue
        if re.fullmatch(r"blocks\.\d+\.attn\.zero_k_bias", k):
            if v.count_nonzero():
                raise ValueError(f"{k} is not zero: NextScaleAR's attention has no k bias")
            continue
        if _BLOCK.fullmatch(k):
            out["transformer." + k] = v
        elif k == "class_emb.weight":
            out["class_emb.table.weight"] = v
        elif k in ("head.weight", "head.bias"):
            out["head.proj." + k.split(".")[1]] = v
        elif k in _VAR_KEEP:
            out[k] = v
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"VAR checkpoint: unknown tensors {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return out


@register("var", ("generator/var-",), needs_tokenizer=True)
def convert_var(state: dict, model, tokenizer=None) -> dict:
    """VAR's transformer (``var_d16.pth`` ...) -> ``generator/var-*``; ``tokenizer`` is the
    converted VQVAE whose codebook and phi build the next-scale input."""
    if tokenizer is None:
        raise ValueError("VAR generators take their codebook and phi from the VQVAE: pass the converted "
                         "tokenizer (arzoo convert ... --tokenizer DIR)")
    if getattr(model, "fhat", None) != "tokenizer":
        raise ValueError("VAR builds its input from the VQVAE's codebook and phi: convert into fhat='tokenizer'")
    out = var_state(state)
    model.attach_tokenizer(tokenizer)
    for k, v in model.state_dict().items():
        if k.startswith("vq_proxy.") or k == "tokenizer_attached":
            out[k] = v.detach().clone()
    return out
