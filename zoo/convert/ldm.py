"""The LDM / taming-transformers encoder-decoder layout shared by MAR's KL-VAE and VAR's VQVAE
(``encoder.down.i.block.j``, ``mid.block_1/attn_1/block_2``, ``decoder.up.i`` with level 0 at
the highest resolution, 1x1-conv attention) -> arzoo's diffusers ``Encoder`` / ``Decoder`` names.
"""
from __future__ import annotations

import re

_RES = r"(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)"
_ATT = r"(norm|q|k|v|proj_out)\.(weight|bias)"
_ATT_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LEVEL = re.compile(r"(encoder\.down|decoder\.up)\.(\d+)\.(block|attn|downsample|upsample)\.(.+)")


def _sub(kind: str, rest: str) -> tuple[str, bool] | None:
    """Inside one level: a ResnetBlock, an attention block or the resampling conv."""
    if kind in ("downsample", "upsample"):
        m = re.fullmatch(r"conv\.(weight|bias)", rest)
        return (f"{kind[:-6]}samplers.0.conv.{m[1]}", False) if m else None
    j, _, rest = rest.partition(".")
    if not j.isdigit():
        return None
    if kind == "block":
        m = re.fullmatch(_RES, rest)
        return (f"resnets.{j}.{'conv_shortcut' if m[1] == 'nin_shortcut' else m[1]}.{m[2]}", False) if m else None
    m = re.fullmatch(_ATT, rest)
    return (f"attentions.{j}.{_ATT_NAMES[m[1]]}.{m[2]}", m[1] != "norm" and m[2] == "weight") if m else None


def ldm_key(key: str, num_levels: int) -> tuple[str, bool] | None:
    """Reference encoder/decoder key -> (arzoo key, is a 1x1 attention conv weight to squeeze),
    or None (not part of the encoder/decoder). ``num_levels`` = ``len(ch_mult)``."""
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", key)
    if m:
        return key, False
    m = re.fullmatch(r"(encoder|decoder)\.norm_out\.(weight|bias)", key)
    if m:
        return f"{m[1]}.conv_norm_out.{m[2]}", False
    m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)", key)
    if m:
        kind, j = ("attn", "0") if m[2] == "attn_1" else ("block", str(int(m[2][-1]) - 1))
        hit = _sub(kind, f"{j}.{m[3]}")
        return (f"{m[1]}.mid_block.{hit[0]}", hit[1]) if hit else None
    m = _LEVEL.fullmatch(key)
    if not m:
        return None
    i = int(m[2])
    if m[1] == "decoder.up":  # diffusers' up_blocks run from the lowest resolution
        i = num_levels - 1 - i
        if i < 0:
            raise ValueError(f"{key}: decoder level {m[2]} but the model has {num_levels} levels")
    hit = _sub(m[3], m[4])
    if hit is None:
        return None
    part = "encoder.down_blocks" if m[1] == "encoder.down" else "decoder.up_blocks"
    return f"{part}.{i}.{hit[0]}", hit[1]


def squeeze_1x1(key: str, v):
    """A 1x1 conv weight (C_out, C_in, 1, 1) -> linear (C_out, C_in)."""
    if v.dim() != 4 or tuple(v.shape[2:]) != (1, 1):
        raise ValueError(f"{key}: expected a 1x1 conv weight, got shape {tuple(v.shape)}")
    return v.reshape(v.shape[0], v.shape[1])
