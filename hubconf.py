"""torch.hub entry points, generated from the arzoo registry.

Every registered model ``kind/name-size`` is an entry point ``kind_name_size``::

    torch.hub.load("<repo or local dir>", "generator_raster_ar_tiny", source="local")
    torch.hub.load(..., "tokenizer_vq_tiny", pretrained=True)   # shipped Shapes weights

Keyword arguments are registry overrides (``spec=...``, ``dim=...``).
"""
dependencies = ["torch", "safetensors", "einops", "numpy", "diffusers", "timm"]

import os as _os
import sys as _sys

# torch.hub imports this file by path; make the repo's top-level packages importable.
_root = _os.path.dirname(_os.path.abspath(__file__))
if _root not in _sys.path:
    _sys.path.insert(0, _root)

from zoo import registry as _registry  # noqa: E402


def _entrypoint_name(name: str) -> str:
    return name.replace("/", "_").replace("-", "_").replace(".", "_")


def _make(name: str):
    def entry(pretrained=False, device=None, **overrides):
        if device is None:
            return _registry.create(name, pretrained=pretrained, **overrides)
        import torch  # build directly on a device ("meta" builds paper-size models for free)

        with torch.device(device):
            return _registry.create(name, pretrained=pretrained, **overrides)

    e = _registry.entry(name)
    entry.__name__ = _entrypoint_name(name)
    entry.__doc__ = (f"{name}: {e.description or ''}\n\nPaper: {e.paper or '-'}\n"
                     f"Pretrained tags: {', '.join(e.weights) or 'none'}\n"
                     f"Keyword arguments override the registry config.")
    return entry


ENTRYPOINTS = {}
for _name in _registry.list_models("*"):
    ENTRYPOINTS[_entrypoint_name(_name)] = _name
    globals()[_entrypoint_name(_name)] = _make(_name)
