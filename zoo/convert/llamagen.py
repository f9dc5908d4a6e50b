"""LlamaGen's released checkpoints -> arzoo (``arzoo convert --from llamagen``).

Sources: FoundationVision/LlamaGen, ``tokenizer/tokenizer_image/vq_model.py`` (``VQModel``)
and ``autoregressive/models/gpt.py`` (``Transformer``, ``GPT_B/L/XL``)::

    arzoo convert --from llamagen vq_ds16_c2i.pt --model tokenizer/vq-16 --out ckpt/vq-16
    arzoo convert --from llamagen c2i_B_256.pt --model generator/raster-ar-b --out ckpt/raster-ar-b

The files are pickles; ``zoo.convert.load_source`` reads them with
``torch.load(weights_only=True)`` only. The ``{"model": ...}`` wrapper of LlamaGen's training
checkpoints, and ``module.`` (DDP) / ``_orig_mod.`` (torch.compile) key prefixes, are removed.

**VQ-16 / VQ-8** (``tokenizer/vq-16``, ``tokenizer/vq-8``; arzoo builds the encoder/decoder
from diffusers' ``Encoder`` / ``Decoder``, same layout):

=========================================  ===============================================
LlamaGen                                    arzoo
=========================================  ===============================================
``{en,de}coder.conv_in / conv_out``         same
``{en,de}coder.norm_out``                   ``{en,de}coder.conv_norm_out``
``encoder.conv_blocks.L.res.i``             ``encoder.down_blocks.L.resnets.i``
``encoder.conv_blocks.L.attn.i``            ``encoder.down_blocks.L.attentions.i``
``encoder.conv_blocks.L.downsample.conv``   ``encoder.down_blocks.L.downsamplers.0.conv``
``decoder.conv_blocks.L.res/attn.i``        ``decoder.up_blocks.L.resnets/attentions.i``
                                            (both list the lowest resolution first)
``decoder.conv_blocks.L.upsample.conv``     ``decoder.up_blocks.L.upsamplers.0.conv``
``*.mid.0`` / ``mid.1`` / ``mid.2``         ``*.mid_block.resnets.0`` / ``attentions.0`` /
                                            ``resnets.1``
ResnetBlock ``nin_shortcut`` (1x1)          ``conv_shortcut``
AttnBlock ``norm``, ``q``, ``k``, ``v``,    ``group_norm``, ``to_q``, ``to_k``, ``to_v``,
``proj_out`` (1x1 convs)                    ``to_out.0`` (linears: weights squeezed)
``quant_conv``, ``post_quant_conv``         same
``quantize.embedding.weight``               ``quantizer.embedding.weight``
``quantize.codebook_used``                  dropped (a training-time usage log)
=========================================  ===============================================

**GPT-B/L/XL** (``generator/raster-ar-{b,l,xl}``, class-conditional ``c2i`` models):
``tok_embeddings`` -> ``embed.embed``; ``cls_embedding.embedding_table`` (``num_classes + 1``
rows, null class last, as arzoo's ``ClassEmbedder``) -> ``cond_encoder.classes.table``;
``layers.i.*`` -> ``transformer.layers.i.*`` (``attention.wqkv`` / ``attention.wo`` /
``feed_forward.w1,w2,w3`` / ``attention_norm`` / ``ffn_norm``: identical names and layouts);
``norm`` -> ``transformer.norm``; ``output`` -> ``head.proj``. The converted model is built
with ``prefix_rope="zero"``: LlamaGen rotates the class token by an all-zero table
(``precompute_freqs_cis_2d`` prepends ``cls_token_num`` zero rows), which zeroes its query and
key. ``freqs_cis``, ``causal_mask`` and KV caches are not parameters; cache buffers found in
a file are dropped. Text-conditional (t2i) GPTs have a T5 caption projection arzoo does not
model and are refused.
"""
from __future__ import annotations

import re

from zoo.convert import register, unwrap

# ---- shared helpers ------------------------------------------------------------------------


def tensors(obj: dict) -> dict:
    """The tensor dict of an official checkpoint: unwrapped, DDP / torch.compile prefixes removed."""
    state = unwrap(obj)
    if not isinstance(state, dict) or not state:
        raise ValueError("the checkpoint holds no tensors")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


_CACHE = re.compile(r"(^|\.)kv_cache\.(k|v)_cache$")


# ---- VQ tokenizer --------------------------------------------------------------------------

_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LINEAR = {"to_q", "to_k", "to_v", "to_out.0"}


def _vq_block(rest: str) -> str:
    """``res.i.<param>`` / ``attn.i.<param>`` (tail of a conv block or mid key) -> arzoo tail."""
    kind, i, sub = rest.split(".", 2)
    if kind == "res":
        return f"resnets.{i}." + sub.replace("nin_shortcut.", "conv_shortcut.")
    name, param = sub.rsplit(".", 1)
    return f"attentions.{i}.{_ATTN.get(name, name)}.{param}"


