"""Frozen semantic teachers for tokenizers that distil semantic features.

TokenFlow (arXiv 2412.03069, §3.1), UniWeTok (arXiv 2602.14178) and SEED (arXiv 2307.08041,
§2.1) align their tokens with a pretrained vision encoder (CLIP / SigLIP / EVA ViT). In arzoo
the teacher is a **constructor argument** naming where to get it, never hard-wired:

``"eval/shapes-net:shapes"``
    a registered model with a ``patch_features(images)`` method, and its weights tag (the
    Shapes feature network of ``eval/features.py``: the tiny teacher for Shapes);
``"timm:<model_name>[@<weights file>]"``
    a timm vision model (``pretrained=False``; the weights file, safetensors, is loaded when
    given -- there are no downloads); ViT tokens are reshaped to a (B, C, h, w) map;
``"<checkpoint folder>"``
    an arzoo checkpoint folder whose model has ``patch_features``;
``"none"``
    no teacher (semantic losses off; encode/decode still work).

The teacher is kept **outside** the student's ``state_dict`` (it is frozen and can be large;
only training needs it) and built lazily on first use, on the device of the images it is given.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


class TeacherError(ValueError):
    """A teacher spec that cannot be resolved."""


class _TimmTeacher(nn.Module):
    """A timm model's last feature map as (B, C, h, w) (ViT patch tokens reshaped, prefix dropped)."""

    def __init__(self, name: str, weights: str | None):
        super().__init__()
        import timm

        self.model = timm.create_model(name, pretrained=False, num_classes=0)
        if weights:
            if not Path(weights).is_file():
                raise TeacherError(f"teacher weights {weights!r} not found (timm:{name}@FILE expects a "
                                   f"local .safetensors file; nothing is downloaded)")
            from safetensors.torch import load_file

            missing, unexpected = self.model.load_state_dict(load_file(weights), strict=False)
            if unexpected or [k for k in missing if not k.startswith("head")]:
                raise TeacherError(f"teacher weights {weights!r} do not fit timm model {name!r}: "
                                   f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        cfg = self.model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5))).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.5, 0.5, 0.5))).view(1, 3, 1, 1), False)
        self.input_size = tuple(cfg.get("input_size", (3, 224, 224))[1:])

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2  # zoo images are in [-1, 1]
        if tuple(x.shape[-2:]) != self.input_size:
            x = nn.functional.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False)
        f = self.model.forward_features((x - self.mean) / self.std)
        if f.dim() == 3:  # ViT: (B, prefix + h*w, C)
            n_prefix = getattr(self.model, "num_prefix_tokens", 1)
            f = f[:, n_prefix:]
            side = int(round(f.shape[1] ** 0.5))
            f = f.transpose(1, 2).reshape(f.shape[0], f.shape[2], side, side)
        return f


def build_teacher(spec: str) -> nn.Module | None:
    """Resolve a teacher spec (see module doc) to a frozen module with ``patch_features``."""
    spec = str(spec)
    if spec in ("", "none"):
        return None
    if spec.startswith("timm:"):
        name, _, weights = spec[5:].partition("@")
        model = _TimmTeacher(name, weights or None)
    elif Path(spec).is_dir():
        from zoo.checkpoint import load_pretrained

        model = load_pretrained(spec)
    else:
        import zoo

        name, _, tag = spec.partition(":")
        try:
            model = zoo.create(name, pretrained=tag or False)
        except KeyError as e:
            raise TeacherError(f"teacher {spec!r}: {e}") from None
    if not hasattr(model, "patch_features"):
        raise TeacherError(f"teacher {spec!r} ({type(model).__name__}) has no patch_features(images)")
    return model.eval().requires_grad_(False)


class TeacherSlot:
    """Holds a lazily built teacher outside the owning module's parameters and state_dict.

    ``slot(images)`` returns the teacher's (B, C, h, w) features (no gradient), building the
    teacher on first use and moving it to the images' device.
    """

    def __init__(self, spec: str):
        self.spec = str(spec)
        self._model: nn.Module | None = None

    @property
    def enabled(self) -> bool:
        return self._model is not None or self.spec not in ("", "none")

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            if not self.enabled:
                raise TeacherError("this tokenizer was built with teacher='none'")
            self._model = build_teacher(self.spec)
        return self._model

    def set(self, model: nn.Module) -> None:
        """Use an already built module (tests, or a teacher shared between students)."""
        if not hasattr(model, "patch_features"):
            raise TeacherError(f"{type(model).__name__} has no patch_features(images)")
        self._model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        p = next(iter(m.parameters()), None)
        if p is not None and p.device != images.device:
            m.to(images.device)
        return m.patch_features(images).float()


__all__ = ["TeacherError", "TeacherSlot", "build_teacher"]
