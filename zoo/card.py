"""Model cards: the ``README.md`` that ``arzoo export`` writes beside every checkpoint.

A card says what the weights are (registry name, class, parameters, token spec, paper), what
they were trained on (the tokenizer a generator learned, the training command and final
metrics when the source run left ``args.json`` / ``metrics.json``), where their measured numbers
live (checkpoints.md) and the license. It is front-matter YAML + Markdown, the layout the
Hugging Face Hub reads, so an exported folder can be pushed as it is.
"""
from __future__ import annotations

import json
from pathlib import Path

CARD_NAME = "README.md"
LICENSE = "apache-2.0"


def _run_files(src: Path) -> tuple[dict | None, dict | None]:
    """``metrics.json`` of the checkpoint folder and ``args.json`` of its run (``OUT/final`` ->
    ``OUT/args.json``), when present and readable."""
    def read(p: Path):
        try:
            return json.loads(p.read_text()) if p.is_file() else None
        except (OSError, json.JSONDecodeError):
            return None

    return read(src / "metrics.json"), read(src.parent / "args.json")


def _command(args: dict) -> str:
    script = {"generator": "generator", "tokenizer": "tokenizer"}.get(str(args.get("model", "")).split("/")[0], "")
    parts = [f"python -m train {script}".rstrip()]
    for k, v in args.items():
        # "set" is the raw --set list: the parsed "overrides" below say the same, one flag each
        if v in (None, False, [], "") or k in ("imports", "set", "overrides", "resume", "allow_changed",
                                               "tokens_identity"):
            continue
        flag = "--" + k.replace("_", "-")
        if k == "num_objects" and isinstance(v, (list, tuple)):  # stored as [min, max]; the flag reads MIN-MAX
            v = str(v[0]) if v[0] == v[-1] else f"{v[0]}-{v[-1]}"
        parts.append(flag if v is True else f"{flag} {v}")
    for k, v in (args.get("overrides") or {}).items():
        parts.append(f"--set {k}={json.dumps(v)}")
    return " \\\n  ".join(parts)


def model_card(model, src=None) -> str:
    """The card text for ``model`` (``src``: the folder it was loaded from, for its run files)."""
    from zoo import registry

    name = getattr(model, "registry_name", None) or type(model).__name__
    base = name.partition(":")[0]
    try:
        entry = registry.entry(base)
        paper, kind = entry.paper, entry.kind
    except KeyError:
        paper, kind = None, "model"
    spec = getattr(model, "spec", None)
    params = sum(p.numel() for p in model.parameters())
    lines = ["---", f"license: {LICENSE}", "library_name: arzoo", "tags:", "- arzoo", f"- {kind}",
             "- autoregressive-image-generation", "---", "", f"# {name}", ""]
    lines += [f"- **class**: `{type(model).__module__}.{type(model).__qualname__}`",
              f"- **parameters**: {params:,}"]
    if spec is not None:
        lines.append(f"- **tokens**: {spec.describe()}")
    if paper:
        lines.append(f"- **paper**: {paper}")
    trained_on = getattr(model, "trained_on", None)
    if trained_on:
        lines.append(f"- **trained on the tokens of**: `{trained_on.get('name')}` "
                     f"(fingerprint `{trained_on.get('fingerprint')}`; `Pipeline` refuses another tokenizer)")
    lines += ["", "## Use", "", "```python", "from zoo.checkpoint import load_pretrained",
              "model = load_pretrained(\"path/to/this/folder\")   # safetensors + JSON; never unpickles", "```", ""]
    metrics, args = _run_files(Path(src)) if src is not None else (None, None)
    if args:
        lines += ["## Training command", "", "```bash", _command(args), "```", ""]
    if metrics:
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) and not isinstance(v, bool)}
        lines += ["## Final metrics (`metrics.json` of the run)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in shown.items()]
        lines.append("")
    lines += ["## Measured numbers", "",
              "Tiny Shapes checkpoints are measured in arzoo's `checkpoints.md` (with the command for each "
              "number); Shapes numbers are not comparable to ImageNet numbers.", "",
              "## License", "", "Apache-2.0 (code and weights). The tiny checkpoints were trained only on arzoo's "
              "procedural Shapes data.", ""]
    return "\n".join(lines)


def write_card(model, directory, src=None) -> Path:
    path = Path(directory) / CARD_NAME
    path.write_text(model_card(model, src))
    return path
