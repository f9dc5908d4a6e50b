"""The model registry (timm / open_clip style): the single source of truth for names.

::

    @register("tokenizer/vq-tiny", paper="LlamaGen, Sun et al. 2024, §2.1",
              weights={"shapes": "weights/tokenizer-vq-tiny"})
    def vq_tiny(**overrides):
        return VQTokenizer(**{**TINY, **overrides})

    zoo.create("tokenizer/vq-tiny", pretrained="shapes")
    zoo.list("generator/*-tiny")
    zoo.info("generator/raster-ar-b")      # built on the meta device: no memory, no init

Names are ``tokenizer/...`` or ``generator/...`` (``eval/...`` for evaluation networks).
Each family registers a ``*-tiny`` entry (Shapes, tests) and, where it reproduces a paper,
the paper-size configs with ``paper_params`` (the paper's parameter count).
"""
from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from zoo.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
KINDS = ("tokenizer", "generator", "eval")


class UnknownModel(KeyError):
    def __str__(self):
        return self.args[0]


@dataclass
class Entry:
    name: str
    factory: Callable
    paper: str | None = None
    paper_params: float | None = None  # the paper's parameter count, if it states one
    weights: dict = field(default_factory=dict)  # tag -> checkpoint folder (repo-relative) or hub id
    description: str = ""
    cls: type | None = field(default=None, repr=False, compare=False)  # cache of model_class()

    @property
    def kind(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def is_tiny(self) -> bool:
        return self.name.endswith("-tiny") or "-tiny-" in self.name


_REGISTRY: dict[str, Entry] = {}
_LOADED = False


def register(name: str, *, paper: str | None = None, paper_params: float | None = None,
             weights: dict | None = None, description: str = ""):
    """Decorator: register ``factory(**overrides) -> ZooModule`` under ``name``."""
    kind = name.split("/", 1)[0]
    if "/" not in name or kind not in KINDS:
        raise ValueError(f"registry names look like '<{'|'.join(KINDS)}>/<model>', got {name!r}")

    def deco(factory):
        if name in _REGISTRY and _REGISTRY[name].factory is not factory:
            raise ValueError(f"{name!r} is registered twice")
        doc = description or (factory.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = Entry(name, factory, paper, paper_params, dict(weights or {}), doc)
        return factory

    return deco


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def _ensure_loaded() -> None:
    # Importing the model packages runs their @register decorators.
    global _LOADED
    if not _LOADED:
        _LOADED = True
        import generators  # noqa: F401
        import tokenizers_vis  # noqa: F401
        try:
            import eval.models  # noqa: F401
        except ModuleNotFoundError as e:
            if e.name not in ("eval.models",):
                raise


def entry(name: str) -> Entry:
    _ensure_loaded()
    if name not in _REGISTRY:
        close = fnmatch.filter(_REGISTRY, f"*{name.split('/')[-1].split('-')[0]}*")
        hint = f"; similar: {', '.join(sorted(close)[:6])}" if close else ""
        raise UnknownModel(f"unknown model {name!r} (see `arzoo list`){hint}")
    return _REGISTRY[name]


def import_plugins(specs) -> None:
    """Import each ``MODULE`` (``MODULE:FUNC``: then call ``FUNC()``) so that its ``@register``
    decorators run -- how user-defined models reach the registry (``--import MODULE``)."""
    _ensure_loaded()  # built-in names first, so a plugin that reuses one fails at its @register
    for spec in specs or []:
        mod, _, func = str(spec).partition(":")
        try:
            m = importlib.import_module(mod)
        except ImportError as e:
            raise UserError(f"--import {spec}: cannot import {mod!r} ({e})") from e
        if func:
            fn = getattr(m, func, None)
            if not callable(fn):
                raise UserError(f"--import {spec}: {mod} has no callable {func!r}")
            fn()


def list_models(pattern: str = "*", *, pretrained: bool = False) -> list[str]:
    """Registered names matching a shell-style wildcard (``generator/*-tiny``)."""
    _ensure_loaded()
    names = sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))
    if pretrained:
        names = [n for n in names if _REGISTRY[n].weights]
    return names


