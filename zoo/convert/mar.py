"""MAR (LTH14/mar) released checkpoints -> arzoo: the KL-16 VAE and MAR-B/L/H.

::

    arzoo convert --from mar kl16.ckpt --model tokenizer/kl-16 --out ckpt/kl-16
    arzoo convert --from mar checkpoint-last.pth --model generator/mar-b --out ckpt/mar-b  # EMA
    arzoo convert --from mar checkpoint-last.pth --model generator/mar-b --out ckpt/mar-b-raw --weights raw

**KL-16** (``models/vae.py`` ``AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))``, the
LDM KL-VAE; the file holds ``{"model": state_dict}``) -> ``tokenizer/kl-16``
(:class:`tokenizers_vis.kl.KLTokenizer` on diffusers' ``Encoder`` / ``Decoder``):

* ``encoder.down.i.block.j.*`` -> ``encoder.down_blocks.i.resnets.j.*`` (``nin_shortcut`` ->
  ``conv_shortcut``, the same 1x1 conv);
* ``encoder.down.i.attn.j.{norm,q,k,v,proj_out}`` -> ``encoder.down_blocks.i.attentions.j.
  {group_norm,to_q,to_k,to_v,to_out.0}`` (the 1x1 conv weights squeezed to linear weights);
* ``encoder.down.i.downsample.conv`` -> ``encoder.down_blocks.i.downsamplers.0.conv``;
* ``{en,de}coder.mid.{block_1,attn_1,block_2}`` -> ``{en,de}coder.mid_block.{resnets.0,
  attentions.0,resnets.1}``; ``{en,de}coder.norm_out`` -> ``{en,de}coder.conv_norm_out``;
* ``decoder.up.i.block.j`` / ``decoder.up.i.upsample.conv`` -> ``decoder.up_blocks.(n-1-i).
  resnets.j`` / ``.upsamplers.0.conv`` (the reference indexes levels from the highest
  resolution, diffusers' ``up_blocks`` from the lowest);
* ``quant_conv`` (1x1, 2·16 -> 2·16 moments) -> ``quantizer.quant_conv``; ``conv_in``,
  ``conv_out``, ``post_quant_conv`` keep their names.

Loss / discriminator tensors (``loss.*``, ``discriminator.*``) are dropped. Latent scale: MAR
trains on ``posterior * 0.2325`` and decodes ``tokens / 0.2325``; ``tokenizer/kl-16`` has
``scale_factor=0.2325``, so its tokens are MAR's tokens and the generator needs no scale.

**MAR** (``models/mar.py`` ``MAR`` + ``models/diffloss.py``; ``checkpoint-last.pth`` holds
``"model"`` and ``"model_ema"``, both full state dicts in the model's names, see
``util/misc.py save_model``) -> ``generator/mar-b`` / ``-l`` / ``-h``
(:class:`generators.mar.MAR`). The EMA weights are taken by default (MAR evaluates with
them); :func:`convert_mar` with ``ema=False`` takes the raw ones. A flat state dict (the
Hugging Face ``mar-base.safetensors`` / ``kl16.safetensors`` re-uploads) works as well.
(``checkpoint-*.pth`` also pickles the training ``args``, an ``argparse.Namespace``: the one
class besides tensors and containers that :func:`zoo.convert.load_source` lets through.)

* ``class_emb.weight`` (K, D) and ``fake_latent`` (1, D) -> ``cond_encoder.classes.table.weight``
  (K + 1, D): the fake latent is the null class (the last row);
* ``z_proj`` -> ``embed.embed``; ``z_proj_ln`` -> ``backbone.in_norm``;
* ``encoder_pos_embed_learned`` / ``decoder_pos_embed_learned`` / ``diffusion_pos_embed_learned``
  -> ``backbone.enc_pos`` / ``backbone.dec_pos`` / ``backbone.head_pos``;
* ``encoder_blocks``, ``encoder_norm``, ``decoder_embed``, ``mask_token``, ``decoder_blocks``,
  ``decoder_norm`` -> ``backbone.`` + the same name (both are timm ``Block``);
* ``diffloss.net.{time_embed,cond_embed,input_proj}`` -> ``head.net.`` + the same name;
* ``diffloss.net.res_blocks.i.{in_ln,mlp,adaLN_modulation.1}`` -> ``head.net.blocks.i.
  {norm,mlp,ada.1}``;
* ``diffloss.net.final_layer.{linear,adaLN_modulation.1}`` -> ``head.net.{out,final_ada.1}``.

``head.target_absmax`` (arzoo's ``clip_denoised`` range, unused: off in the paper configs)
keeps the model's zeros. The condition buffer matches MAR for class conditioning: MAR writes
the class embedding into all ``buffer_size`` slots; arzoo's buffer is the one-token class
prefix repeated into every slot -- the same tensor. Converted generators are built with
``cfg_last_step="mar"`` (the reference's CFG scale at the last sampling step, see
:class:`generators.mar.MAR`).
"""
from __future__ import annotations

