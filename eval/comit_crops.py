"""COMiT reconstruction quality vs. number of crops seen, per crop order (issue 19's "show").

::

    python -m eval.comit_crops --tokenizer tokenizer/comit-tiny:shapes --images 128 --json crops.json \\
        --png crops.png

For every Shapes test image and every order (``raster``, ``random``, ``adaptive``) the image is
encoded once with all 9 crops, keeping the message after each crop
(``COMiT.tokenize(..., history=True)``; the encoding is causal in the crop sequence, so the
message after k crops is exactly what ``num_crops=k`` would give), and the message after k
crops is decoded with its own decode offset (global centre - k-th crop) for k = 1..9. The same
decode noise is used for every k and order (seeded per batch), so the curves differ only by the
message. Reported per (order, k), over the images:

``psnr``
    mean per-image PSNR (dB) of the uint8-quantised reconstruction on [0, 1] (as ``arzoo eval recon``);
``attributes``
    ``eval.recon.attribute_agreement`` (Shapes detector on original and reconstruction: object
    count, colours, shapes, (shape, colour) objects; ``--no-attributes`` turns it off).

COMiT's reconstructions are re-generations from a 1D message, ambiguous by design when few crops
have been seen: the curve is expected to rise with k, and the adaptive order (which observes the
crop the current message explains worst) to rise fastest. ``--png`` writes, for the first
``--show`` images, one row per (order, image): the original, then the decodes after 1..9 crops.
"""
from __future__ import annotations

import argparse
import sys

import torch

from eval.images import add_probe_args

ORDERS = ("raster", "random", "adaptive")


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def crops_curve(tokenizer, images: torch.Tensor, *, orders=ORDERS, steps: int | None = None,
                cfg: float | None = None, seed: int = 0, batch_size: int = 32, attributes: bool = True,
                show: int = 0) -> dict:
    """Reconstruction quality after k = 1..9 crops per order (module docstring).

    ``images`` (N, 3, S, S) in [-1, 1]. Returns ``{"images", "steps", "cfg", "orders": {order:
    [{"crops": k, "psnr": dB, "attributes": {...}}, ...]}}``, plus ``"examples"`` (a uint8 tensor
    ``(len(orders) * show, 10, 3, S, S)``: original + 9 decodes) when ``show > 0``.
    """
    from eval.recon import attribute_agreement, psnr

    if not hasattr(tokenizer, "tokenize") or not hasattr(tokenizer, "sample_latents"):
        raise ValueError(f"{type(tokenizer).__name__} is not a COMiT tokenizer (no tokenize/sample_latents)")
    bad = [o for o in orders if o not in ORDERS]
    if bad:
        raise ValueError(f"unknown crop orders {bad}; choose from {ORDERS}")
    tokenizer = tokenizer.eval()
    device = tokenizer.centres.device
    n = images.shape[0]
    if n < 1:
        raise ValueError("no images")
    report = {"images": n, "steps": steps if steps is not None else tokenizer.sample_steps,
              "cfg": cfg if cfg is not None else tokenizer.guidance, "orders": {}}
    examples = []
    for order in orders:
        psnr_sum = torch.zeros(9, dtype=torch.float64)
        recons = [[] for _ in range(9)]
        originals = []
        shown = []
        for b0 in range(0, n, batch_size):
            x = images[b0:b0 + batch_size].to(device)
            enc = tokenizer.tokenize(x, order, generator=torch.Generator(device=device).manual_seed(seed + b0),
                                     history=True)
            x8 = _uint8(x).cpu()
            originals.extend(x8.permute(0, 2, 3, 1).numpy())
            row = [x8]
            for k, step in enumerate(enc["steps"]):
                gen = torch.Generator(device=device).manual_seed(seed + 100_003 + b0)  # same noise for every k
                z = tokenizer.sample_latents(step["codes"], step["offset"], steps=steps, guidance=cfg, generator=gen)
                r8 = _uint8(tokenizer.decode_latents(z)).cpu()
                psnr_sum[k] += psnr(x8.double() / 255, r8.double() / 255).sum()
                recons[k].extend(r8.permute(0, 2, 3, 1).numpy())
                row.append(r8)
            if show and sum(t.shape[0] for t in shown) < show:
                shown.append(torch.stack(row, 1))
        rows = []
        for k in range(9):
            entry = {"crops": k + 1, "psnr": float(psnr_sum[k] / n)}
            if attributes:
                a = attribute_agreement(originals, recons[k])
                entry["attributes"] = {key: a[key] for key in ("count", "colors", "shapes", "objects",
                                                               "single_object_class")}
            rows.append(entry)
        report["orders"][order] = rows
        if show:
            examples.append(torch.cat(shown)[:show])
    if show:
        report["examples"] = torch.cat(examples)
    return report


