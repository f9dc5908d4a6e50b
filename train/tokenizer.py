"""Train a registered tokenizer on Shapes or an image folder, then measure it on held-out images.

::

    python -m train.tokenizer --model tokenizer/vq-tiny --out runs/vq --steps 20000
    accelerate launch -m train.tokenizer --model tokenizer/vq-tiny --data folder:/data/train --out runs/vq
    # staged tokenizers (SEED, slot): one run per stage, each initialised from the last
    python -m train.tokenizer --model tokenizer/seed-tiny --set stage=1 --out runs/seed-s1
    python -m train.tokenizer --model tokenizer/seed-tiny --set stage=2 --init runs/seed-s1/final --out runs/seed-s2

The objective is the tokenizer's own ``forward(images) -> (recon, losses)`` (``losses["loss"]``:
reconstruction + quantizer terms, as its paper defines them). A model whose ``forward`` takes
``captions`` (SEED / slot: image-text contrastive terms) gets the batch's Shapes captions (``None``
when the data have none, e.g. a folder). ``recon`` may be ``None`` (SEED / slot stages that train
no pixel decoder); then the perceptual and GAN terms are skipped, with a note.

``--init DIR`` starts from the weights of an arzoo checkpoint folder (a previous run's ``final/``
or an exported ``config.json`` + ``model.safetensors``; a bare ``.safetensors`` file also does, a
pickle never), loaded strictly by tensor name and shape into the model built from ``--model`` and
``--set`` (so the constructor arguments, e.g. ``stage``, may differ; differences are printed).
A resumable state in ``--out`` takes precedence: resuming ignores ``--init``.

``--disc-weight > 0`` adds the
PatchGAN adversarial term of VQGAN (Esser et al. 2021, §3.2; hinge form as in LlamaGen,
Sun et al. 2024, §2.1) from ``tokenizers_vis.losses`` after ``--disc-start`` steps, with a
fixed weight (no adaptive weight); when that module lacks the pieces, the GAN is skipped with a
message. ``--perceptual-weight > 0`` adds LPIPS (Zhang et al. 2018) from the same module, with
real VGG16 weights from ``--lpips-weights FILE.safetensors`` (required: an LPIPS with random
weights measures nothing, so it is refused rather than trained against).

At the end ``final/metrics.json`` holds, on ``--eval-images`` held-out images (the Shapes
test split): PSNR on the [0, 1] scale (mean over images) of ``decode(encode(x))``, and
codebook usage (discrete: fraction of the vocabulary used; binary: fraction of bit channels
taking both values, and their mean entropy). For tokenizers whose reconstructions are semantic
re-generations (a ``DiffusionDecoder``: SEED, slot; see :func:`semantic_reconstruction`) on
Shapes, also ``attribute_agreement`` (``eval.recon.attribute_agreement``: detected count,
colours, shapes and objects of original vs reconstruction). A model with no pixel decoder
(``decode`` raises) gets token usage only, and the reason under ``decode``.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import sys

import torch
from torch.utils.data import DataLoader, Subset

from train.common import (add_caption_style_arg, add_common_args, apply_init, build_image_dataset, build_model,
                          collate_images, parse_args, parse_num_objects)
from train.loop import Trainer, make_accelerator, seed_all


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.tokenizer", description=__doc__.split("\n")[0])
    add_common_args(p, steps=20000, batch_size=64, lr=1e-4, warmup=500, weight_decay=0.05,
                    model="tokenizer/vq-tiny")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="shapes", help="'shapes' or 'folder:/path/to/images'")
    g.add_argument("--resolution", type=int, default=None,
                   help="image size (default: the tokenizer's image_size; must match it)")
    g.add_argument("--num-objects", type=parse_num_objects, default=(1, 4),
                   help="Shapes objects per image: N or MIN-MAX")
    g.add_argument("--train-images", type=int, default=50000, help="Shapes training-set size")
    add_caption_style_arg(g)
    g.add_argument("--eval-data", default=None,
                   help="held-out images (default: the test split of --data; for a folder, the folder)")
    g.add_argument("--eval-images", type=int, default=512, help="held-out images measured at the end")
    g.add_argument("--eval-batch-size", type=int, default=64)
    g = p.add_argument_group("extra losses (from tokenizers_vis.losses, when it provides them)")
    g.add_argument("--perceptual-weight", type=float, default=0.0,
                   help="LPIPS weight (0 = off; needs --lpips-weights)")
    g.add_argument("--lpips-weights", metavar="FILE.safetensors", default=None,
                   help="LPIPS network weights: torchvision VGG16 'features.*' tensors, optionally with "
                        "the LPIPS v0.1 'lin0..4.model.1.weight' (else equal channel weights); a "
                        "safetensors file only, never a pickle")
    g.add_argument("--disc-weight", type=float, default=0.0, help="adversarial loss weight (0 = off)")
    g.add_argument("--disc-start", type=int, default=0, help="step at which the GAN terms start")
    g.add_argument("--disc-lr", type=float, default=None, help="discriminator LR (default: --lr)")
    return p


def load_perceptual(weight: float, path):
    """The frozen LPIPS of ``--lpips-weights`` for ``--perceptual-weight`` (None when off);
    called as ``lpips(x, recon)``. Without real weights it refuses: a random VGG is no metric."""
    if weight <= 0:
        return None
    if not path:
        raise SystemExit(f"--perceptual-weight {weight} needs --lpips-weights FILE.safetensors (VGG16 "
                         f"'features.*' weights); LPIPS with random weights is not a perceptual loss")
    from tokenizers_vis.losses import load_lpips

    try:
        model = load_lpips(path)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--lpips-weights {e}") from e
    return model.eval().requires_grad_(False)


def load_gan_losses():
    """``(module, None)`` if ``tokenizers_vis.losses`` has the PatchGAN pieces, else ``(None, why)``."""
    try:
        import tokenizers_vis.losses as L
    except ImportError as e:
        return None, f"tokenizers_vis.losses is not importable ({e})"
    missing = [n for n in ("NLayerDiscriminator", "discriminator_loss", "generator_adv_loss")
               if not hasattr(L, n)]
    if missing:
        return None, f"tokenizers_vis.losses lacks {', '.join(missing)}"
    return L, None


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """No grads into ``module``'s parameters (they still flow through it to its input)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def semantic_reconstruction(model) -> bool:
    """Whether ``decode`` re-generates the content rather than copying pixels.

    A model's own ``semantic_reconstruction`` attribute if it has one, else whether its
    ``decoder`` is a :class:`~tokenizers_vis.diffusion_decoder.DiffusionDecoder` (SEED, slot).
    """
    flag = getattr(model, "semantic_reconstruction", None)
    if flag is not None:
        return bool(flag)
    from tokenizers_vis.diffusion_decoder import DiffusionDecoder

    return isinstance(getattr(model, "decoder", None), DiffusionDecoder)


