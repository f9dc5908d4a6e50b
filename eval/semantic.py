"""Semantic score of a tokenizer: ``arzoo eval semantic``.

::

    arzoo eval semantic --tokenizer tokenizer/vq-tiny:shapes
    arzoo eval semantic --tokenizer runs/tokenflow/final --train 2000 --test 1000 --json semantic.json
    python -m eval.semantic --tokenizer tokenizer/tokenflow-tiny --features decoder

How much of an object's identity (shape, colour) and of its placement can be read off the
features a tokenizer attaches to its **tokens**, by a linear probe and by a 1-nearest-neighbour
classifier. It compares the semantic side of unified tokenizers (TokenFlow, UniWeTok) with a
plain pixel tokenizer on the same tokens-only footing: features are always computed from
``encode(x)``, never from the encoder's continuous activations.

Protocol
--------
Images
    Single-object Shapes images (``zoo.data.shapes.ShapesDataset(num_objects=1)``) rendered at
    the tokenizer's ``image_size``: ``--train`` N images of the ``train`` split and ``--test``
    M images of the ``test`` split (different streams). Which images: ``N`` (``M``) distinct
    indices drawn without replacement from the first ``max(50000, N)`` of the split by
    ``numpy.random.default_rng([seed, 0])`` (``[seed, 1]`` for test), so a run is a pure
    function of ``--seed``.
Features (``--features``)
    ``semantic``: ``tokenizer.semantic_features(tokens)``; TokenFlow: the semantic decoder's
    prediction of the teacher's patch features from the ids' semantic half (B, teacher_dim, g, g);
    UniWeTok: the post-quantisation PPD head applied to the ±1 codes (B, teacher_dim, h, w).
    ``decoder``: what the tokenizer's decoder consumes for the tokens (:func:`decoder_features`):
    VQ: the (l2-normalised) code vectors ``C[ids]`` (B, codebook_dim, h, w); multi-scale VQ and
    TokenFlow: the pixel-side ``f_hat``, the sum over scales upsampled to the finest grid (so a
    pyramid needs no choice of scale: the finest-grid map the decoder sees already combines
    them); binary: the ±1 (or ±1/sqrt(K)) codes; KL: the scaled latent; Q-Former tokenizers
    (SEED, Slot): ``decoder_condition(tokens)``. ``auto`` (default): ``semantic`` when the
    tokenizer has ``semantic_features``, else ``decoder``.
    Each image's feature map is flattened with its spatial positions kept (C*h*w values), then
    every dimension is standardised with the mean and std of the **train** features (a constant
    dimension becomes 0).
Targets
    ``shape`` (3: circle, square, triangle), ``colour`` (10 GenEval colours), ``class``
    (shape x colour, 30: ``zoo.data.shapes.class_id``) and ``position``: the quadrant of the
    centre of the object's tight box (4: top-left, top-right, bottom-left, bottom-right, split
    at ``image_size / 2``). Pixel features are expected to win on position, semantic ones on
    shape/class.
Linear probe
    Multinomial logistic regression ``softmax(x W + b)`` from zero initialisation, full-batch
    ``torch.optim.LBFGS`` (strong-Wolfe line search, ``--max-iter`` iterations at most) on the
    loss ``mean CE + weight_decay / 2 * ||W||^2`` (``--weight-decay``, default 1e-3; the bias is
    not penalised). Reported: test accuracy (``linear``), train accuracy and iterations used.
Nearest neighbour
    1-NN with cosine similarity between standardised test and train features (``knn1``);
    ties go to the lower train index.
Chance
    ``majority``: test accuracy of always predicting the most frequent train label.

Everything runs without gradients through the tokenizer, in eval mode; the probe is
deterministic given the features (zero init, full batch, no sampling).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

#: position classes: quadrant of the object centre (label id = 2 * below + right)
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
FEATURE_KINDS = ("auto", "semantic", "decoder")
DEFAULT_WEIGHT_DECAY = 1e-3
DEFAULT_MAX_ITER = 300


def targets() -> dict:
    """Target name -> tuple of class names (label ``i`` is the ``i``-th name)."""
    from zoo.data.shapes import CLASSES, COLORS, SHAPES

    return {"shape": SHAPES, "colour": COLORS, "class": tuple(f"{c} {s}" for s, c in CLASSES),
            "position": QUADRANTS}


def object_labels(obj: dict, resolution: int) -> dict:
    """Labels of one Shapes object (``{"shape", "color", "bbox"}``) for every target."""
    from zoo.data.shapes import COLORS, SHAPES, class_id

    x0, y0, x1, y1 = obj["bbox"]
    right = (x0 + x1) / 2 >= resolution / 2
    below = (y0 + y1) / 2 >= resolution / 2
    return {"shape": SHAPES.index(obj["shape"]), "colour": COLORS.index(obj["color"]),
            "class": class_id(obj["shape"], obj["color"]), "position": 2 * int(below) + int(right)}


def sample_indices(n: int, seed: int, stream: int, pool: int = 50000) -> np.ndarray:
    """``n`` distinct dataset indices from ``range(max(pool, n))``, a pure function of (seed, stream)."""
    rng = np.random.default_rng([int(seed), int(stream)])
    return np.sort(rng.choice(max(pool, n), size=n, replace=False))


# ---------------------------------------------------------------------------- features
class _Captured(Exception):
    def __init__(self, value):
        super().__init__("decoder input captured")
        self.value = value


def decoder_features(tokenizer, tokens) -> torch.Tensor:
    """What ``tokenizer``'s decoder consumes for ``tokens`` (see the module docstring).

    Q-Former tokenizers: ``decoder_condition(tokens)``. Tokenizers whose ``decode`` ends in
    ``decode_latents(z)`` (every :class:`~tokenizers_vis.vq.VQTokenizer` subclass: VQ, multi-scale
    VQ, binary, KL, TokenFlow, UniWeTok): the ``z`` that ``decode(tokens)`` passes to it, recorded
    by a temporary instance-level wrapper that stops before the decoder runs -- so the
    tokens-to-latent lookup of each tokenizer is used as it is, not re-implemented here.
    """
    from zoo.pipeline import model_name

    if callable(getattr(tokenizer, "decoder_condition", None)):
        return tokenizer.decoder_condition(tokens)
    if not callable(getattr(tokenizer, "decode_latents", None)):
        raise ValueError(f"{model_name(tokenizer)} ({type(tokenizer).__name__}) has neither semantic_features, "
                         f"decoder_condition nor decode_latents: no way to get features for its tokens")

    def capture(z):
        raise _Captured(z)

    # an instance attribute shadows the class method (nn.Module only intercepts modules/params/buffers)
    tokenizer.decode_latents = capture
    try:
        tokenizer.decode(tokens)
    except _Captured as c:
        return c.value
    finally:
        del tokenizer.decode_latents
    raise ValueError(f"{model_name(tokenizer)}: decode(tokens) did not call decode_latents, so the decoder's "
                     f"input cannot be recorded; give it a semantic_features(tokens) method")


def resolve_kind(tokenizer, kind: str = "auto") -> str:
    """``auto`` -> ``semantic`` if the tokenizer has ``semantic_features``, else ``decoder``."""
    from zoo.pipeline import model_name

    if kind not in FEATURE_KINDS:
        raise ValueError(f"features must be one of {FEATURE_KINDS}, got {kind!r}")
    has_sem = callable(getattr(tokenizer, "semantic_features", None))
    if kind == "auto":
        return "semantic" if has_sem else "decoder"
    if kind == "semantic" and not has_sem:
        raise ValueError(f"{model_name(tokenizer)} ({type(tokenizer).__name__}) has no semantic_features(tokens); "
                         f"use --features decoder (the features its decoder consumes)")
    return kind


def token_features(tokenizer, tokens, kind: str) -> torch.Tensor:
    """Features of ``tokens`` of kind ``semantic`` / ``decoder`` (unflattened, as the model gives them)."""
    if kind == "semantic":
        return tokenizer.semantic_features(tokens)
    if kind == "decoder":
        return decoder_features(tokenizer, tokens)
    raise ValueError(f"token_features: kind must be 'semantic' or 'decoder', got {kind!r}")


@torch.no_grad()
def extract(tokenizer, split: str, n: int, *, seed: int = 0, kind: str = "decoder", batch_size: int = 64,
            device=None) -> tuple[torch.Tensor, dict, tuple]:
    """Flattened float32 CPU features (n, D), labels {target: (n,) long} and one feature map's shape."""
    from zoo.data.shapes import ShapesDataset

    device = torch.device(device) if device is not None else next(tokenizer.parameters()).device
    size = int(tokenizer.image_size)
    ds = ShapesDataset(split=split, resolution=size, num_objects=1, length=max(50000, n))
    idx = sample_indices(n, seed, 0 if split == "train" else 1)
    feats, labels, shape = [], {t: [] for t in targets()}, None
    for s in range(0, n, batch_size):
        items = [ds[int(i)] for i in idx[s:s + batch_size]]
        x = torch.stack([it["image"] for it in items]).to(device)
        f = token_features(tokenizer, tokenizer.encode(x), kind)
        shape = tuple(f.shape[1:])
        feats.append(f.reshape(f.shape[0], -1).float().cpu())
        for it in items:
            for t, v in object_labels(it["objects"][0], size).items():
                labels[t].append(v)
    return torch.cat(feats), {t: torch.tensor(v, dtype=torch.long) for t, v in labels.items()}, shape


def standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension z-scores with the **train** mean/std; constant dimensions become 0."""
    mean = train.mean(0)
    std = train.std(0, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return (train - mean) / std, (test - mean) / std


# ---------------------------------------------------------------------------- classifiers
def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, *, weight_decay: float = DEFAULT_WEIGHT_DECAY,
                 max_iter: int = DEFAULT_MAX_ITER) -> dict:
    """Multinomial logistic regression by full-batch LBFGS (module docstring) -> accuracies."""
    d = train_x.shape[1]
    w = torch.zeros(d, num_classes, dtype=train_x.dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=train_x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=int(max_iter), history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(train_x @ w + b, train_y) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        loss = opt.step(closure)
    with torch.no_grad():
        train_acc = (torch.argmax(train_x @ w + b, 1) == train_y).double().mean()
        test_acc = (torch.argmax(test_x @ w + b, 1) == test_y).double().mean()
    n_iter = opt.state[w].get("n_iter", 0)
    return {"test_acc": float(test_acc), "train_acc": float(train_acc), "loss": float(loss.detach()),
            "iters": int(n_iter)}


def nearest_neighbour(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                      chunk: int = 1024) -> float:
    """1-NN accuracy with cosine similarity (argmax takes the first train index on ties)."""
    a, b = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    pred = torch.cat([train_y[torch.argmax(b[s:s + chunk] @ a.T, 1)] for s in range(0, b.shape[0], chunk)])
    return float((pred == test_y).double().mean())


def majority(train_y: torch.Tensor, test_y: torch.Tensor, num_classes: int) -> float:
    """Test accuracy of always predicting the most frequent train label."""
    top = int(torch.argmax(torch.bincount(train_y, minlength=num_classes)))
    return float((test_y == top).double().mean())


def score(train_x, train_labels: dict, test_x, test_labels: dict, *, weight_decay: float = DEFAULT_WEIGHT_DECAY,
          max_iter: int = DEFAULT_MAX_ITER) -> dict:
    """Standardise, then probe and 1-NN for every target in ``train_labels`` -> {target: results}."""
    tr, te = standardise(train_x, test_x)
    names = targets()
    out = {}
    for t, ytr in train_labels.items():
        k = len(names[t]) if t in names else int(max(ytr.max(), test_labels[t].max())) + 1
        yte = test_labels[t]
        lin = linear_probe(tr, ytr, te, yte, k, weight_decay=weight_decay, max_iter=max_iter)
        out[t] = {"classes": k, "linear": lin["test_acc"], "linear_train": lin["train_acc"],
                  "linear_iters": lin["iters"], "knn1": nearest_neighbour(tr, ytr, te, yte),
                  "majority": majority(ytr, yte, k)}
    return out


@torch.no_grad()
def evaluate(tokenizer, *, num_train: int = 2000, num_test: int = 1000, features: str = "auto", seed: int = 0,
             batch_size: int = 64, weight_decay: float = DEFAULT_WEIGHT_DECAY, max_iter: int = DEFAULT_MAX_ITER,
             device=None) -> dict:
    """Semantic-score report of ``tokenizer`` (see the module docstring)."""
    from eval.fid import environment
    from zoo.pipeline import model_name

    if num_train < 2 or num_test < 1:
        raise ValueError(f"need at least 2 train and 1 test images, got --train {num_train} --test {num_test}")
    tokenizer = tokenizer.eval()
    device = torch.device(device) if device is not None else next(tokenizer.parameters()).device
    tokenizer.to(device)
    kind = resolve_kind(tokenizer, features)
    tr_x, tr_y, fshape = extract(tokenizer, "train", num_train, seed=seed, kind=kind, batch_size=batch_size,
                                 device=device)
    te_x, te_y, _ = extract(tokenizer, "test", num_test, seed=seed, kind=kind, batch_size=batch_size, device=device)
    source = (f"{type(tokenizer).__name__}.semantic_features(tokens)" if kind == "semantic"
              else "decoder input for the tokens (eval.semantic.decoder_features)")
    return {
        "tokenizer": model_name(tokenizer), "tokens": tokenizer.spec.describe(),
        "image_size": int(tokenizer.image_size),
        "features": kind, "feature_source": source, "feature_shape": list(fshape), "feature_dim": int(tr_x.shape[1]),
        "num_train": num_train, "num_test": num_test, "seed": seed, "weight_decay": weight_decay,
        "max_iter": max_iter, "targets": score(tr_x, tr_y, te_x, te_y, weight_decay=weight_decay, max_iter=max_iter),
        "protocol": "single-object Shapes (train/test splits); features of encode(x), flattened, standardised with "
                    "train stats; linear = multinomial logistic regression (full-batch LBFGS, zero init, L2 on W); "
                    "knn1 = 1-NN cosine; majority = most frequent train label",
        "device": str(device), "environment": environment(),
    }


def format_report(r: dict) -> str:
    lines = [(f"{r['tokenizer']} ({r['tokens']}): {r['features']} features {tuple(r['feature_shape'])} "
              f"= {r['feature_dim']} dims, {r['num_train']} train / {r['num_test']} test single-object Shapes images"),
             f"  {'target':<9} {'classes':>7} {'linear':>8} {'1-NN':>8} {'majority':>9} {'lin train':>10}"]
    for t, v in r["targets"].items():
        lines.append(f"  {t:<9} {v['classes']:>7} {100 * v['linear']:>7.1f}% {100 * v['knn1']:>7.1f}% "
                     f"{100 * v['majority']:>8.1f}% {100 * v['linear_train']:>9.1f}%")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arzoo eval semantic", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="checkpoint folder, registry name or name:tag")
    p.add_argument("--train", type=int, default=2000, help="train images for the probe / 1-NN (default 2000)")
    p.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
    p.add_argument("--features", choices=FEATURE_KINDS, default="auto",
                   help="semantic_features(tokens), the decoder's input, or auto (semantic when available)")
    p.add_argument("--seed", type=int, default=0, help="which Shapes images are drawn (default 0)")
    p.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY)
    p.add_argument("--max-iter", type=int, default=DEFAULT_MAX_ITER, help="LBFGS iterations at most")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--json", metavar="PATH", help="write the report here (it is always printed)")
    return p


def main(argv=None) -> int:
    from eval.recon import run_tokenizer_report

    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return run_tokenizer_report(
        "arzoo eval semantic", args.tokenizer,
        lambda tok: evaluate(tok, num_train=args.train, num_test=args.test, features=args.features, seed=args.seed,
                             batch_size=args.batch_size, weight_decay=args.weight_decay, max_iter=args.max_iter,
                             device=device),
        format_report, args.json)


if __name__ == "__main__":
    sys.exit(main())
