"""MVAR's released checkpoints -> arzoo (``arzoo convert --from mvar``).

CVL-UESTC/MVAR (Zhang et al. 2025, arXiv 2505.12742, ICLR 2026; read at ``d0e035a``, the
same code as LabShuHangGU/MVAR) releases, on the Hugging Face repo ``CVLUESTC/MVAR``:

* ``mvar-d16.pth`` (trained from scratch), ``mvar-finetune-d16.pth`` / ``-d20`` / ``-d24``
  (fine-tuned from VAR's ``var_d16/20/24.pth``) -- the transformer (``models/mvar.py``
  ``MVAR`` on ``models/basic_mvar.py``) -> ``generator/mvar-d16`` / ``d20`` / ``d24``
  (:class:`generators.var.NextScaleAR`, ``mode="mvar"``);
* no tokenizer of its own: MVAR runs on VAR's ``vae_ch160v4096z32.pth`` (``models/vqvae.py``
  is VAR's, reformatted), converted with ``arzoo convert --from var ... --model
  tokenizer/msvq-var``. As for VAR, the generator builds its next-scale input with the
  VQVAE's codebook and phi convs (``vae_quant_proxy``), which the ``.pth`` does not hold:
  pass the converted VQVAE with ``--tokenizer``; its quantizer is copied into the generator's
  frozen ``vq_proxy`` (:meth:`NextScaleAR.attach_tokenizer`).

::

    arzoo convert --from var vae_ch160v4096z32.pth --model tokenizer/msvq-var --out ckpt/msvq-var
    arzoo convert --from mvar mvar-d16.pth --model generator/mvar-d16 --tokenizer ckpt/msvq-var --out ckpt/mvar-d16
    arzoo convert --from mvar mvar-finetune-d24.pth --model generator/mvar-d24 --tokenizer ckpt/msvq-var \
        --out ckpt/mvar-d24

File layout. ``run_mvar_evaluate.py`` / ``run_mvar_demo.py`` take ``ckpt["mvar_wo_ddp"]`` from an
unrestricted (pickle-executing) load; ``train.py`` saves ``{"epoch", "iter", "trainer": {"config",
"mvar_wo_ddp", "mvar_opt"}, "args"}``. Accepted here: that training file, the trainer dict,
``{"mvar_wo_ddp": ...}`` alone, or a bare state dict -- all read with
``torch.load(weights_only=True)`` (tensors and plain containers); a file holding other
objects is refused by :func:`zoo.convert.load_source` (re-save ``ckpt["mvar_wo_ddp"]`` alone
in a trusted environment). Where the file carries ``args`` (MVAR's ``Args.state_dict()``) or
the trainer's ``config``, its ``patch_nums``, ``depth``, ``kernel_size``, ``refine_step``,
``anorm`` and ``saln`` are checked against the arzoo model (MVAR's ``refine_step`` = index of
the first spatial-Markov scale = ``S - markov_scales``).

Key mapping: MVAR's state dict has exactly VAR's names (``MVAR`` keeps VAR's module tree; the
Markov structure lives in the forward and the mask buffer), so :func:`zoo.convert.var.
convert_var` maps it: ``blocks.i.*`` -> ``transformer.blocks.i.*`` (``attn.mat_qkv`` /
``q_bias`` / ``v_bias`` / ``scale_mul_1H11`` / ``proj``, ``ffn.fc1`` / ``fc2``, ``ada_lin.1``);
``class_emb.weight`` -> ``class_emb.table.weight`` (``num_classes + 1`` rows, the last the null
class); ``head.*`` -> ``head.proj.*``; ``word_embed``, ``pos_start``, ``pos_1LC``,
``lvl_embed``, ``head_nm.ada_lin.1`` kept. ``vq_proxy.*`` / ``tokenizer_attached`` come from
``--tokenizer``. :func:`mvar_state_from` is the inverse (arzoo -> MVAR names, with MVAR's
buffers), used to name missing tensors in MVAR's terms and by the tests.

Dropped buffers (each checked, then rebuilt by arzoo from the spec):

* ``blocks.i.attn.zero_k_bias`` -- must be zero;
* ``lvl_1L`` -- must equal the scale index of every token of the model's pyramid;
* ``attn_bias_for_masking`` ``(1, 1, L, L)`` -- MVAR's training mask of the first chunk
  (``generate_backward_attn_mask_only_next``: block-diagonal by scale). Note: the fine-tuned
  releases start with ``mvar_wo_ddp.load_state_dict(var_d*.pth, strict=True)``, which
  overwrites this persistent buffer with **VAR's block-causal** mask, so those files carry
  VAR's mask and their first training chunk (scales ``0..S-3``) attended block-causally,
  while MVAR's sampling (``autoregressive_infer``: one scale per forward, no mask, NATTEN on
  the last scales) never reads the buffer. Both patterns are accepted; arzoo's MVAR computes
  MVAR's sampling semantics (scale-Markov everywhere), so for a fine-tuned file arzoo's
  teacher-forced logits of scales ``1..S-3`` equal MVAR's sampling path, not MVAR's
  ``forward()`` with its saved buffer. Any other pattern or size is refused.

Options: none beyond the registered configs -- ``generator/mvar-d*`` already set MVAR's
``kernel_size=7`` (``markov_kernel``) and ``refine_step=8`` of 10 scales (``markov_scales=2``),
``attn_l2_norm=True``, ``shared_aln=False``, the head with bias and ``fhat="tokenizer"``.
Sampling: MVAR's CFG ``(1+t)c - t u`` with ``t = cfg·s/(S-1)`` is the zoo's
``cfg_schedule="linear"`` with ``cfg = 1 + cfg_MVAR`` (MVAR's evaluation: cfg 1.4 -> 2.4,
top-k 900, top-p 0.96).
"""
from __future__ import annotations