def _flat_tokens(tokens) -> torch.Tensor:
    return tokens.to_sequence().data


def _uint8_hwc(images: torch.Tensor):
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def evaluate(model, dataset, *, num_images: int, batch_size: int, device, attributes: bool = False) -> dict:
    """PSNR of ``decode(encode(x))`` on [0, 1] (mean over images) and token usage; with
    ``attributes`` also ``eval.recon.attribute_agreement`` of the uint8 images. If ``decode``
    fails on the first batch (no pixel decoder), token usage only and the error under ``decode``."""
    n = min(num_images, len(dataset))
    if n < 1:
        raise SystemExit("the evaluation set is empty")
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, collate_fn=collate_images)
    spec = model.spec
    psnr_sum, mse_sum, count = 0.0, 0.0, 0
    counts = torch.zeros(spec.vocab_size, dtype=torch.long) if spec.kind == "discrete" else None
    bit_sum = torch.zeros(spec.bits, dtype=torch.float64) if spec.kind == "binary" else None
    bit_n, codes = 0, set()
    decode_error, originals, recons = None, [], []
    for batch in loader:
        x = batch["image"].to(device)
        tokens = model.encode(x)
        if decode_error is None:
            try:
                recon = model.decode(tokens).float()
            except (RuntimeError, NotImplementedError) as e:
                if count:  # earlier batches decoded: a real failure, not a missing decoder
                    raise
                decode_error = f"{type(e).__name__}: {e}"
        if decode_error is None:
            x01, r01 = (x.clamp(-1, 1) + 1) / 2, (recon.clamp(-1, 1) + 1) / 2
            mse = (x01 - r01).pow(2).flatten(1).mean(1)
            psnr_sum += float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).sum())
            mse_sum += float(mse.sum())
            if attributes:
                originals.extend(_uint8_hwc(x))
                recons.extend(_uint8_hwc(recon))
        count += x.shape[0]
        flat = _flat_tokens(tokens).cpu()
        if counts is not None:
            counts += torch.bincount(flat.reshape(-1).long(), minlength=spec.vocab_size)
        elif bit_sum is not None:
            bits = flat.reshape(-1, spec.bits).double()
            bit_sum += bits.sum(0)
            bit_n += bits.shape[0]
            if spec.bits <= 62:
                from zoo.tokens import bits_to_groups
                codes.update(bits_to_groups(flat.reshape(-1, spec.bits), spec.bits).unique().tolist())
    out = {"eval_images": count, "tokens": spec.describe()}
    if decode_error is None:
        out.update(psnr=psnr_sum / count, mse=mse_sum / count)
        if attributes:
            from eval.recon import attribute_agreement

            out["attribute_agreement"] = attribute_agreement(originals, recons)
    else:
        out["decode"] = f"skipped: the model cannot decode ({decode_error})"
    if counts is not None:
        p = counts.double() / counts.sum()
        nz = p[p > 0]
        out["codebook_usage"] = float((counts > 0).sum()) / spec.vocab_size
        out["codebook_perplexity"] = float(torch.exp(-(nz * nz.log()).sum()))
    elif bit_sum is not None:
        p = bit_sum / max(bit_n, 1)
        used = ((p > 0) & (p < 1)).double()
        h = -(p * p.clamp_min(1e-12).log2() + (1 - p) * (1 - p).clamp_min(1e-12).log2())
        out["bit_usage"] = float(used.mean())
        out["bit_entropy"] = float(h.mean())
        if codes:
            out["unique_codes"] = len(codes)
    return out


