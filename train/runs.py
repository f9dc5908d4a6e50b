"""What a training run keeps outside the loop: the Accelerator built with ``accelerate
launch``'s settings winning over the script's flags, and the run folder's resumable states
(``OUT/checkpoints/checkpoint_N``, written under a temporary name and renamed when complete;
:meth:`train.loop.Trainer.save`) and the argument check on resume."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from train.common import RESUME_MAY_CHANGE, has_accelerator


#: (environment variable accelerate's launcher / config sets, args attribute, flag, parser)
LAUNCHER_SETTINGS = (("ACCELERATE_MIXED_PRECISION", "mixed_precision", "--mixed-precision", str.lower),
                     ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "grad_accum", "--grad-accum", int))


def apply_launcher_settings(args) -> list[str]:
    """Let ``accelerate launch`` (its flags or config file, passed on as environment variables)
    win over the script's ``--mixed-precision`` / ``--grad-accum``, which are only defaults.

    Updates ``args`` (so the loop's micro-batch size and ``args.json`` agree with the
    Accelerator) and returns one line per flag the launcher overrode.
    """
    notes = []
    for env, dest, flag, conv in LAUNCHER_SETTINGS:
        raw = os.environ.get(env, "").strip()
        if not raw:
            continue
        try:
            value = conv(raw)
        except ValueError:
            raise SystemExit(f"{env}={raw!r}: not a valid value for {flag}") from None
        if value != getattr(args, dest):
            notes.append(f"{env}={value} (accelerate launch / config) wins over {flag} {getattr(args, dest)}")
            setattr(args, dest, value)
    if args.grad_accum < 1 or args.batch_size % args.grad_accum:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the gradient accumulation "
                         f"steps {args.grad_accum} (>= 1)")
    return notes


def make_accelerator(args):
    """The run's Accelerator, with the launcher's settings applied (:func:`apply_launcher_settings`).

    On a machine without a GPU it is built with ``cpu=True``, so that ``accelerate launch
    --multi_gpu --num_processes N`` starts N gloo processes instead of N unrelated single runs.
    """
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration

    notes = apply_launcher_settings(args)
    acc = Accelerator(
        gradient_accumulation_steps=args.grad_accum,
        mixed_precision=args.mixed_precision,
        # states are named and rotated by Trainer.save (atomically), not by accelerate
        project_config=ProjectConfiguration(project_dir=str(Path(args.out))),
        # split_batches: --batch-size is global, so 1 and N processes take the same samples per step
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        # conditioning branches a run does not use (e.g. text under --cond class) get no grads
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        cpu=bool(getattr(args, "cpu", False)) or not has_accelerator(),
    )
    for line in notes:
        acc.print(f"[train] {line}")
    return acc


_CKPT = re.compile(r"checkpoint_(\d+)$")
#: prefixes of a state being written / being removed (never resumed from; cleaned up on resume)
_TMP, _OLD = ".tmp-", ".old-"


def list_states(out) -> list[Path]:
    """Complete resumable states under ``OUT/checkpoints``, oldest first (a state being written
    is named ``.tmp-checkpoint_N`` until it is complete, so it is never listed)."""
    d = Path(out) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def _remove_leftovers(out) -> list[str]:
    """Delete states an interrupted save or rotation left behind; returns their names."""
    d = Path(out) / "checkpoints"
    gone = []
    for p in sorted(d.iterdir()) if d.is_dir() else []:
        if p.is_dir() and p.name.startswith((_TMP, _OLD)):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


def changed_args(old: dict, new: dict) -> list[str]:
    """``["--lr: 0.001 -> 0.002", ...]``: arguments recorded in both that differ, except
    :data:`~train.common.RESUME_MAY_CHANGE` and ``--eval-*`` (``--set`` is compared parsed, as
    ``overrides``). Arguments one side does not record (flags added later) are not compared."""
    skip = set(RESUME_MAY_CHANGE) | {"set", "out"}
    return [f"--{k.replace('_', '-')}: {json.dumps(old[k])} -> {json.dumps(new[k])}"
            for k in sorted(set(old) & set(new))
            if k not in skip and not k.startswith("eval_") and old[k] != new[k]]
