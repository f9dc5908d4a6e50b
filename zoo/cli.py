"""The ``arzoo`` command line (also ``python -m zoo``).

``arzoo list [PATTERN]``   the registry as a table: name, params, token kind/layout, paper
``arzoo info NAME``        one model: parameters, token spec, paper, weights, config
``arzoo demo``             the main job on the embedded Shapes default (see zoo/demo.py)
``arzoo train SCRIPT ...`` tokenizer | extract | generator (train/)
``arzoo sample ...``       sampling CLI (sample/)
``arzoo bench ...``        sampling benchmark (eval/bench.py)
``arzoo eval CMD ...``     fid | fid-job | geneval | recon | train-features (eval/cli.py)
``arzoo convert ...``      official LlamaGen / VAR / MAR / NAR checkpoints -> arzoo (zoo/convert/)
``arzoo export SRC DST``   copy a checkpoint (``--dtype float16`` for small shipped weights) and
                          write its model card (README.md, zoo/card.py)

A user error (bad argument, file or checkpoint) in any subcommand prints one line,
``arzoo <cmd>: <message>``, and exits with status 2; ``ARZOO_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _fmt_params(n) -> str:
    if n is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def _table(rows, headers) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def cmd_list(args) -> int:
    from zoo import registry

    names = registry.list_models(args.pattern, pretrained=args.pretrained)
    if not names:
        print(f"no registered model matches {args.pattern!r}")
        return 1
    rows = []
    for name in names:
        e = registry.entry(name)
        try:
            i = registry.info(name)
            params, spec = _fmt_params(i["params"]), i["spec"] or "-"
        except Exception as err:  # a broken entry must not hide the others
            params, spec = "?", f"error: {err}"
        rows.append([name, params, spec, ",".join(e.weights) or "-", (e.paper or "-")[:60]])
    print(_table(rows, ["name", "params", "tokens", "weights", "paper"]))
    return 0


def cmd_info(args) -> int:
    from zoo import registry

    i = registry.info(args.name)
    if args.json:
        print(json.dumps(i, indent=2, default=str))
        return 0
    print(f"{i['name']}  ({i['class']})")
    pp = f"  (paper: {_fmt_params(i['paper_params'])}, {100 * (i['params'] / i['paper_params'] - 1):+.1f}%)" \
        if i["paper_params"] else ""
    print(f"  params : {i['params']:,} = {_fmt_params(i['params'])}{pp}")
    print(f"  tokens : {i['spec'] or '-'}")
    print(f"  paper  : {i['paper'] or '-'}")
    if i["description"]:
        print(f"  about  : {i['description']}")
    print(f"  weights: {', '.join(f'{k} -> {v}' for k, v in i['weights'].items()) or 'none shipped'}")
    print("  config :")
    for k, v in i["config"].items():
        v = v.describe() if hasattr(v, "describe") else v
        print(f"    {k} = {v}")
    return 0


def _check_export_target(src: Path, dst: Path, overwrite: bool) -> None:
    from zoo.checkpoint import CONFIG_NAME

    if not dst.exists():
        return
    if not dst.is_dir():
        raise NotADirectoryError(f"{dst}: exists and is not a folder")
    # samefile also sees through symlinks and trailing slashes; in place would replace the source
    if src.exists() and os.path.samefile(src, dst):
        raise ValueError(f"{dst} is the source checkpoint {src}; export to a new folder")
    if any(dst.iterdir()) and not (dst / CONFIG_NAME).is_file() and not overwrite:
        raise FileExistsError(f"{dst}: not empty and not an arzoo checkpoint; pass --overwrite to write into it")


def cmd_export(args) -> int:
    import torch

    from zoo.checkpoint import load_pretrained

    _check_export_target(Path(args.src), Path(args.dst), args.overwrite)
    model = load_pretrained(args.src)
    if args.name:
        model.registry_name = args.name
    if args.trained_on:  # runs whose shards predate the recorded fingerprint
        from zoo.checkpoint import fingerprint
        from zoo.pipeline import load_model

        model.trained_on = {"name": args.trained_on, "fingerprint": fingerprint(load_model(args.trained_on, "tokenizer"))}
    dtype = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    model.save_pretrained(args.dst, dtype=dtype)
    from zoo.card import write_card

    write_card(model, args.dst, src=args.src)  # README.md: what the weights are, how they were made
    size = sum(p.stat().st_size for p in Path(args.dst).iterdir())
    print(f"exported {model.registry_name or type(model).__name__} ({model.num_params():,} params, "
          f"{args.dtype}) -> {args.dst} ({size / 1e6:.2f} MB)")
    return 0


PASSTHROUGH = {
    "demo": ("zoo.demo", "train (or load) the tiny models on Shapes and sample grids"),
    "train": ("train.__main__", "training scripts: tokenizer | extract | generator"),
    "sample": ("sample.cli", "sample images from a tokenizer + generator"),
    "bench": ("eval.bench", "sampling benchmark table"),
    "eval": ("eval.cli", "evaluation: fid | fid-job | geneval | recon | train-features"),
    "convert": ("zoo.convert", "convert an official checkpoint (LlamaGen, NAR, VAR, MVAR, MAR) to arzoo's format"),
}


def _take_imports(rest: list) -> tuple[list, list]:
    """Split ``--import MOD`` / ``--import=MOD`` out of a passthrough command's arguments."""
    imports, kept, it = [], [], iter(rest)
    for a in it:
        if a == "--import":
            mod = next(it, None)
            if mod is None:
                raise ValueError("--import needs a MODULE[:FUNC]")
            imports.append(mod)
        elif a.startswith("--import="):
            imports.append(a.split("=", 1)[1])
        else:
            kept.append(a)
    return imports, kept


