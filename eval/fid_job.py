"""Resumable FID evaluation job: ``arzoo eval fid-job``.

::

    arzoo eval fid-job --tokenizer tokenizer/vq-tiny:shapes --generator generator/raster-ar-tiny:shapes \\
        --num 50000 --shard-size 1000 --cfg 2.0 --seed 0 --out runs/fid-raster
    # ImageNet-style: against ADM's reference batch with Inception features
    arzoo eval fid-job ... --ref VIRTUAL_imagenet256_labeled.npz --features inception --inception-weights W.pth

Samples ``--num`` images class-balanced (sample ``i`` has class ``i mod num_classes``, so
every prefix of the job, every shard included, is balanced to within one image per class),
in shards of ``--shard-size`` written to ``OUT/shards/shard_XXXXX.npz`` (``arr_0`` uint8 NHWC,
``arr_1`` class ids), each written to a temporary name and renamed, so a shard file is either
complete or absent; a shard damaged afterwards (truncated copy, full disk) is found at resume
and made again. The feature network's weights and ``--ref`` are checked before sampling. Then
packs ``OUT/samples.npz`` (ADM layout: ``arr_0``, ``arr_1``) and computes FID / KID /
precision-recall (+ IS with Inception) against ``--ref`` with ``eval.fid``; ``OUT/report.json``
holds every setting, whether each model had trained weights (``pretrained``) and the metrics.

Resume and determinism
    ``generate`` takes one ``torch.Generator`` per call, so randomness is per *batch*, not per
    image. Batch ``b`` covers samples ``[b*B, (b+1)*B)`` (B = ``--batch-size``) and its
    generator is seeded from ``(seed, b*B)`` by ``zoo.pipeline.batch_seed`` -- the seed of each
    sample is a function of its global index (with ``--batch-size 1``, of that index alone).
    ``--shard-size`` must be a multiple of ``--batch-size``, so shards are made of whole batches
    and the images do not depend on the shard size or on where a run stopped: rerunning the
    same command skips the complete shards and produces the rest, giving the same
    ``samples.npz`` as an uninterrupted run -- and the same images as
    ``Pipeline.generate(classes, seed=seed, batch_size=B)`` over all labels (same device).
    ``OUT/job.json`` records the settings that determine the images; a rerun with different
    ones stops instead of mixing two jobs (``--overwrite`` starts over).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

_SHARD = re.compile(r"^shard_(\d{5,})\.npz$")
JOB_FILE, REPORT_FILE, SAMPLES_FILE = "job.json", "report.json", "samples.npz"


class JobMismatch(ValueError):
    """OUT holds a job whose image-determining settings differ from this run's."""


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_info(source, model) -> dict:
    """Where ``model``'s weights came from and the sha256 of its ``model.safetensors``."""
    from zoo.checkpoint import WEIGHTS_NAME
    from zoo.pipeline import model_name

    info = {"source": str(source), "model": model_name(model)}
    folder = getattr(model, "pretrained_source", None)  # set by zoo.pipeline.load_model; None: random init
    if folder is not None and (Path(folder) / WEIGHTS_NAME).is_file():
        info["weights"] = str(Path(folder) / WEIGHTS_NAME)
        info["sha256"] = sha256_file(Path(folder) / WEIGHTS_NAME)
    else:
        info["weights"] = "random init (zoo.pipeline init_seed)"
        info["sha256"] = None
    return info


def balanced_labels(num: int, num_classes: int) -> np.ndarray:
    """Class of sample ``i`` = ``i mod num_classes`` (every prefix is balanced)."""
    if num_classes < 1:
        raise ValueError(f"fid-job needs a class-conditional generator (num_classes >= 1), got {num_classes}")
    return np.arange(num, dtype=np.int64) % num_classes


def _save_npz_atomic(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, **arrays)
    os.replace(tmp, path)


