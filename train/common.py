"""What the training scripts share: flags, config files, model building and data plumbing.

The accelerate training loop itself (exact resume, EMA, checkpoint rotation) is in
``train/loop.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

# ----------------------------------------------------------------------------------------
# flags
# ----------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, *, steps: int = 10000, batch_size: int = 64,
                    lr: float = 1e-4, warmup: int = 500, weight_decay: float = 0.05,
                    model: str | None = None) -> argparse.ArgumentParser:
    """Add the flags every training script takes (``--config`` may give any of them)."""
    g = parser.add_argument_group("model")
    g.add_argument("--config", metavar="FILE.yaml",
                   help="YAML file of defaults for any flag (keys are flag names; '-' or '_')")
    g.add_argument("--model", default=model, help="registry name (see `arzoo list`)")
    g.add_argument("--set", dest="set", action="append", default=[], metavar="KEY=VALUE",
                   help="model constructor override; VALUE is parsed as YAML (repeatable)")
    g.add_argument("--init", metavar="DIR", default=None,
                   help="initialise the weights from this checkpoint folder (e.g. a previous stage's "
                        "OUT/final, or shipped weights to fine-tune), strictly by tensor name; ignored when "
                        "resuming from --out")
    g.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE[:FUNC]",
                   help="import MODULE (and call FUNC()) before building models, e.g. to register "
                        "your own models (repeatable)")
    g = parser.add_argument_group("run")
    g.add_argument("--out", help="output folder (required): checkpoints/, log.jsonl, final/")
    g.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help="global batch per optimizer step (split over --grad-accum and processes)")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (a default: accelerate's "
                        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS wins when set)")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="after the linear warmup")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor, as a fraction of --lr")
    g.add_argument("--warmup", type=int, default=warmup, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=weight_decay,
                   help="AdamW decay on >=2-D weights (biases and norms are not decayed)")
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.95)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0 = off)")
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                   help="a default: `accelerate launch --mixed_precision` / its config "
                        "(ACCELERATE_MIXED_PRECISION) wins when set, with a log line if they differ")
    g.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (0 = off)")
    g.add_argument("--time-limit", type=float, default=0.0, metavar="MINUTES",
                   help="stop at the first optimizer step after this many minutes of training in this "
                        "process, save a resumable state and export final/ as at the end; the same "
                        "command run again resumes (0 = no limit; for preemptible or leased machines)")
    g.add_argument("--save-every", type=int, default=1000, help="save resumable state every N steps "
                   "(and at the end; 0 = only at the end)")
    g.add_argument("--keep", type=int, default=3, help="resumable states kept (0 = all)")
    g.add_argument("--resume", default="auto",
                   help="'auto' (latest complete state under OUT/checkpoints, if any), 'no', or a state folder")
    g.add_argument("--allow-changed", action="store_true",
                   help="resume even though arguments differ from OUT/args.json (by default a resume "
                        "refuses and lists them; these may always change: " + ", ".join(
                            f"--{a.replace('_', '-')}" for a in RESUME_MAY_CHANGE
                            if a not in ("resume", "allow_changed")).replace("--imports", "--import")
                        + ", --eval-*)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-every", type=int, default=50, help="log to OUT/log.jsonl every N steps")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process")
    g.add_argument("--cpu", action="store_true", help="train on CPU even if an accelerator is present")
    return parser


#: flags that may differ between a run and its resume without --allow-changed: run length, saving,
#: logging, I/O, hardware and end-of-run evaluation (also every ``--eval-*``); anything else
#: (model, data, optimizer, batch) would silently mix two runs in one OUT
RESUME_MAY_CHANGE = ("steps", "time_limit", "save_every", "keep", "log_every", "num_workers", "resume",
                     "allow_changed", "config", "imports", "cpu", "mixed_precision", "init")


def has_accelerator() -> bool:
    """Whether torch sees a GPU-like device (else multi-process runs use gloo on the CPU)."""
    acc = getattr(torch, "accelerator", None)
    return bool(acc.is_available()) if acc is not None else torch.cuda.is_available()


def parse_args(parser: argparse.ArgumentParser, argv=None, *, required=("out",)) -> argparse.Namespace:
    """Parse ``argv`` with defaults from ``--config FILE.yaml``; adds ``args.overrides``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        defaults = load_config(known.config, parser)
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    for name in required:
        if getattr(args, name, None) in (None, ""):
            parser.error(f"--{name.replace('_', '-')} is required (on the command line or in --config)")
    args.overrides = parse_overrides(getattr(args, "set", None))
    for name in ("steps", "batch_size", "grad_accum", "log_every"):
        if hasattr(args, name) and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if hasattr(args, "grad_accum") and args.batch_size % args.grad_accum:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of --grad-accum {args.grad_accum}")
    if hasattr(args, "ema") and not 0.0 <= args.ema < 1.0:
        parser.error(f"--ema must be a decay in [0, 1), got {args.ema}")
    import_plugins(getattr(args, "imports", []))
    return args


