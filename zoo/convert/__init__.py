"""Convert the authors' released checkpoints into arzoo checkpoints (``arzoo convert``).

::

    arzoo convert --from llamagen vq_ds16_c2i.pt --model tokenizer/vq-16 --out ckpt/vq-16
    arzoo convert --from var var_d16.pth --model generator/var-d16 --tokenizer ckpt/msvq-var --out ckpt/var-d16

Official ``.pt`` / ``.pth`` / ``.ckpt`` files are pickles: they are read **only** with
``torch.load(weights_only=True)`` (tensors and plain containers; any other object refuses to
load), ``.safetensors`` with safetensors. Each family module maps the reference key names and
layouts onto the arzoo model's (``zoo/convert/<family>.py``, registered with
:func:`register`); the mapped state must fill the model exactly (:func:`zoo.checkpoint.
load_state_strict`: every tensor present, nothing left over, shapes equal), and the result is
written with ``save_pretrained`` plus a model card -- an ordinary arzoo checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

FAMILIES = ("llamagen", "var", "mar", "nar", "mvar")


@dataclass
class Converter:
    family: str
    models: tuple  # registry-name prefixes this converter handles, e.g. ("tokenizer/vq-",)
    fn: Callable  # fn(state: dict, model, tokenizer=None) -> dict in arzoo's names
    overrides: dict  # constructor overrides the converted model needs (e.g. prefix_rope="zero")
    needs_tokenizer: bool = False  # VAR: the generator's f̂ comes from the VQVAE (attach_tokenizer)


_CONVERTERS: list[Converter] = []


def register(family: str, models: tuple, *, overrides: dict | None = None, needs_tokenizer: bool = False):
    """Decorator: ``fn(state, model, tokenizer=None) -> state`` converts ``family`` checkpoints
    of the registry names starting with one of ``models``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")

    def deco(fn):
        _CONVERTERS.append(Converter(family, tuple(models), fn, dict(overrides or {}), needs_tokenizer))
        return fn

    return deco


def _load_families() -> None:
    import importlib

    for fam in FAMILIES:
        try:
            importlib.import_module(f"zoo.convert.{fam}")
        except ModuleNotFoundError as e:
            if e.name != f"zoo.convert.{fam}":
                raise


def find(family: str, model: str) -> Converter:
    _load_families()
    for c in _CONVERTERS:
        if c.family == family and model.startswith(c.models):
            return c
    known = sorted({f"{c.family}: {', '.join(c.models)}*" for c in _CONVERTERS})
    raise ValueError(f"no {family!r} converter for {model!r}; converters: {'; '.join(known) or 'none'}")


def load_source(path) -> dict:
    """Tensors of an official checkpoint: safetensors, or a pickle read with weights_only=True."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        # argparse.Namespace: the training args LlamaGen/NAR save beside the weights (plain data)
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"{p}: not loadable with torch.load(weights_only=True) ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); arzoo never unpickles arbitrary objects") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{p}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def unwrap(obj: dict, keys=("model", "state_dict", "module")) -> dict:
    """The tensor dict inside the usual wrappers (``{"model": {...}}``, ``{"state_dict": ...}``)."""
    for k in keys:
        if k in obj and isinstance(obj[k], dict):
            return unwrap(obj[k], keys)
    return obj


def convert(family: str, src, model_name: str, out=None, *, tokenizer=None, dtype=None, weights=None):
    """Build ``model_name``, fill it from ``src`` and (with ``out``) save it; returns the model.
    ``weights``: which weights of a file holding two sets (MAR: ``"ema"`` (default) or ``"raw"``)."""
    import zoo
    from zoo.card import write_card
    from zoo.checkpoint import load_state_strict
    from zoo.pipeline import load_model

    if not Path(src).is_file():
        raise FileNotFoundError(f"{src}: no such file")
    conv = find(family, model_name)
    if conv.needs_tokenizer and tokenizer is None:
        raise ValueError(f"{family} {model_name}: pass --tokenizer (a converted tokenizer checkpoint): the "
                         "generator takes its codebook from it")
    # a given tokenizer also fixes the token grid (e.g. LlamaGen's 384 px GPTs on a 24x24 VQ-16)
    tok = load_model(tokenizer, "tokenizer") if tokenizer is not None else None
    spec = {"spec": tok.spec} if tok is not None else {}
    model = zoo.create(model_name, **{**conv.overrides, **spec})
    kw = {} if weights is None else {"weights": weights}
    try:
        state = conv.fn(load_source(src), model, tokenizer=tok, **kw)
    except TypeError as e:
        if weights is not None and "weights" in str(e):
            raise ValueError(f"--weights: {family} {model_name} files hold one set of weights") from None
        raise
    load_state_strict(model, state, str(src))
    model.registry_name = model_name
    model.pretrained_source = str(src)
    if out is not None:
        model.save_pretrained(out, dtype=dtype)
        write_card(model, out)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="arzoo convert", description=__doc__.split("\n")[0])
    p.add_argument("src", help="the official checkpoint (.pt / .pth / .ckpt / .safetensors)")
    p.add_argument("--from", dest="family", required=True, choices=FAMILIES)
    p.add_argument("--model", required=True, help="arzoo registry name, e.g. tokenizer/vq-16")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--tokenizer", help="converted tokenizer checkpoint: required for VAR generators; for the "
                                        "others it sets the token grid (e.g. 384 px LlamaGen GPTs)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--weights", choices=("ema", "raw"), help="MAR checkpoints: EMA (default) or raw weights")
    a = p.parse_args(argv)
    dtype = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[a.dtype]
    m = convert(a.family, a.src, a.model, a.out, tokenizer=a.tokenizer, dtype=dtype, weights=a.weights)
    print(f"converted {a.src} -> {a.model} ({sum(t.numel() for t in m.parameters()):,} params) -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
