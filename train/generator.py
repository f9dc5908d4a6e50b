"""Train a registered AR generator on extracted token shards.

::

    python -m train.generator --model generator/raster-ar-tiny --tokens runs/tok --out runs/ar
    accelerate launch --multi_gpu --num_processes 2 -m train.generator ...   # 2 processes (gloo without a GPU)

The generator is built as ``zoo.create(model, spec=<the shards' TokenSpec>, **--set)`` and
trained on ``model.loss(Tokens, Condition(labels, text))``; ``--cond`` picks which parts of
the condition are passed (``both`` passes both; condition dropout for classifier-free
guidance is the generator's own business, as in LlamaGen, Sun et al. 2024, §2.2).

At the end ``final/metrics.json`` holds the last logged training loss and the loss of the
exported (EMA, if on) weights on ``--eval-samples`` rows of ``--eval-tokens`` (default: the
first rows of the training shards), with a fixed seed.

The shards are checked when they are opened (see :mod:`train.extract`); the tokenizer they
record (``meta.json``: name and fingerprint) is written into every exported checkpoint's
``config.json`` as ``"tokenizer"``, so a pipeline can tell which tokenizer the generator
learned.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch
from torch.utils.data import DataLoader, Subset

from generators.base import Condition
from train.common import add_common_args, apply_init, build_model, parse_args
from train.loop import Trainer, make_accelerator, seed_all, step_seed
from train.extract import TokenShardDataset, TokenShardError, to_tokens

CONDS = ("class", "text", "both")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.generator", description=__doc__.split("\n")[0])
    add_common_args(p, steps=50000, batch_size=64, lr=1e-4, warmup=1000, weight_decay=0.05)
    g = p.add_argument_group("data")
    g.add_argument("--tokens", help="folder written by `python -m train.extract` (required)")
    g.add_argument("--cond", choices=CONDS, default="class", help="which condition the generator gets")
    g.add_argument("--eval-tokens", default=None, help="held-out token folder (default: --tokens)")
    g.add_argument("--eval-samples", type=int, default=512, help="rows measured at the end")
    g.add_argument("--eval-batch-size", type=int, default=64)
    return p


def make_condition(labels: torch.Tensor, text: torch.Tensor, cond: str) -> Condition:
    if cond not in CONDS:
        raise ValueError(f"cond must be one of {CONDS}, got {cond!r}")
    return Condition(labels if cond in ("class", "both") else None,
                     text if cond in ("text", "both") else None)


def _check_condition_sizes(model, data: TokenShardDataset, cond: str, name: str) -> None:
    """Fail early when the shards' labels / words do not fit the generator's tables."""
    cfg = getattr(model, "config", {}) or {}
    nc, meta_nc = cfg.get("num_classes"), data.meta.get("num_classes")
    if cond in ("class", "both") and nc and meta_nc and meta_nc > nc:
        raise SystemExit(f"the tokens have {meta_nc} classes but {name} was built with num_classes={nc}; "
                         f"pass --set num_classes={meta_nc}")
    tv, meta_tv = cfg.get("text_vocab_size"), data.meta.get("text_vocab_size")
    if cond in ("text", "both") and tv and meta_tv and meta_tv > tv:
        raise SystemExit(f"the captions use {meta_tv} word ids but {name} was built with "
                         f"text_vocab_size={tv}; pass --set text_vocab_size={meta_tv}")


def open_tokens(root, flag: str = "--tokens") -> TokenShardDataset:
    """:class:`TokenShardDataset` of ``root``, checked; a bad folder exits naming the file."""
    try:
        return TokenShardDataset(root)
    except (TokenShardError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{flag} {root}: {e}") from e


def trained_on(data: TokenShardDataset) -> dict | None:
    """``{"name", "fingerprint"}`` of the tokenizer the shards were extracted with (None for
    shards written before extraction recorded it)."""
    tok = data.meta.get("tokenizer") or {}
    if not isinstance(tok, dict) or not isinstance(tok.get("fingerprint"), str):
        return None
    name, tag = tok.get("name"), tok.get("tag")
    if isinstance(name, str) and isinstance(tag, str) and tag:
        name = f"{name}:{tag}"  # the shipped weights, not a fresh model of that name
    return {"name": name if isinstance(name, str) else None, "fingerprint": tok["fingerprint"]}


def shard_tokenizer(data: TokenShardDataset):
    """The tokenizer the shards were extracted with (``meta.json``: its checkpoint path or
    registry ``name:tag``), checked against the recorded fingerprint. For generators that
    take fixed tensors from their tokenizer (VAR/MVAR: codebook and φ, ``attach_tokenizer``)."""
    from zoo.checkpoint import fingerprint
    from zoo.pipeline import load_model

    src = data.meta.get("tokenizer") or {}
    ref = src.get("path") or src.get("ref") if isinstance(src, dict) else None
    if not ref:
        raise SystemExit(f"--tokens {data.root}: meta.json does not say which tokenizer made the shards; "
                         "re-extract them with this arzoo (`train extract --overwrite`)")
    tok = load_model(ref, "tokenizer")
    want = (trained_on(data) or {}).get("fingerprint")
    if want and fingerprint(tok) != want:
        raise SystemExit(f"--tokens {data.root}: the tokenizer {ref} now has fingerprint {fingerprint(tok)}, but the "
                         f"shards were extracted with {want}; re-extract them")
    return tok


def latent_sample(data: TokenShardDataset, rows: int = 4096) -> torch.Tensor:
    """The first ``rows`` token rows (deterministic), for ``fit_latent_stats``; on a resume the
    fitted statistics come back with the state anyway."""
    n = min(rows, len(data))
    return torch.stack([torch.as_tensor(data[i][0]) for i in range(n)]).float()


@torch.no_grad()
def evaluate(model, dataset: TokenShardDataset, *, cond: str, num: int, batch_size: int, seed: int,
             device) -> dict:
    """Mean of every scalar ``model.loss`` returns over the first ``num`` rows (fixed seed)."""
    n = min(num, len(dataset))
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size)
    seed_all(step_seed(seed, 0xE7A1))
    sums, count = defaultdict(float), 0
    for data, labels, text in loader:
        tokens = to_tokens(data.to(device), dataset.spec)
        out = model.loss(tokens, make_condition(labels.to(device), text.to(device), cond))
        b = data.shape[0]
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                sums[k] += float(v) * b
        count += b
    return {f"eval_{k}": v / max(count, 1) for k, v in sums.items()} | {"eval_samples": count}


def main(argv=None) -> dict:
    parser = build_parser()
    args = parse_args(parser, argv, required=("out", "tokens", "model"))
    acc = make_accelerator(args)
    data = open_tokens(args.tokens)
    seed_all(args.seed)
    model = build_model(args.model, args.overrides, spec=data.spec)
    if getattr(model, "spec", None) != data.spec:
        raise SystemExit(f"{args.model} reports spec {getattr(model, 'spec', None)} after being built for "
                         f"{data.spec.describe()}")
    _check_condition_sizes(model, data, args.cond, args.model)
    if hasattr(model, "attach_tokenizer"):  # e.g. VAR's f̂ from the tokenizer's frozen codebook + φ
        model.attach_tokenizer(shard_tokenizer(data))
    if hasattr(model, "fit_latent_stats") and data.spec.kind == "continuous":  # generators.latent_norm
        model.fit_latent_stats(latent_sample(data))
    apply_init(args, acc, model, "generator")  # after the fitted statistics: the folder's own win
    # recorded in every exported config.json (final/, final-raw/) as "tokenizer"
    model.trained_on = trained_on(data)
    # what the tokens are, not just where: a resume refuses a re-extracted folder (args.json)
    args.tokens_identity = {"spec": data.spec.describe(), "rows": len(data),
                            "tokenizer": (model.trained_on or {}).get("fingerprint")}
    trainer = Trainer(args, acc, model, data, name="generator")
    trainer.prepare()
    spec = data.spec

    def step_fn(batch):
        tok, labels, text = batch
        # rows were validated against the spec when written; skip the per-step min/max scan
        return trainer.model(to_tokens(tok, spec, validate=False), make_condition(labels, text, args.cond))

    trainer.fit(step_fn)

    def metrics_fn(export):
        eval_data = open_tokens(args.eval_tokens, "--eval-tokens") if args.eval_tokens else data
        if eval_data.spec != spec:
            raise SystemExit(f"--eval-tokens {args.eval_tokens} holds {eval_data.spec.describe()}, "
                             f"not {spec.describe()}")
        m = evaluate(export, eval_data, cond=args.cond, num=args.eval_samples, batch_size=args.eval_batch_size,
                     seed=args.seed, device=acc.device)
        m["train_loss"] = trainer.last_log.get("loss")
        m["eval_tokens"] = str(args.eval_tokens or args.tokens)
        m["cond"] = args.cond
        m["spec"] = spec.describe()
        return m

    return trainer.finish(metrics_fn)


if __name__ == "__main__":
    main(sys.argv[1:])
