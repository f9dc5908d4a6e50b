"""Decode quality and colour shift vs. number of decoder steps, side by side (issue 19's Layton "show").

::

    python -m eval.decoder_steps --tokenizer A=runs/layton-a/final --tokenizer B=runs/layton-b/final \\
        --steps 1,2,25 --images 256 --json steps.json --png steps.png

Layton (arXiv 2503.08377) reports that decoding its tokens with the plain multi-step latent
diffusion decoder shifts colour and brightness, and that the 1-2-step latent consistency decoder
trained with pixel losses does not. This measures both claims on Shapes test images for any
tokenizers whose ``decode(tokens, steps=..., generator=...)`` takes a step count (Layton stage A =
the many-step flow decoder, Layton stage B = the consistency decoder; FlexTok / COMiT flow decoders
too). Each tokenizer encodes the images once; every step count decodes the same tokens from the
same seeded noise. Reported per (tokenizer, steps), on the uint8-quantised reconstruction (as a
saved PNG) against the original:

``psnr``
    mean per-image PSNR (dB) on [0, 1] (as ``arzoo eval recon``);
``color_shift``
    ``[dR, dG, dB]``: the mean over images of each channel's mean ``recon - original``, on the
    0..255 scale (signed: a systematic cast of the decoder, e.g. "everything comes out bluer");
``color_shift_abs``
    the mean over images and channels of ``|per-image channel mean difference|`` (0..255): how far
    each image's colour balance moves, whatever the direction;
``brightness_shift``
    the mean of ``color_shift`` over the channels (signed, 0..255);
``attributes`` (``--no-attributes`` turns it off)
    ``eval.recon.attribute_agreement`` (Shapes detector on original and reconstruction).
"""
from __future__ import annotations

import argparse
import sys

import torch

from eval.images import add_probe_args

DEFAULT_STEPS = (1, 2, 25)
ATTRIBUTE_KEYS = ("count", "colors", "shapes", "objects", "single_object_class")


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _device(model) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def color_stats(originals: torch.Tensor, recons: torch.Tensor) -> dict:
    """Colour shift of uint8 ``recons`` against ``originals`` (both ``(N, 3, H, W)``), module docstring."""
    if originals.shape != recons.shape or originals.dim() != 4 or originals.shape[1] != 3:
        raise ValueError(f"color_stats expects two (N, 3, H, W) batches of the same shape, got "
                         f"{tuple(originals.shape)} and {tuple(recons.shape)}")
    per_image = (recons.double() - originals.double()).mean((2, 3))  # (N, 3) channel mean differences
    shift = per_image.mean(0)
    return {"color_shift": [float(v) for v in shift], "color_shift_abs": float(per_image.abs().mean()),
            "brightness_shift": float(shift.mean())}


@torch.no_grad()
def steps_table(tokenizer, images: torch.Tensor, steps=DEFAULT_STEPS, *, seed: int = 0, batch_size: int = 32,
                attributes: bool = True, show: int = 0, **decode_kw) -> dict:
    """Decode quality of one tokenizer at each step count (module docstring).

    ``images`` (N, 3, S, S) in [-1, 1]. Returns ``{"images", "rows": [{"steps", "psnr",
    "color_shift", "color_shift_abs", "brightness_shift", "attributes"}, ...]}`` and, when
    ``show > 0``, ``"examples"``: uint8 ``(show, 1 + len(steps), 3, S, S)`` (original, then one
    decode per step count). ``decode_kw`` goes to every ``decode`` call.
    """
    from eval.recon import attribute_agreement, psnr

    steps = [int(s) for s in steps]
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be positive integers, got {steps}")
    n = images.shape[0]
    if n < 1:
        raise ValueError("no images")
    tokenizer = tokenizer.eval()
    device = _device(tokenizer)
    originals, recons = [], {s: [] for s in steps}
    for b0 in range(0, n, batch_size):
        x = images[b0:b0 + batch_size].to(device)
        tokens = tokenizer.encode(x)
        originals.append(_uint8(x).cpu())
        for s in steps:
            gen = torch.Generator(device=device).manual_seed(seed + b0)  # the same noise for every step count
            recons[s].append(_uint8(tokenizer.decode(tokens, steps=s, generator=gen, **decode_kw)).cpu())
    orig = torch.cat(originals)
    rows = []
    for s in steps:
        rec = torch.cat(recons[s])
        row = {"steps": s, "psnr": float(psnr(orig.double() / 255, rec.double() / 255).mean()),
               **color_stats(orig, rec)}
        if attributes:
            a = attribute_agreement(list(orig.permute(0, 2, 3, 1).numpy()), list(rec.permute(0, 2, 3, 1).numpy()))
            row["attributes"] = {k: a[k] for k in ATTRIBUTE_KEYS}
        rows.append(row)
    out = {"images": n, "rows": rows}
    if show:
        out["examples"] = torch.stack([orig[:show]] + [torch.cat(recons[s])[:show] for s in steps], 1)
    return out


