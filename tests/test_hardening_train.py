"""Issue 15, training hardening (train/): atomic resumable states, resume past an epoch end,
resume with changed arguments, checked token shards, accelerate launcher settings, LPIPS weights.

Uses the toy tokenizer / generator of ``test_train.py`` (registered per test) on 32 px Shapes.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_train import (ROOT, TOY_GEN, TOY_TOK, _extract, _toy_tokenizer_dir, toy_models)  # noqa: F401
from zoo import checkpoint, registry

# a resume that skips every batch loops forever: fail instead
pytestmark = [pytest.mark.usefixtures("fresh_accelerate", "toy_models"), pytest.mark.timeout(60)]


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _gen(tokens, out, *extra):
    """Run train.generator in-process on the toy generator (fresh accelerate state)."""
    from train import generator

    _reset_accelerate()
    return generator.main(["--model", TOY_GEN, "--tokens", str(tokens), "--out", str(out), "--lr", "0.05",
                           "--warmup", "0", "--log-every", "1", "--num-workers", "0", "--eval-samples", "4",
                           "--cond", "both", *extra])


def _other_tokenizer(d, **kw) -> Path:
    torch.manual_seed(1)  # weights unlike _toy_tokenizer_dir's
    registry.create(TOY_TOK, **kw).save_pretrained(d)
    return d


@pytest.fixture
def tokens(tmp_path):
    return _extract(tmp_path, _toy_tokenizer_dir(tmp_path), num=10, flip=False, shard_size=4)  # 10 rows


# ---------------------------------------------------------------------------------------
# atomic resumable states
# ---------------------------------------------------------------------------------------


def test_crash_mid_save_resumes_from_last_complete_state(tmp_path, tokens, monkeypatch):
    import accelerate.accelerator as acc_mod

    argv = ["--steps", "6", "--batch-size", "2", "--save-every", "2", "--keep", "1"]
    full = tmp_path / "full"
    _gen(tokens, full, *argv)

    # the second save (step 4) dies after the weights and optimizer are written, before the
    # counters / EMA: what kill -9 mid-save leaves behind
    real, calls = acc_mod.save_custom_state, []

    def dying(obj, output_dir, *a, **kw):
        calls.append(output_dir)
        if len({str(Path(c)) for c in calls}) > 1:
            raise RuntimeError("killed mid-save")
        return real(obj, output_dir, *a, **kw)

    monkeypatch.setattr(acc_mod, "save_custom_state", dying)
    part = tmp_path / "part"
    with pytest.raises(RuntimeError, match="killed mid-save"):
        _gen(tokens, part, *argv)
    monkeypatch.setattr(acc_mod, "save_custom_state", real)
    left = sorted(p.name for p in (part / "checkpoints").iterdir())
    # --keep 1: the step-2 state is still there, complete, next to the unfinished one
    assert left == [".tmp-checkpoint_1", "checkpoint_0"]

    m = _gen(tokens, part, *argv)
    assert m["step"] == 6
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["checkpoint_2"]
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(part / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    steps = [json.loads(x)["step"] for x in (part / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3-4 of the crashed run were redone, not duplicated


# ---------------------------------------------------------------------------------------
# resume position past the end of an epoch
# ---------------------------------------------------------------------------------------


def test_resume_past_epoch_end_does_not_hang(tmp_path, tokens):
    out = tmp_path / "g"
    _gen(tokens, out, "--steps", "3", "--batch-size", "2", "--save-every", "3")  # micro-batch 3 of 5
    # a larger batch: 1 micro-batch per epoch, the saved position 3 is past it
    m = _gen(tokens, out, "--steps", "5", "--batch-size", "8", "--save-every", "0", "--allow-changed")
    assert m["step"] == 5 and m["epoch"] == 3  # epochs 1, 2 and 3 hold steps 4, 5


# ---------------------------------------------------------------------------------------
# resume with changed arguments
# ---------------------------------------------------------------------------------------


def test_resume_with_changed_arguments_is_refused(tmp_path, tokens):
    out = tmp_path / "g"
    _gen(tokens, out, "--steps", "2", "--batch-size", "2")
    before = (out / "args.json").read_text()
    with pytest.raises(SystemExit) as e:
        _gen(tokens, out, "--steps", "4", "--batch-size", "4", "--lr", "0.1", "--num-workers", "0")
    msg = str(e.value)
    assert "args.json" in msg and "--allow-changed" in msg
    assert "--batch-size: 2 -> 4" in msg and "--lr: 0.05 -> 0.1" in msg and "--steps" not in msg
    assert (out / "args.json").read_text() == before

    # other tokens: the folder and what is in it (re-extracted with another tokenizer)
    other = _extract(tmp_path, _other_tokenizer(tmp_path / "tok-b"), num=6, flip=False, name="other")
    with pytest.raises(SystemExit, match="--tokens.*\n.*--tokens-identity"):
        _gen(other, out, "--steps", "4", "--batch-size", "2")

    # only allowed arguments changed: resumes without complaint
    _gen(tokens, out, "--steps", "3", "--batch-size", "2", "--eval-samples", "2", "--save-every", "5")
    m = _gen(tokens, out, "--steps", "4", "--batch-size", "2", "--lr", "0.1", "--allow-changed")
    assert m["step"] == 4
    assert json.loads((out / "args.json").read_text())["lr"] == 0.1
    hist = [json.loads(x) for x in (out / "args.history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [0, 2, 3]
    assert hist[1]["changed"] == [] and hist[2]["changed"] == ["--lr: 0.05 -> 0.1"]
    assert hist[0]["args"]["lr"] == 0.05


def test_changed_args_rules():
    from train.loop import changed_args

    old = {"lr": 0.1, "steps": 5, "eval_samples": 8, "set": ["a=1"], "overrides": {"a": 1}, "model": "m"}
    assert changed_args(old, {**old, "steps": 9, "eval_samples": 2, "set": ["a: 1"], "new_flag": 3}) == []
    assert changed_args(old, {**old, "overrides": {"a": 2}, "model": "n"}) == \
        ['--model: "m" -> "n"', '--overrides: {"a": 1} -> {"a": 2}']


# ---------------------------------------------------------------------------------------
# token shards: checked at load, extract never leaves stale shards, tokenizer identity
# ---------------------------------------------------------------------------------------


def _rewrite_shard(path, **changes):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as h:
        meta = h.metadata()
    t = load_file(str(path))
    t.update(changes)
    save_file(t, str(path), metadata=meta)


def test_bad_shards_fail_at_load_naming_the_file(tmp_path, tokens):
    from train.extract import TokenShardDataset, TokenShardError

    shard = tokens / "tokens-00001.safetensors"
    good = shard.read_bytes()

    shard.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(TokenShardError, match="tokens-00001.safetensors.*truncated or corrupt"):
        TokenShardDataset(tokens)
    with pytest.raises(SystemExit, match="tokens-00001.safetensors"):  # the CLI: one line, no traceback
        _gen(tokens, tmp_path / "g", "--steps", "1", "--batch-size", "2")

    shard.write_bytes(good)
    ids = load_file(str(shard))["tokens"].clone()
    ids[0, 0, 0] = 16  # vocab is 16
    _rewrite_shard(shard, tokens=ids)
    with pytest.raises(TokenShardError, match=r"tokens-00001.safetensors.*\[0, 16\)"):
        TokenShardDataset(tokens)

    shard.write_bytes(good)
    _rewrite_shard(shard, label=torch.full((4,), 30))  # 30 classes
    with pytest.raises(TokenShardError, match="tokens-00001.safetensors.*labels"):
        TokenShardDataset(tokens)

    shard.write_bytes(good)
    _rewrite_shard(shard, tokens=load_file(str(shard))["tokens"][:3])  # rows missing
    with pytest.raises(TokenShardError, match="tokens-00001.safetensors.*3.*4"):
        TokenShardDataset(tokens)
    shard.write_bytes(good)
    assert len(TokenShardDataset(tokens)) == 10


def test_shards_from_another_tokenizer_fail_at_load(tmp_path, tokens):
    from train.extract import TokenShardDataset, TokenShardError

    # same spec, other weights: only the fingerprint tells them apart
    same_spec = _extract(tmp_path, _other_tokenizer(tmp_path / "tok-b"), num=10, flip=False, shard_size=4, name="b")
    other_spec = _extract(tmp_path, _other_tokenizer(tmp_path / "tok-c", vocab=8), num=10, flip=False, shard_size=4,
                          name="c")
    name = "tokens-00002.safetensors"
    good = (tokens / name).read_bytes()
    (tokens / name).write_bytes((other_spec / name).read_bytes())
    with pytest.raises(TokenShardError, match=f"{name}.*V=8.*V=16.*another tokenizer"):
        TokenShardDataset(tokens)
    (tokens / name).write_bytes((same_spec / name).read_bytes())
    with pytest.raises(TokenShardError, match=f"{name}.*two extractions"):
        TokenShardDataset(tokens)
    (tokens / name).write_bytes(good)
    TokenShardDataset(tokens)


def test_extract_refuses_non_empty_out_and_overwrite_leaves_no_stale_shards(tmp_path, tokens):
    from train import extract

    assert len(list(tokens.glob("tokens-*"))) == 3
    tok_dir = tmp_path / "toytok"
    argv = ["--tokenizer", str(tok_dir), "--resolution", "32", "--num", "3", "--out", str(tokens),
            "--shard-size", "4", "--num-workers", "0"]
    before = (tokens / "meta.json").read_text()
    with pytest.raises(SystemExit, match="--out .*not empty.*--overwrite"):
        extract.main(argv)
    assert (tokens / "meta.json").read_text() == before
    extract.main(argv + ["--overwrite"])
    assert sorted(p.name for p in tokens.iterdir()) == ["meta.json", "tokens-00000.safetensors"]
    assert json.loads((tokens / "meta.json").read_text())["count"] == 3


def test_tokenizer_identity_recorded_from_shards_to_generator(tmp_path, tokens):
    tok = checkpoint.load_pretrained(tmp_path / "toytok")
    meta = json.loads((tokens / "meta.json").read_text())
    fp = checkpoint.fingerprint(tok)
    assert meta["tokenizer"]["fingerprint"] == fp and meta["tokenizer"]["name"] == TOY_TOK
    out = tmp_path / "g"
    _gen(tokens, out, "--steps", "1", "--batch-size", "2", "--ema", "0.5")
    for sub in ("final", "final-raw"):
        cfg = json.loads((out / sub / "config.json").read_text())
        assert cfg["tokenizer"] == {"name": TOY_TOK, "fingerprint": fp}


# ---------------------------------------------------------------------------------------
# accelerate launcher settings win over the script's flags
# ---------------------------------------------------------------------------------------


def test_launcher_mixed_precision_and_grad_accum_win(tmp_path, tokens, monkeypatch, capsys):
    from train import generator

    seen = []

    def spy(args):
        seen.append(real(args))
        return seen[-1]

    real = generator.make_accelerator
    monkeypatch.setattr(generator, "make_accelerator", spy)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    out = tmp_path / "g"
    m = _gen(tokens, out, "--steps", "2", "--batch-size", "4", "--mixed-precision", "no", "--grad-accum", "1")
    acc = seen[0]
    assert acc.mixed_precision == "bf16" and acc.gradient_accumulation_steps == 2
    printed = capsys.readouterr().out
    assert "ACCELERATE_MIXED_PRECISION=bf16" in printed and "wins over --mixed-precision no" in printed
    assert "wins over --grad-accum 1" in printed
    args = json.loads((out / "args.json").read_text())
    assert (args["mixed_precision"], args["grad_accum"]) == ("bf16", 2)
    assert m["step"] == 2 and m["last_log"]["samples"] == 8  # 2 steps of the global batch 4

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "3")  # does not split the batch
    with pytest.raises(SystemExit, match="--batch-size 4.*3"):
        _gen(tokens, tmp_path / "h", "--steps", "1", "--batch-size", "4")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_readme_multi_process_command_on_cpu(tmp_path, tokens):
    """README: ``accelerate launch --multi_gpu --num_processes 2 -m train.generator ...``, verbatim,
    without any ACCELERATE_* setting: two gloo processes on a machine without a GPU."""
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only fallback")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    accelerate = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "g"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "-m", "train.generator",
           "--import", "test_train:register_toys", "--model", TOY_GEN, "--tokens", str(tokens), "--out", str(out),
           "--steps", "3", "--batch-size", "4", "--num-workers", "0", "--eval-samples", "4", "--log-every", "1"]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads((out / "final" / "metrics.json").read_text())
    assert m["num_processes"] == 2 and m["step"] == 3
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


# ---------------------------------------------------------------------------------------
# LPIPS needs real weights
# ---------------------------------------------------------------------------------------


def _tok_argv(out, *extra):
    return ["--model", TOY_TOK, "--out", str(out), "--steps", "1", "--batch-size", "2", "--num-objects", "1",
            "--train-images", "4", "--eval-images", "2", "--eval-batch-size", "2", "--num-workers", "0",
            "--warmup", "0", *extra]


def test_perceptual_loss_refuses_random_lpips(tmp_path):
    from tokenizers_vis.losses import load_lpips
    from train import tokenizer

    with pytest.raises(SystemExit, match="--perceptual-weight 0.5 needs --lpips-weights"):
        tokenizer.main(_tok_argv(tmp_path / "t", "--perceptual-weight", "0.5"))
    assert not (tmp_path / "t" / "final").exists()
    pt = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, pt)
    _reset_accelerate()
    with pytest.raises(SystemExit, match="--lpips-weights .*vgg.pth.*safetensors"):
        tokenizer.main(_tok_argv(tmp_path / "t", "--perceptual-weight", "0.5", "--lpips-weights", str(pt)))
    bad = tmp_path / "bad.safetensors"
    save_file({"features.0.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="bad.safetensors.*VGG16"):
        load_lpips(bad)


def test_perceptual_loss_with_weights_file(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    from train import tokenizer

    torch.manual_seed(0)
    w = tmp_path / "vgg16.safetensors"
    save_file({f"features.{k}": v.contiguous() for k, v in make_layers(cfgs["D"]).state_dict().items()}, str(w))
    m = tokenizer.main(_tok_argv(tmp_path / "t", "--perceptual-weight", "0.5", "--lpips-weights", str(w),
                                 "--log-every", "1"))
    assert m["perceptual"] is True and m["lpips_weights"] == str(w) and m["lpips_calibrated"] is False
    assert "perceptual" in json.loads((tmp_path / "t" / "log.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("overrides, match", [
    ({"ch": "abc"}, r"--set ch='abc': tokenizer/vq-tiny's ch is an int \(default 16\)"),
    ({"chx": 3}, "has no argument 'chx'"),
    ({"entropy_weight": "x"}, "is a float"),
    ({"norm_groups": 5}, r"cannot be built with --set norm_groups=5: .*must divide"),
])
def test_bad_set_overrides_are_one_line_errors(overrides, match):
    from train.common import build_model

    with pytest.raises(SystemExit, match=match):
        build_model("tokenizer/vq-tiny", overrides)
    assert build_model("tokenizer/vq-tiny", {"entropy_weight": 1}).config["entropy_weight"] == 1  # int for float: fine
