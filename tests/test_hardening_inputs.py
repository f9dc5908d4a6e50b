"""Issue 15, input validation: sampling knobs, encode() inputs, `arzoo sample` arguments,
random weights made visible, generator/tokenizer pairing, thread-count invariance of sampling."""
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import zoo
from generators.base import SamplingConfig
from generators.sampling import flow_step, sample_bits, sample_categorical
from sample.cli import main as sample_main
import zoo.pipeline as zp
from zoo.pipeline import Pipeline, load_model
from zoo.tokens import IncompatibleTokens

ROOT = Path(__file__).resolve().parent.parent
NAN, INF = float("nan"), float("inf")
TOK, GEN = "tokenizer/vq-tiny", "generator/raster-ar-tiny"

pytestmark = pytest.mark.usefixtures("single_thread")


# ---- SamplingConfig and the sampling functions ---------------------------------------------
@pytest.mark.parametrize("field", ["cfg", "temperature", "top_p"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_sampling_config_refuses_non_finite(field, value):
    # Before: accepted, and NaN probabilities made every token id 0.
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


@pytest.mark.parametrize("value", [2.5, "3", True, None])
def test_sampling_config_top_k_must_be_an_integer(value):
    with pytest.raises(ValueError, match="top_k must be an integer"):
        SamplingConfig(top_k=value)


@pytest.mark.parametrize("kw", [{"cfg": "2"}, {"temperature": True}, {"extra": {"pivot_cfg": NAN}},
                                {"extra": {"cfg_interval": INF}}, {"extra": [("num_iter", 2)]}])
def test_sampling_config_refuses_wrong_types_and_non_finite_extras(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingConfig(**kw)


def test_sampling_config_checks_assignments_and_keeps_meaningful_values():
    s = SamplingConfig(cfg=-1.5, temperature=0, top_k=3, top_p=1)  # guidance away / greedy: meaningful
    assert (s.cfg, s.temperature, s.top_k, s.top_p) == (-1.5, 0.0, 3, 1.0)
    with pytest.raises(ValueError, match="cfg must be finite"):  # generators read the fields directly
        s.cfg = NAN
    with pytest.raises(ValueError, match="top_k"):
        s.top_k = 1.5
    assert s.cfg == -1.5 and s.top_k == 3


def test_sampling_functions_refuse_non_finite_knobs():
    g = torch.Generator().manual_seed(0)
    logits, uncond = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    with pytest.raises(ValueError, match="cfg must be finite"):
        sample_categorical(logits, uncond=uncond, cfg=NAN, generator=g)
    with pytest.raises(ValueError, match="temperature must be finite"):
        sample_categorical(logits, temperature=INF, generator=g)
    with pytest.raises(ValueError, match="top_k must be an integer"):
        sample_categorical(logits, top_k=2.5, generator=g)
    with pytest.raises(ValueError, match="cfg must be finite"):
        sample_bits(logits, uncond=uncond, cfg=-INF, generator=g)
    with pytest.raises(ValueError, match="cfg must be finite"):
        flow_step(logits, logits, uncond, cfg=NAN, dt=0.1)


# ---- Tokenizer.encode inputs -----------------------------------------------------------------
@pytest.fixture(scope="module")
def vq():
    return zoo.create(TOK).eval()


def _images(batch=2):
    return torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("make, match", [
    (lambda x: (x + 1) * 127.5, r"\[-1, 1\].*0\.\.255"),                 # 0..255 floats
    (lambda x: ((x + 1) * 127.5).to(torch.uint8), r"uint8 \(divide by 127.5 and subtract 1\)"),
    (lambda x: x.index_fill(2, torch.tensor([5]), NAN), "NaN"),
    (lambda x: x.index_fill(3, torch.tensor([5]), INF), "inf"),
    (lambda x: x.index_fill(3, torch.tensor([5]), -INF), "inf"),
    (lambda x: x * 3, r"\[-1, 1\]"),
    (lambda x: x[0], r"shape \(B, 3, 64, 64\)"),
])
def test_encode_refuses_bad_images(vq, make, match):
    with pytest.raises(ValueError, match=match):
        vq.encode(make(_images()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_encode_casts_other_float_dtypes(vq, dtype):
    x = _images().to(dtype)
    assert torch.equal(vq.encode(x).data, vq.encode(x.float()).data)


def test_encode_tolerates_resampling_overshoot(vq):
    vq.encode(_images() * 1.2)  # bicubic resizing overshoots [-1, 1] near edges: still accepted


def test_every_tokenizer_checks_encode_inputs():
    # The check sits on the base class: no tokenizer's encode can skip it (meta build: no init cost).
    names = zoo.list_models("tokenizer/*-tiny")
    assert len(names) >= 8
    for name in names:
        tok = zoo.registry.build_meta(name)
        x = torch.rand(1, 3, tok.image_size, tok.image_size) * 255
        with pytest.raises(ValueError, match=r"\[-1, 1\]"):
            tok.encode(x)


# ---- Pipeline conditions ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_pipe():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, on purpose
        return Pipeline.load(TOK, GEN)


@pytest.mark.parametrize("classes, match", [
    ([], "empty"), (["3"], "integers, got '3'"), ([2**63], r"\[0, 30\).*9223372036854775808"),
    ([2.5], "integers, got 2.5"), ([True], "integers, got True"), ([30], r"\[0, 30\)"),
    (torch.tensor([1.0]), "integer class ids"),
])
def test_pipeline_refuses_bad_class_ids(random_pipe, classes, match):
    with pytest.raises(ValueError, match=match):
        random_pipe.make_condition(classes)


# ---- arzoo sample ----------------------------------------------------------------------------
@pytest.mark.parametrize("extra, match", [
    (["--grid-max-rows", "0"], "--grid-max-rows must be >= 1"),
    (["--num", "-3"], "--num must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--device", "gpu"], "--device 'gpu': not a torch device"),
    (["--device", "meta"], "meta device holds no data"),
    (["--classes", str(2**63)], r"\[0, 30\)"),
    (["--classes", "0-99999999999999"], r"\[0, 30\)"),
    (["--cfg", "nan"], "cfg must be finite"),
    (["--top-p", "inf"], "top_p must be finite"),
    (["--temperature", "nan"], "temperature must be finite"),
    (["--tokenizer", "tokenizer/vq-tiny:", "--classes", "0"], "empty weights tag"),
])
def test_sample_cli_bad_arguments_give_one_line(tmp_path, capsys, extra, match):
    argv = ["--tokenizer", TOK, "--generator", GEN, "--out", str(tmp_path / "out"), "--num", "1",
            "--no-progress", *extra]
    assert sample_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last.startswith("arzoo sample: ")
    assert re.search(match, last), last
    assert not (tmp_path / "out" / "grid.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_sample_cli_cuda_without_gpu(tmp_path, capsys):
    assert sample_main(["--tokenizer", TOK, "--generator", GEN, "--out", str(tmp_path), "--device", "cuda"]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err


def test_sample_cli_records_random_weights(tmp_path, capsys):
    out = tmp_path / "out"
    assert sample_main(["--tokenizer", f"{TOK}:shapes", "--generator", GEN, "--classes", "0", "--num", "1",
                        "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "generator/raster-ar-tiny: RANDOM weights (no :tag given; available tags: shapes" in err
    assert "tokenizer/vq-tiny: RANDOM" not in err
    meta = json.loads((out / "samples.json").read_text())
    assert meta["pretrained"] == {"tokenizer": True, "generator": False}
    assert meta["weights"]["generator"] is None
    assert Path(meta["weights"]["tokenizer"]).resolve() == (ROOT / "weights" / "tokenizer-vq-tiny").resolve()


def test_load_model_reports_where_weights_came_from(tmp_path):
    with pytest.warns(zp.RandomWeightsWarning, match="RANDOM weights"):
        rand = load_model(TOK, "tokenizer")
    assert rand.pretrained_source is None
    tagged = load_model(f"{TOK}:shapes", "tokenizer")
    assert Path(tagged.pretrained_source).resolve() == (ROOT / "weights" / "tokenizer-vq-tiny").resolve()
    rand.save_pretrained(tmp_path / "ck")
    assert load_model(tmp_path / "ck", "tokenizer").pretrained_source == str(tmp_path / "ck")
    with pytest.raises(ValueError, match="empty weights tag"):
        load_model(f"{TOK}:", "tokenizer")


@pytest.mark.slow
def test_python_m_sample_matches_arzoo_sample(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "sample", "--tokenizer", TOK, "--generator", GEN, "--cfg", "nan",
                        "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "arzoo sample: cfg must be finite, got nan"


# ---- tokenizer / generator pairing ---------------------------------------------------------
def test_pipeline_refuses_generator_trained_on_another_tokenizer():
    tf = zoo.create("tokenizer/tokenflow-tiny", pretrained="shapes")
    var = zoo.create("generator/var-tiny", pretrained="shapes")
    assert tf.spec == var.spec  # same token shape: the spec check alone accepted this pair
    with pytest.raises(IncompatibleTokens, match=r"var-tiny.*msvq-tiny:shapes.*tokenflow-tiny"):
        Pipeline(tf, var)
    with pytest.warns(UserWarning, match="msvq-tiny"):
        Pipeline(tf, var, allow_tokenizer_mismatch=True)
    var.trained_on = None  # random init / older checkpoint: nothing recorded, nothing checked
    Pipeline(tf, var)


@pytest.mark.slow  # loads every shipped generator and its tokenizer (about 2 s)
def test_shipped_generators_pair_with_their_recorded_tokenizers():
    folders = sorted((ROOT / "weights").glob("generator-*"))
    assert len(folders) >= 10
    for folder in folders:
        rec = json.loads((folder / "config.json").read_text()).get("tokenizer")
        assert rec is not None, f"{folder} records no tokenizer"
        gen = zoo.load_pretrained(folder)
        Pipeline(load_model(rec["name"], "tokenizer"), gen)  # the name carries the weights tag


# ---- thread count ------------------------------------------------------------------------
def test_categorical_sampling_does_not_depend_on_thread_count():
    # The draw (CFG, temperature, top-k/p, softmax, exponential race) is row-wise: identical ids
    # at 1 and 2 threads for the same logits. (Logits themselves come from matmuls whose
    # reduction order may depend on the thread count and BLAS; see the README's reproducibility key.)
    g = torch.Generator().manual_seed(0)
    logits, uncond = torch.randn(64, 4096, generator=g) * 3, torch.randn(64, 4096, generator=g) * 3
    ids = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        kw = dict(uncond=uncond, cfg=2.0, temperature=0.9, top_k=900, top_p=0.96)
        ids.append((sample_categorical(logits, generator=torch.Generator().manual_seed(1), **kw),
                    sample_categorical(logits, seed=7, **kw),
                    sample_bits(logits[:, :64], uncond=uncond[:, :64], cfg=2.0,
                                generator=torch.Generator().manual_seed(1))))
    for a, b in zip(*ids):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["generator/raster-ar-tiny", "generator/nar-tiny", "generator/var-tiny",
                                  "generator/mar-tiny", "generator/himar-tiny", "generator/xar-tiny"])
def test_unknown_sampling_extra_keys_are_refused(name):
    import zoo
    from generators.base import Condition, SamplingConfig

    g = zoo.create(name)
    with pytest.raises(ValueError, match=r"\['bogus'\] are not used"):
        g.generate(Condition(labels=torch.tensor([0])), SamplingConfig(extra={"bogus": 1}))
