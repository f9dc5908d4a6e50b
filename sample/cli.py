"""``arzoo sample`` / ``python -m sample``: sample images from a tokenizer + generator.

::

    python -m sample --tokenizer tokenizer/vq-tiny:shapes --generator generator/raster-ar-tiny:shapes \\
        --classes all --num 8 --cfg 2.0 --seed 0 --out outputs/samples
    python -m sample --tokenizer ckpt/tok --generator ckpt/gen --prompts "a red circle" @more.txt --out out

Writes into ``--out``:

``00000.png ...``  one PNG per sample, condition-major (condition ``c``, repeat ``j`` ->
                   index ``c * num + j``);
``grid.png``       rows = classes / prompts, columns = the ``--num`` samples of each;
``samples.npz``    ``arr_0``: uint8 (N, H, W, 3), the ADM evaluator layout (Dhariwal & Nichol
                   2021, guided-diffusion ``evaluations/``), plus ``arr_1`` (class ids) for
                   class-conditional runs, as ADM's sampler writes;
``samples.json``   the settings and each sample's condition.

With ``--geneval-metadata FILE`` (a GenEval prompt file, one metadata object per line; see
``eval/geneval.py``) the prompts come from the file and ``--out`` gets the official GenEval
layout instead: ``<idx:05d>/metadata.jsonl`` (that prompt's metadata), ``<idx:05d>/samples/
<n:05d>.png`` (``--n-per-prompt`` samples, default 4) and ``<idx:05d>/grid.png``, plus
``samples.json`` with the settings; score it with ``arzoo eval geneval OUT``.

With ``--search {best-of-n,beam,lookahead}`` each sample is the result of a test-time search
(SoTo; ``generators/search.py``) over the generator's tokens (``--prior uniform``: over i.i.d.
uniform tokens, no AR model), scored by ``--verifier`` (``eval/verifiers.py``; ``geneval`` =
Shapes-GenEval per prompt, from the metadata file or the caption); samples.json then holds
``search`` (settings and the verifier / decoder call counts) and each sample's ``score`` and
counts. ``--search none`` (default) samples as before.

Same seed, batch size and device -> identical files (``zoo.pipeline`` explains why the batch
size is part of the key). A registry name without ``:tag`` means random weights: a warning
line on stderr and ``"pretrained": {"tokenizer": ..., "generator": false}`` in samples.json.
Bad input (flags, class ids, device, checkpoints) ends in one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

_PNG = re.compile(r"^\d{5,}\.png$")
_OUTPUTS = ("grid.png", "samples.npz", "samples.json")


def parse_classes(text: str, num_classes: int) -> list[int]:
    """``"all"``, ``"0,1,2"``, ``"0-29"`` or a mix (``"0-4,7"``) -> class ids (order kept)."""
    text = text.strip()
    if text == "all":
        if not num_classes:
            raise ValueError("--classes all needs a class-conditional generator")
        return list(range(num_classes))
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(-?\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise ValueError(f"--classes: expected 'all', ids '0,1,2' or ranges '0-29', got {part!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"--classes: empty range {part!r}")
        if num_classes and (lo < -1 or hi >= num_classes):  # before expanding '0-99999999999'
            raise ValueError(f"--classes {part!r}: class ids must lie in [0, {num_classes}) (or -1 for "
                             f"the null class)")
        out.extend(range(lo, hi + 1))
    if not out:
        raise ValueError(f"--classes: no class ids in {text!r}")
    return out


def read_prompts(values: list[str]) -> list[str]:
    """Prompt strings; ``@file.txt`` expands to the file's non-empty lines."""
    out = []
    for v in values:
        if v.startswith("@"):
            path = Path(v[1:])
            if not path.is_file():
                raise ValueError(f"--prompts: prompt file {path} does not exist")
            out.extend(line.strip() for line in path.read_text().splitlines() if line.strip())
        else:
            out.append(v)
    if not out:
        raise ValueError("--prompts: no prompts given")
    return out


