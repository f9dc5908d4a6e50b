"""The tokenizer interface: images <-> :class:`zoo.tokens.Tokens`.

Images are float tensors in [-1, 1] of shape (B, 3, H, W) with H = W = ``image_size``.
"""
from __future__ import annotations

import torch

from zoo.module import ZooModule
from zoo.tokens import Tokens, TokenSpec, expect_tokens


class Tokenizer(ZooModule):
    """Subclasses set ``self.spec`` and ``self.image_size`` and implement the three methods.

    ``forward(images) -> (recon, losses)`` is the training step: ``losses["loss"]`` is the
    total to back-propagate; other entries are logged (scalars, detached where not used).
    """

    spec: TokenSpec
    image_size: int

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
            raise ValueError(f"{name}: expected float images in [-1, 1], got dtype {images.dtype} "
                             f"(convert uint8 with x / 127.5 - 1)")
        return images

    def check_tokens(self, tokens: Tokens) -> Tokens:
        return expect_tokens(tokens, self.spec, f"{self.registry_name or type(self).__name__}.decode")

    def example_images(self, batch: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand(batch, 3, self.image_size, self.image_size, generator=generator) * 2 - 1
