"""GenEval protocol (eval/geneval.py) and Shapes-GenEval (eval/geneval_shapes.py)."""
import json

import numpy as np
import pytest

from eval import geneval as G
from eval import geneval_natural as GN
from eval import geneval_shapes as GS
from zoo.data import shapes as S
from zoo.data import text as T

# ----------------------------------------------------------------------------- helpers


class BoxColors(G.ColorClassifier):
    """Test colour classifier: colour looked up by the detection's box."""

    def __init__(self, table):
        self.table = {tuple(map(float, k)): v for k, v in table.items()}

    def classify(self, image, box, mask, candidate_colors, class_name=None):
        assert tuple(candidate_colors) == G.COLORS
        return self.table[tuple(map(float, box))]


def score(raw, metadata, colors=None, **cfg):
    config = G.GenEvalConfig(**cfg)
    det = G.filter_detections(raw, metadata["tag"], config)
    return G.evaluate_metadata(None, det, metadata, colors, config)


def box(cx, cy, w=10, h=10):
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


COUNT2 = {"tag": "counting", "include": [{"class": "cat", "count": 2}],
          "exclude": [{"class": "cat", "count": 3}], "prompt": "a photo of two cats"}


# ----------------------------------------------------------------------------- rules


def test_include_needs_count_and_exclude_enforces_exact_count():
    two = {"cat": [(box(10, 10), 0.95), (box(40, 10), 0.95)]}
    assert score(two, COUNT2) == (True, "")
    ok, reason = score({"cat": [(box(10, 10), 0.95)]}, COUNT2)
    assert not ok and reason == "expected cat>=2, found 1"
    three = {"cat": [(box(10, 10), 0.95), (box(40, 10), 0.95), (box(70, 10), 0.99)]}
    ok, reason = score(three, COUNT2)
    assert not ok and reason == "expected cat<3, found 3"


def test_score_thresholds_strict_and_counting_threshold():
    # a third cat at 0.85: dropped under the counting threshold (0.9), so "two cats" is right ...
    three = {"cat": [(box(10, 10), 0.95), (box(40, 10), 0.95), (box(70, 10), 0.85)]}
    assert score(three, COUNT2)[0]
    # ... but the same detections count as three under the ordinary threshold (0.3)
    assert not score(three, dict(COUNT2, tag="two_object"))[0]
    single = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}
    assert not score({"dog": [(box(5, 5), 0.3)]}, single)[0]  # score must exceed 0.3
    assert score({"dog": [(box(5, 5), 0.3001)]}, single)[0]
    assert not score({"dog": [(box(5, 5), 0.5)]}, single, threshold=0.6)[0]
    # classes left empty after thresholding disappear from the kept detections
    assert G.filter_detections({"dog": [(box(5, 5), 0.1)]}, "single_object") == {}


def test_max_objects_and_nms():
    many = {"cat": [(box(5 * i, 5), 0.95) for i in range(20)]}
    kept = G.filter_detections(many, "counting")
    assert len(kept["cat"]) == 16  # official default max_objects
    meta = {"tag": "counting", "include": [{"class": "cat", "count": 16}],
            "exclude": [{"class": "cat", "count": 17}], "prompt": "p"}
    assert score(many, meta)[0]  # only 16 can ever be seen
    dup = {"cat": [(box(10, 10), 0.95), (box(11, 10), 0.94), (box(40, 10), 0.93)]}
    assert len(G.filter_detections(dup, "counting")["cat"]) == 3  # NMS off by default
    nms = G.filter_detections(dup, "counting", G.GenEvalConfig(max_overlap=0.5))["cat"]
    assert [d.score for d in nms] == [0.95, 0.93]
    # sorted by confidence whatever the detector's order
    assert [d.score for d in G.filter_detections({"c": [(box(1, 1), 0.4), (box(9, 9), 0.8)]}, "x")["c"]] \
        == [0.8, 0.4]