def compare(tokenizers: dict, images: torch.Tensor, steps=DEFAULT_STEPS, **kw) -> dict:
    """:func:`steps_table` for each ``{label: tokenizer}``: ``{"images", "steps", "tokenizers": {label: table}}``."""
    if not tokenizers:
        raise ValueError("no tokenizers to compare")
    tables = {label: steps_table(tok, images, steps, **kw) for label, tok in tokenizers.items()}
    return {"images": images.shape[0], "steps": [int(s) for s in steps], "tokenizers": tables}


def format_report(r: dict) -> str:
    """Rows = step counts, one column group (PSNR, |colour shift|, dR dG dB, objects) per tokenizer."""
    labels = list(r["tokenizers"])
    cols = " ".join(f"{c:>5}" for c in ("PSNR", "|dC|", "dR", "dG", "dB", "obj"))
    width = max(len(cols), *(len(label) for label in labels))
    lines = [f"decode quality vs decoder steps ({r['images']} images; colour shifts on 0..255)",
             "      | " + " | ".join(f"{label:<{width}}" for label in labels),
             "steps | " + " | ".join(f"{cols:<{width}}" for _ in labels)]
    lines.insert(1, "-" * len(lines[-1]))
    for i, s in enumerate(r["steps"]):
        cells = []
        for label in labels:
            e = r["tokenizers"][label]["rows"][i]
            obj = e.get("attributes", {}).get("objects")
            dr, dg, db = e["color_shift"]
            cell = (f"{e['psnr']:5.2f} {e['color_shift_abs']:5.2f} {dr:+5.1f} {dg:+5.1f} {db:+5.1f} "
                    + (f"{obj:5.3f}" if obj is not None else "    -"))
            cells.append(f"{cell:<{width}}")
        lines.append(f"{s:>5} | " + " | ".join(cells))
    return "\n".join(lines)


def _label_spec(text: str) -> tuple[str, str]:
    label, sep, spec = text.partition("=")
    return (label, spec) if sep and label and spec else (text, text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.decoder_steps", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", action="append", required=True, metavar="[LABEL=]SPEC",
                   help="checkpoint folder, registry name or name:tag; repeat to compare side by side")
    p.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)), help="comma-separated step counts")
    add_probe_args(p, images=128, seed_help="decode noise seed",
                   png_help="write example rows (original + one decode per step count)",
                   show_help="images per tokenizer in --png")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from eval.fid import emit_json
    from train.common import parse_num_objects
    from zoo.checkpoint import CheckpointError
    from eval.images import shapes_test_batch
    from zoo.pipeline import load_model
    from zoo.registry import UnknownModel

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        steps = [int(s) for s in args.steps.split(",") if s.strip()]
        toks = {}
        for text in args.tokenizer:
            label, spec = _label_spec(text)
            toks[label] = load_model(spec, "tokenizer").to(device)
        sizes = {t.image_size for t in toks.values()}
        if len(sizes) != 1:
            raise ValueError(f"the tokenizers take different image sizes {sorted(sizes)}")
        x, _ = shapes_test_batch(args.images, parse_num_objects(args.num_objects), sizes.pop())
        report = compare(toks, x, steps, seed=args.seed, batch_size=args.batch_size,
                         attributes=not args.no_attributes, show=args.show if args.png else 0)
    except (ValueError, FileNotFoundError, UnknownModel, CheckpointError) as e:
        print(f"eval.decoder_steps: {e}", file=sys.stderr)
        return 2
    if args.png:
        from torchvision.utils import save_image

        ex = torch.cat([t.pop("examples") for t in report["tokenizers"].values()])  # (rows, 1 + steps, 3, S, S)
        save_image(ex.flatten(0, 1).float() / 255, str(args.png), nrow=ex.shape[1], padding=2)
        report["png"] = str(args.png)
    report["specs"] = dict(_label_spec(t) for t in args.tokenizer)
    print(format_report(report))
    emit_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
