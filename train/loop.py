"""The accelerate training loop shared by the training scripts.

The loop follows the accelerate conventions summarised in ``shared/reference/ecosystem.md``
§D.4: one :class:`accelerate.Accelerator` per run, gradient accumulation through
``accelerator.accumulate`` with optimizer steps counted on ``accelerator.sync_gradients``,
``save_state``/``load_state``, an EMA and a step counter registered for checkpointing, and
``skip_first_batches`` for exact resume. ``accelerate launch``'s settings (mixed precision,
gradient accumulation) win over the script's flags (:func:`make_accelerator`).

States are saved atomically (:meth:`Trainer.save`): ``save_state`` writes
``OUT/checkpoints/.tmp-checkpoint_N``, which is renamed to ``checkpoint_N`` only once every
process has written its part, and older states are rotated out (``--keep``) only after that.
So a run killed at any moment (even ``kill -9`` mid-save) leaves its last complete state, and
the next run resumes from it and removes the leftovers. A resume refuses to continue a run with
different arguments (``OUT/args.json``) unless ``--allow-changed``; every start is appended to
``OUT/args.history.jsonl``.

Exact resume rests on three facts:

* the data order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone
  (:class:`EpochSampler`), so a resumed run can rebuild it and skip the micro-batches the
  :class:`TrainState` says were already consumed;
* every micro-batch re-seeds the global RNGs from ``(seed, micro-batch index, rank)``
  (:func:`step_seed`), so dropout, masking orders or condition dropout do not depend on how
  many iterators or workers were created before it;
* optimizer, scheduler, EMA and counter states come back from the checkpoint.

So an interrupted run resumed from its last saved state ends at the same step with the same
weights as an uninterrupted one (bit-identical on CPU in one process; ``tests/test_train.py``).

``--batch-size`` is the *global* batch of one optimizer step: it is divided by
``--grad-accum`` into micro-batches, and each micro-batch is split across processes
(``DataLoaderConfiguration(split_batches=True)``), so 1 and N processes see the same samples
in the same steps.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from train.common import json_safe, write_json
from train.runs import _CKPT, _OLD, _TMP, _remove_leftovers, changed_args, list_states, make_accelerator  # noqa: F401

# ----------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------


def step_seed(*parts) -> int:
    """A 63-bit seed that depends on every part (stable across runs and platforms)."""
    h = hashlib.blake2b("/".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class EpochSampler(Sampler):
    """A permutation of ``range(n)`` drawn from ``(seed, epoch)`` alone.

    Set ``sampler.epoch`` before iterating. (Deliberately no ``set_epoch`` method: accelerate
    would call it with its own iteration count, which restarts at 0 after a resume.)
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = int(n), int(seed), shuffle, 0

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(step_seed(self.seed, self.epoch, 0x5A))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


# ----------------------------------------------------------------------------------------
# checkpointed objects
# ----------------------------------------------------------------------------------------


class TrainState:
    """Counters saved with every resumable state (``register_for_checkpointing``).

    ``step``: optimizer steps done; ``micro``: micro-batches consumed in all; ``epoch`` and
    ``batch_in_epoch``: where the data order stands (micro-batches of this epoch consumed).
    """

    def __init__(self):
        self.step = self.micro = self.epoch = self.batch_in_epoch = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "micro": self.micro, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        for k in ("step", "micro", "epoch", "batch_in_epoch"):
            setattr(self, k, int(state[k]))


