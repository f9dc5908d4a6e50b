"""zoo.convert: the shared part (loading official files safely, finding converters, the CLI)."""
import pytest
import torch
from safetensors.torch import save_file

from zoo import convert
from zoo.cli import main as arzoo


class Payload:
    """Stands for any object a pickle could rebuild (and run code while doing so)."""


def test_pickled_objects_are_refused(tmp_path):
    # a .pt whose pickle holds a non-tensor object: torch.load(weights_only=True) must refuse it
    p = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "obj": Payload()}, p)
    with pytest.raises(ValueError, match="weights_only=True"):
        convert.load_source(p)


def test_tensors_load_from_pt_and_safetensors(tmp_path):
    import argparse

    # LlamaGen / NAR save their argparse.Namespace beside the weights: plain data, allowed
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "a.pth")
    assert torch.equal(convert.unwrap(convert.load_source(tmp_path / "a.pth"))["w"], torch.ones(2))
    save_file({"w": torch.zeros(3)}, str(tmp_path / "b.safetensors"))
    assert convert.load_source(tmp_path / "b.safetensors")["w"].shape == (3,)
    with pytest.raises(FileNotFoundError):
        convert.load_source(tmp_path / "missing.pt")


def test_unknown_converter_and_cli_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="no 'var' converter for 'tokenizer/nope'"):
        convert.find("var", "tokenizer/nope")
    assert arzoo(["convert", "--from", "var", str(tmp_path / "x.pth"), "--model", "generator/var-d16",
                  "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