@torch.no_grad()
def velocity_probe(tokenizer, images: torch.Tensor, ts=(0.0, 0.3, 0.6, 0.9), *, seed: int = 0) -> dict:
    """How much the decoder uses the message: velocity MSE of the flow at each COMiT time ``t``
    (0 = noise) given the image's own message (raster, 9 crops), the prior (empty) message, and
    another image's message (a fixed permutation). Same noise for the three. ``{t: {"own",
    "prior", "shuffled"}}``; own < prior < shuffled once the message carries the image."""
    from tokenizers_vis.comit import comit_interpolate, comit_velocity_target

    dev = next(tokenizer.parameters()).device
    x = images.to(dev)
    B = x.shape[0]
    full = tokenizer.latents(x)
    enc = tokenizer.tokenize(x)
    g = torch.Generator(device="cpu").manual_seed(seed)
    perm = (torch.arange(B) + 1 + torch.randint(0, max(B - 1, 1), (), generator=g)) % B  # no image keeps its own
    msgs = {"own": enc["codes"], "prior": tokenizer.prior_message(B, dev), "shuffled": enc["codes"][perm.to(dev)]}
    out = {}
    for t0 in ts:
        t = torch.full((B,), float(t0), device=dev)
        noise = torch.randn(full.shape, generator=g).to(dev)
        x_t, target = comit_interpolate(full, noise, t), comit_velocity_target(full, noise)
        out[f"{float(t0):g}"] = {k: float((tokenizer.predictor(x_t, t, m, enc["offset"])["velocity"] - target)
                                         .pow(2).mean()) for k, m in msgs.items()}
    return out


def format_report(r: dict) -> str:
    orders = list(r["orders"])
    head = "crops | " + " | ".join(f"{o:>8} PSNR  objects" for o in orders)
    lines = [f"COMiT reconstruction vs crops seen ({r['images']} images, {r['steps']} Euler steps, cfg {r['cfg']})",
             head, "-" * len(head)]
    for k in range(9):
        cells = []
        for o in orders:
            e = r["orders"][o][k]
            obj = e.get("attributes", {}).get("objects")
            cells.append(f"{e['psnr']:>13.2f}  " + (f"{obj:7.3f}" if obj is not None else "      -"))
        lines.append(f"{k + 1:>5} | " + " | ".join(cells))
    return "\n".join(lines)


def save_png(examples: torch.Tensor, path) -> None:
    """(rows, 10, 3, S, S) uint8 -> a grid PNG (one row per (order, image))."""
    from torchvision.utils import save_image

    rows, cols = examples.shape[:2]
    save_image(examples.flatten(0, 1).float() / 255, str(path), nrow=cols, padding=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.comit_crops", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="COMiT checkpoint folder, registry name or name:tag")
    p.add_argument("--orders", default=",".join(ORDERS), help="comma-separated subset of raster,random,adaptive")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the model's sample_steps)")
    p.add_argument("--cfg", type=float, default=None, help="APG guidance (default: the model's; 1 = none)")
    add_probe_args(p, images=64, png_help="write example rows (original + 9 decodes) here",
                   show_help="images per order in --png")
    p.add_argument("--velocity-probe", metavar="T,...", default=None,
                   help="also report the flow's velocity MSE at these COMiT times with the own / prior / "
                        "another image's message (velocity_probe)")
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
        tok = load_model(args.tokenizer, "tokenizer").to(device)
        x, _ = shapes_test_batch(args.images, parse_num_objects(args.num_objects), tok.image_size)
        orders = [o.strip() for o in args.orders.split(",") if o.strip()]
        report = crops_curve(tok, x, orders=orders, steps=args.steps, cfg=args.cfg, seed=args.seed,
                             batch_size=args.batch_size, attributes=not args.no_attributes,
                             show=args.show if args.png else 0)
        if args.velocity_probe:
            ts = [float(v) for v in args.velocity_probe.split(",") if v.strip()]
            report["velocity_probe"] = velocity_probe(tok, x.to(device), ts, seed=args.seed)
    except (ValueError, FileNotFoundError, UnknownModel, CheckpointError) as e:
        print(f"eval.comit_crops: {e}", file=sys.stderr)
        return 2
    examples = report.pop("examples", None)
    if examples is not None:
        save_png(examples, args.png)
        report["png"] = str(args.png)
    report["tokenizer"] = str(args.tokenizer)
    print(format_report(report))
    for t, row in report.get("velocity_probe", {}).items():
        print(f"velocity MSE at t = {t}: own {row['own']:.3f}, prior {row['prior']:.3f}, shuffled {row['shuffled']:.3f}")
    emit_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
