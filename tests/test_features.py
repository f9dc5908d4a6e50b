"""The Shapes feature network (eval/features.py): shipped weights, accuracy, input conventions,
torch-fidelity registration, and the training script."""
import json

import numpy as np
import pytest
import torch

import zoo
from eval.features import (
    FIDELITY_NAME,
    ShapesNet,
    attribute_accuracy,
    register_torch_fidelity,
    targets,
)
from zoo.data.shapes import ShapesDataset


@pytest.fixture(scope="module")
def net():
    return zoo.create("eval/shapes-net", pretrained="shapes").eval()


def _test_batch(n=200, resolution=64, objects=(1, 4), start=0):
    ds = ShapesDataset("test", resolution, objects, length=start + n)
    items = [ds.sample(i) for i in range(start, start + n)]
    x = torch.from_numpy(np.stack([im for im, _, _ in items])).permute(0, 3, 1, 2).contiguous()
    return x, [o for _, _, o in items]


def test_registered_with_shipped_weights():
    assert "eval/shapes-net" in zoo.list("eval/*")
    info = zoo.info("eval/shapes-net")
    assert info["weights"] == {"shapes": "weights/features-shapes-net"}
    assert info["params"] < 1_000_000


def test_held_out_attribute_accuracy(net):
    # Held-out Shapes test split, 1-4 objects: the issue asks for >= 95 %.
    x, objs = _test_batch(300)
    acc = attribute_accuracy(net, x, objs)
    n = acc["n"]
    for key in ("class_set", "count", "shape_set", "color_set"):
        assert acc[key] / n >= 0.95, f"{key} accuracy {acc[key] / n:.3f} < 0.95"


def test_input_conventions(net):
    x, _ = _test_batch(4)
    with torch.no_grad():
        a = net(x)  # uint8 [0, 255]
        b = net(x.float() / 127.5 - 1)  # float [-1, 1]
    for k in ("features", "class_logits", "patch_features"):
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
    assert a["features"].shape == (4, 256) and a["patch_features"].shape == (4, 128, 8, 8)
    assert a["count_logits"].shape == (4, 4) and a["shape_logits"].shape == (4, 3)
    assert a["color_logits"].shape == (4, 10) and a["class_logits"].shape == (4, 30)
    # other resolutions are resized to 64 inside; the same scene at 128 px reads the same
    x128, objs = _test_batch(40, resolution=128)
    acc = attribute_accuracy(net, x128, objs)
    assert acc["class_set"] / acc["n"] >= 0.9
    for bad, msg in [(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "side in"),
                     (torch.zeros(1, 3, 64, 48, dtype=torch.uint8), "square"),
                     (torch.zeros(1, 3, 300, 300, dtype=torch.uint8), "side in"),
                     (torch.full((1, 3, 64, 64), 200.0), "must lie in"),
                     (torch.zeros(1, 64, 64, 3, dtype=torch.uint8), "(B, 3, H, W)")]:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            net(bad)


def test_targets_and_features_are_semantic(net):
    _, objs = _test_batch(3, objects=1)
    t = targets(objs)
    assert t["classes"].sum(1).tolist() == [1, 1, 1] and t["count"].tolist() == [0, 0, 0]
    # Same class, different placement -> closer embeddings than different classes.
    from zoo.data.shapes import render
    a = render([{"shape": "circle", "color": "red", "box": (5, 5, 20)}], 64)
    b = render([{"shape": "circle", "color": "red", "box": (35, 30, 22)}], 64)
    c = render([{"shape": "square", "color": "blue", "box": (5, 5, 20)}], 64)
    imgs = torch.from_numpy(np.stack([a, b, c])).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        f = net.features(imgs)
    assert (f[0] - f[1]).norm() < (f[0] - f[2]).norm()


def test_torch_fidelity_extractor():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor

    assert register_torch_fidelity() == FIDELITY_NAME == "shapes-net"
    register_torch_fidelity()  # idempotent
    assert FIDELITY_NAME in FEATURE_EXTRACTORS_REGISTRY
    fe = create_feature_extractor(FIDELITY_NAME, ["features", "class_logits"], cuda=False, verbose=False)
    x, _ = _test_batch(3)
    feats, logits = fe(x)
    assert feats.shape == (3, 256) and logits.shape == (3, 30) and feats.dtype == torch.float32
    with pytest.raises(ValueError, match="uint8"):
        fe(x.float())


def test_train_script_smoke(tmp_path):
    from train.features import main

    m = main(["--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "8", "--eval-images", "16",
              "--warmup", "1", "--log-every", "1", "--export", str(tmp_path / "export"),
              "--set", "widths=[8, 8, 8, 8, 16]"])
    assert 0.0 <= m["test_64"]["class_set_acc"] <= 1.0 and m["test_64"]["images"] == 16
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["train_steps"] == 2
    net = ShapesNet.from_pretrained(tmp_path / "export")
    assert net.config["widths"] == [8, 8, 8, 8, 16] and net.feature_dim == 32
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2