def resolve_weights(name: str, tag) -> Path:
    e = entry(name)
    if not e.weights:
        raise ValueError(f"{name} has no pretrained weights (see checkpoints.md)")
    if tag is True:
        tag = next(iter(e.weights))
    if tag not in e.weights:
        raise ValueError(f"{name} has no weights tagged {tag!r}; available: {', '.join(e.weights)}")
    loc = e.weights[tag]
    path = REPO_ROOT / loc
    if path.is_dir():
        return path
    if "/" in loc and not loc.startswith(("weights/", "./")):
        from zoo.hub import PREFIX, download  # a Hub repo id (cached, or for users with network)
        return download(loc if loc.startswith(PREFIX) else PREFIX + loc)
    raise FileNotFoundError(f"{name}:{tag}: weights folder {path} is missing (did the checkout include weights/?)")


def split_tag(name: str, pretrained=False) -> tuple[str, object]:
    """``"kind/model:tag"`` -> ``("kind/model", "tag")``; a ``pretrained`` that names another tag
    is an error."""
    base, sep, tag = str(name).partition(":")
    if not sep:
        return base, pretrained
    if not tag:
        raise ValueError(f"{name!r}: empty weights tag after ':'")
    if pretrained not in (False, None, True, tag):
        raise ValueError(f"{name!r} names weights {tag!r} but pretrained={pretrained!r}")
    return base, tag


def create(name: str, pretrained=False, **overrides):
    """Build a registered model; ``pretrained=True|tag`` (or ``name:tag``) loads its checkpoint.
    ``"hf-hub:ORG/REPO[@REV]"`` loads an arzoo checkpoint from the Hugging Face Hub (zoo/hub.py)."""
    from zoo import hub
    from zoo.checkpoint import load_pretrained

    if hub.is_hub_ref(name):
        if overrides or pretrained not in (False, None, True):
            raise ValueError(f"{name}: a Hub checkpoint takes no overrides or weights tag")
        return hub.load(name)
    name, pretrained = split_tag(name, pretrained)
    e = entry(name)
    # Only an explicit False/None means random weights: "" or 0 must not silently skip loading.
    if not (pretrained is None or pretrained is False or pretrained is True
            or (isinstance(pretrained, str) and pretrained.strip())):
        raise ValueError(f"{name}: pretrained must be True, False or a weights tag "
                         f"({', '.join(e.weights) or 'none shipped'}), got {pretrained!r}")
    if pretrained:
        if overrides:
            raise ValueError(f"{name}: overrides {sorted(overrides)} cannot be applied to pretrained weights")
        model = load_pretrained(resolve_weights(name, pretrained))
    else:
        model = e.factory(**overrides)
    model.registry_name = name
    return model


def build_meta(name: str, **overrides):
    """Build on the meta device: shapes and parameter counts without memory or init cost."""
    e = entry(name)
    with torch.device("meta"):
        model = e.factory(**overrides)
    model.registry_name = name
    return model


def model_class(name: str) -> type:
    """The class that ``name``'s factory builds (from a meta-device build, cached)."""
    e = entry(name)
    if e.cls is None:
        e.cls = type(build_meta(name))
    return e.cls


def info(name: str) -> dict:
    """Parameters, token spec, paper and config of a registered model."""
    e = entry(name)
    model = build_meta(name)
    params = sum(p.numel() for p in model.parameters())
    spec = getattr(model, "spec", None)
    return {
        "name": name,
        "kind": e.kind,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "params": params,
        "paper_params": e.paper_params,
        "spec": spec.describe() if spec is not None else None,
        "paper": e.paper,
        "description": e.description,
        "weights": dict(e.weights),
        "config": model.config,
    }
