"""Reconstruction metrics of a tokenizer: ``arzoo eval recon``.

::

    arzoo eval recon --tokenizer tokenizer/vq-tiny:shapes --data shapes:test:1000
    arzoo eval recon --tokenizer runs/vq/final --data /data/imagenet/val_256 --features inception \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --json recon.json

For every image ``x`` of ``--data``: ``r = decode(encode(x))``, quantised to uint8 as a saved
reconstruction would be. Reported:

``psnr``
    ``10 log10(1 / MSE)`` on [0, 1] per image, averaged over images (dB).
``ssim``
    Structural similarity (Wang et al. 2004, "Image Quality Assessment: From Error
    Visibility to Structural Similarity", §III-C): 11x11 Gaussian window with sigma 1.5,
    K1 = 0.01, K2 = 0.03, dynamic range L = 1, statistics over "valid" windows only (no
    padding), computed per RGB channel and averaged over channels, pixels and images (the
    pytorch-msssim / ``skimage`` ``gaussian_weights=True`` convention on RGB).
``rfid`` (``shapes_rfid`` with the Shapes net)
    FID between the originals and their reconstructions (``eval.fid``): Shapes-FID offline
    (**not comparable to Inception rFID**), Inception with ``--features inception``.
token statistics
    tokens per image (and bits per image: ``log2(V)`` per discrete token, ``K`` per binary
    token); discrete: codebook usage (share of the ``V`` codes used at least once) and
    perplexity ``exp(H)`` of the code histogram; binary: bit usage (share of the ``K`` bit
    channels taking both values), mean bit entropy (bits) and the number of distinct codes;
    continuous: none.
timing
    encode and decode milliseconds per image (after one warm-up batch; CUDA synchronised).
``attribute_agreement`` (Shapes data; ``--no-attributes`` turns it off)
    the Shapes detector (``zoo.data.shapes.detect``) run on each original and on its
    reconstruction; the share of images where (a) the object count, (b) the multiset of
    colours, (c) the multiset of shapes and (d) the multiset of (shape, colour) objects agree,
    and, over the originals with exactly one object of a known shape, the share whose
    reconstruction has the same class (``zoo.data.shapes.classify``). This is the metric issue
    10 asks for SEED / slot tokenizers, whose reconstructions are semantic re-generations (a
    diffusion decoder samples an image with the same content, not the same pixels): PSNR and
    SSIM say little there. :func:`attribute_agreement` is also what ``train/tokenizer.py``
    reports for them.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------- image metrics
def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR (dB) of (B, C, H, W) images on a scale of ``data_range``."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-20))


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    t = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM of (B, C, H, W) images (Wang et al. 2004; conventions in the module docstring)."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim: expected two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if min(x.shape[-2:]) < size:
        raise ValueError(f"ssim: images must be at least {size}x{size}, got {x.shape[-2]}x{x.shape[-1]}")
    x, y = x.double(), y.double()
    c = x.shape[1]
    g = gaussian_window(size, sigma).to(x.device)
    gx, gy = g.view(1, 1, 1, -1).expand(c, 1, 1, -1), g.view(1, 1, -1, 1).expand(c, 1, -1, 1)

    def filt(t):  # separable Gaussian, 'valid'
        return F.conv2d(F.conv2d(t, gx, groups=c), gy, groups=c)

    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return smap.flatten(1).mean(1)


# ---------------------------------------------------------------------------- attribute agreement
def attribute_agreement(originals, recons) -> dict:
    """Agreement of the Shapes detector on originals and reconstructions (module docstring).

    ``originals``, ``recons``: sequences (or ``(N, H, W, 3)`` arrays) of uint8 ``(H, W, 3)``
    images, paired by index. Returns shares in [0, 1] over the ``images`` pairs:
    ``count``, ``colors``, ``shapes``, ``objects`` (multisets of (shape, colour)), and
    ``single_object_class`` over the ``single_object_images`` originals that ``classify``
    reads as one object of a known shape (``None`` when there are none).
    """
    from zoo.data.shapes import classify, detect, match_objects

    if len(originals) != len(recons):
        raise ValueError(f"attribute_agreement: {len(originals)} originals but {len(recons)} reconstructions")
    if len(originals) == 0:
        raise ValueError("attribute_agreement: no images")
    n = len(originals)
    count = colors = shapes = objects = single = single_ok = 0
    for a, b in zip(originals, recons):
        da, db = detect(a), detect(b)
        count += len(da) == len(db)
        colors += sorted(o["color"] for o in da) == sorted(o["color"] for o in db)
        shapes += sorted(o["shape"] for o in da) == sorted(o["shape"] for o in db)
        objects += match_objects(da, db)
        if len(da) == 1:  # only then can classify(a) be a class; it re-detects, for its exact rule
            ca = classify(a)
            if ca >= 0:
                single += 1
                single_ok += classify(b) == ca
    return {"images": n, "count": count / n, "colors": colors / n, "shapes": shapes / n, "objects": objects / n,
            "single_object_images": single, "single_object_class": single_ok / single if single else None,
            "detector": "zoo.data.shapes.detect on original and reconstruction"}


# ---------------------------------------------------------------------------- token usage
class TokenUsage:
    """Accumulates code statistics of :class:`zoo.tokens.Tokens` batches."""

    def __init__(self, spec):
        self.spec = spec
        self.counts = torch.zeros(spec.vocab_size, dtype=torch.long) if spec.kind == "discrete" else None
        self.ones = torch.zeros(spec.bits, dtype=torch.float64) if spec.kind == "binary" else None
        self.n = 0
        self.codes: set = set()

    def update(self, tokens) -> None:
        flat = tokens.to_sequence().data.detach().cpu()
        if self.counts is not None:
            self.counts += torch.bincount(flat.reshape(-1).long(), minlength=self.spec.vocab_size)
        elif self.ones is not None:
            bits = flat.reshape(-1, self.spec.bits)
            self.ones += bits.double().sum(0)
            self.n += bits.shape[0]
            if self.spec.bits <= 62:
                from zoo.tokens import bits_to_groups

                self.codes.update(bits_to_groups(bits, self.spec.bits).unique().tolist())

    def result(self) -> dict:
        spec = self.spec
        out = {"tokens": spec.describe(), "tokens_per_image": spec.num_tokens}
        if spec.kind == "discrete":
            out["bits_per_image"] = spec.num_tokens * math.log2(spec.vocab_size)
            p = self.counts.double() / max(int(self.counts.sum()), 1)
            nz = p[p > 0]
            out["codebook_usage"] = float((self.counts > 0).sum()) / spec.vocab_size
            out["codes_used"] = int((self.counts > 0).sum())
            out["codebook_perplexity"] = float(torch.exp(-(nz * nz.log()).sum()))
        elif spec.kind == "binary":
            out["bits_per_image"] = spec.num_tokens * spec.bits
            p = self.ones / max(self.n, 1)
            h = -(p * p.clamp_min(1e-12).log2() + (1 - p) * (1 - p).clamp_min(1e-12).log2())
            out["bit_usage"] = float(((p > 0) & (p < 1)).double().mean())
            out["bit_entropy"] = float(h.mean())
            if self.codes:
                out["unique_codes"] = len(self.codes)
        else:
            out["usage"] = "n/a (continuous tokens)"
        return out


# ---------------------------------------------------------------------------- evaluation
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(tokenizer, data, *, batch_size: int = 32, device=None, features: str | None = "shapes-net",
             inception_weights=None, progress: bool = False, attributes: bool | None = None) -> dict:
    """Reconstruction report of ``tokenizer`` on ``data`` (see the module docstring).

    ``data``: anything :func:`eval.fid.open_images` takes (``shapes:test:N`` renders at the
    tokenizer's resolution). ``features=None`` skips rFID. ``attributes``: add
    :func:`attribute_agreement` (``None``: when ``data`` are Shapes images).
    """
    from eval.fid import ArrayImages, ShapesImages, compute_metrics, open_images
    from zoo.pipeline import model_name

    tokenizer = tokenizer.eval()
    device = torch.device(device) if device is not None else next(tokenizer.parameters()).device
    tokenizer.to(device)
    size = int(tokenizer.image_size)
    ds, desc = open_images(data, default_resolution=size)
    if tuple(desc["image_size"]) != (size, size):
        raise ValueError(f"{desc['source']}: images are {desc['image_size'][0]}x{desc['image_size'][1]} but "
                         f"{model_name(tokenizer)} takes {size}x{size} (resize or center-crop them first)")
    n = len(ds)
    if attributes is None:
        attributes = isinstance(ds, ShapesImages) or str(desc["source"]).startswith("shapes:")
    usage = TokenUsage(tokenizer.spec)
    psnr_all, ssim_all, originals, recons = [], [], [], []
    t_enc = t_dec = 0.0
    timed = 0
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="recon", unit="batch")
    warm = torch.stack([ds[i] for i in range(min(batch_size, n))]).to(device).float() / 127.5 - 1
    tokenizer.decode(tokenizer.encode(warm))  # warm-up, not timed
    for s in starts:
        u8 = torch.stack([ds[i] for i in range(s, min(s + batch_size, n))])
        x = u8.to(device).float() / 127.5 - 1
        _sync(device)
        t0 = time.perf_counter()
        tokens = tokenizer.encode(x)
        _sync(device)
        t1 = time.perf_counter()
        rec = tokenizer.decode(tokens)
        _sync(device)
        t2 = time.perf_counter()
        t_enc += t1 - t0
        t_dec += t2 - t1
        timed += x.shape[0]
        usage.update(tokens)
        r8 = ((rec.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # as a saved PNG
        a, b = u8.double() / 255, r8.double() / 255
        psnr_all.append(psnr(a, b))
        ssim_all.append(ssim(a, b))
        originals.append(u8.permute(0, 2, 3, 1).numpy())
        recons.append(r8.permute(0, 2, 3, 1).numpy())
    psnr_v, ssim_v = torch.cat(psnr_all), torch.cat(ssim_all)
    report = {
        "tokenizer": model_name(tokenizer), "data": desc, "num_images": n, "image_size": size,
        "psnr": float(psnr_v.mean()), "psnr_std": float(psnr_v.std()) if n > 1 else 0.0,
        "ssim": float(ssim_v.mean()), "ssim_std": float(ssim_v.std()) if n > 1 else 0.0,
        **usage.result(),
        "encode_ms_per_image": 1000 * t_enc / timed, "decode_ms_per_image": 1000 * t_dec / timed,
        "batch_size": batch_size, "device": str(device), "threads": torch.get_num_threads(),
        "conventions": "PSNR/SSIM on uint8-quantised reconstructions scaled to [0, 1]; SSIM: Gaussian 11x11, "
                       "sigma 1.5, K1 0.01, K2 0.03, valid windows, mean over RGB channels",
    }
    if attributes:
        report["attribute_agreement"] = attribute_agreement(np.concatenate(originals), np.concatenate(recons))
    if features:
        fid = compute_metrics(ArrayImages(np.concatenate(recons)), ArrayImages(np.concatenate(originals)),
                              features=features, inception_weights=inception_weights, device=device, kid=False,
                              prc=False, isc=False)
        key = "shapes_fid" if features == "shapes-net" else "fid"
        report["shapes_rfid" if features == "shapes-net" else "rfid"] = fid["metrics"][key]
        report["rfid_features"] = fid["metric_family"]
        if features == "shapes-net":
            report["note"] = fid["note"].replace("Shapes-FID", "Shapes-rFID")
        report["environment"] = fid["environment"]
    else:
        from eval.fid import environment

        report["environment"] = environment()
    return report


def format_report(r: dict) -> str:
    lines = [f"{r['tokenizer']} on {r['data']['source']} ({r['num_images']} images, {r['tokens']})",
             f"  PSNR {r['psnr']:.2f} dB   SSIM {r['ssim']:.4f}"]
    if "shapes_rfid" in r:
        lines.append(f"  Shapes-rFID {r['shapes_rfid']:.4f}  [Shapes-net features; NOT comparable to Inception rFID]")
    if "rfid" in r:
        lines.append(f"  rFID {r['rfid']:.4f}  [Inception-v3]")
    if "codebook_usage" in r:
        lines.append(f"  codebook usage {100 * r['codebook_usage']:.1f}% ({r['codes_used']} codes), "
                     f"perplexity {r['codebook_perplexity']:.1f}")
    if "bit_usage" in r:
        lines.append(f"  bit usage {100 * r['bit_usage']:.1f}%, bit entropy {r['bit_entropy']:.3f}")
    if "attribute_agreement" in r:
        lines.append(format_attributes(r["attribute_agreement"]))
    lines.append(f"  tokens/image {r['tokens_per_image']}  encode {r['encode_ms_per_image']:.2f} ms/img  "
                 f"decode {r['decode_ms_per_image']:.2f} ms/img ({r['device']})")
    return "\n".join(lines)


def format_attributes(a: dict) -> str:
    """One report line of :func:`attribute_agreement`'s result."""
    line = (f"  attribute agreement ({a['images']} images): count {a['count']:.3f}  colours {a['colors']:.3f}  "
            f"shapes {a['shapes']:.3f}  objects {a['objects']:.3f}")
    if a.get("single_object_class") is not None:
        line += f"  class {a['single_object_class']:.3f} ({a['single_object_images']} single-object)"
    return line


def build_parser() -> argparse.ArgumentParser:
    from eval.fid import add_feature_args

    p = argparse.ArgumentParser(prog="arzoo eval recon", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="checkpoint folder, registry name or name:tag")
    p.add_argument("--data", default="shapes:test:1000",
                   help="shapes:<split>[:N][:objects=A-B] (rendered at the tokenizer's size), a folder or an npz")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    add_feature_args(p)
    p.add_argument("--no-rfid", action="store_true")
    p.add_argument("--no-attributes", action="store_true",
                   help="skip the Shapes attribute agreement (on by default for shapes:... data)")
    p.add_argument("--json", metavar="PATH", help="write the report here (it is always printed)")
    p.add_argument("--progress", action="store_true")
    return p


def run_tokenizer_report(prog: str, source: str, compute, fmt, json_path=None) -> int:
    """Shared CLI tail of the tokenizer reports (``recon``, ``semantic``): load ``source``,
    ``compute(tokenizer) -> report``, record the weights, print ``fmt(report)``, write JSON.
    Bad input (unknown name, corrupt checkpoint, wrong sizes) exits 2 with a one-line message."""
    from eval.fid import emit_json
    from eval.fid_job import weights_info
    from zoo.checkpoint import CheckpointError
    from zoo.pipeline import load_model
    from zoo.registry import UnknownModel

    try:
        tok = load_model(source, "tokenizer")
        report = compute(tok)
    except (ValueError, FileNotFoundError, UnknownModel, CheckpointError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    report["tokenizer_weights"] = weights_info(source, tok)
    print(fmt(report))
    emit_json(report, json_path)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return run_tokenizer_report(
        "arzoo eval recon", args.tokenizer,
        lambda tok: evaluate(tok, args.data, batch_size=args.batch_size, device=device,
                             features=None if args.no_rfid else args.features,
                             inception_weights=args.inception_weights, progress=args.progress,
                             attributes=False if args.no_attributes else None),
        format_report, args.json)


if __name__ == "__main__":
    sys.exit(main())