import re

import torch

from zoo.convert import convert, register, unwrap
from zoo.convert.ldm import ldm_key, squeeze_1x1

#: tensors of the training losses that some KL checkpoints carry (LDM: LPIPS + PatchGAN)
DROP_PREFIXES = ("loss.", "discriminator.", "perceptual_loss.", "lpips.")


# ---- helpers ---------------------------------------------------------------------------------

def _strip_module(state: dict) -> dict:
    """Remove a DDP ``module.`` prefix when every key has it."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _tensors(state: dict, what: str) -> dict:
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{what}: expected a state dict of tensors, found non-tensor entries {bad[:5]}")
    return state


def _fail_unmapped(unmapped: list, what: str) -> None:
    if unmapped:
        raise ValueError(f"{what}: {len(unmapped)} tensors have no arzoo counterpart: {unmapped[:8]}"
                         f"{' ...' if len(unmapped) > 8 else ''}")


# ---- KL-16 -----------------------------------------------------------------------------------

def kl_key(key: str, num_levels: int) -> tuple[str, bool] | None:
    """Reference ``AutoencoderKL`` key -> (arzoo key, is a 1x1 attention conv weight), or None."""
    if key in ("quant_conv.weight", "quant_conv.bias"):
        return "quantizer." + key, False
    if key.startswith("post_quant_conv."):
        return key, False
    return ldm_key(key, num_levels)


def convert_kl_state(state: dict, num_levels: int) -> dict:
    """Reference ``AutoencoderKL`` state dict -> ``KLTokenizer`` state dict (``num_levels`` =
    ``len(ch_mult)``)."""
    out, unmapped = {}, []
    for k, v in state.items():
        if k.startswith(DROP_PREFIXES):
            continue
        hit = kl_key(k, num_levels)
        if hit is None:
            unmapped.append(k)
            continue
        name, squeeze = hit
        out[name] = squeeze_1x1(k, v) if squeeze else v
    _fail_unmapped(unmapped, "MAR KL-VAE checkpoint")
    return out


@register("mar", ("tokenizer/kl-",))
def mar_kl(state: dict, model, tokenizer=None) -> dict:
    """``kl16.ckpt`` (``{"model": ...}``, or a flat state dict) -> ``tokenizer/kl-16``."""
    sd = _tensors(_strip_module(unwrap(state)), "MAR KL-VAE checkpoint")
    return convert_kl_state(sd, len(model.decoder.up_blocks))


# ---- MAR -------------------------------------------------------------------------------------

_MAR_RENAMES = (
    (r"z_proj\.", "embed.embed."),
    (r"z_proj_ln\.", "backbone.in_norm."),
    (r"encoder_pos_embed_learned$", "backbone.enc_pos"),
    (r"decoder_pos_embed_learned$", "backbone.dec_pos"),
    (r"diffusion_pos_embed_learned$", "backbone.head_pos"),
    (r"mask_token$", "backbone.mask_token"),
    (r"(encoder_blocks|decoder_blocks|encoder_norm|decoder_norm|decoder_embed)\.", r"backbone.\1."),
    (r"diffloss\.net\.(time_embed|cond_embed|input_proj)\.", r"head.net.\1."),
    (r"diffloss\.net\.res_blocks\.(\d+)\.in_ln\.", r"head.net.blocks.\1.norm."),
    (r"diffloss\.net\.res_blocks\.(\d+)\.mlp\.", r"head.net.blocks.\1.mlp."),
    (r"diffloss\.net\.res_blocks\.(\d+)\.adaLN_modulation\.1\.", r"head.net.blocks.\1.ada.1."),
    (r"diffloss\.net\.final_layer\.linear\.", "head.net.out."),
    (r"diffloss\.net\.final_layer\.adaLN_modulation\.1\.", "head.net.final_ada.1."),
)


def mar_key(key: str) -> str | None:
    """Reference ``MAR`` key -> arzoo ``MAR`` key (None for class_emb / fake_latent / unknown)."""
    for pat, rep in _MAR_RENAMES:
        if re.match(pat, key):
            return re.sub("^" + pat, rep, key, count=1)
    return None


def select_weights(obj: dict, ema: bool = True) -> dict:
    """The state dict to convert: ``model_ema`` (default) or ``model`` of a ``checkpoint-*.pth``;
    a flat state dict as is."""
    if "model" in obj or "model_ema" in obj:
        key = "model_ema" if ema else "model"
        sd = obj.get(key)
        if not isinstance(sd, dict):
            other = "model" if ema else "model_ema"
            raise ValueError(f"MAR checkpoint has no {key!r} state dict (keys: {sorted(obj)}); "
                             f"use ema={not ema} to take {other!r}")
        return sd
    return obj


def convert_mar_state(sd: dict, model) -> dict:
    """Reference ``MAR`` state dict -> arzoo :class:`generators.mar.MAR` state dict."""
    sd = _tensors(_strip_module(sd), "MAR checkpoint")
    enc = model.cond_encoder
    if enc.classes is None or enc.text is not None:
        raise ValueError("MAR checkpoints are class-conditional: convert into a class-only arzoo MAR "
                         "(num_classes set, text_vocab_size=None)")
    for k in ("class_emb.weight", "fake_latent"):
        if k not in sd:
            raise ValueError(f"MAR checkpoint lacks {k!r}; is this a MAR model state dict?")
    cls, fake = sd["class_emb.weight"], sd["fake_latent"]
    if fake.dim() != 2 or fake.shape[0] != 1 or fake.shape[1] != cls.shape[1]:
        raise ValueError(f"fake_latent should be (1, {cls.shape[1]}), got {tuple(fake.shape)}")
    out = {"cond_encoder.classes.table.weight": torch.cat((cls, fake.to(cls.dtype)), 0)}
    unmapped = []
    for k, v in sd.items():
        if k in ("class_emb.weight", "fake_latent"):
            continue
        name = mar_key(k)
        if name is None:
            unmapped.append(k)
        else:
            out[name] = v
    _fail_unmapped(unmapped, "MAR checkpoint")
    own = model.state_dict()
    # arzoo-only state with no reference counterpart keeps the model's values: the clip range
    # of clip_denoised (zeros = unset) and an unfitted latent_norm ("none" in the paper configs)
    for k in own:
        if k not in out and (k == "head.target_absmax" or k.startswith("latent_norm.")):
            out[k] = own[k].clone()
    return out


@register("mar", ("generator/mar-",), overrides={"cfg_last_step": "mar"})
def mar_generator(state: dict, model, tokenizer=None, weights: str = "ema") -> dict:
    """``checkpoint-last.pth`` (EMA weights unless ``weights="raw"``) or a flat MAR state dict
    -> ``generator/mar-{b,l,h}``."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    ema = weights == "ema"
    obj = state
    if "module" in obj and isinstance(obj["module"], dict):
        obj = obj["module"]
    return convert_mar_state(select_weights(obj, ema), model)


# ---- entry point -----------------------------------------------------------------------------

def convert_mar(src, model_name: str, out=None, *, ema: bool = True, dtype=None):
    """:func:`zoo.convert.convert` for MAR files: ``ema=True`` (the default, as ``arzoo convert``)
    takes ``model_ema``, ``ema=False`` the raw ``model`` (``arzoo convert --weights raw``)."""
    return convert("mar", src, model_name, out, dtype=dtype, weights="ema" if ema else "raw")


__all__ = ["convert_kl_state", "convert_mar", "convert_mar_state", "kl_key", "mar_key", "select_weights"]
