"""Registry, checkpoints, CLI and torch.hub on toy entries (independent of the real models)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo
from toys import ToyGenerator, ToyTokenizer, toy_registry
from zoo import registry
from zoo.checkpoint import CheckpointError, load_pretrained
from zoo.tokens import TokenSpec

ROOT = Path(__file__).resolve().parent.parent


def test_register_create_list_info():
    with toy_registry() as names:
        assert set(names) <= set(zoo.list("*"))
        assert zoo.list("generator/toy-*") == ["generator/toy-big", "generator/toy-tiny"]
        assert zoo.list("tokenizer/toy-*") == ["tokenizer/toy-tiny"]
        m = zoo.create("generator/toy-tiny", num_classes=3)
        assert isinstance(m, ToyGenerator) and m.num_classes == 3 and m.registry_name == "generator/toy-tiny"
        i = zoo.info("generator/toy-tiny")
        assert i["params"] == 5 * 4 * 16 and i["spec"] == "discrete/grid 2x2 V=16" and i["paper"] == "none (test toy)"
        assert i["config"]["num_classes"] == 4
    assert "generator/toy-tiny" not in zoo.list("*")


def test_unknown_and_bad_names():
    with pytest.raises(KeyError, match="unknown model 'generator/nope'"):
        zoo.create("generator/nope")
    with pytest.raises(ValueError, match="registry names look like"):
        registry.register("nope")(lambda: None)
    with toy_registry():
        with pytest.raises(ValueError, match="registered twice"):
            registry.register("generator/toy-tiny")(lambda **kw: None)
        with pytest.raises(ValueError, match="no pretrained weights"):
            zoo.create("generator/toy-tiny", pretrained=True)


def test_info_builds_on_meta_device():
    with toy_registry():
        m = registry.build_meta("generator/toy-tiny")
        assert all(p.device.type == "meta" for p in m.parameters())


def test_config_capture_includes_defaults_and_spec():
    spec = TokenSpec("discrete", "sequence", (5,), vocab_size=3)
    m = ToyGenerator(spec=spec)
    assert m.config == {"spec": spec, "num_classes": 4}


def _saved(tmp_path):
    m = ToyTokenizer(image_size=8, vocab=16)
    m.registry_name = "tokenizer/toy-tiny"
    d = tmp_path / "ck"
    m.save_pretrained(d)
    return m, d


def test_checkpoint_round_trip_and_layout(tmp_path):
    m, d = _saved(tmp_path)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["class"] == "toys:ToyTokenizer" or cfg["class"].endswith(":ToyTokenizer")
    assert cfg["name"] == "tokenizer/toy-tiny" and cfg["args"]["vocab"] == 16


@pytest.fixture
def toys_registered():
    with toy_registry():  # checkpoints resolve their class through the registry name
        yield


def test_checkpoint_errors_name_file_and_problem(tmp_path, toys_registered):
    m, d = _saved(tmp_path)
    back = load_pretrained(d)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert back.encode(x) == m.encode(x)

    w = d / "model.safetensors"
    raw = w.read_bytes()
    w.write_bytes(raw[: len(raw) // 2])                      # truncated
    with pytest.raises(CheckpointError, match="model.safetensors: truncated or corrupt"):
        load_pretrained(d)
    w.write_bytes(b"\x00" * 64)                              # garbage
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(d)
    w.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        load_pretrained(d)

    m2, d2 = _saved(tmp_path / "b")
    cfg = json.loads((d2 / "config.json").read_text())
    cfg["args"]["vocab"] = 32                                # config no longer fits the tensors
    (d2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch .*proj.weight: file \(16, 3, 4, 4\) vs model \(32, 3, 4, 4\)"):
        load_pretrained(d2)
    (d2 / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_pretrained(d2)
    (d2 / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_pretrained(d2)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")


def test_checkpoint_refuses_foreign_classes(tmp_path, toys_registered):
    _, d = _saved(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["class"] = "os:system"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'os:system' is not the class 'tokenizer/toy-tiny' builds"):
        load_pretrained(d)


def test_cli_list_and_info(capsys):
    from zoo.cli import main
    with toy_registry():
        assert main(["list", "*/toy-*"]) == 0
        out = capsys.readouterr().out
        assert "generator/toy-tiny" in out and "tokenizer/toy-tiny" in out and "discrete/grid 2x2 V=16" in out
        assert main(["info", "generator/toy-big"]) == 0
        out = capsys.readouterr().out
        assert "params : 320" in out and "(paper: 320, +0.0%)" in out
    assert main(["info", "generator/toy-tiny"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_python_m_zoo_lists_real_registry():
    r = subprocess.run([sys.executable, "-m", "zoo", "list"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in registry.list_models("*"):
        assert name in r.stdout


def test_hub_entrypoints_load_locally():
    import hubconf
    assert hubconf.ENTRYPOINTS, "hubconf exposes no entry points"
    for fn, name in hubconf.ENTRYPOINTS.items():
        tiny = registry.entry(name).is_tiny
        m = torch.hub.load(str(ROOT), fn, source="local", trust_repo=True, device=None if tiny else "meta")
        assert m.registry_name == name
        assert m.num_params() == registry.info(name)["params"]


def test_half_precision_export_loads_back(tmp_path, toys_registered):
    m = ToyTokenizer(image_size=8, vocab=16)
    m.registry_name = "tokenizer/toy-tiny"
    m.save_pretrained(tmp_path / "f32")
    m.save_pretrained(tmp_path / "f16", dtype=torch.float16)
    size = lambda d: (tmp_path / d / "model.safetensors").stat().st_size  # noqa: E731
    assert size("f16") < 0.6 * size("f32")
    back = load_pretrained(tmp_path / "f16")
    assert all(p.dtype == torch.float32 for p in back.parameters())
    torch.testing.assert_close(back.table.weight, m.table.weight, atol=1e-3, rtol=1e-3)
    assert json.loads((tmp_path / "f16" / "config.json").read_text())["stored_dtype"] == "float16"
