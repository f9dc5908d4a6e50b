"""Perceptual and adversarial losses for tokenizer training (used by the training script).

- PatchGAN discriminator and hinge loss: Isola et al. 2017 ("pix2pix", §3.2.2) as used by
  VQGAN (Esser et al. 2021, §3.2, with the adaptive weight of its eq. 7) and LlamaGen
  (Sun et al. 2024, §2.1: PatchGAN, hinge, weight 0.5).
- LPIPS: Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
  Metric", §3: unit-normalised VGG16 features, squared differences, per-channel weights,
  spatial mean, sum over 5 layers.

Nothing here is needed by ``VQTokenizer.forward``; nothing is downloaded.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.module import ZooModule


class NLayerDiscriminator(ZooModule):
    """PatchGAN: ``n_layers`` strided 4x4 convs, then a 1-channel map of per-patch logits.

    ``norm="batch"`` is taming's choice; ``"group"`` avoids batch statistics for tiny batches.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")

        def norm_layer(c):
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(32 if c % 32 == 0 else 1, c)

        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = ndf
        for i in range(1, n_layers + 1):
            c_out = ndf * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), norm_layer(c_out), nn.LeakyReLU(0.2, True)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # DCGAN init, as taming
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss for the discriminator: ``0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G))])``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge generator loss ``-E[D(G)]``."""
    return -logits_fake.mean()


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN eq. 7: ``||grad nll|| / (||grad g_loss|| + 1e-4)`` at the decoder's last layer, detached."""
    g_nll = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# ---- LPIPS ------------------------------------------------------------------------------
_VGG_SLICES = (4, 9, 16, 23, 30)  # ends of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16.features
_VGG_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """LPIPS distance between images in [-1, 1]; returns one value per image (B,).

    ``vgg_state``: a torchvision ``vgg16`` state dict (only ``features.*`` is used); None keeps a
    random VGG (tests only: ``pretrained`` is then False and the distance means nothing; training
    loads real weights with :func:`load_lpips`). ``lin_state``: the LPIPS v0.1 per-channel weights
    (``lin{i}.model.1.weight``);
    None uses equal channel weights -- the uncalibrated "baseline" variant of the paper.
    The network is frozen.
    """

    def __init__(self, vgg_state: dict | None = None, lin_state: dict | None = None):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        self.features = make_layers(cfgs["D"])
        self.pretrained = vgg_state is not None
        self.calibrated = lin_state is not None
        if vgg_state is not None:
            self.features.load_state_dict({k[len("features."):]: v for k, v in vgg_state.items()
                                           if k.startswith("features.")})
        self.lins = nn.ParameterList(nn.Parameter(torch.ones(1, c, 1, 1)) for c in _VGG_CHANNELS)
        if lin_state is not None:
            for i, p in enumerate(self.lins):
                p.data.copy_(lin_state[f"lin{i}.model.1.weight"].reshape(p.shape))
        # LPIPS' input scaling layer (images in [-1, 1] -> roughly ImageNet-normalised)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def _feats(self, x):
        x = (x - self.shift) / self.scale
        out, start = [], 0
        for end in _VGG_SLICES:
            x = self.features[start:end](x)
            out.append(x / (x.norm(dim=1, keepdim=True) + 1e-10))
            start = end
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for fa, fb, w in zip(self._feats(a), self._feats(b), self.lins):
            total = total + ((fa - fb) ** 2 * w).sum(1).mean((1, 2))
        return total

    def train(self, mode: bool = True):  # stays in eval mode (frozen)
        return super().train(False)


def load_lpips(path) -> LPIPS:
    """LPIPS with real weights from a safetensors file (never a pickle): torchvision VGG16
    ``features.*`` tensors, plus optionally the LPIPS v0.1 ``lin0..4.model.1.weight`` (without
    them channels are weighted equally). Errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if p.suffix != ".safetensors":
        raise ValueError(f"{path}: LPIPS weights must be a .safetensors file (pickled .pth/.pt files are "
                         f"never loaded)")
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: truncated or corrupt safetensors file ({e})") from e
    lins = {k: v for k, v in state.items() if k.startswith("lin")}
    try:
        return LPIPS(state, lins or None)
    except (RuntimeError, KeyError) as e:  # missing / mis-shaped VGG tensors, incomplete lin weights
        raise ValueError(f"{path}: not VGG16 'features.*' (+ LPIPS 'lin*') weights ({e})") from e


_WARNED = False


def vgg16_weights_path() -> str:
    """Where torchvision caches the ImageNet VGG16 weights (``$TORCH_HOME/hub/checkpoints``)."""
    from torchvision.models import VGG16_Weights

    name = os.path.basename(VGG16_Weights.IMAGENET1K_V1.url)
    return os.path.join(torch.hub.get_dir(), "checkpoints", name)


def lpips_or_none() -> LPIPS | None:
    """An LPIPS module if the VGG16 weights are in the torch hub cache, else None (warns once).

    The calibrated per-channel weights come from the ``lpips`` package when it is installed;
    otherwise channels are weighted equally (and a warning says so).
    """
    global _WARNED
    path = vgg16_weights_path()
    if not os.path.isfile(path):
        if not _WARNED:
            warnings.warn(f"LPIPS disabled: VGG16 weights not found at {path} (no download is attempted); "
                          f"training uses pixel losses only", stacklevel=2)
            _WARNED = True
        return None
    lin_state = None
    try:
        import lpips as _lpips_pkg  # optional; ships the LPIPS v0.1 linear weights

        lin_path = os.path.join(os.path.dirname(_lpips_pkg.__file__), "weights", "v0.1", "vgg.pth")
        lin_state = torch.load(lin_path, map_location="cpu", weights_only=True)
    except (ImportError, OSError):
        warnings.warn("LPIPS: the lpips package (calibrated layer weights) is not installed; "
                      "using equal channel weights", stacklevel=2)
    return LPIPS(torch.load(path, map_location="cpu", weights_only=True), lin_state)
