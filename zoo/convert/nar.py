"""NAR's released checkpoints -> arzoo (``arzoo convert --from nar``).

Source: ThisisBillhe/NAR, ``NAR-images/autoregressive/models/gpt.py`` (LlamaGen's GPT plus
``medusa_attention_num`` extra blocks and a second "below" head)::

    arzoo convert --from nar nar_b.pt --model generator/nar-b --out ckpt/nar-b

Read with ``torch.load(weights_only=True)`` only (``zoo.convert.load_source``). The reference
keeps trunk and extra blocks in one list: ``layers.0 .. layers.{n_layer-1}`` are the trunk,
``layers.{n_layer + k}`` the extra block(s) that feed the below head. With ``n = depth`` of the
arzoo model:

====================================  =============================================
NAR                                    arzoo ``NAR``
====================================  =============================================
``tok_embeddings``                     ``embed.embed``
``cls_embedding.embedding_table``      ``cond_encoder.classes.table`` (null class last)
``layers.i`` (i < n)                   ``transformer.layers.i``
``layers.{n+k}``                       ``below.layers.k``
``norm`` (after layer n-1)             ``norm_right`` (the trunk's own norm is Identity)
``output`` (right head, "R")           ``head.proj``
``medusa_norm``                        ``below.norm``
``medusa_output`` (below head, "B")    ``head_below.proj``
====================================  =============================================

The converted model is built with ``prefix_rope="zero"`` (the reference's zero rotation of the
class token, in the trunk and in the extra block). ``freqs_cis``, masks and KV caches are not
parameters; cache buffers found in a file are dropped.
"""
from __future__ import annotations

import re

from zoo.convert import register
from zoo.convert.llamagen import _check_classes, gpt_common_key, tensors


def nar_key(key: str, depth: int) -> str | None:
    """One NAR GPT key -> arzoo ``NAR`` key for a trunk of ``depth`` layers (None = drop)."""
    key = gpt_common_key(key)
    if key is None:
        return None
    m = re.match(r"layers\.(\d+)\.(.*)$", key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        return f"transformer.layers.{i}.{rest}" if i < depth else f"below.layers.{i - depth}.{rest}"
    return {"norm.weight": "norm_right.weight", "output.weight": "head.proj.weight",
            "medusa_norm.weight": "below.norm.weight",
            "medusa_output.weight": "head_below.proj.weight"}.get(key, key)


@register("nar", ("generator/nar-b", "generator/nar-l", "generator/nar-xl"), overrides={"prefix_rope": "zero"})
def convert_nar(state: dict, model, tokenizer=None) -> dict:
    depth = model.transformer.depth
    out = {}
    for k, v in tensors(state).items():
        nk = nar_key(k, depth)
        if nk is not None:
            out[nk] = v
    _check_classes(out, model)
    return out


__all__ = ["convert_nar", "nar_key"]
