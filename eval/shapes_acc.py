"""Shapes accuracy of generated samples: does the image show exactly what was asked for?

Class-conditional: sample ``--num`` images spread evenly over the Shapes classes and count
those that ``zoo.data.shapes.classify`` parses as exactly the requested class (one object,
right shape, right colour). Caption-conditional: the same with the single-object captions
("a red circle") as prompts. This is the offline stand-in for a GenEval "single object"
score on the Shapes domain; the numbers in checkpoints.md come from this command::

    python -m eval.shapes_acc --tokenizer tokenizer/vq-tiny:shapes \
        --generator generator/raster-ar-tiny:shapes --num 256 --cfg 2.0 --seed 0

``--samples runs/JOB/samples.npz`` scores class-conditional samples that ``arzoo eval fid-job``
already made (its ``arr_1`` holds each image's class), so one sampling pass gives both
Shapes-FID and Shapes accuracy.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from generators.base import SamplingConfig


def _evenly(num: int, num_classes: int) -> list[int]:
    return [i % num_classes for i in range(num)]


def score(images: np.ndarray, wanted: list[int]) -> tuple[float, list[int]]:
    from zoo.data.shapes import classify

    got = [classify(img) for img in images]
    acc = float(np.mean([g == w for g, w in zip(got, wanted)])) if wanted else float("nan")
    return acc, got


def colour_accuracy(images: np.ndarray, wanted: list[int]) -> float:
    """Fraction of images whose dominant foreground colour is the requested class's colour.

    A coarse partial-credit score for weak generators (the shape and count are ignored): each
    pixel gets its nearest palette colour and mixing weight (``zoo.data.shapes``' pixel model,
    the one ``detect`` uses); pixels with weight > 0.5 vote, weighted by it. An image with no
    foreground counts as wrong. Chance is 10%.
    """
    from zoo.data.shapes import COLORS, explain_pixels

    ok = 0
    for img, w in zip(images, wanted):
        idx, alpha = explain_pixels(np.asarray(img, dtype=np.float64))
        fg = alpha > 0.5
        if fg.any():
            ok += int(np.bincount(idx[fg], weights=alpha[fg], minlength=len(COLORS)).argmax() == w % len(COLORS))
    return ok / len(wanted) if wanted else float("nan")


def evaluate(pipe, *, num: int = 256, sampling: SamplingConfig | None = None, seed: int = 0,
             batch_size: int = 64, modes=("class", "caption"), progress: bool = True) -> dict:
    from zoo.data.shapes import NUM_CLASSES, class_caption

    sampling = sampling or SamplingConfig()
    wanted = _evenly(num, NUM_CLASSES)
    report = {"num": num, "seed": seed, "sampling": {k: v for k, v in vars(sampling).items()}}
    if "class" in modes:
        imgs = pipe.generate(classes=wanted, sampling=sampling, seed=seed, batch_size=batch_size,
                             progress=progress)
        report["class_accuracy"], got = score(np.asarray(imgs), wanted)
        report["class_detected_none_or_many"] = float(np.mean([g == -1 for g in got]))
        report["class_colour_accuracy"] = colour_accuracy(np.asarray(imgs), wanted)
    if "caption" in modes:
        prompts = [class_caption(c) for c in wanted]
        imgs = pipe.generate(prompts=prompts, sampling=sampling, seed=seed, batch_size=batch_size,
                             progress=progress)
        report["caption_accuracy"], got = score(np.asarray(imgs), wanted)
    return report


def score_npz(path: str) -> dict:
    """Class accuracy of an ``arzoo eval fid-job`` ``samples.npz`` (``arr_0`` images, ``arr_1`` classes)."""
    with np.load(path) as d:
        if "arr_1" not in d:
            raise ValueError(f"{path}: no arr_1 (class labels); only class-conditional fid-job samples can be scored")
        images, labels = d["arr_0"], d["arr_1"].astype(int).tolist()
    if images.ndim != 4 or images.shape[0] != len(labels):
        raise ValueError(f"{path}: expected arr_0 (N, H, W, 3) uint8 and arr_1 (N,), got {images.shape} / {len(labels)}")
    acc, got = score(images, labels)
    return {"num": len(labels), "samples": str(path), "class_accuracy": acc,
            "class_detected_none_or_many": float(np.mean([g == -1 for g in got])),
            "class_colour_accuracy": colour_accuracy(images, labels)}


def main(argv=None) -> int:
    from zoo.pipeline import Pipeline

    if argv is None:
        argv = sys.argv[1:]
    if "--samples" in argv:  # score existing fid-job samples; no models needed
        q = argparse.ArgumentParser(prog="python -m eval.shapes_acc --samples")
        q.add_argument("--samples", required=True, help="samples.npz of a class-conditional fid-job")
        q.add_argument("--json", help="also write the report here")
        a = q.parse_args(argv)
        try:
            rep = score_npz(a.samples)
        except (ValueError, FileNotFoundError) as e:
            print(f"shapes_acc: {e}", file=sys.stderr)
            return 2
        print(json.dumps(rep, indent=2))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rep, f, indent=2)
        return 0

    p = argparse.ArgumentParser(prog="python -m eval.shapes_acc", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="checkpoint dir, registry name or name:tag")
    p.add_argument("--generator", required=True, help="checkpoint dir, registry name or name:tag")
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--modes", default="class,caption", help="class, caption or both (comma-separated)")
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--cfg-schedule", choices=("constant", "linear"), default="constant",
                   help="linear: the scale ramps from 1 to --cfg over the generation steps (VAR, xAR, MAR)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE",
                   help="a SamplingConfig.extra knob of the generator (repeatable), e.g. context_t=0.05 (xAR)")
    p.add_argument("--json", help="also write the report here")
    a = p.parse_args(argv)
    from train.common import parse_overrides  # KEY=VALUE with YAML values, as --set

    extra = parse_overrides(a.extra)
    pipe = Pipeline.load(a.tokenizer, a.generator)
    modes = tuple(m.strip() for m in a.modes.split(","))
    gen_cfg = pipe.generator.config
    if "caption" in modes and not gen_cfg.get("text_vocab_size"):
        modes = tuple(m for m in modes if m != "caption")
    if "class" in modes and not gen_cfg.get("num_classes"):
        modes = tuple(m for m in modes if m != "class")
    sampling = SamplingConfig(cfg=a.cfg, cfg_schedule=a.cfg_schedule, temperature=a.temperature, top_k=a.top_k,
                              top_p=a.top_p, extra=extra)
    rep = evaluate(pipe, num=a.num, sampling=sampling, seed=a.seed, batch_size=a.batch_size, modes=modes)
    rep.update(tokenizer=a.tokenizer, generator=a.generator)
    print(json.dumps(rep, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
