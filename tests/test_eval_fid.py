"""FID / KID / precision-recall (eval/fid.py) and the resumable FID job (eval/fid_job.py)."""
import json

import numpy as np
import pytest
import torch

from eval import fid as F
from zoo.tokens import TokenSpec

# ---------------------------------------------------------------------------- Fréchet distance


def _random_features(n, d, seed, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features
    return (rng.normal(size=(n, d)) @ mix) * scale + shift


def test_frechet_distance_matches_torch_fidelity():
    from torch_fidelity.metric_fid import (
        fid_features_to_statistics,
        fid_statistics_to_metric,
    )

    a = _random_features(400, 24, 0)
    b = _random_features(300, 24, 1, shift=0.3, scale=1.5)
    mine = F.frechet_distance(*F.feature_statistics(a), *F.feature_statistics(b))
    sa = fid_features_to_statistics(torch.from_numpy(a))
    sb = fid_features_to_statistics(torch.from_numpy(b))
    theirs = fid_statistics_to_metric(sa, sb, verbose=False)["frechet_inception_distance"]
    assert mine > 1.0
    assert mine == pytest.approx(theirs, rel=1e-8)


def test_frechet_distance_closed_form_and_self():
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum (s1 - s2)^2 with s the standard deviations.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 0.5])
    want = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert F.frechet_distance(mu1, np.diag(s1 ** 2), mu2, np.diag(s2 ** 2)) == pytest.approx(want, rel=1e-10)
    # Rotating both Gaussians by the same orthogonal matrix changes nothing.
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    got = F.frechet_distance(q @ mu1, q @ np.diag(s1 ** 2) @ q.T, q @ mu2, q @ np.diag(s2 ** 2) @ q.T)
    assert got == pytest.approx(want, rel=1e-8)
    # A set against itself: 0, also for a singular covariance (fewer samples than dims).
    for n in (500, 10):
        x = _random_features(n, 32, 2)
        st = F.feature_statistics(x)
        assert abs(F.frechet_distance(*st, *st)) < 1e-6 * np.trace(st[1])
    with pytest.raises(ValueError, match="do not match"):
        F.frechet_distance(mu1, np.eye(3), mu2[:2], np.eye(2))


# ---------------------------------------------------------------------------- Shapes-FID end to end


def test_shapes_fid_self_zero_and_semantic_order():
    same = F.compute_metrics("shapes:test:96", "shapes:test:96", kid_subsets=10)
    m = same["metrics"]
    assert abs(m["shapes_fid"]) < 1e-6
    assert m["shapes_precision"] == 1.0 and m["shapes_recall"] == 1.0
    assert "NOT comparable" in same["note"] and same["feature_dim"] == 256 and "fid" not in m
    # Held-out images of the same distribution are closer than images with 3-4 objects.
    near = F.compute_metrics("shapes:test:96", "shapes:train:96", kid=False, prc=False)["metrics"]["shapes_fid"]
    far = F.compute_metrics("shapes:test:96", "shapes:train:96:objects=3-4", kid=False,
                            prc=False)["metrics"]["shapes_fid"]
    assert 0 < near < far


def test_registered_extractor_through_calculate_metrics():
    import torch_fidelity

    a, b = F.ShapesImages("test", 64), F.ShapesImages("train", 64, objects=(1, 2))
    ours = F.compute_metrics(a, b, kid=False, prc=False)["metrics"]["shapes_fid"]
    theirs = torch_fidelity.calculate_metrics(input1=a, input2=b, fid=True, feature_extractor="shapes-net",
                                              cuda=False, cache=False, verbose=False, save_cpu_ram=True)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)