def test_compute_iou_inclusive_pixels():
    assert G.compute_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert G.compute_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    assert G.compute_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0


def test_colour_checked_on_top_count_detections_only():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a red car"}
    a, b = box(10, 10), box(40, 10)
    colors = BoxColors({a: "blue", b: "red"})
    # a red car exists, but the most confident car is blue -> wrong
    ok, reason = score({"car": [(a, 0.9), (b, 0.8)]}, meta, colors)
    assert not ok and reason == "expected red car>=1, found 0 red; and 1 blue"
    assert score({"car": [(a, 0.8), (b, 0.9)]}, meta, colors)[0]
    # count 2: both of the top two must be red
    meta2 = {"tag": "color_attr", "include": [{"class": "car", "count": 2, "color": "red"}], "prompt": "p"}
    c = box(70, 10)
    colors3 = BoxColors({a: "blue", b: "red", c: "red"})
    assert not score({"car": [(a, 0.9), (b, 0.8), (c, 0.7)]}, meta2, colors3)[0]
    assert score({"car": [(a, 0.6), (b, 0.8), (c, 0.7)]}, meta2, colors3)[0]
    with pytest.raises(ValueError, match="ColorClassifier"):
        score({"car": [(a, 0.9)]}, meta)


def _reference_relations(a, b, thr=0.1):
    # GenEval Sec. 3.2 written out by hand: centre offset shrunk by thr x (summed sizes)
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    size = np.array([a[2] - a[0] + b[2] - b[0], a[3] - a[1] + b[3] - b[1]])
    off = ca - cb
    rev = np.sign(off) * np.maximum(np.abs(off) - thr * size, 0)
    if np.abs(rev).max() < 1e-3:
        return set()
    d = rev / np.linalg.norm(off)
    names = [("left of", d[0] < -0.5), ("right of", d[0] > 0.5), ("above", d[1] < -0.5), ("below", d[1] > 0.5)]
    return {n for n, on in names if on}


def test_position_margins():
    ref = box(50, 50)
    pos = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                          {"class": "cat", "count": 1, "position": ["left of", 0]}],
           "prompt": "a photo of a cat left of a dog"}
    dets = lambda cat_box: {"dog": [(ref, 0.9)], "cat": [(cat_box, 0.9)]}
    # equal 10 px boxes, same row: revised offset = |dx| - 0.1 * 20, normalised by |dx| -> needs |dx| > 4
    assert score(dets(box(45.5, 50)), pos)[0]
    ok, reason = score(dets(box(46.5, 50)), pos)
    assert not ok and reason == "expected cat left of target, found  target"
    assert G.relative_position(box(40, 40), ref) == {"left of", "above"}  # diagonal: both
    assert G.relative_position(box(44, 40), ref) == {"above"}  # mostly vertical: only above
    assert not score(dets(box(44, 40)), pos)[0]
    assert G.relative_position(box(45.5, 50), ref, threshold=0.3) == set()  # the margin is a parameter
    rng = np.random.default_rng(0)
    for _ in range(300):
        xy = rng.uniform(0, 60, size=(2, 2))
        wh = rng.uniform(2, 30, size=(2, 2))
        a, b = (tuple(np.r_[xy[i], xy[i] + wh[i]]) for i in range(2))
        assert G.relative_position(a, b) == _reference_relations(a, b)


def test_position_checks_every_object_against_every_target_and_needs_a_target():
    pos = {"tag": "position", "include": [{"class": "dog", "count": 2},
                                          {"class": "cat", "count": 1, "position": ["right of", 0]}],
           "prompt": "p"}
    dogs = [(box(10, 50), 0.9), (box(30, 50), 0.9)]
    assert score({"dog": dogs, "cat": [(box(60, 50), 0.9)]}, pos)[0]
    ok, reason = score({"dog": dogs, "cat": [(box(20, 50), 0.9)]}, pos)  # between the two dogs
    assert not ok and reason == "expected cat right of target, found left of target"
    # a low-confidence cat somewhere wrong does not matter: only the top-count one is checked
    assert score({"dog": dogs, "cat": [(box(60, 50), 0.9), (box(0, 50), 0.5)]}, pos)[0]
    ok, reason = score({"dog": dogs[:1], "cat": [(box(60, 50), 0.9)]}, pos)  # the target clause failed
    assert not ok and reason == "expected dog>=2, found 1\nno target for cat to be right of"