def _run_passthrough(cmd: str, rest: list) -> int:
    import importlib

    if cmd != "train":  # the training scripts parse --import themselves (it is in their args.json)
        from zoo.registry import import_plugins

        imports, rest = _take_imports(rest)
        import_plugins(imports)
    return importlib.import_module(PASSTHROUGH[cmd][0]).main(rest) or 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arzoo", description="arzoo: autoregressive image tokenizers and generators")
    plugins = argparse.ArgumentParser(add_help=False)
    plugins.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE[:FUNC]",
                         help="import MODULE (and call FUNC()) first, e.g. to register your own models (repeatable)")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("list", help="list registered models", parents=[plugins])
    q.add_argument("pattern", nargs="?", default="*", help="shell-style wildcard, e.g. 'generator/*-tiny'")
    q.add_argument("--pretrained", action="store_true", help="only models with shipped weights")
    q.set_defaults(func=cmd_list)
    q = sub.add_parser("info", help="show one model", parents=[plugins])
    q.add_argument("name")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_info)
    q = sub.add_parser("export", help="copy a checkpoint folder, optionally storing float16 weights",
                       parents=[plugins])
    q.add_argument("src", help="checkpoint folder (config.json + model.safetensors)")
    q.add_argument("dst")
    q.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    q.add_argument("--name", help="registry name to record in config.json")
    q.add_argument("--trained-on", metavar="TOKENIZER",
                   help="record this tokenizer (name:tag or folder) as the one the generator was trained on")
    q.add_argument("--overwrite", action="store_true", help="write into a non-empty DST that is not a checkpoint")
    q.set_defaults(func=cmd_export)
    for name, (_, helptext) in PASSTHROUGH.items():
        # Listed for --help only: main() hands these commands their raw arguments.
        sub.add_parser(name, help=helptext, add_help=False)
    return p


def user_errors() -> tuple:
    """The exception types that mean "bad input" rather than a bug (printed as one line)."""
    from zoo.checkpoint import CheckpointError
    from zoo.errors import UserError
    from zoo.registry import UnknownModel
    from zoo.tokens import IncompatibleTokens

    return (UserError, CheckpointError, UnknownModel, IncompatibleTokens, ValueError, FileNotFoundError,
            FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return "; ".join(lines) or type(e).__name__


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv else ""
    try:
        if cmd in PASSTHROUGH:
            return _run_passthrough(cmd, argv[1:])
        args = build_parser().parse_args(argv)  # argparse errors exit here with their own message
        from zoo.registry import import_plugins
        import_plugins(args.imports)
        return args.func(args)
    except user_errors() as e:
        if os.environ.get("ARZOO_DEBUG", "") not in ("", "0"):
            raise
        print(f"arzoo {cmd}: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
