"""Verifiers for test-time search (eval/verifiers.py)."""
import numpy as np
import pytest
import torch

from eval.geneval import GenEvalConfig, evaluate_image
from eval.geneval_shapes import ShapesColorClassifier, ShapesDetector, make_prompts, render_oracle
from eval.verifiers import (CLIPVerifier, GenEvalVerifier, ImageRewardVerifier, LikelihoodVerifier, make_verifier,
                            shapes_metadata)
from zoo.data import shapes as S


def _float(images) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1] (what a tokenizer decodes to)."""
    x = torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


def _scene(*objs, res=64):
    """Objects (shape, colour, x0, y0, side) rendered."""
    out = []
    for shape, color, x0, y0, side in objs:
        m = S.shape_mask(shape, side)
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        out.append({"shape": shape, "color": color, "box": (x0, y0, side),
                    "bbox": (x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1)})
    return S.render(out, res)


def test_shapes_metadata_states_every_requirement_of_the_caption():
    assert shapes_metadata("a red circle") == {
        "tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a red circle"}
    m = shapes_metadata("three blue squares")
    assert m["tag"] == "counting" and m["include"] == [{"class": "square", "count": 3, "color": "blue"}]
    assert m["exclude"] == [{"class": "square", "count": 4}]
    m = shapes_metadata("a red circle left of a blue square")
    assert m["tag"] == "position" and m["include"][0] == {"class": "square", "count": 1, "color": "blue"}
    assert m["include"][1]["position"] == ["left of", 0] and m["include"][1]["class"] == "circle"
    assert shapes_metadata("a red circle and a green triangle")["tag"] == "color_attr"
    with pytest.raises(ValueError):
        shapes_metadata("a purple elephant")


def test_geneval_verifier_scores_correct_images_one_and_grades_failures():
    v = GenEvalVerifier()
    meta = shapes_metadata("a red circle")
    right = _scene(("circle", "red", 16, 16, 28))
    wrong_colour = _scene(("circle", "blue", 16, 16, 28))
    wrong_shape = _scene(("square", "blue", 16, 16, 28))
    blank = S.render([], 64)
    s = v(_float([right, wrong_colour, wrong_shape, blank]), [meta] * 4).tolist()
    assert s[0] == 1.0
    assert s[1] == pytest.approx(0.25)         # incorrect; the circle is there (1 of 2 requirements)
    assert s[2] == s[3] == 0.0
    # counting: partial credit grows with the objects found; the binary verdict still decides 1.0
    m3 = shapes_metadata("three green squares")
    one = _scene(("square", "green", 4, 4, 14))
    two = _scene(("square", "green", 4, 4, 14), ("square", "green", 40, 40, 14))
    three = _scene(("square", "green", 4, 4, 14), ("square", "green", 40, 40, 14), ("square", "green", 4, 40, 14))
    s1, s2, s3 = v(_float([one, two, three]), [m3] * 3).tolist()
    assert s1 < s2 < 0.5 < s3 == 1.0
    # captions and metadata dicts are both accepted
    assert v(_float([right]), ["a red circle"]).item() == 1.0


def test_geneval_verifier_agrees_with_the_geneval_verdict_on_oracle_renders():
    v = GenEvalVerifier()
    det, cc = ShapesDetector(), ShapesColorClassifier()
    metas = make_prompts(2)
    imgs = [render_oracle(m, 1, seed=1, index=i)[0] for i, m in enumerate(metas)]
    blank = S.render([], 64)
    for m, img in zip(metas, imgs):
        for im in (img, blank):
            correct = evaluate_image(im, m, det, cc, GenEvalConfig())["correct"]
            got, credit = v.evaluate(im, m)
            assert got == correct
            score = v.score_image(im, m)
            assert (score == 1.0) == correct and (score <= 0.5 or correct) and 0 <= min(credit)
    assert v(_float(imgs), metas).tolist() == [1.0] * len(metas)


def test_likelihood_verifier_is_the_per_token_log_probability():
    v = LikelihoodVerifier()
    assert v.requires_images is False
    lp = torch.tensor([-8.0, -4.0])
    assert v(None, ["a", "b"], log_probs=lp, num_tokens=4).tolist() == [-2.0, -1.0]
    assert LikelihoodVerifier(normalize=False)(None, ["a", "b"], log_probs=lp, num_tokens=4).tolist() == [-8, -4]
    with pytest.raises(ValueError, match="log_probs"):
        v(None, ["a"])


def test_reward_model_verifiers_need_local_weights(tmp_path):
    with pytest.raises(ValueError, match="--verifier-weights"):
        make_verifier("clip")
    with pytest.raises(FileNotFoundError):
        CLIPVerifier(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="--verifier-weights"):
        ImageRewardVerifier()
    (tmp_path / "ImageReward.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="med_config"):
        ImageRewardVerifier(tmp_path)
    with pytest.raises(ValueError, match="unknown verifier"):
        make_verifier("hpsv2")


def test_clip_and_imagereward_adapters_score_with_an_injected_model():
    class FakeClip(torch.nn.Module):
        def encode_image(self, x):
            return x.mean((2, 3))                                  # (B, 3): mean colour

        def encode_text(self, t):
            return t.float()

    pre = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)  # noqa: E731
    tok = lambda texts: torch.tensor([[1.0, 0, 0] if "red" in t else [0, 0, 1.0] for t in texts])  # noqa: E731
    v = CLIPVerifier(model=(FakeClip(), pre, tok))
    red, blue = -torch.ones(1, 3, 4, 4), -torch.ones(1, 3, 4, 4)
    red[:, 0], blue[:, 2] = 1, 1
    s = v(torch.cat([red, blue]), ["a red circle", {"prompt": "a red circle", "tag": "colors"}])
    assert s[0] > s[1] and s[0] == pytest.approx(100.0, abs=1e-3)

    class FakeIR:
        def score(self, prompt, images):
            return [float(len(prompt))]

    assert ImageRewardVerifier(model=FakeIR())(red, ["abc"]).tolist() == [3.0]