def test_inputs_stats_files_and_cli(tmp_path, capsys):
    from PIL import Image

    ds = F.ShapesImages("test", 48)
    arr = np.stack([ds[i].permute(1, 2, 0).numpy() for i in range(len(ds))])
    np.savez(tmp_path / "samples.npz", arr_0=arr)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=arr)
    assert isinstance(F.npz_array(tmp_path / "samples.npz"), np.memmap)  # read lazily
    np.testing.assert_array_equal(F.npz_array(tmp_path / "compressed.npz"), arr)
    (tmp_path / "pngs").mkdir()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(tmp_path / "pngs" / f"{i:05d}.png")
    ref = "shapes:train:64:objects=1-2"
    direct = F.compute_metrics(arr, ref, kid=False, prc=False)["metrics"]["shapes_fid"]
    assert direct > 0
    # the reference statistics, saved by the CLI and read back as the reference
    stats = tmp_path / "ref.npz"
    assert F.main([ref, "--save-stats", str(stats), "--stats-with-features"]) == 0
    with np.load(stats) as z:
        assert z["mu"].shape == (256,) and z["sigma"].shape == (256, 256) and str(z["feature_extractor"]) == "shapes-net"
    out = tmp_path / "r.json"
    for inp in (tmp_path / "samples.npz", tmp_path / "compressed.npz", tmp_path / "pngs"):
        assert F.main([str(inp), "--ref", str(stats), "--json", str(out), "--kid-subsets", "5"]) == 0
        rep = json.loads(out.read_text())
        assert rep["metrics"]["shapes_fid"] == pytest.approx(direct, rel=1e-6)
        assert rep["input"]["num_images"] == 48 and "shapes_kid_mean" in rep["metrics"]
        assert rep["metric_family"] == "Shapes-FID" and rep["environment"]["arzoo"]
    printed = capsys.readouterr().out
    assert "Shapes-FID" in printed and "NOT comparable" in printed
    # an ADM/MAR-style file with only mu and sigma
    with np.load(stats) as z:
        np.savez(tmp_path / "adm.npz", mu=z["mu"], sigma=z["sigma"])
    rep = F.compute_metrics(tmp_path / "samples.npz", tmp_path / "adm.npz")
    assert rep["metrics"]["shapes_fid"] == pytest.approx(direct, rel=1e-6) and "shapes_kid_mean" not in rep["metrics"]
    # wrong dimensionality (Inception's 2048-d stats with Shapes features) is refused, clearly
    np.savez(tmp_path / "incep.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    assert F.main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "incep.npz")]) == 2
    assert "2048-d" in capsys.readouterr().err
    # a stats file is not a sample set
    assert F.main([str(stats), "--ref", ref]) == 2
    assert "statistics file" in capsys.readouterr().err


def test_inception_offline_error(tmp_path, monkeypatch, capsys):
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    def no_download(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(fi, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(F.InceptionWeightsMissing) as e:
        F.compute_metrics("shapes:test:8", "shapes:train:8", features="inception")
    msg = str(e.value)
    assert F.INCEPTION_FILE in msg and "--inception-weights" in msg and fi.URL_INCEPTION_V3 in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg
    assert F.main(["shapes:test:8", "--ref", "shapes:train:8", "--features", "inception",
                   "--inception-weights", str(tmp_path / "nope.pth")]) == 2
    err = capsys.readouterr().err
    assert "nope.pth: no such file" in err and "Nothing is downloaded" in err


@pytest.mark.slow
def test_inception_path_with_local_weights(tmp_path, monkeypatch):
    """The Inception branch end to end on a stand-in weights file (random values, right shapes):
    loads from the given path, never downloads, gives FID / IS / KID / PR on 2048-d features."""
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    with monkeypatch.context() as m:  # build the module once without weights to get its state dict
        m.setattr(fi, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(fi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        state = fi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    path = tmp_path / F.INCEPTION_FILE
    torch.save(state, path)
    monkeypatch.setattr(fi, "load_state_dict_from_url", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
    rep = F.compute_metrics("shapes:test:4", "shapes:test:4", features="inception", inception_weights=path,
                            batch_size=4, kid_subsets=3)
    m = rep["metrics"]
    assert rep["feature_dim"] == 2048 and rep["metric_family"].startswith("FID (Inception")
    assert abs(m["fid"]) < 1e-3 and m["precision"] == 1.0 and np.isfinite(m["is_mean"]) and "kid_mean" in m
    assert "note" not in rep


# ---------------------------------------------------------------------------- FID job


@pytest.fixture
def toy_models(tmp_path, monkeypatch):
    """A 32 px toy tokenizer + class-conditional toy generator saved as checkpoint folders."""
    from toys import ToyGenerator, ToyTokenizer

    import zoo.checkpoint as ck

    monkeypatch.setattr(ck, "_ALLOWED", dict(ck._ALLOWED))  # allow the toy classes for this test only
    ck.allow_class(ToyTokenizer)
    ck.allow_class(ToyGenerator)
    torch.manual_seed(0)
    tok = ToyTokenizer(image_size=32, vocab=16)
    gen = ToyGenerator(spec=TokenSpec("discrete", "grid", (8, 8), vocab_size=16), num_classes=5)
    tok.save_pretrained(tmp_path / "tok")
    gen.save_pretrained(tmp_path / "gen")
    return str(tmp_path / "tok"), str(tmp_path / "gen")


def _job(out, models, *extra):
    from eval.fid_job import main

    tok, gen = models
    return main(["--tokenizer", tok, "--generator", gen, "--num", "23", "--shard-size", "8", "--batch-size", "4",
                 "--out", str(out), "--seed", "7", "--no-progress", *extra])


def _samples(out):
    with np.load(out / "samples.npz") as z:
        return z["arr_0"], z["arr_1"]


def test_fid_job_resume_is_exact(tmp_path, toy_models, monkeypatch):
    import eval.fid_job as J
    from zoo.pipeline import Pipeline

    full = tmp_path / "full"
    assert _job(full, toy_models, "--ref", "none") == 0
    imgs, labels = _samples(full)
    assert imgs.shape == (23, 32, 32, 3) and imgs.dtype == np.uint8
    assert labels.tolist() == [i % 5 for i in range(23)]  # class-balanced
    assert np.bincount(labels).max() - np.bincount(labels).min() <= 1
    # Same images as one Pipeline.generate call over all labels with the same seed and batch size.
    pipe = Pipeline.load(*toy_models)
    ref = pipe.generate(labels.tolist(), seed=7, batch_size=4, progress=False).numpy()
    np.testing.assert_array_equal(imgs, ref)

    # Stopped after 1 shard (--max-shards), then crashed during the 3rd: the rerun is identical.
    part = tmp_path / "part"
    assert _job(part, toy_models, "--ref", "none", "--max-shards", "1") == 0
    assert sorted(p.name for p in (part / "shards").iterdir()) == ["shard_00000.npz"]
    assert not (part / "samples.npz").exists()
    real, calls = J.generate_range, []

    def crash_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(J, "generate_range", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _job(part, toy_models, "--ref", "none")
    monkeypatch.setattr(J, "generate_range", real)
    assert len(list((part / "shards").glob("shard_*.npz"))) == 2
    made = []
    monkeypatch.setattr(J, "generate_range", lambda *a, **k: made.append(a[2]) or real(*a, **k))
    assert _job(part, toy_models, "--ref", "none") == 0
    assert made == [16]  # only the missing shard (samples 16..22) was generated
    np.testing.assert_array_equal(_samples(part)[0], imgs)

    # the shard size does not change the images (shards are whole batches)
    other = tmp_path / "other"
    monkeypatch.setattr(J, "generate_range", real)
    assert _job(other, toy_models, "--ref", "none", "--shard-size", "12") == 0
    np.testing.assert_array_equal(_samples(other)[0], imgs)


def test_fid_job_refuses_mixed_settings_and_reports(tmp_path, toy_models, capsys):
    out = tmp_path / "job"
    assert _job(out, toy_models, "--ref", "none", "--max-shards", "1") == 0
    assert _job(out, toy_models, "--ref", "none", "--cfg", "2.0") == 2
    assert "different settings (sampling)" in capsys.readouterr().err
    assert _job(out, toy_models, "--ref", "none", "--shard-size", "6") == 2  # not a multiple of the batch
    assert "multiple of --batch-size" in capsys.readouterr().err
    # finish it with metrics against the Shapes test split
    assert _job(out, toy_models, "--ref", "shapes:test:40") == 0
    rep = json.loads((out / "report.json").read_text())
    s = rep["settings"]
    assert s["num"] == 23 and s["seed"] == 7 and s["batch_size"] == 4 and s["sampling"]["cfg"] == 1.0
    assert len(s["tokenizer"]["sha256"]) == 64 and len(s["generator"]["sha256"]) == 64
    assert rep["environment"]["arzoo"] and rep["environment"]["torch-fidelity"]
    assert rep["fid"]["ref"]["num_images"] == 40 and "resize" in rep["fid"]
    assert rep["metrics"]["shapes_fid"] > 0 and "Shapes-FID" in capsys.readouterr().out
