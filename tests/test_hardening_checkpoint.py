"""Issue 15 (security / input validation): checkpoint loading never runs code a file names,
refuses absurd sizes before allocating, and every bad input is a clear one-line error."""
import json
import shutil
import sys
import textwrap

import pytest
import torch

import zoo
import zoo.cli as arzoo_cli
from toys import ToyGenerator, ToyTokenizer, toy_registry
from zoo import checkpoint as ck
from zoo import registry
from zoo.checkpoint import CheckpointError, load_pretrained
from zoo.cli import main as arzoo

TOY = "tokenizer/toy-tiny"


def fingerprint(model):
    return ck.fingerprint(model)


@pytest.fixture
def toys():
    with toy_registry():
        yield


@pytest.fixture
def allowed(monkeypatch):
    """A fresh allow-list for the test (allow_class is process-global)."""
    monkeypatch.setattr(ck, "_ALLOWED", {})


def _toy_ckpt(path, name=TOY, **kw):
    torch.manual_seed(0)
    m = ToyTokenizer(image_size=8, vocab=16, **kw)
    m.registry_name = name
    m.save_pretrained(path)
    return m


def _edit(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d / "config.json"


# ---------------------------------------------------------------- class resolution

@pytest.mark.parametrize("cls", ["zoo.checkpoint:os.system", "os:system", "zoo.registry:importlib.import_module",
                                 "toys:ToyGenerator", "generators.raster_ar:RasterAR"])
@pytest.mark.parametrize("name", [TOY, None, "generator/nope"])
def test_class_is_never_walked_or_imported(tmp_path, toys, cls, name):
    d = tmp_path / "ck"
    _toy_ckpt(d, name)
    marker = tmp_path / "pwned"
    cfg = _edit(d, **{"class": cls, "args": {"command": f"touch {marker}"}})
    with pytest.raises(CheckpointError, match=str(cfg)):
        load_pretrained(d)
    assert not marker.exists()


def test_name_must_be_registered_and_build_the_recorded_class(tmp_path, toys):
    d = tmp_path / "ck"
    m = _toy_ckpt(d)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    _edit(d, name=f"{TOY}:sometag")                                  # name:tag resolves through name
    assert load_pretrained(d).encode(x) == m.encode(x)
    cfg = _edit(d, name="tokenizer/does-not-exist")
    with pytest.raises(CheckpointError, match=f"{cfg}: name 'tokenizer/does-not-exist': unknown model"):
        load_pretrained(d)
    _edit(d, name="generator/toy-tiny")                               # registered, but builds ToyGenerator
    with pytest.raises(CheckpointError, match="is not the class 'generator/toy-tiny' builds"):
        load_pretrained(d)


def test_allow_class_is_the_escape_hatch(tmp_path, allowed):
    d = tmp_path / "ck"
    m = _toy_ckpt(d, name=None)                                       # user class, no registry name
    with pytest.raises(CheckpointError, match="no registry 'name'.*allow_class"):
        load_pretrained(d)
    assert ck.allow_class("toys:ToyTokenizer") == f"{ToyTokenizer.__module__}:ToyTokenizer"
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert load_pretrained(d).encode(x) == m.encode(x)
    assert ck.allow_class(ToyGenerator).endswith(":ToyGenerator")
    with pytest.raises(TypeError, match="not a ZooModule"):
        ck.allow_class("os:system")
    with pytest.raises(ValueError, match="expected 'package.module:Class'"):
        ck.allow_class("os.system")


def test_import_plugins_registers_user_models(tmp_path, monkeypatch, capsys):
    (tmp_path / "arzoo_plugin_x.py").write_text(textwrap.dedent("""
        from toys import ToyTokenizer
        from zoo import register

        class PluginTokenizer(ToyTokenizer):
            pass

        @register("tokenizer/plugin-x-tiny")
        def plugin(**kw):
            return PluginTokenizer(**kw)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(zoo.UserError, match="--import no_such_mod_x: cannot import"):
            zoo.import_plugins(["no_such_mod_x"])
        assert arzoo(["info", "--import", "arzoo_plugin_x", "tokenizer/plugin-x-tiny"]) == 0
        assert "PluginTokenizer" in capsys.readouterr().out
        m = zoo.create("tokenizer/plugin-x-tiny")
        m.save_pretrained(tmp_path / "ck")
        assert type(load_pretrained(tmp_path / "ck")).__name__ == "PluginTokenizer"
    finally:
        registry.unregister("tokenizer/plugin-x-tiny")
        sys.modules.pop("arzoo_plugin_x", None)


@pytest.mark.parametrize("cmd", [["sample"], ["eval", "fid"], ["bench"]])
def test_passthrough_commands_take_import(cmd, capsys):
    # --import is handled before the command runs, for every passthrough command but train
    assert arzoo([cmd[0], "--import", "no_such_mod_y", *cmd[1:]]) == 2
    assert "--import no_such_mod_y: cannot import" in capsys.readouterr().err
    assert arzoo_cli._take_imports(["a", "--import=m1", "b", "--import", "m2:f"]) == (["m1", "m2:f"], ["a", "b"])


# ---------------------------------------------------------------- sizes, before allocating

def test_absurd_sizes_are_refused_before_allocating(tmp_path, toys, monkeypatch):
    d = tmp_path / "ck"
    _toy_ckpt(d)
    cfg = _edit(d, args={"image_size": 8, "vocab": 10 ** 15, "spec_layout": "grid"})   # 192 PB of weights
    with pytest.raises(CheckpointError, match=rf"{cfg}: .*more than 4,000,000,000 parameter/buffer elements"):
        load_pretrained(d)
    _toy_ckpt(d)                                                      # 1,584 elements: fine by default,
    with pytest.raises(CheckpointError, match="more than 1,000 parameter/buffer elements"):
        load_pretrained(d, max_elements=1000)                         # over an explicit cap
    monkeypatch.setenv("ARZOO_MAX_ELEMENTS", "1e3")
    with pytest.raises(CheckpointError, match="ARZOO_MAX_ELEMENTS"):
        load_pretrained(d)


def test_absurd_depth_stops_early(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "MAX_MODULES", 300)                       # raster-ar-tiny has ~100 modules
    src = registry.resolve_weights("generator/raster-ar-tiny", "shapes")
    d = tmp_path / "deep"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["args"]["depth"] = 10 ** 12
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="more than 300 submodules"):
        load_pretrained(d)


# ---------------------------------------------------------------- malformed config.json

@pytest.mark.parametrize("text, match", [
    ("[1, 2]", "expected a JSON object, got list"),
    ('"config"', "expected a JSON object, got str"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (" " * (2 << 20) + "{}", "a checkpoint config is at most"),
])
def test_malformed_config_json(tmp_path, toys, text, match):
    d = tmp_path / "ck"
    _toy_ckpt(d)
    (d / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=f"{d / 'config.json'}: .*{match}"):
        load_pretrained(d)


@pytest.mark.parametrize("changes, match", [
    ({"arzoo": 2}, "'arzoo': 2 is not one this arzoo reads"),
    ({"arzoo": "1"}, "'arzoo': '1' is not one"),
    ({"arzoo": 0}, "'arzoo': 0 is not one"),
    ({"arzoo": ...}, "missing key 'arzoo'"),
    ({"args": [1, 2]}, "'args' must be an object"),
    ({"args": {"vocab": "abc"}}, "arguments do not fit ToyTokenizer"),
    ({"args": {"nope": 1}}, "arguments do not fit ToyTokenizer"),
    ({"class": 7}, "'class' must be"),
    ({"name": 7}, "'name' must be"),
    ({"tokenizer": "vq"}, "'tokenizer' must be"),
    ({"tokenizer": {"name": "x"}}, "'tokenizer' must be"),
])
def test_bad_config_fields(tmp_path, toys, changes, match):
    d = tmp_path / "ck"
    _toy_ckpt(d)
    cfg = _edit(d, **changes)
    with pytest.raises(CheckpointError, match=f"{cfg}: .*{match}"):
        load_pretrained(d)


def test_deeply_nested_args(tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(registry.resolve_weights("generator/raster-ar-tiny", "shapes"), d)
    cfg = d / "config.json"
    depth = sys.getrecursionlimit() - 50      # json.loads may cope; rebuilding the specs must not crash
    cfg.write_text(cfg.read_text().replace('"dim": 128', '"dim": ' + "[" * depth + "]" * depth))
    with pytest.raises(CheckpointError, match=str(cfg)):
        load_pretrained(d)


# ---------------------------------------------------------------- pretrained / meta

@pytest.fixture
def toy_weights(tmp_path, toys, monkeypatch):
    m = _toy_ckpt(tmp_path / "w")
    monkeypatch.setitem(registry.entry(TOY).weights, "toy", str(tmp_path / "w"))
    return m


def test_pretrained_values(toy_weights):
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    for bad in ("", "  ", 0):
        with pytest.raises(ValueError, match=r"pretrained must be True, False or a weights tag \(toy\)"):
            zoo.create(TOY, pretrained=bad)
    assert zoo.create(f"{TOY}:toy").encode(x) == toy_weights.encode(x)
    assert zoo.create(f"{TOY}:toy", pretrained=True).registry_name == TOY
    with pytest.raises(ValueError, match="names weights 'toy' but pretrained='other'"):
        zoo.create(f"{TOY}:toy", pretrained="other")
    with pytest.raises(ValueError, match="empty weights tag"):
        zoo.create(f"{TOY}:")
    with pytest.raises(ValueError, match="no weights tagged 'nope'"):
        zoo.create(f"{TOY}:nope")


def test_meta_device_never_gives_a_silently_empty_model(tmp_path, toy_weights):
    with pytest.raises(CheckpointError, match="meta device"):
        load_pretrained(tmp_path / "w", map_location="meta")
    with torch.device("meta"), pytest.raises(CheckpointError, match="meta device"):
        zoo.create(TOY, pretrained="toy")
    with torch.device("meta"):                                        # random init on meta still works
        assert zoo.create(TOY).proj.weight.device.type == "meta"


# ---------------------------------------------------------------- tokenizer fingerprint

def test_fingerprint_identity(tmp_path, allowed):
    torch.manual_seed(0)
    a = ToyTokenizer(image_size=8, vocab=16)
    fp = fingerprint(a)
    assert len(fp) == 16 and int(fp, 16) >= 0 and fingerprint(a) == fp
    a.save_pretrained(tmp_path / "f16", dtype=torch.float16)
    ck.allow_class(ToyTokenizer)
    half = load_pretrained(tmp_path / "f16")
    assert not torch.equal(half.table.weight, a.table.weight)
    assert fingerprint(half) == fp                                    # a float16 export: the same identity
    with torch.no_grad():
        half.table.weight[0, 0] += 0.5
    assert fingerprint(half) != fp                                    # other weights
    torch.manual_seed(0)
    assert fingerprint(ToyTokenizer(image_size=8, vocab=16, spec_layout="sequence")) != fp   # other config
    with torch.device("meta"), pytest.raises(ValueError, match="meta device"):
        fingerprint(ToyTokenizer())


def test_shipped_generator_records_its_tokenizer():
    """Cross-process determinism: the fingerprint stored in the shipped config (computed in
    another process) matches the one computed now from the shipped tokenizer weights."""
    gen = zoo.create("generator/raster-ar-tiny:shapes")
    assert gen.trained_on["name"] == "tokenizer/vq-tiny:shapes"
    assert fingerprint(zoo.create(gen.trained_on["name"])) == gen.trained_on["fingerprint"]
    assert zoo.create("generator/raster-ar-tiny").trained_on is None


def test_trained_on_round_trip_and_export(tmp_path, toys):
    tok = _toy_ckpt(tmp_path / "tok")
    gen = zoo.create("generator/toy-tiny")
    assert load_pretrained(tmp_path / "tok").trained_on is None
    gen.trained_on = {"name": f"{TOY}:x", "fingerprint": fingerprint(tok)}
    gen.save_pretrained(tmp_path / "gen")
    assert json.loads((tmp_path / "gen" / "config.json").read_text())["tokenizer"] == gen.trained_on
    assert load_pretrained(tmp_path / "gen").trained_on == gen.trained_on
    assert arzoo(["export", str(tmp_path / "gen"), str(tmp_path / "gen16"), "--dtype", "float16"]) == 0
    assert load_pretrained(tmp_path / "gen16").trained_on == gen.trained_on
    gen.trained_on = {"fingerprint": 3}
    with pytest.raises(CheckpointError, match="'tokenizer' must be"):
        gen.save_pretrained(tmp_path / "bad")


@pytest.mark.slow
def test_every_shipped_checkpoint_loads_and_matches_its_tokenizer():
    fps = {}
    for name in zoo.list_models(pretrained=True):
        for tag in registry.entry(name).weights:
            m = zoo.create(name, pretrained=tag)
            if name.startswith("generator/"):
                rec = m.trained_on
                assert rec is not None, f"{name}:{tag} does not record its tokenizer"
                if rec["name"] not in fps:
                    fps[rec["name"]] = fingerprint(zoo.create(rec["name"]))
                assert fps[rec["name"]] == rec["fingerprint"], f"{name}:{tag}"


# ---------------------------------------------------------------- arzoo export / CLI errors

def test_export_refuses_to_overwrite_its_source(tmp_path, toys, capsys):
    src = tmp_path / "ck"
    _toy_ckpt(src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    (tmp_path / "link").symlink_to(src)
    for dst in (src, f"{src}/", tmp_path / "link", f"{tmp_path}/./ck"):
        assert arzoo(["export", str(src), str(dst), "--dtype", "float16"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("arzoo export: ") and "is the source checkpoint" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before

    other = tmp_path / "notes"
    other.mkdir()
    (other / "README.txt").write_text("mine")
    assert arzoo(["export", str(src), str(other)]) == 2
    assert "not empty and not an arzoo checkpoint; pass --overwrite" in capsys.readouterr().err
    assert arzoo(["export", str(src), str(other), "--overwrite"]) == 0
    assert (other / "README.txt").read_text() == "mine" and (other / "config.json").is_file()
    assert arzoo(["export", str(src), str(other), "--dtype", "float16"]) == 0      # a checkpoint: replaced
    (tmp_path / "file").write_text("x")
    assert arzoo(["export", str(src), str(tmp_path / "file")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_cli_user_errors_are_one_line(monkeypatch, capsys):
    import types

    from zoo import cli

    def boom(argv):
        raise {"ck": CheckpointError("some/dir/config.json: bad\nsecond line"),
               "fnf": FileNotFoundError("no such file: x.npz"),
               "tok": zoo.IncompatibleTokens("NAR needs a grid"),
               "user": zoo.UserError("--grid-max-rows must be >= 1"),
               "bug": AttributeError("a bug")}[argv[0]]

    monkeypatch.setitem(sys.modules, "fake_arzoo_cmd", types.SimpleNamespace(main=boom))
    monkeypatch.setitem(cli.PASSTHROUGH, "sample", ("fake_arzoo_cmd", "patched"))
    assert arzoo(["sample", "ck"]) == 2
    assert capsys.readouterr().err == "arzoo sample: some/dir/config.json: bad; second line\n"
    for kind, text in (("fnf", "no such file: x.npz"), ("tok", "NAR needs a grid"), ("user", "--grid-max-rows")):
        assert arzoo(["sample", kind]) == 2
        assert capsys.readouterr().err.startswith(f"arzoo sample: {text}")
    with pytest.raises(AttributeError):                               # bugs keep their traceback
        arzoo(["sample", "bug"])
    monkeypatch.setenv("ARZOO_DEBUG", "1")
    with pytest.raises(CheckpointError):
        arzoo(["sample", "ck"])
    monkeypatch.delenv("ARZOO_DEBUG")
    assert arzoo(["info", "generator/nope"]) == 2
    assert capsys.readouterr().err.startswith("arzoo info: unknown model 'generator/nope'")
    assert arzoo(["list", "--import", "no_such_mod_y"]) == 2
    assert "arzoo list: --import no_such_mod_y: cannot import" in capsys.readouterr().err
    with pytest.raises(SystemExit):                                   # argparse keeps its own usage message
        arzoo(["export"])


def test_arzoo_sample_never_runs_a_checkpoint_command(tmp_path, capsys):
    """The issue's case: ``arzoo sample --generator DIR`` whose config names os.system."""
    evil = tmp_path / "evil"
    shutil.copytree(registry.resolve_weights("generator/raster-ar-tiny", "shapes"), evil)
    marker = tmp_path / "pwned"
    _edit(evil, **{"class": "zoo.checkpoint:os.system", "args": {"command": f"touch {marker}"}})
    rc = arzoo(["sample", "--tokenizer", "tokenizer/vq-tiny:shapes", "--generator", str(evil), "--classes", "0",
                "--num", "1", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists()
    assert err.startswith("arzoo sample: ") and str(evil) in err and err.count("\n") == 1