def main(argv=None) -> dict:
    args = parse_args(build_parser(), argv)
    acc = make_accelerator(args)
    seed_all(args.seed)
    model = build_model(args.model, args.overrides)
    for attr in ("spec", "image_size", "encode", "decode"):
        if not hasattr(model, attr):
            raise SystemExit(f"{args.model} is not a tokenizer (it has no {attr!r}); pass --model tokenizer/...")
    apply_init(args, acc, model, "tokenizer")
    res = args.resolution or model.image_size
    if res != model.image_size:
        raise SystemExit(f"--resolution {res} does not match {args.model}'s image_size {model.image_size}")
    train_set = build_image_dataset(args.data, split="train", resolution=res, num_objects=args.num_objects,
                                    length=args.train_images, caption_style=args.caption_style)
    trainer = Trainer(args, acc, model, train_set, collate_fn=collate_images, name="tokenizer")

    gan, disc_raw = None, None
    if args.disc_weight > 0:
        gan, why = load_gan_losses()
        if gan is None:
            acc.print(f"[tokenizer] --disc-weight {args.disc_weight} ignored: {why}; training without GAN")
        else:
            try:
                disc_raw = gan.NLayerDiscriminator()
            except TypeError as e:
                gan = None
                acc.print(f"[tokenizer] GAN skipped: NLayerDiscriminator() could not be built ({e})")
            else:
                trainer.add_aux(disc_raw, lr=args.disc_lr)
    perceptual = load_perceptual(args.perceptual_weight, args.lpips_weights)
    if perceptual is not None:
        perceptual = perceptual.to(acc.device)
    elif args.lpips_weights:
        acc.print(f"[tokenizer] --lpips-weights {args.lpips_weights} unused: --perceptual-weight is 0")
    trainer.prepare()
    disc = trainer.aux[0] if trainer.aux else None
    disc_raw = acc.unwrap_model(disc) if disc is not None else None

    # SEED / slot take the captions for their image-text contrastive terms
    takes_captions = "captions" in inspect.signature(trainer.unwrapped.forward).parameters
    noted = set()

    def step_fn(batch):
        x = batch["image"]
        if takes_captions:
            caps = batch["caption"]
            recon, losses = trainer.model(x, captions=caps if any(caps) else None)
        else:
            recon, losses = trainer.model(x)
        out = dict(losses)
        total = losses["loss"]
        if recon is None and (perceptual is not None or gan is not None):
            if "recon" not in noted:
                noted.add("recon")
                acc.print("[tokenizer] the model returns no reconstruction at this stage (recon is None): "
                          "perceptual and GAN terms skipped")
            out["loss"] = total
            return out
        if perceptual is not None:
            p = perceptual(x, recon).mean()
            total = total + args.perceptual_weight * p
            out["perceptual"] = p.detach()
        if gan is not None and trainer.state.step >= args.disc_start:
            # generator side: grads reach the tokenizer through D, not D itself
            with frozen(disc_raw):
                adv = gan.generator_adv_loss(disc_raw(recon))
            total = total + args.disc_weight * adv
            out["adv_loss"] = adv.detach()
            # discriminator side: one forward over real + fake (DDP needs one forward per step)
            logits = disc(torch.cat([x, recon.detach()]))
            real, fake = logits.chunk(2)
            out["aux_loss"] = gan.discriminator_loss(real, fake)
            out["disc_loss"] = out["aux_loss"].detach()
        out["loss"] = total
        return out

    trainer.fit(step_fn)

    def metrics_fn(export):
        eval_data = args.eval_data or args.data
        shapes = eval_data.split(":")[0] == "shapes"
        split = "test" if shapes else "eval"
        eval_set = build_image_dataset(eval_data, split=split, resolution=res, num_objects=args.num_objects,
                                       length=args.eval_images if shapes else None,
                                       caption_style=args.caption_style if shapes else None)
        m = evaluate(export, eval_set, num_images=args.eval_images, batch_size=args.eval_batch_size,
                     device=acc.device, attributes=shapes and semantic_reconstruction(export))
        m["eval_data"] = f"{eval_data} ({split} split)" if split == "test" else eval_data
        m["gan"] = gan is not None
        # true only for an LPIPS with real (loaded) weights
        m["perceptual"] = perceptual is not None and perceptual.pretrained
        if m["perceptual"]:
            m["lpips_weights"], m["lpips_calibrated"] = str(args.lpips_weights), perceptual.calibrated
        return m

    metrics = trainer.finish(metrics_fn)
    if metrics and not math.isfinite(metrics.get("psnr", 0.0)):
        acc.print("[tokenizer] warning: PSNR is not finite")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
