"""Training scripts (train/): flags, token shards, the tokenizer script, exact resume, 2 processes.

Toy ZooModules are registered for the duration of each test (``toy_models`` fixture) so the
tests do not depend on the real tokenizers / generators. Data is the real Shapes set at 32 px.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from generators.base import Condition, Generator
from tokenizers_vis.base import Tokenizer
from zoo import registry
from zoo.tokens import Tokens, TokenSpec, random_tokens

ROOT = Path(__file__).resolve().parent.parent
TOY_TOK, TOY_GEN = "tokenizer/test-toy-tiny", "generator/test-toy-tiny"
RES = 32


# ---------------------------------------------------------------------------------------
# toy models
# ---------------------------------------------------------------------------------------


class ToyVQ(Tokenizer):
    """8x8 patches -> nearest of ``vocab`` codes (straight-through VQ, VQ-VAE loss)."""

    def __init__(self, image_size: int = RES, vocab: int = 16, dim: int = 8, patch: int = 8):
        super().__init__()
        self.image_size, self.patch = image_size, patch
        n = image_size // patch
        self.spec = TokenSpec("discrete", "grid", (n, n), vocab_size=vocab)
        self.enc = nn.Conv2d(3, dim, patch, patch)
        self.codebook = nn.Embedding(vocab, dim)
        self.dec = nn.ConvTranspose2d(dim, 3, patch, patch)

    def _ids(self, z):
        d = (z.unsqueeze(-2) - self.codebook.weight).pow(2).sum(-1)  # (B, h, w, V)
        return d.argmin(-1)

    def encode(self, images):
        z = self.enc(self.check_images(images)).permute(0, 2, 3, 1)
        return Tokens(self._ids(z), self.spec)

    def decode(self, tokens):
        e = self.codebook(self.check_tokens(tokens).data).permute(0, 3, 1, 2)
        return torch.tanh(self.dec(e))

    def forward(self, images):
        z = self.enc(self.check_images(images)).permute(0, 2, 3, 1)
        e = self.codebook(self._ids(z))
        q = z + (e - z).detach()
        recon = torch.tanh(self.dec(q.permute(0, 3, 1, 2)))
        rec = F.mse_loss(recon, images)
        vq = F.mse_loss(e, z.detach()) + 0.25 * F.mse_loss(z, e.detach())
        return recon, {"loss": rec + vq, "rec": rec.detach(), "vq": vq.detach()}


class ToyAR(Generator):
    """Next-token prediction from (previous token, position, class, mean caption word)."""

    crash_after = None  # raise after this many loss() calls in training mode (simulated crash)
    calls = 0

    def __init__(self, spec: TokenSpec = TokenSpec("discrete", "grid", (4, 4), vocab_size=16),
                 num_classes: int = 30, text_vocab_size: int = 64, dim: int = 16, dropout: float = 0.0):
        super().__init__()
        self.spec, self.num_classes = spec, num_classes
        n, v = spec.num_tokens, spec.vocab_size
        self.tok = nn.Embedding(v + 1, dim)  # + BOS
        self.pos = nn.Parameter(torch.randn(n, dim) * 0.1)
        self.cls = nn.Embedding(num_classes + 1, dim)  # + null class
        self.words = nn.Embedding(text_vocab_size, dim, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, v))

    def _cond(self, cond: Condition, b: int, device):
        c = torch.zeros(b, self.pos.shape[1], device=device)
        if cond.labels is not None:
            lab = torch.where(cond.labels < 0, torch.full_like(cond.labels, self.num_classes), cond.labels)
            c = c + self.cls(lab)
        if cond.text is not None:
            c = c + self.words(cond.text).sum(1) / (cond.text > 0).sum(1, keepdim=True).clamp_min(1)
        return c

    def _logits(self, ids, cond):
        b = ids.shape[0]
        prev = torch.cat([torch.full_like(ids[:, :1], self.spec.vocab_size), ids[:, :-1]], 1)
        h = self.tok(prev) + self.pos + self._cond(cond, b, ids.device)[:, None]
        return self.mlp(h)

    def loss(self, tokens, cond):
        if self.training and ToyAR.crash_after is not None:
            ToyAR.calls += 1
            if ToyAR.calls > ToyAR.crash_after:
                raise RuntimeError("simulated crash")
        ids = self.check_tokens(tokens).to_sequence().data
        logits = self._logits(ids, cond)
        loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        return {"loss": loss, "acc": (logits.argmax(-1) == ids).float().mean().detach()}

    @torch.no_grad()
    def generate(self, cond, sampling=None, generator=None):
        b = cond.batch_size
        ids = torch.zeros(b, self.spec.num_tokens, dtype=torch.long, device=self.pos.device)
        for i in range(self.spec.num_tokens):
            p = self._logits(ids, cond)[:, i].softmax(-1)
            ids[:, i] = torch.multinomial(p, 1, generator=generator)[:, 0]
        return Tokens.from_sequence(ids, self.spec)


def register_toys():
    """Register the toys (also used by subprocesses via ``--import test_train:register_toys``)."""
    registry._ensure_loaded()
    for name, factory in ((TOY_TOK, _toy_tok), (TOY_GEN, _toy_gen)):
        registry.unregister(name)
        registry.register(name, paper="none (test toy)")(factory)


def _toy_tok(**kw):
    return ToyVQ(**kw)


def _toy_gen(**kw):
    return ToyAR(**kw)


@pytest.fixture
def toy_models():
    register_toys()  # registered, so their checkpoints load (classes resolve through the registry)
    yield
    registry.unregister(TOY_TOK)
    registry.unregister(TOY_GEN)


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _toy_tokenizer_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    tok = registry.create(TOY_TOK)
    d = tmp_path / "toytok"
    tok.save_pretrained(d)
    return d


def _extract(tmp_path, tok_dir, num=12, flip=True, shard_size=5, name="tokens") -> Path:
    from train import extract

    out = tmp_path / name
    argv = ["--tokenizer", str(tok_dir), "--data", "shapes", "--resolution", str(RES), "--num", str(num),
            "--out", str(out), "--batch-size", "4", "--shard-size", str(shard_size), "--num-workers", "0"]
    extract.main(argv + (["--flip"] if flip else []))
    return out


# ---------------------------------------------------------------------------------------
# flags and helpers
# ---------------------------------------------------------------------------------------


def test_flag_helpers(tmp_path):
    import argparse

    from train.common import add_common_args, parse_args, parse_num_objects, parse_overrides
    from train.loop import lr_lambda

    assert parse_overrides(["depth=4", "dims=[64, 128]", "name=foo", "p=0.5", "flag=true"]) == \
        {"depth": 4, "dims": [64, 128], "name": "foo", "p": 0.5, "flag": True}
    with pytest.raises(SystemExit):
        parse_overrides(["novalue"])
    assert parse_num_objects("3") == 3 and parse_num_objects("1-4") == (1, 4)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_num_objects("4-1")

    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 7\nbatch-size: 6\nset: {depth: 3}\nout: from-config\n")
    p = add_common_args(argparse.ArgumentParser(prog="t"))
    args = parse_args(p, ["--config", str(cfg), "--set", "width=8", "--lr", "0.5"])
    assert (args.steps, args.batch_size, args.lr, args.out) == (7, 6, 0.5, "from-config")
    assert args.overrides == {"depth": 3, "width": 8}
    # the command line beats the config
    p = add_common_args(argparse.ArgumentParser(prog="t"))
    assert parse_args(p, ["--config", str(cfg), "--steps", "9"]).steps == 9
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    with pytest.raises(SystemExit):
        parse_args(add_common_args(argparse.ArgumentParser(prog="t")), ["--config", str(bad), "--out", "x"])
    with pytest.raises(SystemExit):  # --out is required somewhere
        parse_args(add_common_args(argparse.ArgumentParser(prog="t")), [])
    with pytest.raises(SystemExit):  # batch must split into micro-batches
        parse_args(add_common_args(argparse.ArgumentParser(prog="t")),
                   ["--out", "x", "--batch-size", "6", "--grad-accum", "4"])

    f = lr_lambda(warmup=4, total=14, schedule="cosine", min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1)
    assert lr_lambda(2, 10)(7) == 1.0


def test_ema_and_sampler():
    from train.loop import EMA, EpochSampler

    m = nn.Linear(2, 2)
    ema = EMA(m, 0.5)
    with torch.no_grad():
        m.weight.add_(2.0)
    ema.update(m)
    target = m.weight - 1.0  # halfway between old and new
    assert torch.allclose(ema.shadow["weight"], target)
    other = EMA(nn.Linear(2, 2), 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.5 and other.num_updates == 1
    assert torch.equal(other.copy_to(nn.Linear(2, 2)).weight, target)

    s = EpochSampler(20, seed=3)
    s.epoch = 0
    a = list(s)
    s.epoch = 1
    b = list(s)
    s.epoch = 0
    assert list(s) == a != b and sorted(a) == list(range(20))
    assert list(EpochSampler(20, seed=4)) != a


def test_dispatch():
    from train.__main__ import main

    assert main(["nope"]) == 2
    assert main([]) == 2
    with pytest.raises(SystemExit):
        main(["generator", "--help"])


# ---------------------------------------------------------------------------------------
# extract
# ---------------------------------------------------------------------------------------


def test_extract_round_trip(tmp_path, toy_models):
    from train.extract import TokenShardDataset, load_token_spec, swap_left_right
    from zoo import load_pretrained
    from zoo.data import ShapesDataset
    from zoo.data import text as T

    tok_dir = _toy_tokenizer_dir(tmp_path)
    out = _extract(tmp_path, tok_dir, num=12, flip=True, shard_size=5)
    meta = json.loads((out / "meta.json").read_text())
    tok = load_pretrained(tok_dir).eval()
    assert load_token_spec(out) == tok.spec and TokenSpec.from_dict(meta["spec"]) == tok.spec
    assert meta["count"] == 24 and [s["count"] for s in meta["shards"]] == [10, 10, 4]
    assert sorted(p.name for p in out.glob("tokens-*.safetensors")) == \
        ["tokens-00000.safetensors", "tokens-00001.safetensors", "tokens-00002.safetensors"]
    assert meta["num_classes"] == 30

    ds = TokenShardDataset(out)
    assert len(ds) == 24
    src = ShapesDataset("train", resolution=RES, num_objects=1, length=12)
    idx = [0, 4, 5, 11]  # across shard boundaries
    x = torch.stack([src[i]["image"] for i in idx])
    with torch.no_grad():
        want = tok.encode(x).data
        want_flip = tok.encode(x.flip(-1)).data
    for k, i in enumerate(idx):
        t, label, text = ds[2 * i]
        tf, label_f, text_f = ds[2 * i + 1]
        assert t.dtype == torch.long and torch.equal(t, want[k])
        assert torch.equal(tf, want_flip[k])
        assert int(label) == int(label_f) == src[i]["label"]
        assert torch.equal(text, T.encode([src[i]["caption"]], 16)[0])
        assert torch.equal(text_f, T.encode([swap_left_right(src[i]["caption"])], 16)[0])
    assert not torch.equal(want, want_flip)  # the flip did something
    raw = load_file(str(out / "tokens-00001.safetensors"))
    assert raw["flipped"].tolist() == [0, 1] * 5 and raw["index"].tolist() == [5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
    tokens = ds.to_tokens(torch.stack([ds[j][0] for j in range(3)]))
    assert tokens.spec == tok.spec and tokens.batch_size == 3


def test_swap_left_right_and_pyramid_storage():
    from train.extract import stored_spec, swap_left_right, to_tokens

    assert swap_left_right("a red circle left of a blue square") == "a red circle right of a blue square"
    assert swap_left_right("Right of it, left, bright") == "Left of it, right, bright"
    pyr = TokenSpec("discrete", "pyramid", [(1, 1), (2, 2), (3, 3)], vocab_size=8)
    t = random_tokens(pyr, 3, torch.Generator().manual_seed(0))
    flat = t.to_sequence().data
    assert stored_spec(pyr).layout == "sequence" and flat.shape == (3, 14)
    assert to_tokens(flat, pyr) == t


def test_extract_image_folder(tmp_path, toy_models):
    from PIL import Image

    from train.extract import TokenShardDataset

    for cls, colour in (("cats", (200, 30, 30)), ("dogs", (30, 30, 200))):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40 + 4 * i, 36), colour).save(tmp_path / "imgs" / cls / f"{i}.png")
    from train import extract

    out = tmp_path / "ftok"
    cfg = tmp_path / "x.yaml"
    cfg.write_text(f"tokenizer: {_toy_tokenizer_dir(tmp_path)}\nnum-workers: 0\nbatch_size: 4\n")
    extract.main(["--config", str(cfg), "--data", f"folder:{tmp_path / 'imgs'}", "--num", "100", "--out", str(out)])
    ds = TokenShardDataset(out)
    assert len(ds) == 6 and ds.num_classes == 2
    assert [int(ds[i][1]) for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert all(int(ds[i][2].abs().sum()) == 0 for i in range(6))  # no captions: the null caption
    with pytest.raises(SystemExit, match="folder"):
        extract.main(["--tokenizer", TOY_TOK, "--data", "folder:", "--out", str(tmp_path / "x")])


class ToyBits(Tokenizer):
    """Binary tokens: bit 0 is always 0, bits 1-3 say whether the image is bright."""

    def __init__(self, image_size: int = 8):
        super().__init__()
        self.image_size = image_size
        self.spec = TokenSpec("binary", "grid", (2, 2), bits=4)
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode(self, images):
        bright = (images.mean((1, 2, 3)) > 0).to(torch.uint8)
        bits = torch.stack([torch.zeros_like(bright)] + [bright] * 3, -1)
        return Tokens(bits[:, None, None].expand(-1, 2, 2, -1).contiguous(), self.spec)

    def decode(self, tokens):
        return torch.zeros(tokens.batch_size, 3, self.image_size, self.image_size)


def test_tokenizer_evaluate_binary_usage_and_psnr():
    from train.tokenizer import evaluate

    data = [{"image": torch.full((3, 8, 8), v), "label": 0} for v in (-1.0, 1.0, -1.0, 1.0, 1.0)]
    m = evaluate(ToyBits(), data, num_images=4, batch_size=3, device="cpu")
    assert m["eval_images"] == 4
    assert m["psnr"] == pytest.approx(10 * math.log10(4))  # |x - recon| = 0.5 on [0, 1] everywhere
    assert m["bit_usage"] == pytest.approx(0.75) and m["bit_entropy"] == pytest.approx(0.75)
    assert m["unique_codes"] == 2


# ---------------------------------------------------------------------------------------
# tokenizer script
# ---------------------------------------------------------------------------------------


def test_tokenizer_script(tmp_path, toy_models):
    from train import tokenizer
    from zoo import load_pretrained

    out = tmp_path / "tok"
    argv = ["--model", TOY_TOK, "--set", "vocab=12", "--out", str(out), "--steps", "3", "--batch-size", "4",
            "--num-objects", "1-2", "--train-images", "16", "--eval-images", "8", "--eval-batch-size", "4",
            "--num-workers", "0", "--log-every", "1", "--warmup", "1", "--lr", "1e-2", "--ema", "0.5",
            "--disc-weight", "0.1"]  # GAN is optional: used if tokenizers_vis.losses has it, else skipped
    metrics = tokenizer.main(argv)
    final = out / "final"
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    m = json.loads((final / "metrics.json").read_text())
    assert m == json.loads(json.dumps(metrics)) and m["step"] == 3 and m["eval_images"] == 8
    assert 0 < m["psnr"] < 100 and 0 < m["codebook_usage"] <= 1
    assert m["codebook_usage"] * 12 == pytest.approx(round(m["codebook_usage"] * 12))
    model = load_pretrained(final)
    assert model.spec.vocab_size == 12 and json.loads((final / "config.json").read_text())["name"] == TOY_TOK
    # EMA on: final/ has the averaged weights, final-raw/ the trained ones; they differ
    raw = load_file(str(out / "final-raw" / "model.safetensors"))
    ema = load_file(str(final / "model.safetensors"))
    assert not torch.equal(raw["enc.weight"], ema["enc.weight"])
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all("rec" in r and "loss" in r for r in log)
    assert [r["lr"] for r in log] == pytest.approx([1e-2] * 3)


# ---------------------------------------------------------------------------------------
# generator script: exact resume
# ---------------------------------------------------------------------------------------


def _gen_argv(tokens, out, cfg):
    return ["--config", str(cfg), "--tokens", str(tokens), "--out", str(out)]


def test_generator_exact_resume(tmp_path, toy_models):
    from train import generator

    tok_dir = _toy_tokenizer_dir(tmp_path)
    tokens = _extract(tmp_path, tok_dir, num=10, flip=True, shard_size=4)  # 20 rows
    # 20 rows / micro-batch 4 = 5 micro-batches per epoch (grad-accum 2: the 3rd step of an epoch
    # is cut short by the epoch end); 7 steps cross an epoch boundary. Dropout and EMA on.
    cfg = tmp_path / "gen.yaml"
    cfg.write_text("model: generator/test-toy-tiny\nset: [dropout=0.2]\nsteps: 7\nbatch-size: 8\n"
                   "grad-accum: 2\nlr: 0.05\nwarmup: 2\nlr-schedule: cosine\nema: 0.8\nsave-every: 2\n"
                   "keep: 2\nlog-every: 1\nnum-workers: 0\ncond: both\neval-samples: 8\n")

    full = tmp_path / "full"
    m_full = generator.main(_gen_argv(tokens, full, cfg))
    assert m_full["step"] == 7 and m_full["epoch"] == 2

    part = tmp_path / "part"
    # micro-batches per step: 2, 2, 1 (epoch end), 2, 2, 1, 2; the 9th call is mid-step 5,
    # after the step-4 save and after one micro-batch of step 5 was accumulated
    ToyAR.crash_after, ToyAR.calls = 8, 0
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            generator.main(_gen_argv(tokens, part, cfg))
    finally:
        ToyAR.crash_after = None
    assert not (part / "final").exists()
    states = sorted(p.name for p in (part / "checkpoints").iterdir())
    assert states == ["checkpoint_0", "checkpoint_1"]  # steps 2 and 4
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    m_part = generator.main(_gen_argv(tokens, part, cfg))

    assert m_part["step"] == m_full["step"] == 7
    for sub in ("final", "final-raw"):
        a = load_file(str(full / sub / "model.safetensors"))
        b = load_file(str(part / sub / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{sub}/{k} differs after resume"
    assert m_part["eval_loss"] == m_full["eval_loss"]
    la = [json.loads(x) for x in (full / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (part / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == list(range(1, 8))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert [r["lr"] for r in la[:4]] == pytest.approx([0.025, 0.05, 0.05, 0.025 * (1 + math.cos(math.pi / 5))])
    # rotation: at most --keep states remain (steps 6 and the final 7)
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["checkpoint_2", "checkpoint_3"]
    # the model learned something and EMA differs from the raw weights
    assert la[-1]["loss"] < la[0]["loss"]
    raw, ema = load_file(str(full / "final-raw" / "model.safetensors")), load_file(str(full / "final" / "model.safetensors"))
    assert not torch.equal(raw["pos"], ema["pos"])

    # a third run over the finished folder does no more steps and exports the same weights
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    m_again = generator.main(_gen_argv(tokens, part, cfg))
    assert m_again["step"] == 7
    assert torch.equal(load_file(str(part / "final" / "model.safetensors"))["pos"], ema["pos"])


def test_generator_time_limit_stops_saves_and_resumes(tmp_path, toy_models):
    """--time-limit stops at a step boundary with a resumable state and final/; the same command
    without the limit continues to the same weights as a run never stopped."""
    from accelerate.state import AcceleratorState, GradientState
    from train import generator

    tok_dir = _toy_tokenizer_dir(tmp_path)
    tokens = _extract(tmp_path, tok_dir, num=10, flip=True, shard_size=4)
    cfg = tmp_path / "gen.yaml"
    cfg.write_text("model: generator/test-toy-tiny\nsteps: 5\nbatch-size: 4\nlr: 0.05\nwarmup: 1\n"
                   "ema: 0.8\nsave-every: 0\nlog-every: 1\nnum-workers: 0\ncond: both\neval-samples: 4\n")
    full = tmp_path / "full"
    generator.main(_gen_argv(tokens, full, cfg))

    part = tmp_path / "part"
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    m_cut = generator.main(_gen_argv(tokens, part, cfg) + ["--time-limit", "1e-9"])  # past after step 1
    assert m_cut["step"] == 1 and (part / "final" / "model.safetensors").is_file()
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["checkpoint_0"]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    m_part = generator.main(_gen_argv(tokens, part, cfg))  # the limit may change on resume
    assert m_part["step"] == 5
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(part / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)



def test_generator_init_from_a_checkpoint_folder(tmp_path, toy_models):
    """--init loads a finished run's weights before training (lr 0: they come out unchanged);
    a resume from --out ignores it."""
    from accelerate.state import AcceleratorState, GradientState
    from train import generator

    tok_dir = _toy_tokenizer_dir(tmp_path)
    tokens = _extract(tmp_path, tok_dir, num=10, flip=True, shard_size=4)
    cfg = tmp_path / "gen.yaml"
    cfg.write_text("model: generator/test-toy-tiny\nsteps: 2\nbatch-size: 4\nlr: 0.05\nwarmup: 1\n"
                   "save-every: 0\nlog-every: 1\nnum-workers: 0\ncond: both\neval-samples: 4\n")
    generator.main(_gen_argv(tokens, tmp_path / "a", cfg))
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    for _ in range(2):  # the second run resumes from b's state: --init is ignored, still equal
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        generator.main(_gen_argv(tokens, tmp_path / "b", cfg) + ["--init", str(tmp_path / "a" / "final"),
                                                                   "--lr", "0", "--weight-decay", "0"])
        b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(SystemExit, match="no such folder"):
        generator.main(_gen_argv(tokens, tmp_path / "c", cfg) + ["--init", str(tmp_path / "missing")])


def test_trained_on_names_the_shipped_weights():
    """A generator trained on tokens of `name:tag` records `name:tag` (a fresh `name` has other
    weights and another fingerprint); a folder-extracted run records the model name alone."""
    from types import SimpleNamespace

    from train.generator import trained_on

    meta = {"ref": "tokenizer/vq-tiny:shapes", "path": None, "name": "tokenizer/vq-tiny", "tag": "shapes",
            "fingerprint": "ab"}
    assert trained_on(SimpleNamespace(meta={"tokenizer": meta})) == {"name": "tokenizer/vq-tiny:shapes",
                                                                      "fingerprint": "ab"}
    folder = {"ref": "runs/x/final", "path": "/abs/runs/x/final", "name": "tokenizer/vq-tiny", "fingerprint": "cd"}
    assert trained_on(SimpleNamespace(meta={"tokenizer": folder})) == {"name": "tokenizer/vq-tiny", "fingerprint": "cd"}
    assert trained_on(SimpleNamespace(meta={})) is None


def test_generator_rejects_mismatched_condition(tmp_path, toy_models):
    from train import generator

    tokens = _extract(tmp_path, _toy_tokenizer_dir(tmp_path), num=4, flip=False, shard_size=4)
    with pytest.raises(SystemExit, match="num_classes"):
        generator.main(["--model", TOY_GEN, "--set", "num_classes=5", "--tokens", str(tokens),
                        "--out", str(tmp_path / "g"), "--steps", "1", "--batch-size", "2", "--num-workers", "0"])


# ---------------------------------------------------------------------------------------
# two processes (gloo on CPU) vs one
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, toy_models):
    """``accelerate launch --multi_gpu --num_processes 2`` on a CPU-only machine runs 2 gloo processes
    (accelerate 1.15's ``--cpu --num_processes 2`` needs mpirun and falls back to one process)."""
    tokens = _extract(tmp_path, _toy_tokenizer_dir(tmp_path), num=16, flip=False, shard_size=16)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    common = ["--import", "test_train:register_toys", "--model", TOY_GEN, "--tokens", str(tokens),
              "--steps", "6", "--batch-size", "8", "--grad-accum", "2", "--lr", "0.05", "--warmup", "0", "--log-every", "1",
              "--save-every", "0", "--num-workers", "0", "--cond", "both", "--cpu", "--eval-samples", "16"]
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(n)]
        if n > 1:
            launch += ["--multi_gpu", "--main_process_port", "29533"]
        r = subprocess.run(launch + ["-m", "train.generator", *common, "--out", str(out)], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        m = json.loads((out / "final" / "metrics.json").read_text())
        assert m["num_processes"] == n
        runs[n] = ([json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines()],
                   load_file(str(out / "final" / "model.safetensors")), m)
    (l1, w1, m1), (l2, w2, m2) = runs[1], runs[2]
    print("1 process losses:", l1, "\n2 processes losses:", l2)
    assert len(l1) == len(l2) == 6
    assert l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    assert m1["eval_loss"] == pytest.approx(m2["eval_loss"], rel=1e-4)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-5), k