def load_config(path, parser: argparse.ArgumentParser) -> dict:
    """Read a YAML mapping of flag defaults and check every key is a flag of ``parser``."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"--config {path}: no such file")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path}: expected a mapping of flag: value, got {type(data).__name__}")
    dests = {a.dest for a in parser._actions}
    out = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest == "import":
            dest = "imports"
        if dest not in dests or dest == "config":
            raise SystemExit(f"--config {path}: unknown key {key!r} (not a flag of {parser.prog})")
        if dest == "set" and isinstance(value, dict):
            value = [f"{k}={json.dumps(v)}" for k, v in value.items()]
        if dest in ("set", "imports") and isinstance(value, str):
            value = [value]
        out[dest] = value
    return out


def parse_overrides(items) -> dict:
    """``["depth=4", "dims=[64, 128]"]`` -> ``{"depth": 4, "dims": [64, 128]}`` (YAML values)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as e:
            raise SystemExit(f"--set {item!r}: value is not valid YAML ({e})") from e
    return out


def parse_num_objects(text) -> int | tuple:
    """``"2"`` -> 2; ``"1-4"`` -> (1, 4) (inclusive range)."""
    if isinstance(text, int):
        return text
    if isinstance(text, (list, tuple)) and len(text) == 2:
        return (int(text[0]), int(text[1]))
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"--num-objects expects N or MIN-MAX, got {text!r}")
    lo = int(m.group(1))
    if m.group(2) is None:
        return lo
    hi = int(m.group(2))
    if hi < lo:
        raise argparse.ArgumentTypeError(f"--num-objects MIN-MAX needs MIN <= MAX, got {text!r}")
    return (lo, hi)


def import_plugins(specs) -> None:
    """:func:`zoo.import_plugins`, exiting with its one-line message (``python -m train ...``)."""
    from zoo.errors import UserError
    from zoo.registry import import_plugins as _import

    try:
        _import(specs)
    except UserError as e:
        raise SystemExit(str(e)) from e


def json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return repr(obj)


