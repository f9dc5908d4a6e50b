"""``arzoo eval <command>``: evaluation jobs.

``arzoo eval fid INPUT --ref REF``     FID / IS / KID / precision-recall (eval/fid.py)
``arzoo eval fid-job ...``             sample N images in resumable shards, then measure (eval/fid_job.py)
``arzoo eval geneval ...``             GenEval protocol and Shapes-GenEval (eval/geneval.py)
``arzoo eval recon --tokenizer T``     PSNR, SSIM, rFID, codebook usage, timing, Shapes attribute
                                       agreement (eval/recon.py)
``arzoo eval semantic --tokenizer T``  linear-probe / 1-NN accuracy of token features on Shapes
                                       attributes (eval/semantic.py)
``arzoo eval train-features ...``      train the Shapes feature network (train/features.py)

With the default ``--features shapes-net`` the numbers are **Shapes-FID**: computed on the
shipped Shapes feature network, offline, and not comparable to Inception FID.
"""
from __future__ import annotations

import importlib
import sys

#: command -> (module with main(argv), one-line help)
COMMANDS = {
    "fid": ("eval.fid", "FID / IS / KID / precision-recall of images against a reference"),
    "fid-job": ("eval.fid_job", "resumable sampling job (class-balanced, sharded) + metrics report"),
    "geneval": ("eval.geneval", "GenEval protocol: score a sample folder, Shapes-GenEval prompts"),
    "recon": ("eval.recon", ("tokenizer reconstruction: PSNR, SSIM, rFID, codebook usage, timing, "
                             "Shapes attribute agreement")),
    "semantic": ("eval.semantic", "semantic score: linear probe and 1-NN on token features (Shapes)"),
    "train-features": ("train.features", "train the Shapes feature network (eval/shapes-net)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: arzoo eval {{{','.join(COMMANDS)}}} [args]\n\ncommands:\n{rows}\n\n" \
           f"`arzoo eval <command> --help` lists a command's options."


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip().split("\n\n")[0])
        print(usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"arzoo eval: unknown command {cmd!r}\n{usage()}", file=sys.stderr)
        return 2
    # Imported lazily: each command pulls in only what it needs (geneval is a separate module).
    module = importlib.import_module(COMMANDS[cmd][0])
    result = module.main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
