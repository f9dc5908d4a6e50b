"""Pipeline and the sampling CLI on toy models (no dependency on the real tokenizers/generators)."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import zoo
import zoo.checkpoint
from generators.base import Generator, SamplingConfig
from sample.cli import main as sample_main
from sample.cli import parse_classes, read_prompts
from tokenizers_vis.base import Tokenizer
from zoo import registry
from zoo.pipeline import Pipeline, batch_seed
from zoo.tokens import IncompatibleTokens, Tokens, TokenSpec

TOK, GEN, TXT, BIG = ("tokenizer/test-sample-toy-tiny", "generator/test-sample-toy-tiny",
                      "generator/test-sample-text-tiny", "generator/test-sample-v16-tiny")


class PaletteTokenizer(Tokenizer):
    """n x n discrete tokens, each decoded to a p x p patch of a fixed colour (deterministic init)."""

    def __init__(self, grid: int = 3, vocab: int = 8, patch: int = 2):
        super().__init__()
        self.spec = TokenSpec("discrete", "grid", (grid, grid), vocab_size=vocab)
        self.image_size = grid * patch
        self.patch = patch
        colours = torch.linspace(-1, 1, vocab * 3).reshape(3, vocab).T.contiguous()
        self.palette = nn.Parameter(colours)

    def decode(self, tokens):
        ids = self.check_tokens(tokens).data  # (B, n, n)
        x = self.palette[ids].permute(0, 3, 1, 2)  # (B, 3, n, n)
        return x.repeat_interleave(self.patch, 2).repeat_interleave(self.patch, 3)


class ClassCategorical(Generator):
    """Each token ~ softmax(bias + 3·onehot((label + text) mod V)): seeded, condition-dependent."""

    def __init__(self, spec: TokenSpec = TokenSpec("discrete", "grid", (3, 3), vocab_size=8),
                 num_classes: int = 5, text_vocab_size: int = 0, text_len: int = 0):
        super().__init__()
        self.spec = spec
        self.bias = nn.Parameter(torch.zeros(spec.vocab_size))

    @torch.no_grad()
    def generate(self, cond, sampling=None, generator=None):
        B, V = cond.batch_size, self.spec.vocab_size
        shift = torch.zeros(B, dtype=torch.long)
        if cond.labels is not None:
            shift += cond.labels.clamp(min=0)
        if cond.text is not None:
            shift += cond.text.sum(1)
        logits = self.bias + 3.0 * nn.functional.one_hot(shift % V, V)
        probs = logits.softmax(-1).repeat_interleave(self.spec.num_tokens, 0)
        ids = torch.multinomial(probs, 1, generator=generator).reshape(B, *self.spec.shape)
        return Tokens(ids, self.spec)


@pytest.fixture(scope="module", autouse=True)
def toys():
    registry._ensure_loaded()
    registry.register(TOK)(lambda **kw: PaletteTokenizer(**kw))
    registry.register(GEN)(lambda **kw: ClassCategorical(**kw))
    registry.register(TXT)(lambda **kw: ClassCategorical(**{"num_classes": 0, "text_vocab_size": 64,
                                                             "text_len": 6, **kw}))
    registry.register(BIG)(lambda **kw: ClassCategorical(
        **{"spec": TokenSpec("discrete", "grid", (3, 3), vocab_size=16), **kw}))
    yield
    for n in (TOK, GEN, TXT, BIG):
        registry.unregister(n)


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    argv = ["--tokenizer", TOK, "--generator", GEN, "--classes", "0-2", "--num", "2",
            "--batch-size", "4", "--out", str(out), "--no-progress", *extra]
    assert sample_main(argv) == 0
    return out


# ---- CLI ----------------------------------------------------------------------------------
def test_cli_writes_pngs_grid_npz_json(tmp_path):
    out = _run(tmp_path, "a")
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == [f"{i:05d}.png" for i in range(6)]
    npz = np.load(out / "samples.npz")
    arr = npz["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (6, 6, 6, 3)
    for i in range(6):
        assert np.array_equal(np.asarray(Image.open(out / f"{i:05d}.png")), arr[i])
    assert npz["arr_1"].tolist() == [0, 0, 1, 1, 2, 2]  # ADM's label array
    # grid: 3 condition rows x 2 samples, 6 px images with 2 px padding
    assert Image.open(out / "grid.png").size == (2 * 8 + 2, 3 * 8 + 2)
    meta = json.loads((out / "samples.json").read_text())
    assert [s["class"] for s in meta["samples"]] == [0, 0, 1, 1, 2, 2]
    assert meta["seed"] == 0 and meta["batch_size"] == 4 and meta["sampling"]["cfg"] == 1.0
    # the conditioning reaches the images: class 0 and class 2 rows differ
    assert not np.array_equal(arr[0:2], arr[4:6])


def test_cli_same_seed_identical_other_seed_differs(tmp_path):
    a = np.load(_run(tmp_path, "a", "--seed", "3") / "samples.npz")["arr_0"]
    b = np.load(_run(tmp_path, "b", "--seed", "3") / "samples.npz")["arr_0"]
    c = np.load(_run(tmp_path, "c", "--seed", "4") / "samples.npz")["arr_0"]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_cli_refuses_bad_input_cleanly(tmp_path, capsys):
    out = tmp_path / "bad"
    assert sample_main(["--tokenizer", TOK, "--generator", GEN, "--classes", "3-7", "--out", str(out),
                        "--no-progress"]) == 2
    assert "[0, 5)" in capsys.readouterr().err
    assert not (out / "samples.npz").exists()
    out = _run(tmp_path, "again")
    assert sample_main(["--tokenizer", TOK, "--generator", GEN, "--out", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err  # refuses to mix with an earlier run
    out = _run(tmp_path, "again", "--overwrite", "--num", "1")
    assert len(list(out.glob("0*.png"))) == 3  # no stale PNGs from the bigger run


def test_parse_classes_and_prompt_files(tmp_path):
    assert parse_classes("0-3,7", 10) == [0, 1, 2, 3, 7]
    assert parse_classes("all", 4) == [0, 1, 2, 3]
    for bad in ("a", "5-2", ","):
        with pytest.raises(ValueError):
            parse_classes(bad, 10)
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n\n two blue squares \n")
    assert read_prompts(["one", f"@{f}"]) == ["one", "a red circle", "two blue squares"]


# ---- Pipeline -----------------------------------------------------------------------------
def test_pipeline_refuses_incompatible_pair_naming_both():
    with pytest.raises(IncompatibleTokens) as e:
        Pipeline(zoo.create(TOK), zoo.create(BIG))
    msg = str(e.value)
    assert TOK in msg and BIG in msg and "V=8" in msg and "V=16" in msg
    with pytest.raises(IncompatibleTokens) as e:  # unnamed models: class names
        Pipeline(PaletteTokenizer(), ClassCategorical(TokenSpec("discrete", "grid", (4, 4), vocab_size=8)))
    assert "PaletteTokenizer" in str(e.value) and "ClassCategorical" in str(e.value)


def test_pipeline_validates_conditions():
    pipe = Pipeline.load(TOK, GEN)
    with pytest.raises(ValueError, match=r"\[0, 5\).*\[5, 9\]"):
        pipe.generate([0, 5, 9], progress=False)
    with pytest.raises(ValueError, match="no text conditioning"):
        pipe.generate(prompts=["a red circle"], progress=False)
    assert pipe.generate([-1, 4], progress=False).shape == (2, 6, 6, 3)  # -1 = null class
    text = Pipeline.load(TOK, TXT)
    with pytest.raises(ValueError, match="not class-conditional"):
        text.generate([0], progress=False)


def test_pipeline_prompts():
    T = pytest.importorskip("zoo.data.text")
    pipe = Pipeline.load(TOK, TXT)
    imgs = pipe.generate(prompts=["a red circle", "two blue squares"], progress=False)
    assert imgs.dtype == torch.uint8 and imgs.shape == (2, 6, 6, 3)
    with pytest.raises(ValueError, match="zebra"):
        pipe.generate(prompts=["a red zebra"], progress=False)
    # the prompt reaches the generator: different captions give different images
    a = pipe.generate(prompts=["a red circle"] * 4, seed=0, progress=False)
    b = pipe.generate(prompts=["two red circles"] * 4, seed=0, progress=False)
    assert (T.encode(["a red circle"]).sum() - T.encode(["two red circles"]).sum()) % 8 != 0
    assert not torch.equal(a, b)


def test_pipeline_seeding_rule():
    pipe = Pipeline.load(TOK, GEN)
    cls = [0, 1, 2, 3, 4]
    a = pipe.generate(cls, seed=1, batch_size=2, progress=False)
    assert torch.equal(a, pipe.generate(cls, seed=1, batch_size=2, progress=False))
    # batch_size=1: sample i depends only on (seed, i, its condition)
    one = pipe.generate(cls, seed=1, batch_size=1, progress=False)
    assert torch.equal(one[:2], pipe.generate(cls[:2], seed=1, batch_size=1, progress=False))
    assert batch_seed(0, 64) != batch_seed(64, 0)
    # every batch gets its own stream: repeats of one class are not copies of each other
    same = pipe.generate([2] * 4, seed=1, batch_size=1, progress=False)
    assert len({bytes(x.numpy()) for x in same}) > 1
    pil = pipe.generate_pil([1], progress=False)
    assert pil[0].size == (6, 6)


def test_pipeline_load_checkpoint_dir_and_tag(tmp_path, monkeypatch):
    # The toys are registered (TOK, GEN), so their checkpoints resolve through the registry.
    tok, gen = zoo.create(TOK), zoo.create(GEN)
    with torch.no_grad():
        tok.palette.mul_(-1)  # differs from a fresh init, so loading must read the file
        gen.bias[3] = 5.0
    tok.save_pretrained(tmp_path / "tok")
    gen.save_pretrained(tmp_path / "gen")
    ref = Pipeline(tok, gen).generate([0, 1], seed=2, progress=False)
    pipe = Pipeline.load(tmp_path / "tok", tmp_path / "gen")
    assert torch.equal(pipe.generate([0, 1], seed=2, progress=False), ref)
    monkeypatch.setitem(registry.entry(GEN).weights, "toy", str(tmp_path / "gen"))
    monkeypatch.setitem(registry.entry(TOK).weights, "toy", str(tmp_path / "tok"))
    tagged = Pipeline.load(f"{TOK}:toy", f"{GEN}:toy")
    assert torch.equal(tagged.generate([0, 1], seed=2, progress=False), ref)
    fresh = Pipeline.load(TOK, GEN).generate([0, 1], seed=2, progress=False)
    assert not torch.equal(fresh, ref)


def test_sampling_config_reaches_generator(tmp_path):
    seen = {}

    class Spy(ClassCategorical):
        def generate(self, cond, sampling=None, generator=None):
            seen["s"] = sampling
            return super().generate(cond, sampling, generator)

    pipe = Pipeline(PaletteTokenizer(), Spy())
    pipe.generate([0], sampling=SamplingConfig(cfg=2.5, top_k=3), progress=False)
    assert seen["s"].cfg == 2.5 and seen["s"].top_k == 3
