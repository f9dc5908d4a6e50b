"""``python -m train <script> [flags]`` (and ``arzoo train <script> ...``): run one training script.

Scripts: ``tokenizer`` (train a tokenizer), ``extract`` (encode images to token shards),
``generator`` (train a generator on token shards). ``python -m train <script> --help`` lists
a script's flags.
"""
from __future__ import annotations

import importlib
import sys

from train import SCRIPTS


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        print(f"\nusage: python -m train {{{','.join(SCRIPTS)}}} [flags]")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SCRIPTS:
        print(f"unknown training script {name!r}; expected one of: {', '.join(SCRIPTS)}", file=sys.stderr)
        return 2
    importlib.import_module(f"train.{name}").main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
