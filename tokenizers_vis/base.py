"""The tokenizer interface: images <-> :class:`zoo.tokens.Tokens`.

Images are float tensors in [-1, 1] of shape (B, 3, H, W) with H = W = ``image_size``.

Every subclass's ``encode`` is wrapped once here (:meth:`Tokenizer.prepare_images`), so no
tokenizer can skip the input checks: the shape and size must match, integer images (uint8
pixels) are refused with the conversion to use, NaN / inf and values outside [-1, 1] (beyond
``RANGE_TOLERANCE``, e.g. 0..255 floats) raise ``ValueError``, and other float dtypes
(float64, float16, bfloat16) are cast to the model's parameter dtype. The cost is one
``aminmax`` over the batch.
"""
from __future__ import annotations

import functools

import torch

from zoo.module import ZooModule
from zoo.tokens import Tokens, TokenSpec, expect_tokens


# Resampling (bicubic, Lanczos) overshoots [-1, 1] a little near hard edges; 0..255 pixels or
# ImageNet mean/std normalisation (down to -2.1, up to 2.6) still fail.
RANGE_TOLERANCE = 0.25


class Tokenizer(ZooModule):
    """Subclasses set ``self.spec`` and ``self.image_size`` and implement the three methods.

    ``forward(images) -> (recon, losses)`` is the training step: ``losses["loss"]`` is the
    total to back-propagate; other entries are logged (scalars, detached where not used).
    """

    spec: TokenSpec
    image_size: int

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        enc = cls.__dict__.get("encode")
        if enc is None or getattr(enc, "_prepares_images", False):
            return

        @functools.wraps(enc)
        def encode(self, images, *args, **kw):
            return enc(self, self.prepare_images(images), *args, **kw)

        encode._prepares_images = True
        cls.encode = encode

    def encode(self, images: torch.Tensor) -> Tokens:
        raise NotImplementedError

    def decode(self, tokens: Tokens) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor):
        raise NotImplementedError

    # -- helpers for subclasses -------------------------------------------------------
    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Refuse inputs that are not (B, 3, S, S) floats at this tokenizer's resolution."""
        name = self.registry_name or type(self).__name__
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{name}: expected images of shape (B, 3, {self.image_size}, {self.image_size}), "
                             f"got {shape}")
        if tuple(images.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"{name}: expected {self.image_size}x{self.image_size} images, got "
                             f"{images.shape[2]}x{images.shape[3]} (resize or center-crop first; "
                             f"zoo.data.center_crop_arr does the ADM crop)")
        if not images.dtype.is_floating_point:
            dtype = str(images.dtype).replace("torch.", "")
            raise ValueError(f"{name}: expected float images in [-1, 1]; got dtype {dtype}"
                             + (" (divide by 127.5 and subtract 1)" if dtype == "uint8" else ""))
        return images

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """What ``encode`` runs on: :meth:`check_images`, finite values in [-1, 1] (within
        ``RANGE_TOLERANCE``), cast to the dtype of the model's parameters."""
        name = self.registry_name or type(self).__name__
        images = self.check_images(images)
        if images.numel():
            lo, hi = torch.stack(torch.aminmax(images)).float().tolist()  # NaN propagates to both
            if lo != lo or hi != hi:
                raise ValueError(f"{name}: images contain NaN")
            if abs(lo) == float("inf") or abs(hi) == float("inf"):
                raise ValueError(f"{name}: images contain inf")
            if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
                raise ValueError(f"{name}: expected images in [-1, 1], got values in [{lo:g}, {hi:g}]"
                                 + (" (0..255 pixels? divide by 127.5 and subtract 1)" if hi > 2 else ""))
        dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), images.dtype)
        return images.to(dtype)

    def check_tokens(self, tokens: Tokens) -> Tokens:
        return expect_tokens(tokens, self.spec, f"{self.registry_name or type(self).__name__}.decode")

    def example_images(self, batch: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand(batch, 3, self.image_size, self.image_size, generator=generator) * 2 - 1
