"""Semantic score (eval/semantic.py): probe and 1-NN on token features, feature adapters, the CLI."""
import json

import pytest
import torch

from eval.semantic import (decoder_features, linear_probe, majority, nearest_neighbour, object_labels,
                           resolve_kind, sample_indices, score, standardise)
from zoo.pipeline import load_model
from zoo.tokens import Tokens


def _labelled(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, k, (n,), generator=g), g


def test_probe_reads_a_planted_label_and_not_noise():
    k, d = 10, 64
    ytr, g = _labelled(200, k, 0)
    yte, _ = _labelled(200, k, 1)
    # label planted as a one-hot block among noise dimensions: linearly separable
    noise_tr, noise_te = torch.randn(200, d, generator=g), torch.randn(200, d, generator=g)
    xtr = torch.cat([torch.nn.functional.one_hot(ytr, k).float() * 3, noise_tr], 1)
    xte = torch.cat([torch.nn.functional.one_hot(yte, k).float() * 3, noise_te], 1)
    xtr, xte = standardise(xtr, xte)
    lin = linear_probe(xtr, ytr, xte, yte, k)
    assert lin["test_acc"] > 0.97 and lin["train_acc"] == 1.0 and lin["iters"] > 0
    assert nearest_neighbour(xtr[:, :k], ytr, xte[:, :k], yte) == 1.0
    # pure noise: the probe fits the train set but is near chance (0.1) on test
    ntr, nte = standardise(noise_tr, noise_te)
    lin = linear_probe(ntr, ytr, nte, yte, k)
    assert lin["train_acc"] > 0.9 and lin["test_acc"] < 0.2
    assert nearest_neighbour(ntr, ytr, nte, yte) < 0.2


def test_score_majority_and_standardise_use_train_statistics():
    ytr = torch.tensor([0, 0, 0, 1])
    assert majority(ytr, torch.tensor([0, 1, 1, 1]), 2) == 0.25
    tr = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    a, b = standardise(tr, torch.tensor([[2.0, 7.0]]))
    assert torch.allclose(a, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))  # constant dim -> 0, no NaN
    assert torch.allclose(b, torch.tensor([[0.0, 2.0]]))  # test shifted by the train mean only
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    r = score(x, {"position": y}, x, {"position": y})
    assert r["position"]["classes"] == 4 and r["position"]["linear"] == 1.0 and r["position"]["knn1"] == 1.0


def test_labels_and_indices():
    o = {"shape": "triangle", "color": "blue", "bbox": (40, 2, 60, 20)}
    lab = object_labels(o, 64)
    assert lab == {"shape": 2, "colour": 4, "class": 24, "position": 1}  # centre (50, 11): top-right
    assert object_labels({**o, "bbox": (0, 40, 10, 60)}, 64)["position"] == 2  # bottom-left
    a = sample_indices(50, seed=3, stream=0)
    assert len(set(a.tolist())) == 50 and (a == sample_indices(50, seed=3, stream=0)).all()
    assert not (a == sample_indices(50, seed=4, stream=0)).all()


def test_decoder_features_are_what_the_decoder_consumes():
    tok = load_model("tokenizer/vq-tiny", "tokenizer").eval()
    with torch.no_grad():
        tokens = tok.encode(tok.example_images(2, torch.Generator().manual_seed(0)))
        f = decoder_features(tok, tokens)
        assert torch.equal(f, tok.quantizer.lookup(tokens.data))  # the code vectors C[ids]
        assert torch.allclose(tok.decode_latents(f), tok.decode(tokens))  # method restored afterwards
    assert "decode_latents" not in vars(tok) and resolve_kind(tok) == "decoder"
    with pytest.raises(ValueError, match="no semantic_features"):
        resolve_kind(tok, "semantic")


def test_uniwetok_semantic_features_are_the_post_distillation_head():
    tok = load_model("tokenizer/uniwetok-tiny", "tokenizer", ch=8, norm_groups=4).eval()
    x = tok.example_images(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        z_q, bits, _ = tok.quantize(x)
        f = tok.semantic_features(Tokens(bits, tok.spec))
        assert torch.allclose(f, tok.post_head(z_q), atol=1e-6) and f.shape == (2, 128, 8, 8)
    assert resolve_kind(tok) == "semantic"
    bare = load_model("tokenizer/uniwetok-tiny", "tokenizer", ch=8, norm_groups=4, teacher="none")
    with pytest.raises(ValueError, match="teacher='none'"):
        bare.semantic_features(Tokens(bits, bare.spec))


@pytest.mark.parametrize("name", ["tokenizer/vq-tiny", "tokenizer/tokenflow-tiny"])
def test_cli_runs_on_random_init_tiny_tokenizers(name, tmp_path, capsys, single_thread):
    from eval.cli import main

    out = tmp_path / "semantic.json"
    assert main(["semantic", "--tokenizer", name, "--train", "48", "--test", "24", "--max-iter", "50",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["features"] == ("semantic" if "tokenflow" in name else "decoder")
    assert r["feature_dim"] == (128 * 64 if "tokenflow" in name else 8 * 64)
    assert set(r["targets"]) == {"shape", "colour", "class", "position"}
    for v in r["targets"].values():
        assert 0 <= v["linear"] <= 1 and 0 <= v["knn1"] <= 1 and 0 <= v["majority"] <= 1
    assert r["tokenizer_weights"]["sha256"] is None and "linear" in capsys.readouterr().out


def test_evaluate_is_deterministic_given_seed(single_thread):
    from eval.semantic import evaluate

    tok = load_model("tokenizer/vq-tiny", "tokenizer")
    a, b, c = (evaluate(tok, num_train=32, num_test=16, max_iter=30, seed=s)["targets"] for s in (0, 0, 1))
    assert a == b and a != c


def test_cli_errors_are_explained(capsys):
    from eval.cli import main

    assert main(["semantic", "--tokenizer", "tokenizer/kl-tiny", "--features", "semantic", "--train", "4",
                 "--test", "2"]) == 2
    assert "no semantic_features" in capsys.readouterr().err


def test_shipped_vq_tiny_reads_colour_and_position(tmp_path, single_thread):
    """Trained pixel codes carry colour and position far above chance (10% / ~25%)."""
    from eval.semantic import evaluate

    tok = load_model("tokenizer/vq-tiny:shapes", "tokenizer")
    r = evaluate(tok, num_train=160, num_test=80, max_iter=100)
    t = r["targets"]
    assert t["colour"]["knn1"] > 0.25 and t["position"]["knn1"] > 0.5
    assert t["colour"]["linear"] > 0.3 and t["position"]["linear"] > 0.45