class EMA:
    """Exponential moving average of a model's floating-point state (weights and float buffers).

    ``shadow = decay * shadow + (1 - decay) * current`` after every optimizer step, kept in
    float32 (as in DiT / LlamaGen training); integer buffers are taken from the live model at
    export. Checkpointed with ``accelerator.register_for_checkpointing``.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()
                       if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        for k, v in model.state_dict().items():
            s = self.shadow.get(k)
            if s is not None:
                s.lerp_(v.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> torch.nn.Module:
        state = model.state_dict()
        for k, s in self.shadow.items():
            state[k].copy_(s.to(state[k].dtype))
        return model

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not fit the model: differing tensors {sorted(missing)[:5]}")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


def lr_lambda(warmup: int, total: int, schedule: str = "constant", min_ratio: float = 0.0):
    """LR multiplier for optimizer step ``s`` (0-based): linear warmup, then constant or cosine."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr schedule must be 'constant' or 'cosine', got {schedule!r}")

    def fn(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """Decay >=2-D weights only (biases, norm gains and 1-D tables are not decayed), and
    nothing the model lists in ``no_weight_decay()`` (timm convention)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return groups


# ----------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------


class Trainer:
    """The shared training loop (see the module docstring for the resume guarantees).

    ::

        acc = make_accelerator(args); seed_all(args.seed)
        model = build_model(...)
        trainer = Trainer(args, acc, model, dataset, collate_fn=...)
        trainer.prepare()                       # (optionally trainer.add_aux(disc) before)
        trainer.fit(lambda batch: {"loss": ...})
        trainer.finish(metrics_fn)              # final/ (+ final-raw/), final/metrics.json

    ``step_fn(batch)`` returns a dict of scalars; ``"loss"`` is back-propagated through the
    main model and ``"aux_loss"`` (if an auxiliary model was added) through the auxiliary one;
    every entry is averaged over the log window and across processes into ``log.jsonl``.
    """

    def __init__(self, args, accelerator, model: torch.nn.Module, dataset: Dataset, *,
                 collate_fn=None, name: str = "train"):
        self.args, self.accelerator, self.name = args, accelerator, name
        self.out = Path(args.out)
        acc = accelerator
        self.micro_global = args.batch_size // args.grad_accum
        if self.micro_global % acc.num_processes:
            raise SystemExit(f"--batch-size {args.batch_size} / --grad-accum {args.grad_accum} = "
                             f"{self.micro_global} samples per micro-batch does not split over "
                             f"{acc.num_processes} processes")
        if len(dataset) < self.micro_global:
            raise SystemExit(f"the dataset has {len(dataset)} items, fewer than one micro-batch "
                             f"({self.micro_global}); lower --batch-size or add data")
        self.sampler = EpochSampler(len(dataset), args.seed)
        self.loader = DataLoader(dataset, batch_size=self.micro_global, sampler=self.sampler,
                                 drop_last=True, num_workers=args.num_workers, collate_fn=collate_fn,
                                 generator=torch.Generator().manual_seed(args.seed),
                                 persistent_workers=False)
        self.model = model
        self.optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                           betas=(args.beta1, args.beta2))
        self._lr_fn = lr_lambda(args.warmup, args.steps, args.lr_schedule, args.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_fn)
        self.aux = None  # (module, optimizer, scheduler)
        self.ema: EMA | None = None
        self.state = TrainState()
        self.last_log: dict = {}
        self._last_saved = -1
        self._prepared = False

    # -- setup -------------------------------------------------------------------------
    def add_aux(self, module: torch.nn.Module, lr: float | None = None, betas=None) -> None:
        """A second model trained alongside (a discriminator), from ``step_fn``'s ``"aux_loss"``."""
        if self._prepared:
            raise RuntimeError("add_aux must be called before prepare()")
        a = self.args
        opt = torch.optim.AdamW(param_groups(module, a.weight_decay), lr=lr or a.lr,
                                betas=betas or (a.beta1, a.beta2))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(a.warmup, a.steps, a.lr_schedule, a.min_lr_ratio))
        self.aux = [module, opt, sched]

    def prepare(self) -> "Trainer":
        acc = self.accelerator
        if self.aux is None:
            self.model, self.optimizer, self.loader, self.scheduler = acc.prepare(
                self.model, self.optimizer, self.loader, self.scheduler)
        else:
            (self.model, self.optimizer, self.loader, self.scheduler,
             *self.aux) = acc.prepare(self.model, self.optimizer, self.loader, self.scheduler, *self.aux)
        acc.register_for_checkpointing(self.state)
        if self.args.ema > 0:
            self.ema = EMA(self.unwrapped, self.args.ema)
            acc.register_for_checkpointing(self.ema)
        self._prepared = True
        changed = self._resume()
        if acc.is_main_process:
            self._record_args(changed)
        return self

    def _args_now(self) -> dict:
        return json.loads(json.dumps(json_safe(vars(self.args))))

    def _check_args(self) -> list[str]:
        """Before resuming: the arguments that differ from ``OUT/args.json`` (refused unless
        ``--allow-changed``)."""
        path = self.out / "args.json"
        if not path.is_file():
            return []
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not valid JSON ({e}); fix or remove it to resume") from e
        changed = changed_args(old, self._args_now())
        if changed and not getattr(self.args, "allow_changed", False):
            raise SystemExit(f"{path}: resuming this run with different arguments; pass --allow-changed "
                             f"to continue anyway, or choose another --out:\n  " + "\n  ".join(changed))
        return changed

    def _record_args(self, changed: list[str]) -> None:
        # args.json: the arguments now in force; args.history.jsonl: every start, with what changed
        now = self._args_now()
        write_json(self.out / "args.json", now)
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": self.state.step, "changed": changed,
               "args": now}
        with open(self.out / "args.history.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _resume(self) -> list[str]:
        """Load the state to resume from, if any; returns the arguments that changed."""
        acc, mode = self.accelerator, str(self.args.resume)
        states = list_states(self.out)
        if mode.lower() in ("no", "never", "false", "0"):
            if states:
                raise SystemExit(f"{self.out} already holds resumable states ({states[-1].name}); pass "
                                 "--resume auto to continue that run, or choose another --out")
            return []
        if mode.lower() == "auto":
            if not states:
                return []
            path = states[-1]
        else:
            path = Path(mode)
            if not path.is_dir():
                raise SystemExit(f"--resume {mode}: not a folder (expected OUT/checkpoints/checkpoint_N)")
            if path.name.startswith((_TMP, _OLD)):
                raise SystemExit(f"--resume {mode}: an incomplete state (a save or rotation was interrupted)")
        changed = self._check_args()
        acc.wait_for_everyone()  # every process has listed the states before leftovers go
        if acc.is_main_process:
            gone = _remove_leftovers(self.out)
            if gone:
                acc.print(f"[{self.name}] removed incomplete state(s) left by an interrupted run: {', '.join(gone)}")
        acc.load_state(str(path))
        self._last_saved = self.state.step
        acc.print(f"[{self.name}] resumed from {path} at step {self.state.step} "
                  f"(epoch {self.state.epoch}, micro-batch {self.state.batch_in_epoch})")
        for line in changed:
            acc.print(f"[{self.name}] --allow-changed: {line}")
        if acc.is_main_process:
            self._truncate_log(self.state.step)
        return changed

    def _truncate_log(self, step: int) -> None:
        # an interrupted run may have logged steps past its last saved state; they are redone
        log = self.out / "log.jsonl"
        if not log.is_file():
            return
        keep = []
        for ln in log.read_text().splitlines():
            try:
                if json.loads(ln).get("step", 0) <= step:
                    keep.append(ln)
            except (json.JSONDecodeError, AttributeError):
                pass  # a line cut short by the interruption
        log.write_text("".join(ln + "\n" for ln in keep))

    def save(self) -> None:
        """Save a resumable state as ``OUT/checkpoints/checkpoint_N`` atomically: written under
        a temporary name, renamed once complete, and only then are states beyond ``--keep``
        removed (so even ``--keep 1`` always leaves one complete state on disk)."""
        acc = self.accelerator
        root = self.out / "checkpoints"
        states = list_states(self.out)
        n = int(_CKPT.match(states[-1].name).group(1)) + 1 if states else 0
        final, tmp = root / f"checkpoint_{n}", root / f"{_TMP}checkpoint_{n}"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)  # left by a save that was interrupted
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()  # every process has written its part (e.g. its RNG state)
        if acc.is_main_process:
            os.replace(tmp, final)  # the commit: only complete states carry a checkpoint_N name
            if self.args.keep > 0:
                for old in list_states(self.out)[:-self.args.keep]:
                    # renamed first, so a rotation cut short never leaves a half-deleted checkpoint_N
                    trash = old.with_name(_OLD + old.name)
                    os.replace(old, trash)
                    shutil.rmtree(trash)
        acc.wait_for_everyone()
        self._last_saved = self.state.step

    # -- training ----------------------------------------------------------------------
    def fit(self, step_fn: Callable[[dict], dict]) -> TrainState:
        from tqdm.auto import tqdm

        if not self._prepared:
            self.prepare()
        acc, args, st = self.accelerator, self.args, self.state
        models = [self.model] + ([self.aux[0]] if self.aux else [])
        n_batches = len(self.loader)
        if st.batch_in_epoch >= n_batches:
            # saved by a run with more micro-batches per epoch (smaller batch, more data): the rest
            # of that epoch does not exist here, so go on with the next one (skipping every batch
            # of this epoch would loop forever)
            acc.print(f"[{self.name}] the resumed position (micro-batch {st.batch_in_epoch} of epoch {st.epoch}) "
                      f"is past this run's {n_batches} micro-batches per epoch; continuing at epoch {st.epoch + 1}")
            st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        window: dict = defaultdict(list)
        bar = tqdm(total=args.steps, initial=min(st.step, args.steps), desc=self.name,
                   disable=not acc.is_main_process, dynamic_ncols=True)
        t0 = time.time()
        limit_s = 60.0 * (getattr(args, "time_limit", 0.0) or 0.0)
        self.stopped_at_time_limit = False
        while st.step < args.steps and not self.stopped_at_time_limit:
            self.sampler.epoch = st.epoch
            loader = self.loader
            if st.batch_in_epoch:
                loader = acc.skip_first_batches(self.loader, st.batch_in_epoch)
            empty = True
            for batch in loader:
                empty = False
                # randomness inside the step depends only on (seed, micro-batch, rank): exact resume
                seed_all(step_seed(args.seed, st.micro, acc.process_index))
                with acc.accumulate(*models):
                    with acc.autocast():
                        out = step_fn(batch)
                    if "loss" not in out:
                        raise KeyError(f"step_fn must return a dict with 'loss', got keys {sorted(out)}")
                    total = out["loss"]
                    if "aux_loss" in out:
                        if self.aux is None:
                            raise RuntimeError("step_fn returned 'aux_loss' but no auxiliary model was added")
                        total = total + out["aux_loss"]
                    acc.backward(total)
                    if acc.sync_gradients and args.grad_clip > 0:
                        gn = acc.clip_grad_norm_(self.model.parameters(), args.grad_clip)
                        out = {**out, "grad_norm": gn}
                        if self.aux is not None:
                            acc.clip_grad_norm_(self.aux[0].parameters(), args.grad_clip)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.aux is not None:
                        self.aux[1].step()
                        self.aux[2].step()
                        self.aux[1].zero_grad(set_to_none=True)
                for k, v in out.items():
                    if isinstance(v, (torch.Tensor, float, int)) and not isinstance(v, bool):
                        v = torch.as_tensor(v).detach().float()
                        if v.numel() == 1:
                            window[k].append(v.reshape(()).to(acc.device))
                st.micro += 1
                st.batch_in_epoch += 1
                if st.batch_in_epoch >= n_batches:
                    st.epoch, st.batch_in_epoch = st.epoch + 1, 0
                if not acc.sync_gradients:
                    continue
                st.step += 1
                if self.ema is not None:
                    self.ema.update(self.unwrapped)
                bar.update(1)
                if st.step % args.log_every == 0 or st.step == args.steps:
                    self._log(window, t0)
                    window = defaultdict(list)
                    if acc.is_main_process:
                        bar.set_postfix(loss=f"{self.last_log.get('loss', float('nan')):.4f}")
                if args.save_every > 0 and st.step % args.save_every == 0:
                    self.save()
                if st.step >= args.steps:
                    break
                if limit_s > 0 and self._past(t0 + limit_s):
                    self.stopped_at_time_limit = True
                    acc.print(f"[{self.name}] --time-limit {args.time_limit:g} min reached at step {st.step}; "
                              f"the same command resumes from here")
                    break
            if empty:
                raise RuntimeError(f"epoch {st.epoch} yielded no batch from micro-batch {st.batch_in_epoch} on "
                                   f"({n_batches} per epoch); refusing to loop forever")
        bar.close()
        return st

    def _past(self, deadline: float) -> bool:
        """Whether ``deadline`` has passed, decided alike on every process (rank clocks and step
        times differ; one rank stopping alone would hang the others at the next collective)."""
        past = time.time() > deadline
        if self.accelerator.num_processes > 1:
            flag = torch.tensor(float(past), device=self.accelerator.device)
            past = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        return past

    def _log(self, window: dict, t0: float) -> None:
        acc, st = self.accelerator, self.state
        keys = sorted(window)
        if keys:
            vec = torch.stack([torch.stack(window[k]).mean() for k in keys])
            vec = acc.reduce(vec, reduction="mean") if acc.num_processes > 1 else vec
            vals = dict(zip(keys, vec.tolist()))
        else:
            vals = {}
        # the LR the last optimizer step used (the scheduler already points at the next one)
        rec = {"step": st.step, "epoch": st.epoch, "lr": self.args.lr * self._lr_fn(st.step - 1),
               **vals, "samples": st.step * self.args.batch_size, "elapsed_s": round(time.time() - t0, 3)}
        self.last_log = rec
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(json_safe(rec)) + "\n")

    # -- export ------------------------------------------------------------------------
    def finish(self, metrics_fn: Callable[[torch.nn.Module], dict] | None = None) -> dict:
        """Save a last resumable state, export ``final/`` (EMA weights if on; then the raw ones
        go to ``final-raw/``) and write ``final/metrics.json`` with ``metrics_fn(exported)``."""
        acc, st = self.accelerator, self.state
        acc.wait_for_everyone()
        if self._last_saved != st.step:
            self.save()  # so a later run with a larger --steps continues from here
        raw = acc.unwrap_model(self.model, keep_fp32_wrapper=False)
        metrics: dict = {}
        if acc.is_main_process:
            export = raw
            if self.ema is not None:
                raw.save_pretrained(self.out / "final-raw")
                export = self.ema.copy_to(copy.deepcopy(raw))
            export.save_pretrained(self.out / "final")
            metrics = {"step": st.step, "epoch": st.epoch, "num_processes": acc.num_processes,
                       "ema": self.args.ema, "last_log": self.last_log}
            if metrics_fn is not None:
                was = export.training
                export.eval()
                metrics.update(metrics_fn(export))
                export.train(was)
            write_json(self.out / "final" / "metrics.json", metrics)
            acc.print(json.dumps(json_safe({k: v for k, v in metrics.items() if k != "last_log"}), indent=2))
        acc.wait_for_everyone()
        acc.end_training()
        return metrics