def pack_shards(shards: list, labels: np.ndarray, path: Path) -> tuple:
    """Write ``path`` = npz with ``arr_0`` (all shards' images, in order) and ``arr_1`` (labels).

    Streams shard by shard into an uncompressed zip member (what ``np.savez`` writes), so
    packing 50k x 256^2 images never holds them all in memory; atomic (temporary name, rename).
    """
    import zipfile

    from eval.fid import npz_array

    heads = [npz_array(p, "arr_0") for p in shards]  # memory maps: shapes without reading pixels
    if any(h.shape[1:] != heads[0].shape[1:] or h.dtype != heads[0].dtype for h in heads):
        raise ValueError(f"shards in {shards[0].parent} disagree on image shape or dtype")
    first = heads[0]
    shape = (sum(int(h.shape[0]) for h in heads), *first.shape[1:])
    del heads
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(first.dtype),
                                                     "fortran_order": False, "shape": shape})
            for p in shards:
                try:  # reading a member to its end checks its CRC
                    with np.load(p) as z:
                        f.write(np.ascontiguousarray(z["arr_0"]).tobytes())
                except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
                    raise ValueError(f"{p}: damaged shard ({type(e).__name__}: {e}); delete it and rerun the same "
                                     f"command to make it again") from None
        with zf.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))
    os.replace(tmp, path)
    return shape


def shard_ranges(num: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, num)) for s in range(0, num, shard_size)]


def _shard_ok(path: Path, labels: np.ndarray) -> bool:
    """Whether ``path`` is a complete shard of ``labels``; a damaged one is reported (and then
    made again by the caller)."""
    import warnings
    import zipfile

    from eval.fid import npz_array

    if not path.is_file():
        return False
    try:  # header and labels only: shards of 256^2 images are large
        # the memory map of arr_0 fails when the file is shorter than its header says
        return npz_array(path, "arr_0").shape[0] == len(labels) and np.array_equal(npz_array(path, "arr_1"), labels)
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as e:
        warnings.warn(f"{path}: damaged shard ({type(e).__name__}: {e}); making it again", stacklevel=2)
        return False


@torch.no_grad()
def generate_range(pipe, labels: np.ndarray, start: int, *, sampling, seed: int, batch_size: int,
                   condition: str = "class") -> np.ndarray:
    """Images of global samples ``[start, start + len(labels))``; ``start`` must be a multiple of
    ``batch_size``. Batch seeds come from the global index of each batch's first sample."""
    from zoo.pipeline import batch_seed, to_uint8

    if start % batch_size:
        raise ValueError(f"start {start} is not a multiple of the batch size {batch_size}")
    device = pipe.device
    out = []
    for off in range(0, len(labels), batch_size):
        lab = labels[off:off + batch_size].tolist()
        if condition == "caption":
            from zoo.data.shapes import class_caption

            cond = pipe.make_condition(prompts=[class_caption(c) for c in lab])
        else:
            cond = pipe.make_condition(classes=lab)
        g = torch.Generator(device=device).manual_seed(batch_seed(seed, start + off))
        tokens = pipe.generator.generate(cond.to(device), sampling, generator=g)
        out.append(to_uint8(pipe.tokenizer.decode(tokens)).numpy())
    return np.concatenate(out)


def job_settings(args, pipe, sampling) -> dict:
    """Everything that determines the images (compared on resume)."""
    return {
        "tokenizer": weights_info(args.tokenizer, pipe.tokenizer),
        "generator": weights_info(args.generator, pipe.generator),
        "spec": pipe.tokenizer.spec.describe(),
        "num": args.num, "shard_size": args.shard_size, "batch_size": args.batch_size, "seed": args.seed,
        "init_seed": args.init_seed, "condition": args.condition, "num_classes": args.num_classes,
        "labels": "class of sample i = i mod num_classes",
        "sampling": asdict(sampling), "device_type": pipe.device.type,
        "seeding": "batch b uses torch.Generator(batch_seed(seed, b * batch_size)) (zoo.pipeline.batch_seed)",
    }


