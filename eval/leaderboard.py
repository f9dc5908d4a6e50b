"""One table for every shipped generator: Shapes class accuracy and Shapes-FID side by side.

::

    python -m eval.leaderboard --out runs/leaderboard --write checkpoints.md
    python -m eval.leaderboard --only nar-tiny,raster-ar-tiny --num 256     # quick look

Each row samples ``--num`` class-balanced images (seed 0, the row's stated sampling config)
with :class:`zoo.pipeline.Pipeline`, then scores the *same* images twice: Shapes class
accuracy (:func:`eval.shapes_acc.score`: the detector parses exactly the requested object) and
Shapes-FID against the statistics of ``shapes:train:5000`` (the Shapes feature network,
:mod:`eval.fid`; built once into ``--ref`` if missing). Every row is cached as
``OUT/<row>.json`` keyed by its settings and the weights' sha256, so an interrupted run
resumes where it stopped and a retrained checkpoint is re-measured. ``--write FILE``
replaces the table between the ``<!-- leaderboard:start -->`` / ``<!-- leaderboard:end -->``
markers of FILE (checkpoints.md), with the command that made it.

``--candidate ROW=FOLDER`` measures a checkpoint folder (e.g. a training run's ``final``) in
place of a row's shipped weights, under the same protocol, without touching ``weights/`` or
the shipped rows' cache: its result is cached under ``OUT/candidates/`` and it cannot be
combined with ``--write`` (the table in checkpoints.md lists shipped weights only)::

    python -m eval.leaderboard --candidate himar-tiny=runs/himar-small-cd/final-raw --num-slow 2000
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

START, END = "<!-- leaderboard:start -->", "<!-- leaderboard:end -->"


@dataclass(frozen=True)
class Row:
    generator: str  # registry name:tag
    tokenizer: str
    cfg: float = 2.0
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    extra: dict = field(default_factory=dict)
    bar: float | None = None  # the class-accuracy bar
    slow: bool = False  # continuous generators: minutes per hundred images on a CPU (--num-slow)

    @property
    def key(self) -> str:
        return self.generator.split("/")[-1].replace(":", "-")


# The shipped generators with the tokenizer each was trained on, and the sampling each is
# measured with (constant cfg 2.0 unless stated; temperature 1, no top-k/top-p). Raster AR
# and NAR: cfg 1.5, the best of 1.25/1.5/2/2.5/3 for both on 256 samples (checkpoints.md). MAR and
# Hi-MAR: temperature 0.7 (the diffusion heads' noise scale, MAR's sampling knob), better than 1.0
# for both on 60 samples (checkpoints.md).
ROWS = (
    Row("generator/raster-ar-tiny:shapes", "tokenizer/vq-tiny:shapes", cfg=1.5),
    Row("generator/nar-tiny:shapes", "tokenizer/vq-tiny:shapes", cfg=1.5, bar=0.90),
    Row("generator/var-tiny:shapes", "tokenizer/msvq-tiny:shapes", bar=0.80),
    Row("generator/mvar-tiny:shapes", "tokenizer/msvq-tiny:shapes", bar=0.80),
    Row("generator/xar-tiny:shapes", "tokenizer/kl-tiny:shapes", bar=0.75, slow=True),
    Row("generator/mar-tiny:shapes", "tokenizer/kl-tiny:shapes", temperature=0.7, bar=0.75, slow=True),
    Row("generator/himar-tiny:shapes", "tokenizer/kl-tiny:shapes", temperature=0.7, bar=0.75, slow=True),
)


def _weights_id(source: str) -> str:
    """sha256 prefix of a row's weights (``name:tag`` or a checkpoint folder): the cache key."""
    from eval.fid_job import sha256_file
    from zoo.registry import resolve_weights

    name, sep, tag = source.partition(":")
    path = resolve_weights(name, tag) if sep else Path(source)
    return sha256_file(Path(path) / "model.safetensors")[:16]


def ensure_ref(path: Path, num: int = 5000) -> Path:
    """Shapes-net statistics of ``shapes:train:NUM`` (computed once)."""
    from eval.fid import compute_metrics

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        compute_metrics(f"shapes:train:{num}", None, save_stats_path=path, kid=False, prc=False, isc=False)
    return path


