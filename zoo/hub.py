"""Checkpoints on the Hugging Face Hub: ``hf-hub:ORG/REPO[@REVISION]``.

A Hub repository holding an arzoo checkpoint folder (``config.json`` + ``model.safetensors``,
plus the ``README.md`` model card) loads like a local folder:

    zoo.create("hf-hub:ORG/REPO")                 # or ...@v1 / @<commit>
    zoo.pipeline.Pipeline.load("hf-hub:ORG/TOK", "hf-hub:ORG/GEN")
    RasterAR.from_pretrained("hf-hub:ORG/REPO")

Only those three files are downloaded (never ``*.bin`` / ``*.pt`` pickles), into
huggingface_hub's cache; with ``HF_HUB_OFFLINE=1`` (or no network) a cached snapshot is used.
:func:`push_to_hub` uploads a model as such a folder, card included.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

PREFIX = "hf-hub:"
FILES = ("config.json", "model.safetensors", "README.md")


def is_hub_ref(source) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def parse_ref(source: str) -> tuple[str, str | None]:
    """``"hf-hub:ORG/REPO@rev"`` -> ``("ORG/REPO", "rev")``."""
    ref = source[len(PREFIX):] if source.startswith(PREFIX) else source
    repo, _, rev = ref.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{source!r}: expected hf-hub:ORG/REPO or hf-hub:ORG/REPO@REVISION")
    return repo, rev or None


def download(source: str) -> Path:
    """The local snapshot folder of ``hf-hub:ORG/REPO[@REV]`` (downloaded or from the cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, rev = parse_ref(source)
    try:
        return Path(snapshot_download(repo, revision=rev, allow_patterns=list(FILES)))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"{source}: not in the local Hugging Face cache and the Hub cannot be reached "
                                f"({e.__class__.__name__})") from e


def load(source: str, map_location="cpu"):
    from zoo.checkpoint import load_pretrained

    model = load_pretrained(download(source), map_location=map_location)
    model.pretrained_source = source
    return model


def push_to_hub(model, repo_id: str, *, dtype=None, private: bool = False, commit_message: str | None = None,
                token: str | None = None) -> str:
    """Upload ``model`` as an arzoo checkpoint folder (+ model card) to ``repo_id``; returns the
    commit URL. Needs network access and a Hub token."""
    from huggingface_hub import HfApi

    from zoo.card import write_card

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, dtype=dtype)
        write_card(model, d, src=getattr(model, "pretrained_source", None)
                   if not is_hub_ref(getattr(model, "pretrained_source", None)) else None)
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=d, repo_id=repo_id, allow_patterns=list(FILES),
                                 commit_message=commit_message or f"arzoo: {model.registry_name or type(model).__name__}")
    return str(getattr(info, "commit_url", info))