def _extra(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--extra takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arzoo sample", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("models (checkpoint folder, registry name, or name:tag for shipped weights)")
    m.add_argument("--tokenizer", required=True)
    m.add_argument("--generator", required=True)
    c = p.add_argument_group("conditions")
    c.add_argument("--classes", help="'all', '0,1,2', '0-29' (default: all, for a class-conditional generator)")
    c.add_argument("--prompts", nargs="+", metavar="PROMPT", help="captions, or @file.txt (one per line)")
    c.add_argument("--num", "--n-per-prompt", dest="num", type=int, default=4,
                   help="samples per class / prompt (default 4)")
    c.add_argument("--geneval-metadata", metavar="FILE",
                   help="GenEval prompt file (.jsonl); writes the GenEval folder layout into --out")
    s = p.add_argument_group("sampling")
    s.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale s in u + s(c - u)")
    s.add_argument("--cfg-schedule", choices=("constant", "linear"), default="constant")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0, help="0 = off")
    s.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    s.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE",
                   help="scheme-specific knob for SamplingConfig.extra (value parsed as JSON), repeatable")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=64, help="part of the reproducibility key, with --seed")
    t = p.add_argument_group("test-time search (SoTo; generators/search.py)")
    t.add_argument("--search", choices=("none", "best-of-n", "beam", "lookahead"), default="none",
                   help="none = plain sampling (default)")
    t.add_argument("--verifier", choices=("geneval", "likelihood", "clip", "imagereward"), default="geneval",
                   help="geneval: Shapes-GenEval per prompt (graded); likelihood: the prior's log-probability")
    t.add_argument("--verifier-weights", metavar="PATH", help="local weights of the clip / imagereward verifier")
    t.add_argument("--num-candidates", type=int, default=10,
                   help="N of best-of-n; candidates per beam C of beam / lookahead (default 10)")
    t.add_argument("--beams", type=int, default=5, help="beam width B (default 5)")
    t.add_argument("--lookahead", type=int, default=8, help="greedy rollout tokens before scoring; -1 = to the end")
    t.add_argument("--schedule", default="geometric",
                   help="token schedule: geometric (1, 2, 4, ..., N), linear, fixed, or lengths '1,4,16'")
    t.add_argument("--tokens-per-step", type=int, default=1, help="tokens per step of the linear schedule")
    t.add_argument("--branching", choices=("last", "independent"), default="last",
                   help="beam candidates: 'last' (the reference: C distinct last tokens per beam) or 'independent'")
    t.add_argument("--prior", choices=("generator", "uniform"), default="generator",
                   help="uniform: i.i.d. uniform tokens instead of the generator (training-free search)")
    t.add_argument("--grid-fill", type=int, default=0,
                   help="token id filling the unseen positions of a partial grid/unordered prefix (default 0)")
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    r.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="pair a generator with a tokenizer other than the one it was trained on (warns)")
    r.add_argument("--grid-max-rows", type=int, default=64, help="grid.png shows at most this many conditions")
    r.add_argument("--overwrite", action="store_true", help="replace the samples of an earlier run in --out")
    r.add_argument("--no-progress", action="store_true")
    return p


def _is_geneval_folder(f: Path) -> bool:
    return f.is_dir() and f.name.isdigit() and (f / "metadata.jsonl").is_file()


def _prepare_out(out: Path, overwrite: bool) -> None:
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    old = [f for f in out.iterdir() if f.name in _OUTPUTS or _PNG.match(f.name) or _is_geneval_folder(f)]
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds samples ({old[0].name}, ...); pass --overwrite "
                              f"or choose another --out")
    for f in old:  # only our own outputs, so a smaller rerun leaves no stale PNGs behind
        if f.is_dir():
            shutil.rmtree(f)
        else:
            f.unlink()


def write_outputs(out: Path, images: torch.Tensor, rows: int, cols: int, labels, meta: dict,
                  grid_max_rows: int = 64) -> None:
    """PNGs, grid.png, samples.npz (ADM ``arr_0``) and samples.json for ``images`` (N, H, W, 3)."""
    from PIL import Image
    from torchvision.utils import make_grid

    arr = images.numpy()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(out / f"{i:05d}.png")
    shown = images[: min(rows, grid_max_rows) * cols].permute(0, 3, 1, 2)
    grid = make_grid(shown, nrow=cols, padding=2, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy()).save(out / "grid.png")
    if labels is not None:
        np.savez(out / "samples.npz", arr_0=arr, arr_1=np.asarray(labels, dtype=np.int64))
    else:
        np.savez(out / "samples.npz", arr_0=arr)
    (out / "samples.json").write_text(json.dumps(meta, indent=2) + "\n")


