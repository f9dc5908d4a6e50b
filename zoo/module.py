"""`ZooModule`: an ``nn.Module`` that remembers its constructor arguments.

Every registered model subclasses it, so a checkpoint can be a JSON config (class + the
exact arguments) next to a safetensors file, with nothing pickled (see ``zoo.checkpoint``).
"""
from __future__ import annotations

import functools
import inspect

import torch.nn as nn


class ZooModule(nn.Module):
    #: set by ``zoo.create``; saved into ``config.json`` so ``arzoo info`` can name it
    registry_name: str | None = None
    #: a generator's tokenizer, ``{"name": "tokenizer/...:tag" or None, "fingerprint": ...}``
    #: (``zoo.checkpoint.fingerprint``); saved as ``"tokenizer"`` in config.json
    trained_on: dict | None = None
    #: the checkpoint folder the weights were loaded from; None = random initialisation
    pretrained_source: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        orig = cls.__dict__["__init__"]
        sig = inspect.signature(orig)

        @functools.wraps(orig)
        def __init__(self, *args, **kw):
            # Only the most-derived constructor (the first to run) records the arguments.
            if "_zoo_config" not in self.__dict__:
                bound = sig.bind(self, *args, **kw)
                bound.apply_defaults()
                cfg = {}
                for name, p in sig.parameters.items():
                    if name == "self":
                        continue
                    if p.kind is p.VAR_KEYWORD:
                        cfg.update(bound.arguments.get(name, {}))
                    elif p.kind is p.VAR_POSITIONAL:
                        if bound.arguments.get(name):
                            raise TypeError(f"{cls.__name__}: *args cannot be saved in a config")
                    else:
                        cfg[name] = bound.arguments[name]
                object.__setattr__(self, "_zoo_config", cfg)
            orig(self, *args, **kw)

        cls.__init__ = __init__

    @property
    def config(self) -> dict:
        """The constructor arguments this module was built with."""
        return dict(self.__dict__.get("_zoo_config", {}))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory, dtype=None) -> None:
        from zoo.checkpoint import save_pretrained
        save_pretrained(self, directory, dtype=dtype)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload as an arzoo checkpoint folder + model card (:func:`zoo.hub.push_to_hub`)."""
        from zoo.hub import push_to_hub
        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu"):
        """A checkpoint folder or ``hf-hub:ORG/REPO[@REV]`` (zoo/hub.py) holding this class."""
        from zoo import hub
        from zoo.checkpoint import load_pretrained
        if hub.is_hub_ref(str(directory)):
            model = hub.load(str(directory), map_location=map_location)
        else:
            model = load_pretrained(directory, map_location=map_location)
        if not isinstance(model, cls):
            raise TypeError(f"{directory} holds a {type(model).__name__}, not a {cls.__name__}")
        return model
