"""eval.shapes_acc --samples: scoring fid-job samples by their stored classes."""
import json

import numpy as np
import pytest

from eval import shapes_acc
from zoo.data.shapes import class_id, render


def _npz(tmp_path, labels_shift=0):
    objs = [[{"shape": "circle", "color": "red", "box": (10, 10, 30)}],
            [{"shape": "square", "color": "blue", "box": (20, 5, 24)}]]
    imgs = np.stack([render(o, 64) for o in objs])
    labels = np.array([class_id(o[0]["shape"], o[0]["color"]) for o in objs]) + labels_shift
    path = tmp_path / "samples.npz"
    np.savez(path, imgs, labels)
    return path


def test_scores_correct_and_wrong_labels(tmp_path):
    right = shapes_acc.score_npz(_npz(tmp_path))
    assert right["class_accuracy"] == 1.0 and right["class_colour_accuracy"] == 1.0
    wrong = shapes_acc.score_npz(_npz(tmp_path, labels_shift=1))  # next colour, same shape
    assert wrong["class_accuracy"] == 0.0 and wrong["class_colour_accuracy"] == 0.0
    shape_only = shapes_acc.score_npz(_npz(tmp_path, labels_shift=10))  # next shape, same colour
    assert shape_only["class_accuracy"] == 0.0 and shape_only["class_colour_accuracy"] == 1.0


def test_colour_accuracy_counts_blank_images_as_wrong():
    blank = np.full((1, 64, 64, 3), 128, np.uint8)  # background only
    assert shapes_acc.colour_accuracy(blank, [0]) == 0.0


def test_cli_writes_json_and_rejects_unlabelled(tmp_path):
    out = tmp_path / "r.json"
    assert shapes_acc.main(["--samples", str(_npz(tmp_path)), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["num"] == 2
    bare = tmp_path / "bare.npz"
    np.savez(bare, np.zeros((2, 64, 64, 3), np.uint8))
    assert shapes_acc.main(["--samples", str(bare)]) == 2
    with pytest.raises(FileNotFoundError):
        shapes_acc.score_npz(tmp_path / "missing.npz")
