"""Shapes attribute agreement of reconstructions (eval/recon.py ``attribute_agreement``)."""
import numpy as np
import pytest

from eval.recon import attribute_agreement, format_attributes
from zoo.data.shapes import render

RES = 64
SCENES = [
    [{"shape": "circle", "color": "red", "box": (10, 12, 24)}],
    [{"shape": "square", "color": "blue", "box": (30, 28, 20)}],
    [{"shape": "triangle", "color": "green", "box": (6, 6, 16)},
     {"shape": "square", "color": "yellow", "box": (36, 36, 16)}],
    [{"shape": "circle", "color": "white", "box": (4, 40, 14)},
     {"shape": "triangle", "color": "purple", "box": (40, 6, 16)}],
]


def _imgs(scenes):
    return np.stack([render(s, RES) for s in scenes])


def test_identical_renders_agree_fully():
    a = _imgs(SCENES)
    r = attribute_agreement(a, a.copy())
    assert r["images"] == 4
    assert r["count"] == r["colors"] == r["shapes"] == r["objects"] == 1.0
    assert r["single_object_images"] == 2 and r["single_object_class"] == 1.0
    assert "count 1.000" in format_attributes(r)


def test_recoloured_and_reshaped_renders_disagree():
    a = _imgs(SCENES)
    # image 0 recoloured (red -> orange); image 1 reshaped (square -> circle) and shifted;
    # image 2 loses an object; image 3 unchanged but shifted (position is not an attribute)
    b = _imgs([
        [{"shape": "circle", "color": "orange", "box": (10, 12, 24)}],
        [{"shape": "circle", "color": "blue", "box": (20, 20, 20)}],
        [{"shape": "triangle", "color": "green", "box": (6, 6, 16)}],
        [{"shape": "circle", "color": "white", "box": (8, 44, 14)},
         {"shape": "triangle", "color": "purple", "box": (36, 10, 16)}],
    ])
    r = attribute_agreement(a, b)
    assert r["count"] == pytest.approx(3 / 4)    # only image 2's count differs
    assert r["colors"] == pytest.approx(2 / 4)   # images 1, 3
    assert r["shapes"] == pytest.approx(2 / 4)   # images 0, 3
    assert r["objects"] == pytest.approx(1 / 4)  # image 3
    assert r["single_object_images"] == 2 and r["single_object_class"] == 0.0


def test_swapped_colours_keep_multisets_but_not_objects():
    a = _imgs([SCENES[2]])
    swapped = [{**SCENES[2][0], "color": "yellow"}, {**SCENES[2][1], "color": "green"}]
    r = attribute_agreement(a, _imgs([swapped]))
    assert r["count"] == r["colors"] == r["shapes"] == 1.0 and r["objects"] == 0.0
    assert r["single_object_class"] is None


def test_rejects_unpaired_inputs():
    a = _imgs(SCENES[:2])
    with pytest.raises(ValueError, match="2 originals but 1"):
        attribute_agreement(a, a[:1])
    with pytest.raises(ValueError, match="uint8"):
        attribute_agreement(a.astype(np.float32), a)


def test_recon_report_has_attributes_on_shapes_only_by_default():
    import torch
    from test_eval_recon import IdentityTokenizer

    from eval.recon import evaluate, format_report

    tok = IdentityTokenizer(32)
    r = evaluate(tok, "shapes:test:6", batch_size=6, features=None)
    assert r["attribute_agreement"]["objects"] == 1.0 and "attribute agreement" in format_report(r)
    assert "attribute_agreement" not in evaluate(tok, "shapes:test:6", batch_size=6, features=None,
                                                 attributes=False)
    arr = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    assert "attribute_agreement" not in evaluate(tok, arr, batch_size=3, features=None)