def _check_resume(out: Path, settings: dict, overwrite: bool) -> None:
    path = out / JOB_FILE
    if overwrite:
        for f in list((out / "shards").glob("shard_*.npz*")) if (out / "shards").is_dir() else []:
            f.unlink()
        for name in (SAMPLES_FILE, REPORT_FILE, JOB_FILE):
            if (out / name).exists():
                (out / name).unlink()
        return
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != json.loads(json.dumps(settings.get(k)))]
        if diff:
            raise JobMismatch(f"{out} holds a job with different settings ({', '.join(diff)}); use another --out, "
                              f"or --overwrite to discard it")


def run(args) -> dict:
    """Sample (resuming), pack and measure; returns the report (``status`` 'complete' or 'incomplete')."""
    from tqdm.auto import tqdm

    from generators.base import SamplingConfig
    from zoo.data.shapes import NUM_CLASSES
    from zoo.pipeline import Pipeline, class_conditioning

    if args.num < 1 or args.shard_size < 1 or args.batch_size < 1:
        raise ValueError(f"--num, --shard-size and --batch-size must be >= 1, got {args.num}, {args.shard_size}, "
                         f"{args.batch_size}")
    if args.shard_size % args.batch_size:
        raise ValueError(f"--shard-size {args.shard_size} must be a multiple of --batch-size {args.batch_size} "
                         f"(shards are whole batches; that is what makes resuming exact)")
    measure = bool(args.ref) and args.ref.lower() != "none"
    if measure:  # before sampling: a missing weights file or reference should not cost a sampling run
        from eval.fid import check_features, is_stats_file, open_images, parse_shapes

        check_features(args.features, inception_weights=args.inception_weights, shapes_weights=args.shapes_weights)
        if args.ref.startswith("shapes:"):
            parse_shapes(args.ref)
        elif not is_stats_file(args.ref):
            open_images(args.ref)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = Pipeline.load(args.tokenizer, args.generator, device=device, init_seed=args.init_seed)
    extra = {}
    for item in args.extra:
        key, sep, val = item.partition("=")
        if not sep:
            raise ValueError(f"--extra takes KEY=VALUE, got {item!r}")
        try:
            extra[key] = json.loads(val)
        except json.JSONDecodeError:
            extra[key] = val
    sampling = SamplingConfig(cfg=args.cfg, cfg_schedule=args.cfg_schedule, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, extra=extra)
    if args.condition == "class":
        args.num_classes = class_conditioning(pipe.generator)
    else:
        args.num_classes = NUM_CLASSES  # Shapes class captions as prompts
    labels = balanced_labels(args.num, args.num_classes)
    settings = job_settings(args, pipe, sampling)

    out = Path(args.out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    _check_resume(out, settings, args.overwrite)
    (out / JOB_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    for stale in (out / "shards").glob("*.tmp"):  # a run killed while writing
        stale.unlink()

    ranges = shard_ranges(args.num, args.shard_size)
    todo = [(k, s, e) for k, (s, e) in enumerate(ranges)
            if not _shard_ok(out / "shards" / f"shard_{k:05d}.npz", labels[s:e])]
    done = args.num - sum(e - s for _, s, e in todo)
    made, t0 = 0, time.time()
    bar = tqdm(total=args.num, initial=done, unit="img", desc="fid-job sampling", disable=args.no_progress)
    for k, s, e in todo:
        if args.max_shards is not None and made >= args.max_shards:
            break
        imgs = generate_range(pipe, labels[s:e], s, sampling=sampling, seed=args.seed, batch_size=args.batch_size,
                              condition=args.condition)
        _save_npz_atomic(out / "shards" / f"shard_{k:05d}.npz", arr_0=imgs, arr_1=labels[s:e])
        made += 1
        bar.update(e - s)
    bar.close()
    sample_time = time.time() - t0
    if made < len(todo):
        left = len(todo) - made
        return {"status": "incomplete", "out": str(out), "shards_made": made, "shards_left": left,
                "message": f"stopped after {made} new shard(s) (--max-shards); {left} left -- rerun to resume"}

    shape = pack_shards([out / "shards" / f"shard_{k:05d}.npz" for k in range(len(ranges))], labels,
                        out / SAMPLES_FILE)

    report = {"status": "complete", "command": "arzoo eval fid-job", "settings": settings,
              "samples": str(out / SAMPLES_FILE), "samples_sha256": sha256_file(out / SAMPLES_FILE),
              "num_images": int(shape[0]), "image_size": list(shape[1:3]),
              "class_counts": {"min": int(np.bincount(labels).min()), "max": int(np.bincount(labels).max())},
              # a registry name without :tag is a random-init model: say so next to the metrics
              "pretrained": {k: settings[k]["sha256"] is not None for k in ("tokenizer", "generator")},
              "sampling_time_s_this_run": round(sample_time, 2), "shards_made_this_run": made}
    if measure:
        from eval.fid import compute_metrics

        ref = args.ref
        if ref.startswith("shapes:") and len(ref.split(":")) == 2:
            ref = f"{ref}:{args.num}"  # as many reference images as samples
        fid = compute_metrics(str(out / SAMPLES_FILE), ref, features=args.features,
                              inception_weights=args.inception_weights, shapes_weights=args.shapes_weights,
                              batch_size=args.eval_batch_size,
                              device=args.device, progress=not args.no_progress)
        report["fid"] = fid
        report["metrics"] = fid["metrics"]
        report["environment"] = fid["environment"]
    else:
        from eval.fid import environment

        report["environment"] = environment()
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    from eval.fid import add_feature_args

    p = argparse.ArgumentParser(prog="arzoo eval fid-job", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("models (checkpoint folder, registry name, or name:tag for shipped weights)")
    m.add_argument("--tokenizer", required=True)
    m.add_argument("--generator", required=True)
    m.add_argument("--init-seed", type=int, default=0, help="weights seed for random-init registry names")
    j = p.add_argument_group("job")
    j.add_argument("--num", type=int, default=50000, help="number of samples (class-balanced)")
    j.add_argument("--shard-size", type=int, default=1000, help="samples per shard file (multiple of --batch-size)")
    j.add_argument("--batch-size", type=int, default=50, help="generation batch; part of the reproducibility key")
    j.add_argument("--condition", choices=("class", "caption"), default="class",
                   help="class ids, or Shapes class captions ('a red circle') as prompts")
    j.add_argument("--out", required=True)
    j.add_argument("--max-shards", type=int, default=None,
                   help="stop after making this many shards in this run (resume later)")
    j.add_argument("--overwrite", action="store_true", help="discard an earlier job in --out")
    j.add_argument("--device", default=None)
    j.add_argument("--no-progress", action="store_true")
    s = p.add_argument_group("sampling")
    s.add_argument("--cfg", type=float, default=1.0)
    s.add_argument("--cfg-schedule", choices=("constant", "linear"), default="constant")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--seed", type=int, default=0)
    e = p.add_argument_group("metrics")
    e.add_argument("--ref", default="shapes:train",
                   help="reference: stats npz (mu/sigma), folder, npz, shapes:<split>[:N][:objects=..] "
                        "(default shapes:train with N = --num, 1 object, the samples' resolution), or none")
    add_feature_args(e)
    e.add_argument("--eval-batch-size", type=int, default=64)
    return p


def main(argv=None) -> int:
    from zoo.checkpoint import CheckpointError
    from zoo.registry import UnknownModel
    from zoo.tokens import IncompatibleTokens

    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except (ValueError, FileNotFoundError, UnknownModel, CheckpointError, IncompatibleTokens) as e:
        print(f"arzoo eval fid-job: {e}", file=sys.stderr)
        return 2
    if report["status"] != "complete":
        print(report["message"])
        return 0
    if "fid" in report:
        from eval.fid import format_report

        print(format_report(report["fid"]))
    print(f"wrote {report['samples']} and {Path(args.out) / REPORT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