def measure(row: Row, *, num: int, ref: Path, seed: int, batch_size: int) -> dict:
    from eval.fid import compute_metrics
    from eval.shapes_acc import _evenly, colour_accuracy, score
    from generators.base import SamplingConfig
    from zoo.data.shapes import NUM_CLASSES
    from zoo.pipeline import Pipeline

    pipe = Pipeline.load(row.tokenizer, row.generator)
    gen = pipe.generator
    sampling = SamplingConfig(cfg=row.cfg, cfg_schedule=row.cfg_schedule, temperature=row.temperature,
                              extra=dict(row.extra))
    wanted = _evenly(num, NUM_CLASSES)
    t0 = time.perf_counter()
    imgs = np.asarray(pipe.generate(classes=wanted, sampling=sampling, seed=seed, batch_size=batch_size))
    secs = time.perf_counter() - t0
    acc, got = score(imgs, wanted)
    report = compute_metrics(imgs, str(ref), kid=False, prc=False, isc=False)
    from eval.bench import count_forward_steps
    from generators.base import Condition

    nfe, _ = count_forward_steps(gen, Condition(labels=torch.tensor([0])), sampling)  # trunk passes / image
    return {"class_accuracy": acc, "none_or_many": float(np.mean([g == -1 for g in got])),
            "colour_accuracy": colour_accuracy(imgs, wanted), "shapes_fid": report["metrics"]["shapes_fid"],
            "num": num, "seed": seed, "img_per_s": num / secs, "forward_steps": nfe,
            "params": sum(p.numel() for p in gen.parameters())}


def table(rows, results: dict, keys=None) -> str:
    """The markdown table; ``results`` by row key (``keys``: one per row, default ``row.key``)."""
    head = ("| generator | tokenizer | sampling | params | class acc. | bar | right colour | none/many "
            "| Shapes-FID | N | trunk passes / image | img/s |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r, key in zip(rows, keys or [r.key for r in rows]):
        m = results.get(key)
        samp = f"cfg {r.cfg:g}" + (f" {r.cfg_schedule}" if r.cfg_schedule != "constant" else "") + \
            (f", temperature {r.temperature:g}" if r.temperature != 1.0 else "") + \
            "".join(f", {k}={v}" for k, v in r.extra.items())
        if m is None:
            lines.append(f"| `{r.generator}` | `{r.tokenizer}` | {samp} | | not measured | | | | | | | |")
            continue
        bar = "" if r.bar is None else (f"≥ {r.bar:.0%} " + ("met" if m["class_accuracy"] >= r.bar else "**not met**"))
        lines.append(f"| `{r.generator}` | `{r.tokenizer}` | {samp} | {m['params'] / 1e6:.2f}M | "
                     f"**{m['class_accuracy']:.1%}** | {bar} | {m['colour_accuracy']:.1%} | {m['none_or_many']:.1%} | "
                     f"{m['shapes_fid']:.2f} | {m['num']} | {m['forward_steps']} | {m['img_per_s']:.2f} |")
    return "\n".join(lines)


def write_between_markers(path: Path, text: str) -> None:
    doc = path.read_text()
    if START not in doc or END not in doc:
        raise ValueError(f"{path}: no {START} ... {END} markers to replace")
    a, b = doc.index(START) + len(START), doc.index(END)
    path.write_text(doc[:a] + "\n" + text + "\n" + doc[b:])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.leaderboard", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/leaderboard", help="per-row result cache (resumable)")
    p.add_argument("--only", default="", help="measure only these rows (comma-separated keys or generator names); "
                                              "the others show cached results of the same settings and weights")
    p.add_argument("--num", type=int, default=2000, help="samples per row (accuracy and FID on the same images)")
    p.add_argument("--num-slow", type=int, default=None,
                   help="samples for the slow (continuous) rows; default --num. Shapes-FID depends on N: compare "
                        "rows at equal N")
    p.add_argument("--ref", default="refs/shapes64-train5k.npz", help="Shapes-net statistics (made if missing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--write", metavar="FILE", help="replace the table between the leaderboard markers of FILE")
    p.add_argument("--candidate", action="append", default=[], metavar="ROW=FOLDER",
                   help="measure a checkpoint folder in place of ROW's shipped weights (repeatable; cached under "
                        "OUT/candidates; not with --write)")
    return p