import re

import torch

from zoo.convert import register, unwrap
from zoo.convert.var import convert_var

#: wrapper keys, outermost first: train.py's file -> the trainer's dict -> the weights
WRAPPERS = ("trainer", "mvar_wo_ddp", "model", "state_dict", "module")
_DROPPED_BUFFERS = ("lvl_1L", "attn_bias_for_masking")


def _meta(obj: dict) -> dict:
    """The training options a wrapped MVAR file carries (``args``, the trainer's ``config``)."""
    meta: dict = {}
    for level in (obj, obj.get("trainer") if isinstance(obj.get("trainer"), dict) else None):
        if level is None:
            continue
        for k in ("config", "args"):
            if isinstance(level.get(k), dict):
                meta.update(level[k])
    return meta


def check_options(meta: dict, model) -> None:
    """Refuse a file whose recorded training options differ from ``model``'s config."""
    if not meta:
        return
    S = model.num_scales
    want = {"patch_nums": tuple(h for h, _ in model.scales), "depth": model.transformer.depth,
            "anorm": model.transformer.blocks[0].attn.l2_norm, "saln": False}
    if model.spatial:  # kernel/refine_step only matter when some scale is spatial-Markov
        want.update(kernel_size=model.kernel, refine_step=S - len(model.spatial))
    bad = []
    for k, v in want.items():
        got = meta.get(k)
        if got is None:
            continue
        got = tuple(int(p) for p in got) if k == "patch_nums" else got
        if got != v:
            bad.append(f"{k}={got!r} (model: {v!r})")
    if not model.spatial and meta.get("refine_step") is not None and int(meta["refine_step"]) < S:
        bad.append(f"refine_step={meta['refine_step']} (model: no spatial-Markov scale)")
    if bad:
        raise ValueError("MVAR checkpoint was trained with other options than the arzoo model: " + ", ".join(bad)
                         + " -- pick the matching generator/mvar-* config or pass overrides "
                         "(markov_kernel = kernel_size, markov_scales = len(patch_nums) - refine_step)")


def mvar_block_mask(levels: torch.Tensor) -> torch.Tensor:
    """MVAR's ``attn_bias_for_masking`` (``generate_backward_attn_mask_only_next``):
    ``(1, 1, L, L)``, 0 where query and key share a scale, -inf elsewhere."""
    same = levels[:, None] == levels[None, :]
    return torch.where(same, 0.0, float("-inf"))[None, None]