def check_device(device: str) -> torch.device:
    """``--device`` as a ``torch.device`` that this machine has, else a one-line ``ValueError``."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if dev.type == "meta":
        raise ValueError(f"--device {device}: the meta device holds no data; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available on this machine; use --device cpu")
    try:
        torch.empty(0, device=dev)  # the cheapest way to ask torch whether the device exists
    except (RuntimeError, AssertionError) as e:  # AssertionError: torch built without that backend
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--device {device}: not usable here ({first[:120]})") from None
    return dev


def run(args) -> Path:
    from generators.base import SamplingConfig
    from zoo.pipeline import Pipeline, RandomWeightsWarning, class_conditioning, random_weights_note

    for flag, value in (("--num", args.num), ("--batch-size", args.batch_size),
                        ("--grid-max-rows", args.grid_max_rows)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    sampling = SamplingConfig(cfg=args.cfg, cfg_schedule=args.cfg_schedule, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, extra=_extra(args.extra))
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)  # printed below as one plain line each
        pipe = Pipeline.load(args.tokenizer, args.generator, device=device,
                             allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
    for model in (pipe.tokenizer, pipe.generator):
        note = random_weights_note(model)
        if note:
            print(f"arzoo sample: WARNING {note}", file=sys.stderr)

    classes = prompts = metadatas = None
    if args.geneval_metadata is not None:
        from eval.geneval import load_metadata

        if args.classes is not None or args.prompts is not None:
            raise ValueError("--geneval-metadata takes the prompts from the file: drop --classes/--prompts")
        metadatas = load_metadata(args.geneval_metadata)
        prompts = [m["prompt"] for m in metadatas]
    if args.classes is not None:
        classes = parse_classes(args.classes, class_conditioning(pipe.generator))
    if args.prompts is not None:
        prompts = read_prompts(args.prompts)
    if classes is None and prompts is None:
        if not class_conditioning(pipe.generator):
            raise ValueError(f"{pipe.describe()['generator']} is not class-conditional: pass --prompts")
        classes = parse_classes("all", class_conditioning(pipe.generator))
    if classes is not None and prompts is not None and len(classes) != len(prompts):
        raise ValueError(f"--classes and --prompts pair up one to one: got {len(classes)} and {len(prompts)}")
    conds = len(classes if classes is not None else prompts)
    rep = lambda xs: None if xs is None else [x for x in xs for _ in range(args.num)]  # noqa: E731
    per_classes, per_prompts = rep(classes), rep(prompts)
    pipe.make_condition(per_classes, per_prompts)  # validate before touching --out

    searching = args.search != "none" or args.prior != "generator"
    parts = prepare_search(args, pipe, sampling) if searching else None  # bad search flags fail here

    out = Path(args.out)
    _prepare_out(out, args.overwrite)
    if searching:
        rep_meta = None if metadatas is None else [m for m in metadatas for _ in range(args.num)]
        images, search_meta, per_sample = run_search(args, pipe, parts, per_classes, per_prompts, rep_meta)
    else:
        images = pipe.generate(per_classes, per_prompts, sampling=sampling, seed=args.seed,
                               batch_size=args.batch_size, progress=not args.no_progress)
    n = images.shape[0]
    samples = []
    for i in range(n):
        s = {"index": i, "file": f"{i:05d}.png"}
        if per_classes is not None:
            s["class"] = per_classes[i]
        if per_prompts is not None:
            s["prompt"] = per_prompts[i]
        if searching:
            s.update(per_sample[i])
        samples.append(s)
    models = {"tokenizer": pipe.tokenizer, "generator": pipe.generator}
    meta = {
        "tokenizer": args.tokenizer, "generator": args.generator,
        "tokenizer_model": pipe.describe()["tokenizer"], "generator_model": pipe.describe()["generator"],
        "spec": pipe.tokenizer.spec.describe(),
        # false = random weights (a registry name without :tag); "weights": where they came from
        "pretrained": {k: getattr(m, "pretrained_source", None) is not None for k, m in models.items()},
        "weights": {k: getattr(m, "pretrained_source", None) for k, m in models.items()},
        "sampling": asdict(sampling), "seed": args.seed, "batch_size": args.batch_size,
        "device": str(pipe.device), "torch": torch.__version__,
        "num_per_condition": args.num, "num_conditions": conds, "num_samples": n,
        "image_shape": list(images.shape[1:]),
        "reproducible_with": "same seed, batch_size, device and conditions (see zoo/pipeline.py)",
        "samples": samples,
    }
    if searching:
        meta["search"] = search_meta
    if metadatas is not None:
        from eval.geneval import write_prompt_folder

        arr = images.numpy()
        for i, m in enumerate(metadatas):
            write_prompt_folder(out, i, m, arr[i * args.num:(i + 1) * args.num])
        meta.update(layout="geneval", geneval_metadata=str(args.geneval_metadata))
        for s in samples:
            s["file"] = f"{s['index'] // args.num:05d}/samples/{s['index'] % args.num:05d}.png"
        (out / "samples.json").write_text(json.dumps(meta, indent=2) + "\n")
        return out
    write_outputs(out, images, conds, args.num, per_classes, meta, args.grid_max_rows)
    return out


def _verifier_prompts(pipe, per_classes, per_prompts, metadatas, verifier: str) -> list:
    """One verifier prompt per sample: the GenEval metadata, else the caption, else the Shapes
    caption of the class id."""
    if metadatas is not None:
        return metadatas
    if per_prompts is not None:
        return list(per_prompts)
    if verifier == "likelihood":
        return [f"class {c}" for c in per_classes]
    from zoo.data.shapes import class_caption

    return [class_caption(c) for c in per_classes]


def prepare_search(args, pipe, sampling):
    """``(prior, decoder, verifier)`` for ``--search``, checking the search flags."""
    from eval.verifiers import make_verifier
    from generators.search import ARPrior, UniformPrior, make_decoder, token_schedule

    for flag, value in (("--num-candidates", args.num_candidates), ("--beams", args.beams)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.search == "lookahead" and not (args.lookahead >= 1 or args.lookahead == -1):
        raise ValueError(f"--search lookahead needs --lookahead >= 1 (or -1 = to the end), got {args.lookahead}")
    prior = (UniformPrior.for_spec(pipe.tokenizer.spec, pipe.device) if args.prior == "uniform"
             else ARPrior(pipe.generator, sampling))
    token_schedule(args.schedule, prior.num_tokens, tokens_per_step=args.tokens_per_step)
    decoder = make_decoder(pipe.tokenizer, fill=args.grid_fill)
    return prior, decoder, make_verifier(args.verifier, args.verifier_weights, device=str(pipe.device))


def run_search(args, pipe, parts, per_classes, per_prompts, metadatas):
    """Search images for every sample (batches of ``--batch-size`` prompts, each with the
    torch.Generator of ``zoo.pipeline.batch_seed(seed, start)``): ``(uint8 images, the samples.json
    "search" record, per-sample records)``."""
    from generators.search import beam_verifier_calls, search
    from zoo.pipeline import batch_seed, to_uint8

    prior, decoder, verifier = parts
    device = pipe.device
    prompts = _verifier_prompts(pipe, per_classes, per_prompts, metadatas, args.verifier)
    cond = pipe.make_condition(per_classes, per_prompts)
    n = cond.batch_size
    images, per_sample = [], []
    totals = {"verifier_calls": 0, "decoder_calls": 0, "prior_tokens": 0}
    starts = range(0, n, args.batch_size)
    if not args.no_progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"{args.search} search, {n} samples", unit="batch", leave=False)
    settings = {}
    for start in starts:
        stop = min(start + args.batch_size, n)
        g = torch.Generator(device=device).manual_seed(batch_seed(args.seed, start))
        res = search(args.search, prior, decoder, verifier, prompts[start:stop], cond[start:stop].to(device),
                     num_candidates=args.num_candidates, beams=args.beams, lookahead=args.lookahead,
                     schedule=args.schedule, tokens_per_step=args.tokens_per_step, branching=args.branching,
                     generator=g,
                     decode_seed=batch_seed(args.seed, start))
        images.append(to_uint8(res.images))
        for k in totals:
            totals[k] += getattr(res, k)
        each = res.per_prompt()
        for sc in res.scores.tolist():
            per_sample.append({"score": sc, **each})
        settings = {k: v for k, v in res.summary().items()
                    if k not in ("scores", "num_prompts", "per_prompt", *totals)}
    record = {**settings, "algorithm": args.search, "prior": prior.name, "decoder": decoder.describe(),
              "verifier": getattr(verifier, "name", args.verifier), **totals,
              "per_sample": {k: v / n for k, v in totals.items()}}
    if args.search in ("beam", "lookahead"):
        record["verifier_calls_formula"] = "C + (steps - 1) * B * C per sample (B <= C)"
        record["expected_verifier_calls_per_sample"] = beam_verifier_calls(
            prior.num_tokens, args.beams, args.num_candidates, args.schedule, tokens_per_step=args.tokens_per_step)
    print(f"arzoo sample: {args.search} search with the {record['verifier']} verifier: "
          f"{totals['verifier_calls']} verifier calls, {totals['decoder_calls']} decoder calls "
          f"({totals['verifier_calls'] / n:g} and {totals['decoder_calls'] / n:g} per sample)", file=sys.stderr)
    return torch.cat(images), record, per_sample


def main(argv=None) -> int:
    # `arzoo sample` and `python -m sample` both come here: the same errors end the same way.
    from zoo.cli import one_line, user_errors

    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except user_errors() as e:
        if os.environ.get("ARZOO_DEBUG", "") not in ("", "0"):
            raise
        # Bad input: one clean line, not a traceback.
        print(f"arzoo sample: {one_line(e)}", file=sys.stderr)
        return 2
    if args.geneval_metadata is not None:
        print(f"wrote the GenEval layout to {out} (<idx>/metadata.jsonl, <idx>/samples/<n>.png); "
              f"score it with `arzoo eval geneval {out}`")
        return 0
    print(f"wrote {out}/grid.png, samples.npz, samples.json and the PNGs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