def write_json(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# models and data
# ----------------------------------------------------------------------------------------


def build_model(name: str, overrides: dict | None = None, **fixed):
    """``zoo.create(name, **fixed, **overrides)`` with a readable error for a missing name."""
    import zoo

    if not name:
        raise SystemExit("--model is required (a registry name; see `arzoo list`)")
    clash = set(fixed) & set(overrides or {})
    if clash:
        raise SystemExit(f"--set {', '.join(sorted(clash))}: set by the script, cannot be overridden")
    try:
        _check_override_types(name, overrides or {})
        return zoo.create(name, **fixed, **(overrides or {}))
    except zoo.registry.UnknownModel as e:
        raise SystemExit(str(e)) from e
    except (TypeError, ValueError) as e:  # the values came from --set: say so, in one line
        sets = " ".join(f"--set {k}={v!r}" for k, v in (overrides or {}).items()) or "(no --set)"
        raise SystemExit(f"{name} cannot be built with {sets}: {e}") from e


def init_weights(model: torch.nn.Module, path) -> list[str]:
    """Load ``path``'s weights into ``model`` strictly by tensor name and shape (``--init``).

    ``path``: an arzoo checkpoint folder (``config.json`` + ``model.safetensors``) or a
    ``.safetensors`` file. Returns the constructor arguments that differ from the folder's
    config (``["stage: 1 -> 3"]``); a different model class, or tensors that do not fit, exit
    with the missing / unexpected / mis-shaped names.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from zoo.checkpoint import WEIGHTS_NAME, CheckpointError, load_state_strict, read_config
    from zoo.tokens import spec_to_json

    p = Path(path)
    cfg = None
    if p.is_dir():
        try:
            cfg = read_config(p)
        except CheckpointError as e:
            raise SystemExit(f"--init {path}: {e}") from e
        wpath = p / WEIGHTS_NAME
        if not wpath.is_file():
            raise SystemExit(f"--init {path}: no {WEIGHTS_NAME} in this folder (only safetensors weights are "
                             f"loaded, never pickles)")
    elif p.is_file():
        if p.suffix != ".safetensors":
            raise SystemExit(f"--init {path}: not a .safetensors file; pickled weights (.pt/.pth/.bin/.ckpt) are "
                             f"never loaded (pass an arzoo checkpoint folder)")
        wpath = p
    else:
        raise SystemExit(f"--init {path}: no such folder or file")
    diffs = []
    if cfg is not None:
        cls = type(model)
        own = f"{cls.__module__}:{cls.__qualname__}"
        if cfg["class"] != own:
            raise SystemExit(f"--init {path}: holds a {cfg['class']} ({cfg.get('name')}), not a {own}")
        mine, theirs = spec_to_json(model.config), cfg["args"]
        diffs = [f"{k}: {theirs.get(k, '(default)')} -> {mine.get(k, '(default)')}"
                 for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    try:
        state = load_file(str(wpath), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise SystemExit(f"--init {wpath}: truncated or corrupt safetensors file ({e})") from e
    try:
        load_state_strict(model, state, f"--init {wpath}")
    except CheckpointError as e:
        raise SystemExit(str(e)) from e
    return diffs


def apply_init(args, acc, model: torch.nn.Module, who: str) -> None:
    """``--init``: load the weights before training starts, unless the run resumes from a saved
    state in ``--out`` (then the state wins, and a line says so)."""
    if not getattr(args, "init", None):
        return
    from train.runs import list_states

    mode = str(args.resume).lower()
    if mode not in ("no", "never", "false", "0") and (mode != "auto" or list_states(args.out)):
        acc.print(f"[{who}] --init {args.init} ignored: resuming from the saved state in {args.out}")
        return
    diffs = init_weights(model, args.init)
    acc.print(f"[{who}] initialised from {args.init}"
              + (f" (constructor arguments differ: {'; '.join(diffs)})" if diffs else ""))


def _check_override_types(name: str, overrides: dict) -> None:
    """``--set ch=abc`` for an int argument: refuse before building (default values' types)."""
    import zoo

    defaults = zoo.registry.build_meta(name).config
    for k, v in overrides.items():
        if k not in defaults:
            raise SystemExit(f"--set {k}=...: {name} has no argument {k!r} (see `arzoo info {name}`)")
        d = defaults[k]
        if d is None or v is None or isinstance(d, (list, tuple, dict)) or not isinstance(d, (bool, int, float, str)):
            continue
        ok = isinstance(v, bool) if isinstance(d, bool) else (
            isinstance(v, (int, float)) and not isinstance(v, bool) if isinstance(d, float) else
            isinstance(v, int) and not isinstance(v, bool) if isinstance(d, int) else isinstance(v, str))
        if not ok:
            kind = type(d).__name__
            raise SystemExit(f"--set {k}={v!r}: {name}'s {k} is {'an' if kind == 'int' else 'a'} {kind} (default {d!r})")


#: ``name -> fn(arg, *, split, resolution, num_objects, length) -> Dataset``; ``--data name[:arg]``
IMAGE_DATASETS: dict[str, Callable[..., Dataset]] = {}


def register_image_dataset(name: str):
    """Decorator: make ``--data name[:arg]`` build a dataset of images in [-1, 1]."""
    def deco(fn):
        IMAGE_DATASETS[name] = fn
        return fn
    return deco


@register_image_dataset("shapes")
def _shapes_dataset(arg, *, split, resolution, num_objects, length, caption_style="default"):
    from zoo.data.shapes import NUM_CLASSES, ShapesDataset

    kw = {"split": split, "resolution": resolution, "num_objects": num_objects, "caption_style": caption_style}
    if length is not None:
        kw["length"] = length
    ds = ShapesDataset(**kw)
    ds.num_classes = NUM_CLASSES  # the label space (what token extraction records for generators)
    return ds


@register_image_dataset("folder")
def _folder_dataset(arg, *, split, resolution, num_objects, length):
    from zoo.data.imagefolder import ImageFolderDataset

    if not arg:
        raise SystemExit("--data folder:PATH needs a folder, e.g. folder:/data/imagenet/train")
    if not Path(arg).is_dir():
        raise SystemExit(f"--data folder:{arg}: not a folder")
    ds = ImageFolderDataset(arg, resolution)
    if length is not None and length < len(ds):
        ds = torch.utils.data.Subset(ds, range(length))
    return ds


def build_image_dataset(data: str, *, split: str = "train", resolution: int = 64, num_objects=1,
                        length: int | None = None, caption_style: str | None = None) -> Dataset:
    """``--data shapes`` or ``--data folder:/path`` (or a name added by :func:`register_image_dataset`).

    ``caption_style`` (``--caption-style``, Shapes only: ``zoo.data.shapes.CAPTION_STYLES``) is passed
    to the source only when it is not ``None`` / ``"default"``."""
    name, _, arg = str(data).partition(":")
    if name not in IMAGE_DATASETS:
        raise SystemExit(f"--data {data!r}: unknown source {name!r}; expected one of "
                         + ", ".join(f"{n}" + (":PATH" if n == "folder" else "") for n in IMAGE_DATASETS))
    kw = {}
    if caption_style not in (None, "default"):
        if name != "shapes":
            raise SystemExit(f"--caption-style {caption_style}: only --data shapes writes captions")
        kw["caption_style"] = caption_style
    return IMAGE_DATASETS[name](arg or None, split=split, resolution=resolution, num_objects=num_objects,
                                length=length, **kw)


def add_caption_style_arg(group) -> None:
    """``--caption-style`` (Shapes captions: ``zoo.data.shapes.CAPTION_STYLES``)."""
    from zoo.data.shapes import CAPTION_STYLES

    group.add_argument("--caption-style", choices=CAPTION_STYLES, default="default",
                       help="Shapes caption style: 'default' (what the shipped models saw) or 'geneval' "
                            "(relations only where the Shapes-GenEval position task can check them)")


def collate_images(items) -> dict:
    """Batch dataset items (dicts with ``image`` [+ ``label``, ``caption``], ``(image, label)``
    pairs, or bare image tensors) into ``{"image", "label", "caption"}``; a missing label is -1."""
    images, labels, captions = [], [], []
    for it in items:
        if isinstance(it, dict):
            img, lab, cap = it["image"], it.get("label", -1), it.get("caption", "")
        elif isinstance(it, (tuple, list)):
            img, lab, cap = it[0], (it[1] if len(it) > 1 else -1), ""
        else:
            img, lab, cap = it, -1, ""
        images.append(img)
        labels.append(int(lab) if not isinstance(lab, torch.Tensor) else int(lab.item()))
        captions.append(cap if isinstance(cap, str) else "")
    return {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.long),
            "caption": captions}