def test_include_anded_exclude_ored():
    meta = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
            "exclude": [{"class": "bird", "count": 1}, {"class": "cow", "count": 2}], "prompt": "p"}
    base = {"cat": [(box(10, 10), 0.9)], "dog": [(box(40, 10), 0.9)]}
    assert score(base, meta)[0]
    assert not score({"cat": base["cat"]}, meta)[0]
    assert not score(dict(base, bird=[(box(70, 70), 0.9)]), meta)[0]
    assert score(dict(base, cow=[(box(70, 70), 0.9)]), meta)[0]
    ok, reason = score(dict(base, bird=[(box(70, 70), 0.9)], cow=[(box(70, 20), 0.9), (box(20, 70), 0.9)]), meta)
    assert not ok and reason == "expected bird<1, found 1\nexpected cow<2, found 2"


def test_summary_is_unweighted_mean_over_tasks():
    recs = []
    for i, c in enumerate([True, True, True, False]):
        recs.append({"tag": "counting", "correct": c, "metadata": json.dumps({"p": i // 2}), "prompt": ""})
    for i, c in enumerate([True, False]):
        recs.append({"tag": "colors", "correct": c, "metadata": json.dumps({"q": 0}), "prompt": ""})
    s = G.summarize(recs)
    assert s["tasks"]["counting"]["score"] == 0.75 and s["tasks"]["colors"]["score"] == 0.5
    assert s["overall"] == pytest.approx(0.625)  # not 4/6
    assert s["correct_images"] == pytest.approx(4 / 6)
    assert s["total_prompts"] == 3 and s["correct_prompts"] == 1.0  # any sample right
    assert "two_object" in s["missing_tasks"]
    text = G.format_summary(s, "detector: x")
    assert "counting         = 75.00% (3 / 4)" in text and "Overall score (avg. over tasks): 0.62500" in text


def test_validate_metadata_rejects_bad_input():
    good = {"tag": "position", "include": [{"class": "a", "count": 1},
                                           {"class": "b", "count": 1, "position": ["above", 0]}], "prompt": "p"}
    assert G.validate_metadata(good) is good
    for bad in ({"tag": "x"}, {"tag": "x", "prompt": "p", "include": [{"class": "a"}]},
                {"tag": "x", "prompt": "p", "include": [{"class": "a", "count": 1, "color": "teal"}]},
                {"tag": "x", "prompt": "p", "include": [{"class": "a", "count": 1, "position": ["above", 0]}]},
                {"tag": "x", "prompt": "p", "exclude": [{"class": "a"}]}):
        with pytest.raises(ValueError):
            G.validate_metadata(bad)


# ----------------------------------------------------------------------------- layout


def test_layout_round_trip(tmp_path):
    metas = GS.make_prompts(per_task=1)
    rng = np.random.default_rng(0)
    imgs = [[rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2 + i % 2)]
            for i in range(len(metas))]
    G.write_layout(tmp_path, metas, imgs)
    (tmp_path / "results.jsonl").write_text("")  # non-layout entries are ignored
    (tmp_path / "notes").mkdir()
    (tmp_path / "00000" / "samples" / "readme.txt").write_text("x")
    folders = G.read_layout(tmp_path)
    assert [f.index for f in folders] == list(range(len(metas)))
    for f, m, ims in zip(folders, metas, imgs):
        assert f.metadata == m
        assert [p.name for p in f.images] == [f"{n:05d}.png" for n in range(len(ims))]
        for p, a in zip(f.images, ims):
            np.testing.assert_array_equal(G.load_image(p), a)
        assert (f.path / "grid.png").is_file()
        assert json.loads((f.path / "metadata.jsonl").read_text()) == m  # one JSON object
    # the official generator writes metadata with json.dump (no newline); that reads too
    (tmp_path / "00000" / "metadata.jsonl").write_text(json.dumps(metas[0]))
    assert G.read_layout(tmp_path)[0].metadata == metas[0]
    prompts = G.write_metadata(tmp_path / "p.jsonl", metas)
    assert G.load_metadata(prompts) == metas
    with pytest.raises(ValueError, match="no GenEval prompt folders"):
        G.read_layout(tmp_path / "notes")


# ----------------------------------------------------------------------------- Shapes-GenEval


def test_prompt_set_format_and_determinism():
    metas = GS.make_prompts()
    counts = {t: sum(m["tag"] == t for m in metas) for t in G.TASKS}
    assert counts == {"single_object": 30, "two_object": 50, "counting": 50, "colors": 30,
                      "position": 50, "color_attr": 50}
    assert metas == GS.make_prompts() and metas != GS.make_prompts(seed=1)
    assert GS.make_prompts(tasks=("counting",)) == [m for m in metas if m["tag"] == "counting"]
    assert len({json.dumps(m) for m in metas}) == len(metas)  # no duplicates
    for m in metas:
        G.validate_metadata(m)
        assert next(iter(m)) == "tag" and list(m)[-1] == "prompt"  # official key order
        ids = T.encode([m["prompt"]], max_len=16)  # raises if longer than the generator's text
        assert not (ids == T.UNK).any(), m["prompt"]
        inc = m["include"]
        if m["tag"] == "counting":
            assert m["exclude"] == [{"class": inc[0]["class"], "count": inc[0]["count"] + 1}]
            assert 2 <= inc[0]["count"] <= 4
        if m["tag"] in ("two_object", "position", "color_attr"):
            assert inc[0]["class"] != inc[1]["class"]
        if m["tag"] == "color_attr":
            assert inc[0]["color"] != inc[1]["color"]
        if m["tag"] == "position":
            assert inc[1]["position"][1] == 0 and "position" not in inc[0]


def test_prompts_are_phrased_as_training_captions():
    # every Shapes caption parses back into its objects ...
    ds = S.ShapesDataset(split="test", num_objects=(1, 4), length=200)
    for i in range(200):
        _, cap, objs = ds.sample(i)
        p = GS.parse_prompt(cap)
        got = sorted((s, c) for n, c, s in p["groups"] for _ in range(n))
        assert got == sorted((o["shape"], o["color"]) for o in objs), cap
        if p["relation"]:
            assert p["relation"] in S.relative_position(objs[0]["bbox"], objs[1]["bbox"])
    with pytest.raises(ValueError):
        GS.parse_prompt("a photo of a red circle")
    # ... and every prompt is exactly the caption the dataset writes for its oracle scene
    rng = np.random.default_rng(0)
    for m in GS.make_prompts(per_task=10):
        objs = GS.oracle_objects(m, rng)
        if m["tag"] == "position":
            a, rel, b = m["prompt"].partition(" " + m["include"][1]["position"][0] + " ")
            assert S.caption_for(objs) == f"{a} and {b}"
            assert rel.strip() in S.relative_position(objs[0]["bbox"], objs[1]["bbox"])
        else:
            assert S.caption_for(objs) == m["prompt"]


def test_shapes_detector_and_colour_classifier():
    objs = [{"shape": "triangle", "color": "pink", "box": (4, 6, 17)},
            {"shape": "circle", "color": "brown", "box": (30, 30, 20)},
            {"shape": "square", "color": "white", "box": (40, 4, 13)}]
    img = S.render(objs, 64)
    det = GS.ShapesDetector().detect(img)
    assert sorted(det) == ["circle", "square", "triangle"]
    cc = GS.ShapesColorClassifier()
    for o in objs:
        (d,) = det[o["shape"]]
        assert d.score == 1.0 and d.mask.shape == (64, 64) and d.mask.sum() > 50
        x0, y0, s = o["box"]
        assert d.box[0] == x0 and d.box[3] == y0 + s
        assert cc.classify(img, d.box, d.mask, G.COLORS) == o["color"]
        assert cc.classify(img, d.box, None, G.COLORS) == o["color"]
    with pytest.raises(ValueError, match="palette"):
        cc.classify(img, (0, 0, 5, 5), None, ["teal"])
    assert GS.ShapesDetector().detect(S.render([], 64)) == {}
    assert "not comparable to GenEval" in GS.ShapesDetector().label()


def test_oracle_renders_score_high_and_mismatched_metadata_scores_low(tmp_path):
    metas = GS.make_prompts(per_task=8, seed=5)
    GS.write_oracle(tmp_path, metas, n_per_prompt=2, resolution=64, seed=3)
    det, cc = GS.ShapesDetector(), GS.ShapesColorClassifier()
    s = G.summarize(G.evaluate_folder(tmp_path, det, cc, progress=False))
    assert s["missing_tasks"] == []
    for task, t in s["tasks"].items():
        assert t["score"] >= 0.95, (task, t)
    # the same images judged against another prompt of the same task mostly fail
    folders = G.read_layout(tmp_path)
    wrong = []
    for f in folders:
        same = [g for g in folders if g.metadata["tag"] == f.metadata["tag"]]
        other = same[(same.index(f) + 1) % len(same)].metadata
        wrong += [G.evaluate_image(G.load_image(p), other, det, cc)["correct"] for p in f.images]
    assert np.mean(wrong) < 0.6
    with pytest.raises(ValueError, match="already holds"):
        GS.write_oracle(tmp_path, metas[:1])


def test_oracle_at_32px_and_custom_metadata():
    rng = np.random.default_rng(1)
    meta = {"tag": "counting", "include": [{"class": "triangle", "count": 4}],
            "exclude": [{"class": "triangle", "count": 5}], "prompt": "four green triangles"}
    img = S.render(GS.oracle_objects(meta, rng, resolution=32), 32)
    assert G.evaluate_image(img, meta, GS.ShapesDetector(), GS.ShapesColorClassifier())["correct"]
    # a prompt outside the caption grammar: objects come from the include clauses
    odd = {"tag": "position", "include": [{"class": "square", "count": 1},
                                          {"class": "circle", "count": 2, "position": ["below", 0]}],
           "prompt": "two circles under a square"}
    objs = GS.oracle_objects(odd, rng)
    assert sorted(o["shape"] for o in objs) == ["circle", "circle", "square"]
    assert G.evaluate_image(S.render(objs, 64), odd, GS.ShapesDetector(), GS.ShapesColorClassifier())["correct"]
    with pytest.raises(ValueError, match="Shapes class"):
        GS.oracle_objects({"tag": "x", "include": [{"class": "dog", "count": 1}], "prompt": "a dog"}, rng)


# ----------------------------------------------------------------------------- CLIs


def test_cli_make_prompts_oracle_score_summary(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    assert G.main(["--make-prompts", str(prompts), "--per-task", "2"]) == 0
    metas = G.load_metadata(prompts)
    assert len(metas) == 12
    assert G.main(["--oracle", str(tmp_path / "o"), "--metadata", str(prompts), "--n-per-prompt", "1"]) == 0
    capsys.readouterr()
    assert G.main([str(tmp_path / "o"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "not the official Mask2Former" in out and "Overall score (avg. over tasks): 1.00000" in out
    recs = G.read_results(tmp_path / "o" / "results.jsonl")
    assert len(recs) == 12
    assert set(recs[0]) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    assert json.loads(recs[0]["metadata"]) == metas[0]
    assert all(len(b) == 5 for boxes in json.loads(recs[0]["details"]).values() for b in boxes)
    summ = json.loads((tmp_path / "o" / "results_summary.json").read_text())
    assert summ["overall"] == 1.0 and summ["official_detector"] is False and summ["config"]["threshold"] == 0.3
    assert G.main(["--summary", str(tmp_path / "o" / "results.jsonl")]) == 0
    assert "color_attr" in capsys.readouterr().out
    assert G.main([]) == 2 and G.main(["--oracle", str(tmp_path / "x")]) == 2
    assert G.main([str(tmp_path / "missing")]) == 2
    assert G.main([str(tmp_path / "o"), "--detector", "torchvision", "--no-progress"]) == 2  # no weights


def test_sample_cli_writes_geneval_layout(tmp_path, single_thread):
    from sample.cli import main as sample_main

    metas = [m for m in GS.make_prompts(per_task=1) if m["tag"] in ("single_object", "position")]
    prompts = G.write_metadata(tmp_path / "p.jsonl", metas)
    out = tmp_path / "s"
    args = ["--tokenizer", "tokenizer/vq-tiny:shapes", "--generator", "generator/raster-ar-tiny:shapes",
            "--geneval-metadata", str(prompts), "--n-per-prompt", "2", "--cfg", "2.0", "--out", str(out),
            "--no-progress"]
    assert sample_main(args) == 0
    folders = G.read_layout(out)
    assert [f.metadata for f in folders] == metas and all(len(f.images) == 2 for f in folders)
    first = G.load_image(folders[0].images[0])
    assert first.shape == (64, 64, 3)
    meta = json.loads((out / "samples.json").read_text())
    assert meta["layout"] == "geneval" and meta["samples"][3]["file"] == "00001/samples/00001.png"
    assert meta["samples"][3]["prompt"] == metas[1]["prompt"]
    recs = G.evaluate_folder(out, GS.ShapesDetector(), GS.ShapesColorClassifier(), progress=False)
    assert len(recs) == 4 and {r["tag"] for r in recs} == {"single_object", "position"}
    assert sample_main(args) == 2  # refuses to overwrite
    assert sample_main(args + ["--overwrite"]) == 0
    np.testing.assert_array_equal(G.load_image(folders[0].images[0]), first)  # same seed, same images
    assert sample_main(args + ["--prompts", "a red circle"]) == 2


# ----------------------------------------------------------------------------- optional detectors


def test_torchvision_detector_output_mapping():
    import torch

    class Stub(torch.nn.Module):
        def forward(self, images):
            (x,) = images
            assert x.shape == (3, 8, 8) and float(x.max()) <= 1.0
            masks = torch.zeros(3, 1, 8, 8)
            masks[0, 0, :4] = 0.9
            return [{"boxes": torch.tensor([[0., 0., 4., 4.], [1., 1., 5., 5.], [2., 2., 6., 6.]]),
                     "labels": torch.tensor([75, 12, 17]),  # remote, N/A, cat
                     "scores": torch.tensor([0.9, 0.8, 0.7]), "masks": masks}]

    d = GN.TorchvisionDetector(model=Stub().eval())
    out = d.detect(np.zeros((8, 8, 3), dtype=np.uint8))
    assert sorted(out) == ["cat", "tv remote"]
    (r,) = out["tv remote"]
    assert r.score == pytest.approx(0.9) and r.mask.dtype == bool and r.mask.sum() == 32
    with pytest.raises(FileNotFoundError, match="--detector-weights"):
        GN.TorchvisionDetector(weights="/nonexistent.pth").detect(np.zeros((8, 8, 3), dtype=np.uint8))


def test_openclip_classifier_missing_is_a_clear_error():
    try:
        import open_clip  # noqa: F401
        pytest.skip("open_clip is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="open_clip"):
        GN.OpenCLIPColorClassifier().classify(np.zeros((8, 8, 3), np.uint8), (0, 0, 4, 4), None, G.COLORS)