def parse_candidates(items) -> dict:
    """``["ROW=FOLDER", ...]`` -> ``{row key: folder}``; each folder must be a checkpoint of the
    row's registry model (its ``config.json`` names it)."""
    keys = {r.key: r for r in ROWS}
    keys.update({_short(r): r for r in ROWS})
    out = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or name not in keys:
            raise SystemExit(f"--candidate takes ROW=FOLDER with ROW one of {', '.join(keys)}; got {item!r}")
        key = keys[name].key
        cfg = Path(folder) / "config.json"
        if not cfg.is_file() or not (Path(folder) / "model.safetensors").is_file():
            raise SystemExit(f"--candidate {item}: {folder} is not a checkpoint folder (config.json + model.safetensors)")
        held, want = json.loads(cfg.read_text()).get("name"), keys[key].generator.split(":")[0]
        if held != want:
            raise SystemExit(f"--candidate {item}: the folder holds {held!r}, the row is {want!r}")
        out[key] = folder
    return out


def _short(row: Row) -> str:
    """``generator/nar-tiny:shapes`` -> ``nar-tiny`` (``--only`` and ``--candidate`` take it too)."""
    return row.generator.split(":")[0].split("/")[-1]


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    for flag, n in (("--num", a.num), ("--num-slow", a.num_slow)):
        if n is not None and n < 30:
            raise SystemExit(f"{flag} must be >= 30 (one sample per Shapes class at least), got {n}")
    cands = parse_candidates(a.candidate)
    if cands and a.write:
        raise SystemExit("--candidate measures weights that are not shipped: it cannot --write the table")
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    chosen = {r.key for r in ROWS if r.key in cands or (not only and not cands) or r.key in only
              or _short(r) in only}
    if not chosen:
        raise SystemExit(f"--only {a.only!r} matches no row; rows: {', '.join(r.key for r in ROWS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ref = ensure_ref(Path(a.ref))
    results, commands = {}, set()
    cmd = "python -m eval.leaderboard " + " ".join(argv if argv is not None else sys.argv[1:])
    # every row is listed; rows outside --only show a cached result of the same settings and
    # weights if there is one, else "not measured"
    shown = []
    for shipped in ROWS:
        r = replace(shipped, generator=cands[shipped.key]) if shipped.key in cands else shipped
        shown.append(r)
        num = a.num_slow if r.slow and a.num_slow else a.num
        ident = {"row": asdict(r), "num": num, "seed": a.seed, "batch_size": a.batch_size,
                 "weights": _weights_id(r.generator), "tokenizer_weights": _weights_id(r.tokenizer)}
        cache = (out / "candidates" / f"{shipped.key}-{ident['weights']}.json" if r is not shipped
                 else out / f"{shipped.key}.json")
        cache.parent.mkdir(parents=True, exist_ok=True)
        if cache.is_file():
            saved = json.loads(cache.read_text())
            same = saved.get("ident") == ident
            # a row outside --only keeps its cached result at whatever N it was measured with
            # (the table states each row's N), as long as the weights and settings are the same
            kept = shipped.key not in chosen and {**saved.get("ident", {}), "num": num} == ident
            if same or kept:
                results[shipped.key] = saved["metrics"]
                commands.add(saved.get("command") or "")
                continue
        if shipped.key not in chosen:
            continue
        torch.manual_seed(0)
        print(f"[leaderboard] {r.generator}: sampling {num} images", file=sys.stderr, flush=True)
        results[shipped.key] = measure(r, num=num, ref=ref, seed=a.seed, batch_size=a.batch_size)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"ident": ident, "metrics": results[shipped.key], "command": cmd}, indent=2))
        tmp.replace(cache)
        commands.add(cmd)
    text = table(shown, results, [r.key for r in ROWS])
    print(text)
    if a.write:
        cmds = "\n".join(sorted(c for c in commands if c)) or cmd
        write_between_markers(Path(a.write), f"```bash\n{cmds}\n```\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
