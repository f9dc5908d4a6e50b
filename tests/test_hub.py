"""hf-hub:ORG/REPO checkpoints (zoo/hub.py), offline from a local Hugging Face cache."""
import shutil

import pytest
import torch

import zoo
from zoo import hub
from zoo.pipeline import load_model

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding org/vq (a saved, perturbed vq-tiny); offline."""
    import huggingface_hub.constants as C

    cache = tmp_path / "hf"
    snap = cache / "models--org--vq" / "snapshots" / REV
    tok = zoo.create("tokenizer/vq-tiny")
    with torch.no_grad():
        next(tok.parameters()).add_(1.0)  # differs from a fresh init
    tok.save_pretrained(snap)
    (cache / "models--org--vq" / "refs").mkdir(parents=True)
    (cache / "models--org--vq" / "refs" / "main").write_text(REV)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    return tok


def test_create_and_load_from_the_hub_cache(hub_cache):
    for m in (zoo.create("hf-hub:org/vq"), zoo.create(f"hf-hub:org/vq@{REV}"),
              load_model("hf-hub:org/vq", "tokenizer"), type(hub_cache).from_pretrained("hf-hub:org/vq")):
        assert m.registry_name == "tokenizer/vq-tiny" and m.pretrained_source.startswith("hf-hub:org/vq")
        for a, b in zip(m.state_dict().values(), hub_cache.state_dict().values()):
            assert torch.equal(a, b)


def test_hub_errors_are_clear(hub_cache):
    with pytest.raises(FileNotFoundError, match="hf-hub:org/missing: not in the local Hugging Face cache"):
        zoo.create("hf-hub:org/missing")
    with pytest.raises(ValueError, match="expected hf-hub:ORG/REPO"):
        zoo.create("hf-hub:noslash")
    with pytest.raises(ValueError, match="no overrides"):
        zoo.create("hf-hub:org/vq", ch=8)


def test_push_to_hub_uploads_the_checkpoint_folder(monkeypatch, tmp_path):
    import huggingface_hub

    seen = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            seen["repo"] = repo_id

        def upload_folder(self, folder_path, repo_id, allow_patterns, commit_message):
            seen["files"] = sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())
            shutil.copytree(folder_path, tmp_path / "up")
            return "https://example.invalid/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    g = zoo.create("generator/nar-tiny", pretrained="shapes")
    assert g.push_to_hub("me/nar") == "https://example.invalid/commit/1"
    assert seen["repo"] == "me/nar" and seen["files"] == ["README.md", "config.json", "model.safetensors"]
    assert zoo.checkpoint.load_pretrained(tmp_path / "up").trained_on == g.trained_on