def check_buffers(state: dict, model) -> str:
    """Check MVAR's buffers against the model's pyramid; returns which training mask the file
    holds: ``"mvar"`` (block-diagonal), ``"var"`` (block-causal: fine-tuned from VAR, see the
    module doc) or ``"none"`` (no buffer in the file)."""
    lv = model.levels()
    L = int(lv.numel())
    if "lvl_1L" in state:
        got = state["lvl_1L"]
        if tuple(got.shape) != (1, L) or not torch.equal(got.flatten().long(), lv):
            raise ValueError(f"MVAR checkpoint: lvl_1L {tuple(got.shape)} does not match the model's pyramid "
                             f"{[h for h, _ in model.scales]} ({L} tokens)")
    kind = "none"
    if "attn_bias_for_masking" in state:
        got = state["attn_bias_for_masking"]
        if tuple(got.shape) != (1, 1, L, L):
            raise ValueError(f"MVAR checkpoint: attn_bias_for_masking {tuple(got.shape)} does not match the "
                             f"model's pyramid {[h for h, _ in model.scales]} ({L} tokens)")
        attend = torch.isfinite(got[0, 0])
        if torch.equal(attend, lv[:, None] == lv[None, :]):
            kind = "mvar"
        elif torch.equal(attend, lv[None, :] <= lv[:, None]):
            kind = "var"
        else:
            raise ValueError("MVAR checkpoint: attn_bias_for_masking is neither MVAR's block-diagonal nor VAR's "
                             "block-causal mask")
    return kind


def mvar_state_from(model) -> dict:
    """The inverse mapping: an arzoo ``NextScaleAR`` (``mode="mvar"``) state in MVAR's
    ``MVAR.state_dict()`` layout (names, buffers), without the tokenizer's ``vq_proxy``."""
    out: dict = {}
    for k, v in model.state_dict().items():
        if k.startswith("vq_proxy.") or k == "tokenizer_attached":
            continue
        if k.startswith("transformer.blocks."):
            out[k[len("transformer."):]] = v
        elif k == "class_emb.table.weight":
            out["class_emb.weight"] = v
        elif k.startswith("head.proj."):
            out["head." + k.rsplit(".", 1)[1]] = v
        else:
            out[k] = v
    for i, b in enumerate(model.transformer.blocks):
        out[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros_like(b.attn.q_bias)
    lv = model.levels()
    out["lvl_1L"] = lv[None].clone()
    out["attn_bias_for_masking"] = mvar_block_mask(lv)
    return out


@register("mvar", ("generator/mvar-",), needs_tokenizer=True)
def convert_mvar(state: dict, model, tokenizer=None) -> dict:
    """MVAR's transformer (``mvar-d16.pth``, ``mvar-finetune-d*.pth``) -> ``generator/mvar-*``;
    ``tokenizer`` is the converted VAR VQVAE whose codebook and phi build the next-scale input."""
    if tokenizer is None:
        raise ValueError("MVAR generators take their codebook and phi from VAR's VQVAE: pass the converted "
                         "tokenizer (arzoo convert --from var vae_ch160v4096z32.pth ...; then --tokenizer DIR)")
    if getattr(model, "mode", None) != "mvar":
        raise ValueError(f"an MVAR checkpoint converts into a mode='mvar' NextScaleAR, got mode="
                         f"{getattr(model, 'mode', None)!r}")
    check_options(_meta(state), model)
    sd = unwrap(state, WRAPPERS)
    if not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"MVAR checkpoint: no tensors found (top-level keys {sorted(state)[:8]}); expected a state "
                         f"dict or one wrapped in {WRAPPERS}")
    check_buffers(sd, model)
    expected = set(mvar_state_from(model)) - set(_DROPPED_BUFFERS)
    missing = sorted(k for k in expected if k not in sd and not re.fullmatch(r"blocks\.\d+\.attn\.zero_k_bias", k))
    if missing:
        raise ValueError(f"MVAR checkpoint: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                         f"(arzoo model: depth {model.transformer.depth}, {model.num_scales} scales)")
    try:
        return convert_var(sd, model, tokenizer=tokenizer)
    except ValueError as e:  # same layout as VAR: say which converter found it
        raise ValueError(f"MVAR checkpoint (VAR's transformer layout): {e}") from None
