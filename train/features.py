"""Train the Shapes feature network (``eval/shapes-net``, ``eval/features.py``) on Shapes attributes.

::

    python -m train.features --out runs/shapes-net --steps 900 --threads 1
    arzoo eval train-features --out runs/shapes-net --export weights/features-shapes-net

A plain single-process loop (the network is small; no accelerate needed). Every step draws a
fresh batch from the Shapes train split with 1-4 objects (sample ``i`` of the stream is image
``i`` of the split, so no image is seen twice and the run is a pure function of ``--seed``).
Each image is rendered at 64 px (70 %), 32 px or 128 px (15 % each) and resized to 64 the way
the network resizes its inputs, then augmented with a Gaussian blur (p = 0.3) and Gaussian
noise (p = 0.3), so features stay stable on the soft edges of generated and reconstructed
images. Loss: BCE on class / shape / colour presence + cross-entropy on the object count
(``eval.features.attribute_loss``); AdamW with linear warmup and cosine decay.

At the end, ``OUT/metrics.json`` holds held-out accuracies on the Shapes *test* split (1-4
objects): exact class-set accuracy (all 30 presence bits right), count accuracy, exact
shape-set and colour-set accuracy, all-attributes-right, and mean per-label accuracies; at
64 px clean, 64 px blurred (sigma 1), and 32 / 128 px. ``OUT/model`` is the checkpoint
(``--export DIR`` also writes it there).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.features", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder: model/, metrics.json, log.jsonl")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-images", type=int, default=2000, help="held-out test images at 64 px")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.add_argument("--export", help="also save the final model to this checkpoint folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="ShapesNet constructor override, VALUE parsed as JSON (repeatable)")
    return p


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding (radius ceil(3 sigma))."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class AttributeStream:
    """Batches of (images (B, 3, 64, 64) in [-1, 1], objects) from a Shapes split, 1-4 objects.

    Image ``i`` of the stream is image ``i`` of the split at a resolution drawn from
    ``(seed, i)``; augmentations are drawn per batch from ``(seed, first index)`` and applied
    to groups of images at once (the per-image Python overhead dominated otherwise).
    """

    RESOLUTIONS = (64, 32, 128)
    RES_PROBS = (0.7, 0.15, 0.15)
    BLURS = (0.5, 0.8, 1.1)

    def __init__(self, split: str = "train", seed: int = 0, augment: bool = True, resolution: int | None = None,
                 num_objects=(1, 4)):
        from zoo.data.shapes import ShapesDataset

        res = self.RESOLUTIONS if resolution is None else (resolution,)
        self.sets = {r: ShapesDataset(split, r, num_objects, length=1 << 40) for r in res}
        self.seed, self.augment, self.fixed = seed, augment, resolution

    def _resolution(self, index: int) -> int:
        if self.fixed:
            return self.fixed
        u = np.random.default_rng([self.seed, 0xFEA7, index]).random()
        return self.RESOLUTIONS[int(np.searchsorted(np.cumsum(self.RES_PROBS), u, side="right"))]

    def batch(self, start: int, size: int):
        from eval.features import INPUT_SIZE

        idx = list(range(start, start + size))
        res = [self._resolution(i) for i in idx]
        x = torch.empty(size, 3, INPUT_SIZE, INPUT_SIZE)
        objects = [None] * size
        for r in sorted(set(res)):
            rows = [j for j in range(size) if res[j] == r]
            imgs = []
            for j in rows:
                img, _, objects[j] = self.sets[r].sample(idx[j])
                imgs.append(img)
            t = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
            if r != INPUT_SIZE:  # as ShapesNet.prepare resizes its inputs
                t = F.interpolate(t, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                                  antialias=r > INPUT_SIZE)
            x[rows] = t
        if self.augment:
            rng = np.random.default_rng([self.seed, 0xA06, start])
            blur = rng.integers(-1, len(self.BLURS), size=size)  # -1: none
            blur[rng.random(size) >= 0.3] = -1
            for b, sigma in enumerate(self.BLURS):
                rows = np.flatnonzero(blur == b)
                if len(rows):
                    x[rows] = gaussian_blur(x[rows], sigma)
            scale = rng.uniform(0.0, 0.06, size=size) * (rng.random(size) < 0.3)
            g = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
            x = x + torch.from_numpy(scale).float().view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g)
        return x.clamp_(-1, 1), objects


@torch.no_grad()
def evaluate(model, *, num_images: int = 2000, batch_size: int = 250, resolution: int = 64,
             blur: float = 0.0, seed: int = 0) -> dict:
    """Held-out accuracies on the Shapes test split (1-4 objects); fractions in [0, 1]."""
    from eval.features import attribute_accuracy

    model.eval()
    stream = AttributeStream("test", seed=seed, augment=False, resolution=resolution)
    tot: dict = {}
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        items = [stream.sets[resolution].sample(i) for i in range(start, start + n)]
        x = torch.from_numpy(np.stack([im for im, _, _ in items])).permute(0, 3, 1, 2).contiguous()
        if blur > 0:
            x = gaussian_blur(x.float() / 127.5 - 1, blur).clamp(-1, 1)
        acc = attribute_accuracy(model, x, [o for _, _, o in items])
        for k, v in acc.items():
            tot[k] = tot.get(k, 0) + v
    n = tot.pop("n")
    out = {f"{k}_acc": v / n for k, v in tot.items()}
    out["images"] = n
    return out


def main(argv=None) -> dict:
    from eval.features import ShapesNet

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = {}
    for item in args.set:
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[k] = json.loads(v)
    torch.manual_seed(args.seed)
    model = ShapesNet(**overrides)
    model.registry_name = "eval/shapes-net"
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)

    def lr_at(step):
        if step < args.warmup:
            return (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    stream = AttributeStream("train", seed=args.seed)
    t0 = time.time()
    model.train()
    with open(out / "log.jsonl", "w") as log:
        _fit(args, model, opt, sched, stream, log, t0)
    model.eval()
    model.save_pretrained(out / "model")
    metrics = {"train_steps": args.steps, "batch_size": args.batch_size, "train_images": args.steps * args.batch_size,
               "train_time_s": round(time.time() - t0, 1), "params": model.num_params(),
               "test_64": evaluate(model, num_images=args.eval_images),
               "test_64_blur1": evaluate(model, num_images=args.eval_images // 4, blur=1.0),
               "test_32": evaluate(model, num_images=args.eval_images // 4, resolution=32),
               "test_128": evaluate(model, num_images=args.eval_images // 4, resolution=128)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    if args.export:
        model.save_pretrained(args.export)
        (Path(args.export) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"exported to {args.export}")
    return metrics


def _fit(args, model, opt, sched, stream, log, t0) -> None:
    from eval.features import attribute_loss, targets

    for step in range(args.steps):
        x, objs = stream.batch(step * args.batch_size, args.batch_size)
        losses = attribute_loss(model(x), targets(objs))
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        sched.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            rec = {"step": step + 1, "time_s": round(time.time() - t0, 1), "lr": sched.get_last_lr()[0],
                   **{k: round(float(v.detach()), 5) for k, v in losses.items()}}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
