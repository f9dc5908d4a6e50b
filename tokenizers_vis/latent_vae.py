"""The frozen KL autoencoder shared by the latent-space tokenizers (COMiT, Layton).

:class:`LatentVAE` wraps a KL autoencoder -- a registered ``tokenizer/kl-*`` (built from its
config) or an SD-style ``diffusers.AutoencoderKL`` (:data:`SD_VAE`) -- and re-registers its
weights as persistent buffers (:func:`params_to_buffers`): they are saved inside the owning
model's checkpoint (self-contained, loads offline), frozen, and invisible to ``parameters()`` and
optimisers. A fresh ``LatentVAE`` has random weights; :meth:`LatentVAE.load_weights` copies
weights in and :func:`load_shipped_vae` is the tiny factories' step that copies a shipped
checkpoint's weights into a freshly built model.
"""
from __future__ import annotations

import torch
from torch import nn

# SD AutoencoderKL (Rombach et al. 2022; diffusers config of stabilityai/sd-vae-ft-*): f8, 4 channels.
SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
          "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32,
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
SD_SCALE = 0.18215


def params_to_buffers(module: nn.Module) -> nn.Module:
    """Re-register every parameter of ``module`` as a (persistent) buffer: frozen, saved in the
    state dict under the same names, invisible to ``parameters()`` and optimisers."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is None:
                continue
            del m._parameters[name]
            m.register_buffer(name, p.detach(), persistent=True)
    return module


class LatentVAE(nn.Module):
    """A frozen KL autoencoder, weights held as buffers (:func:`params_to_buffers`); the ``vae``
    of COMiT (``tokenizers_vis.comit``) and Layton (``tokenizers_vis.layton``).

    ``spec``: a registered KL tokenizer name (``"tokenizer/kl-tiny"``; built from its config, no
    weights) or ``"diffusers:sd"`` (``diffusers.AutoencoderKL`` with :data:`SD_VAE`, updated by
    ``config``). ``encode`` gives the posterior mode (the KL tokenizer's scaled latent), ``decode``
    maps it back to pixels; both take any spatial size divisible by ``factor`` (crops).
    """

    def __init__(self, spec: str, config: dict | None = None):
        super().__init__()
        self.spec = str(spec)
        if self.spec == "diffusers:sd":
            from diffusers import AutoencoderKL

            cfg = {**SD_VAE, **(config or {})}
            self.model = AutoencoderKL(**cfg)
            self.factor = 2 ** (len(cfg["block_out_channels"]) - 1)
            self.channels = int(cfg["latent_channels"])
        elif self.spec.startswith("tokenizer/"):
            from zoo import registry

            self.model = registry.entry(self.spec).factory(**(config or {}))
            if not hasattr(self.model, "decode_latents"):
                raise ValueError(f"latent vae {self.spec!r} is not a KL tokenizer (no decode_latents)")
            self.factor = int(self.model.downsample)
            self.channels = int(self.model.spec.dim)
        else:
            raise ValueError(f"latent vae must be a 'tokenizer/kl-*' name or 'diffusers:sd', got {spec!r}")
        params_to_buffers(self.model.eval())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec == "diffusers:sd":
            return self.model.encode(x).latent_dist.mode()
        m = self.model
        return m.quantizer(m.quant_conv(m.encoder(x)), sample=False)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.spec == "diffusers:sd":
            # diffusers' Decoder.forward reads next(up_blocks.parameters()).dtype: none here (buffers)
            m = self.model
            d = m.decoder
            h = d.conv_in(m.post_quant_conv(z))
            h = d.mid_block(h, None)
            for up in d.up_blocks:
                h = up(h, None)
            return d.conv_out(d.conv_act(d.conv_norm_out(h)))
        return self.model.decode_latents(z)

    def load_weights(self, source) -> None:
        """Copy frozen VAE weights in: a module with the same state-dict names (e.g. a trained
        ``tokenizer/kl-*``), or a local ``.safetensors`` file (a diffusers AutoencoderKL's
        ``diffusion_pytorch_model.safetensors`` for ``"diffusers:sd"``). Strict."""
        if isinstance(source, nn.Module):
            state = source.state_dict()
        else:
            from safetensors.torch import load_file

            state = load_file(str(source))
        own = self.model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"VAE weights do not fit {self.spec}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.model.load_state_dict(state, strict=True)


def load_shipped_vae(model: nn.Module, source: str) -> nn.Module:
    """A tiny factory's step: copy the shipped KL weights ``source`` (a ``zoo.create`` name, e.g.
    ``"tokenizer/kl-tiny:shapes"``) into ``model.vae`` of a freshly built model; skipped on the
    meta device, where no weights exist. Returns ``model``."""
    buf = next(model.vae.buffers(), None)
    if buf is not None and buf.device.type == "meta":
        return model
    import zoo

    model.vae.load_weights(zoo.create(source))
    return model


__all__ = ["SD_SCALE", "SD_VAE", "LatentVAE", "load_shipped_vae", "params_to_buffers"]
