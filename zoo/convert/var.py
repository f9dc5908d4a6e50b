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

# ---- VQVAE -----------------------------------------------------------------------------------

_RES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}


def _resnet(rest: str) -> str:
    """``norm1.weight`` / ``nin_shortcut.bias`` ... inside a ResnetBlock -> diffusers' names."""
    mod, _, leaf = rest.partition(".")
    if mod not in _RES or leaf not in ("weight", "bias"):
        raise KeyError(rest)
    return f"{_RES[mod]}.{leaf}"


def _attention(prefix: str, tensors: dict, out: dict, where: str) -> None:
    """VAR ``AttnBlock`` tensors (``norm``, fused 1x1 ``qkv``, ``proj_out``) -> diffusers ``Attention``."""
    need = {"norm.weight", "norm.bias", "qkv.weight", "qkv.bias", "proj_out.weight", "proj_out.bias"}
    if set(tensors) != need:
        raise ValueError(f"{where}: attention block has tensors {sorted(tensors)}, expected {sorted(need)}")
    out[f"{prefix}.group_norm.weight"] = tensors["norm.weight"]
    out[f"{prefix}.group_norm.bias"] = tensors["norm.bias"]
    w, b = tensors["qkv.weight"], tensors["qkv.bias"]
    if w.dim() != 4 or w.shape[0] % 3 or tuple(w.shape[2:]) != (1, 1):
        raise ValueError(f"{where}.qkv.weight: expected a (3C, C, 1, 1) conv, got {tuple(w.shape)}")
    for name, wi, bi in zip(("to_q", "to_k", "to_v"), w.flatten(1).chunk(3, 0), b.chunk(3, 0)):
        out[f"{prefix}.{name}.weight"] = wi.contiguous()
        out[f"{prefix}.{name}.bias"] = bi.contiguous()
    out[f"{prefix}.to_out.0.weight"] = tensors["proj_out.weight"].flatten(1).contiguous()
    out[f"{prefix}.to_out.0.bias"] = tensors["proj_out.bias"]


_ENC_DOWN = re.compile(r"encoder\.down\.(\d+)\.(block|attn)\.(\d+)\.(.+)")
_ENC_DS = re.compile(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)")
_DEC_UP = re.compile(r"decoder\.up\.(\d+)\.(block|attn)\.(\d+)\.(.+)")
_DEC_US = re.compile(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)")
_MID = re.compile(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)")
_PHI = re.compile(r"quantize\.quant_resi\.qresi_ls\.(\d+)\.(weight|bias)")
_VAE_DROP = ("quantize.ema_vocab_hit_SV",)


def vqvae_state(state: dict, num_levels: int) -> dict:
    """A VAR ``VQVAE`` state dict -> :class:`MultiScaleVQTokenizer` names (``num_levels`` =
    ``len(ch_mult)``, to reverse the decoder's level order)."""
    state = unwrap(state)
    out: dict = {}
    attn: dict = {}  # arzoo prefix -> {VAR sub-name: tensor}, split once complete
    unknown = []
    for k, v in state.items():
        if k in _VAE_DROP:
            continue
        if m := _ENC_DOWN.fullmatch(k):
            i, kind, j, rest = m.groups()
            pre = f"encoder.down_blocks.{i}.{'resnets' if kind == 'block' else 'attentions'}.{j}"
        elif m := _DEC_UP.fullmatch(k):
            i, kind, j, rest = m.groups()
            lvl = num_levels - 1 - int(i)
            if lvl < 0:
                raise ValueError(f"{k}: decoder level {i} but the model has {num_levels} levels")
            pre = f"decoder.up_blocks.{lvl}.{'resnets' if kind == 'block' else 'attentions'}.{j}"
        elif m := _MID.fullmatch(k):
            part, blk, rest = m.groups()
            kind = "attn" if blk == "attn_1" else "block"
            pre = f"{part}.mid_block." + {"block_1": "resnets.0", "block_2": "resnets.1", "attn_1": "attentions.0"}[blk]
        elif m := _ENC_DS.fullmatch(k):
            out[f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"] = v
            continue
        elif m := _DEC_US.fullmatch(k):
            out[f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"] = v
            continue
        elif m := _PHI.fullmatch(k):
            out[f"quantizer.phis.{m[1]}.conv.{m[2]}"] = v
            continue
        elif k == "quantize.embedding.weight":
            out["quantizer.vq.embedding.weight"] = v
            continue
        elif re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", k) or \
                re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", k):
            out[k] = v
            continue
        elif m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(weight|bias)", k):
            out[f"{m[1]}.conv_norm_out.{m[2]}"] = v
            continue
        else:
            unknown.append(k)
            continue
        if kind == "attn":
            attn.setdefault(pre, {})[rest] = v
        else:
            try:
                out[f"{pre}.{_resnet(rest)}"] = v
            except KeyError:
                unknown.append(k)
    if unknown:
        raise ValueError(f"VAR VQVAE checkpoint: unknown tensors {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    for pre, tensors in attn.items():
        _attention(pre, tensors, out, pre)
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