def vq_key(key: str) -> str | None:
    """One LlamaGen ``VQModel`` key -> arzoo ``VQTokenizer`` key (None = drop). Keys it does
    not know come back unchanged, so a strict load names them."""
    if key == "quantize.codebook_used":
        return None
    if key.startswith("quantize."):
        return "quantizer." + key[len("quantize."):]
    m = re.match(r"(encoder|decoder)\.(.*)$", key)
    if not m:
        return key
    part, rest = m.groups()
    if rest.startswith("norm_out."):
        return f"{part}.conv_norm_out.{rest[len('norm_out.'):]}"
    mm = re.match(r"mid\.(\d)\.(.*)$", rest)
    if mm:
        j, sub = int(mm.group(1)), mm.group(2)
        tail = {0: "res.0.", 1: "attn.0.", 2: "res.1."}.get(j)
        return f"{part}.mid_block.{_vq_block(tail + sub)}" if tail else key
    mm = re.match(r"conv_blocks\.(\d+)\.(.*)$", rest)
    if mm:
        lvl, sub = mm.groups()
        blocks = "down_blocks" if part == "encoder" else "up_blocks"
        if sub.startswith(("downsample.", "upsample.")):
            which, tail = sub.split(".", 1)
            return f"{part}.{blocks}.{lvl}.{which}rs.0.{tail}"
        if sub.startswith(("res.", "attn.")):
            return f"{part}.{blocks}.{lvl}.{_vq_block(sub)}"
    return key


def convert_vq_state(state: dict) -> dict:
    """A LlamaGen ``VQModel`` state dict in arzoo ``VQTokenizer`` names and layouts."""
    out = {}
    for k, v in tensors(state).items():
        nk = vq_key(k)
        if nk is None:
            continue
        if (v.dim() == 4 and v.shape[2:] == (1, 1) and ".attentions." in nk
                and any(nk.endswith(f".{n}.weight") for n in _LINEAR)):
            v = v[:, :, 0, 0]  # 1x1 conv -> linear
        out[nk] = v
    return out


@register("llamagen", ("tokenizer/vq-16", "tokenizer/vq-8"))
def convert_vq(state: dict, model, tokenizer=None) -> dict:
    return convert_vq_state(state)


# ---- GPT (c2i) -----------------------------------------------------------------------------

def gpt_common_key(key: str) -> str | None:
    """Keys shared by LlamaGen's GPT and NAR's (embeddings; None = drop); else unchanged."""
    if _CACHE.search(key) or key in ("freqs_cis", "causal_mask", "proximity_mask"):
        return None
    if key == "tok_embeddings.weight":
        return "embed.embed.weight"
    if key == "cls_embedding.embedding_table.weight":
        return "cond_encoder.classes.table.weight"
    if key.startswith("cls_embedding.cap_proj.") or key == "cls_embedding.uncond_embedding":
        raise ValueError("this is a text-conditional (t2i) LlamaGen GPT: its T5 caption projection "
                         f"({key}) has no arzoo counterpart; only class-conditional (c2i) models convert")
    return key


def gpt_key(key: str) -> str | None:
    """One LlamaGen GPT key -> arzoo ``RasterAR`` key (None = drop; unknown keys unchanged)."""
    key = gpt_common_key(key)
    if key is None:
        return None
    if key.startswith("layers."):
        return "transformer." + key
    if key == "norm.weight":
        return "transformer.norm.weight"
    if key == "output.weight":
        return "head.proj.weight"
    return key


def _check_classes(out: dict, model) -> None:
    t = out.get("cond_encoder.classes.table.weight")
    enc = getattr(model, "cond_encoder", None)
    if t is not None and enc is not None and enc.classes is not None and t.shape[0] != enc.classes.num_classes + 1:
        raise ValueError(f"the class table has {t.shape[0]} rows; the model needs num_classes + 1 = "
                         f"{enc.classes.num_classes + 1} (LlamaGen adds the null class row when "
                         "class_dropout_prob > 0)")


@register("llamagen", ("generator/raster-ar-b", "generator/raster-ar-l", "generator/raster-ar-xl"),
          overrides={"prefix_rope": "zero"})
def convert_gpt(state: dict, model, tokenizer=None) -> dict:
    out = {}
    for k, v in tensors(state).items():
        nk = gpt_key(k)
        if nk is not None:
            out[nk] = v
    _check_classes(out, model)
    return out


__all__ = ["convert_gpt", "convert_vq", "convert_vq_state", "gpt_common_key", "gpt_key", "tensors", "vq_key"]
