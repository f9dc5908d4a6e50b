"""Issue 15 (hardening), evaluation: folders written by `arzoo sample`, damaged fid-job shards,
missing Inception weights, random-init models in fid-job, and GenEval's official detection
order and float32 precision (eval/images.py, eval/fid_job.py, eval/geneval.py)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from eval import fid as F
from eval import geneval as G
from eval.images import FolderImages, open_images
from test_eval_fid import toy_models  # noqa: F401  (fixture: toy checkpoint folders)

# ----------------------------------------------------------------------------- folders


def _sample_folder(tmp_path, n=6, size=32):
    """A folder as `arzoo sample` writes it (its own writer): PNGs, grid.png, samples.npz/json."""
    from sample.cli import write_outputs

    out = tmp_path / "samples"
    out.mkdir()
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    meta = {"samples": [{"index": i, "file": f"{i:05d}.png", "class": i % 3} for i in range(n)]}
    write_outputs(out, images, n // 2, 2, [i % 3 for i in range(n)], meta)
    return out, images.numpy()


def test_fid_on_a_sample_folder_reads_only_the_listed_samples(tmp_path, capsys):
    out, images = _sample_folder(tmp_path)
    assert (out / "grid.png").is_file()
    ds, desc = open_images(out)
    assert len(ds) == 6 and desc["image_size"] == (32, 32)  # grid.png is not a sample
    np.testing.assert_array_equal(np.stack([ds[i].permute(1, 2, 0).numpy() for i in range(6)]), images)
    # the command the issue reports crashing on grid.png
    assert F.main([str(out), "--ref", "shapes:test:6", "--no-kid", "--no-prc"]) == 0
    assert "6 images" in capsys.readouterr().out


def test_manifest_errors_name_the_file(tmp_path):
    out, _ = _sample_folder(tmp_path)
    (out / "00003.png").unlink()
    with pytest.raises(ValueError, match=r"samples\.json: lists '00003\.png', but .*00003\.png does not exist"):
        FolderImages(out)
    (out / "samples.json").write_text(json.dumps({"samples": [{"file": "../elsewhere.png"}]}))
    with pytest.raises(ValueError, match=r"lists '\.\./elsewhere\.png', which is outside"):
        FolderImages(out)
    (out / "samples.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"samples\.json: not valid JSON"):
        FolderImages(out)


def test_folder_without_manifest_names_the_odd_sized_image(tmp_path, capsys):
    out, _ = _sample_folder(tmp_path)
    (out / "samples.json").unlink()
    with pytest.raises(ValueError, match=r"grid\.png: \d+x\d+ image \(arzoo sample's grid\.png, not a sample\), "
                                         r"but 6 of the 7 images in .* are 32x32"):
        open_images(out)
    assert F.main([str(out), "--ref", "shapes:test:6"]) == 2
    assert "grid.png" in capsys.readouterr().err
    (out / "grid.png").unlink()
    (out / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken\.png: cannot read this image"):
        open_images(out)
    (out / "broken.png").unlink()
    assert len(open_images(out)[0]) == 6  # plain folder of same-size images: all of them


def test_geneval_layout_folder_reads_its_listed_samples(tmp_path):
    out = tmp_path / "gen"
    meta = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a red circle"}
    ims = [np.full((16, 16, 3), v, np.uint8) for v in (10, 20)]
    G.write_prompt_folder(out, 0, meta, ims)  # also writes a 36-px-wide grid.png
    (out / "samples.json").write_text(json.dumps(
        {"layout": "geneval", "samples": [{"file": f"00000/samples/{n:05d}.png"} for n in range(2)]}))
    ds, _ = open_images(out)
    assert len(ds) == 2 and [int(ds[i][0, 0, 0]) for i in range(2)] == [10, 20]


# ----------------------------------------------------------------------------- fid-job


def _job(out, tok, gen, *extra):
    from eval.fid_job import main

    return main(["--tokenizer", tok, "--generator", gen, "--num", "12", "--shard-size", "4", "--batch-size", "4",
                 "--out", str(out), "--seed", "3", "--no-progress", "--ref", "none", *extra])


def test_fid_job_remakes_a_truncated_shard(tmp_path, toy_models, monkeypatch):
    import eval.fid_job as J

    out = tmp_path / "job"
    assert _job(out, *toy_models) == 0
    with np.load(out / "samples.npz") as z:
        want = z["arr_0"]
    shard = out / "shards" / "shard_00001.npz"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # a "complete" shard cut in half (no zip directory left)
    made, real = [], J.generate_range
    monkeypatch.setattr(J, "generate_range", lambda *a, **k: made.append(a[2]) or real(*a, **k))
    with pytest.warns(UserWarning, match=r"shard_00001\.npz: damaged shard \(BadZipFile"):
        assert _job(out, *toy_models) == 0
    assert made == [4]  # only that shard was made again
    with np.load(out / "samples.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], want)


def test_fid_job_names_a_shard_damaged_inside(tmp_path, toy_models, capsys):
    out = tmp_path / "job"
    assert _job(out, *toy_models) == 0
    shard = out / "shards" / "shard_00002.npz"
    data = bytearray(shard.read_bytes())
    data[300] ^= 0xFF  # a flipped pixel byte: headers intact, only the CRC tells
    shard.write_bytes(bytes(data))
    assert _job(out, *toy_models) == 2
    err = capsys.readouterr().err
    assert "shard_00002.npz: damaged shard" in err and "delete it and rerun" in err


def test_fid_job_without_inception_weights_fails_before_sampling(tmp_path, toy_models, monkeypatch, capsys):
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    import eval.fid_job as J

    # torch.hub's cache (where torch-fidelity would put the weights) is $TORCH_HOME/hub: empty here
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(fi, "load_state_dict_from_url", lambda *a, **k: pytest.fail("a download was attempted"))
    monkeypatch.setattr(J, "generate_range", lambda *a, **k: pytest.fail("sampled before checking the weights"))
    out = tmp_path / "job"
    assert _job(out, *toy_models, "--ref", "shapes:test", "--features", "inception") == 2
    err = capsys.readouterr().err
    assert F.INCEPTION_FILE in err and "--inception-weights" in err and str(tmp_path / "torch_home") in err
    assert _job(out, *toy_models, "--ref", str(tmp_path / "missing.npz")) == 2  # a missing --ref too
    assert "missing.npz: no such file" in capsys.readouterr().err
    assert not list(out.glob("shards/shard_*.npz"))


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")  # load_model's own warning, tested with it
def test_fid_job_reports_whether_models_were_pretrained(tmp_path, toy_models):
    from toys import toy_registry

    tok, gen = toy_models
    assert _job(tmp_path / "a", tok, gen) == 0
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rep["pretrained"] == {"tokenizer": True, "generator": True}
    with toy_registry():  # a registry name without :tag = random init
        assert _job(tmp_path / "b", tok, "generator/toy-tiny") == 0
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    assert rep["pretrained"] == {"tokenizer": True, "generator": False}


# ----------------------------------------------------------------------------- GenEval parity
# Expected orders were produced by the official evaluate_images.py expressions
# (np.argsort(bbox[:, 4])[::-1], bbox[:, 4] > threshold, relative_position) under numpy 1.23,
# the version its environment.yml pins.


def _box(cx, cy, w=10, h=10):
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


class _BoxColors(G.ColorClassifier):
    def __init__(self, table):
        self.table = {tuple(map(float, k)): v for k, v in table.items()}

    def classify(self, image, box, mask, candidate_colors, class_name=None):
        return self.table[tuple(map(float, box))]


def _score(raw, metadata, colors=None, **cfg):
    config = G.GenEvalConfig(**cfg)
    return G.evaluate_metadata(None, G.filter_detections(raw, metadata["tag"], config), metadata, colors, config)


def test_equal_scores_check_the_last_detection_first():
    red_car = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a red car"}
    a, b = _box(10, 10), _box(40, 10)
    colors = _BoxColors({a: "blue", b: "red"})
    # a detector giving every good fit the same confidence (the Shapes one gives 1.0)
    assert _score({"car": [(a, 1.0), (b, 1.0)]}, red_car, colors) == (True, "")
    ok, reason = _score({"car": [(b, 1.0), (a, 1.0)]}, red_car, colors)
    assert not ok and reason == "expected red car>=1, found 0 red; and 1 blue"
    left = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                           {"class": "cat", "count": 1, "position": ["left of", 0]}], "prompt": "p"}
    cats = [(_box(10, 50), 0.8), (_box(90, 50), 0.8)]  # one left of the dog, one right of it
    ok, reason = _score({"dog": [(_box(50, 50), 0.9)], "cat": cats}, left)
    assert not ok and reason == "expected cat left of target, found right of target"
    assert _score({"dog": [(_box(50, 50), 0.9)], "cat": cats[::-1]}, left)[0]


def test_official_order_is_numpys_introsort_reversed():
    assert G.official_order([0.5, 0.5]) == [1, 0]
    assert G.official_order(np.full(20, 0.95)) == [19, 18, *range(1, 18), 0]  # 17+ elements: quicksort
    s = np.array([0.5, 0.9, 0.5, 0.9, 0.2, 0.5] * 4)
    assert G.official_order(s) == [9, 21, 1, 19, 3, 15, 13, 7, 23, 2, 5, 6, 8, 11, 12, 14, 17, 18, 20, 0, 10, 22,
                                   16, 4]
    # a median-of-3 killer: the introsort falls back to heapsort on an 18-element run of ties
    v = np.array([0, 20, 2, 40, 4, 40, 6, 40, 8, 40, 10, 40, 12, 40, 14, 40, 16, 40, 18, 1, 3, 5, 7, 9, 11, 13, 15,
                  17, 19, 21, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40]) / 40
    assert G.official_order(v) == [5, 39, 3, 37, 36, 35, 34, 33, 32, 31, 30, 38, 17, 15, 13, 11, 9, 7, 29, 1, 28, 18,
                                   27, 16, 26, 14, 25, 12, 24, 10, 23, 8, 22, 6, 21, 4, 20, 2, 19, 0]
    assert G.official_order([0.4, np.nan, 0.7]) == [1, 2, 0]  # NaN sorts last, so comes first (then fails > thr)
    assert G.official_order([]) == []
    # which 16 of 20 equally confident cats are kept (max_objects) follows that order
    cats = [(_box(5 * i + 5, 5), 0.95) for i in range(20)]
    kept = G.filter_detections({"cat": cats}, "counting")["cat"]
    assert [d.box for d in kept] == [cats[i][0] for i in [19, 18, *range(1, 15)]]


def test_scores_compare_in_float32():
    one = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}
    f32 = float(np.float32(0.3))  # 0.30000001192..., what mmdet's float32 array holds for 0.3
    assert f32 > 0.3
    assert _score({"dog": [(_box(5, 5), f32)]}, one) == (False, "expected dog>=1, found 0")
    assert not _score({"dog": [(_box(5, 5), 0.30000002)]}, one)[0]  # float32(0.30000002) == float32(0.3)
    assert _score({"dog": [(_box(5, 5), float(np.nextafter(np.float32(0.3), np.float32(1))))]}, one)[0]
    two = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}],
           "prompt": "a photo of two cats"}
    cats = [(_box(10, 10), 0.95), (_box(40, 10), 0.95), (_box(70, 10), 0.9000000001)]
    assert _score({"cat": cats}, two)[0]  # the third is float32(0.9), not above the counting threshold


def test_positions_compare_in_float32():
    a, b = (4.2, 0.0, 6.2, 10.0), (5.0, 0.0, 7.0, 10.0)  # offset 0.8 = 0.4 x width: the margin's edge
    assert G.relative_position(a, b) == {"left of"}
    from zoo.data.shapes import relative_position as float64_rule

    assert float64_rule(a, b) == set()  # the same rule in float64 (Shapes captions) says otherwise
    left = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                           {"class": "cat", "count": 1, "position": ["left of", 0]}], "prompt": "p"}
    assert _score({"dog": [(b, 0.9)], "cat": [(a, 0.9)]}, left) == (True, "")
    # the IoU of NMS: float32 boxes, float64 arithmetic after the +1 (numpy 1.23 promotion)
    assert G.compute_iou((0.1, 0, 9.1, 9), (0.1, 0, 9.1, 9)) == 1.0
    assert G.compute_iou((0, 0, 9, 9), (5, 0, 14, 9)) == 50 / 150
