"""FID / IS / KID / precision-recall with stock torch-fidelity: ``arzoo eval fid``.

::

    # reference statistics once, then samples against them (Shapes-FID, offline)
    arzoo eval fid shapes:train:10000 --save-stats refs/shapes64-train.npz
    arzoo eval fid outputs/samples/samples.npz --ref refs/shapes64-train.npz
    # two image sets (folder of PNGs, ADM npz, or shapes:<split>[:N]) -> FID, KID, P/R
    arzoo eval fid outputs/samples --ref shapes:test:1000 --json report.json
    # Inception FID against ADM's reference batch (weights file given, nothing is downloaded)
    arzoo eval fid samples.npz --ref VIRTUAL_imagenet256_labeled.npz --features inception \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth

Metrics (the ADM evaluator's set, Dhariwal & Nichol 2021, guided-diffusion ``evaluations/``):

FID
    Fréchet distance between Gaussians fitted to the two feature sets (Heusel et al. 2017, §3):
    ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``, computed here in float64 by
    :func:`frechet_distance` (the trace of the matrix square root from symmetric
    eigendecompositions; no scipy). The reference may be precomputed ``mu``/``sigma`` (ADM /
    MAR npz format, e.g. ``VIRTUAL_imagenet256_labeled.npz``).
IS
    Inception Score (Salimans et al. 2016) on Inception logits, 10 splits (Inception only).
KID
    Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD^2 with the cubic
    polynomial kernel ``(x.y / d + 1)^3`` over 100 subsets of ``min(1000, min(N1, N2) // 2)``
    samples (torch-fidelity's estimator). Shapes-net features are larger than Inception's
    pool_3 (``x.y / d`` ~ 4.5 instead of well below 1), so Shapes-KID lives on its own
    scale; at a few hundred images it is noisy (compare with its std).
Precision / recall
    Kynkäänniemi et al. 2019 k-NN manifolds with k = 3, on the *same* features as FID (as ADM
    does with pool_3; torch-fidelity's default would download VGG-16 for this): precision =
    share of samples inside the reference manifold, recall = share of reference images
    inside the sample manifold.

Feature networks (``--features``)

``shapes-net`` (default)
    the shipped Shapes attribute CNN (``eval/features.py``). Gives **Shapes-FID**, the
    offline number for the tiny models. **Not comparable to Inception FID**; every key is
    prefixed ``shapes_`` and every printed line says so.
``inception``
    torch-fidelity's ``inception-v3-compat`` (TF-FID Inception weights, inputs resized to
    299 with TF1-compatible bilinear). Offline: ``--inception-weights PATH`` or the file in
    torch.hub's cache (``$TORCH_HOME/hub/checkpoints/``); when neither exists the command
    stops with a message naming the file and the URL instead of trying to download.

Inputs: a folder of PNG/JPEG files (sorted by name; not recursive), an ADM-style ``.npz``
(``arr_0`` uint8 NHWC), or ``shapes:<split>[:N][:objects=1-4][:res=64]`` (the procedural
dataset; default N = 10000, 1 object, the other input's resolution or 64). A reference
``.npz`` holding ``mu`` and ``sigma`` is used as statistics (its ``arr_0``, as in ADM's
reference batches, or ``features``, as written by ``--stats-with-features``, then feed KID
and precision/recall).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from eval.features import FIDELITY_NAME, NOT_COMPARABLE, register_torch_fidelity
from eval.images import (  # noqa: F401  (re-exported: the image sources used to live here)
    ArrayImages,
    FolderImages,
    ShapesImages,
    npz_array,
    open_images,
    parse_shapes,
)

INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
FEATURES = {"shapes-net": FIDELITY_NAME, "inception": INCEPTION}
#: (feature layer for FID/KID/PR, layer for IS or None, metric-key prefix, family label)
_LAYERS = {"shapes-net": ("features", None, "shapes_", "Shapes-FID"),
           "inception": ("2048", "logits_unbiased", "", "FID (Inception-v3, torch-fidelity inception-v3-compat)")}
RESIZE = {"shapes-net": "inputs resized inside shapes-net to 64x64 (bilinear, antialiased when shrinking)",
          "inception": "inputs resized inside torch-fidelity to 299x299 (TF1-compatible bilinear, "
                       "align_corners=False), as the TF FID/ADM evaluator"}

register_torch_fidelity()


class InceptionWeightsMissing(FileNotFoundError):
    """The Inception-v3 FID weights are not on this machine (no download is attempted)."""


# ---------------------------------------------------------------------------- statistics
def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64 of (N, D) features (sigma: unbiased covariance, as numpy.cov)."""
    f = np.asarray(features.numpy() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"expected features of shape (N >= 2, D), got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_eigvals_floor(w: np.ndarray) -> np.ndarray:
    # Eigenvalues of a PSD matrix below the round-off level of eigh (dim * eps * largest) are
    # zeros of a rank-deficient covariance (fewer images than dims); clip them to exactly 0 so
    # that their square roots (~1e-8 * largest) do not pile up into the trace.
    tol = w.shape[0] * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), 1e-300)
    return np.where(w > tol, w, 0.0)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(_psd_eigvals_floor(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, Eq. 6 in §3).

    ``tr((S1 S2)^(1/2))`` = ``sum(sqrt(eig(S1^(1/2) S2 S1^(1/2))))``: ``S1 S2`` is similar to
    that symmetric PSD matrix, so both have the same real, non-negative eigenvalues, and
    ``eigh`` on a symmetric matrix is stable where ``sqrtm`` / ``eigvals`` of the non-symmetric
    product is not. Eigenvalues at round-off level are set to 0 before the square root (see
    ``_psd_eigvals_floor``), so a set against itself gives 0 to ~1e-12 relative even when
    there are fewer images than feature dimensions.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    tr_covmean = float(np.sqrt(_psd_eigvals_floor(np.linalg.eigvalsh((m + m.T) / 2))).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def save_stats(path, features, *, features_name: str, extra: dict | None = None, with_features: bool = False) -> Path:
    """Write ``mu``, ``sigma`` (ADM/MAR npz keys) + which features made them; atomically."""
    mu, sigma = feature_statistics(features)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": mu, "sigma": sigma, "feature_extractor": np.array(features_name),
              "num_images": np.array(int(np.asarray(features).shape[0])),
              "meta": np.array(json.dumps(extra or {}))}
    if with_features:
        arrays["features"] = np.asarray(features, dtype=np.float32)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def load_stats(path) -> dict:
    """``mu``/``sigma`` (+ ``features``, ``arr_0``, ``feature_extractor`` when present) of a stats npz."""
    with np.load(path) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"{path}: not a statistics file (expected keys mu and sigma, got {sorted(z.keys())})")
        out = {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64)}
        if "features" in z:
            out["features"] = z["features"]
        if "arr_0" in z:  # ADM reference batches: the images behind the statistics
            out["arr_0"] = npz_array(path, "arr_0")
        if "feature_extractor" in z:
            out["feature_extractor"] = str(z["feature_extractor"])
        if "num_images" in z:
            out["num_images"] = int(z["num_images"])
    if out["mu"].ndim != 1 or out["sigma"].shape != (out["mu"].shape[0],) * 2:
        raise ValueError(f"{path}: mu {out['mu'].shape} and sigma {out['sigma'].shape} do not fit together")
    return out


def is_stats_file(source) -> bool:
    if not isinstance(source, (str, Path)) or not str(source).endswith(".npz") or not Path(source).is_file():
        return False
    with np.load(source) as z:
        return "mu" in z and "sigma" in z


# ---------------------------------------------------------------------------- features
def inception_weights_path(path=None) -> Path:
    """The Inception-v3 FID weights file: ``path``, else torch.hub's cached copy; never downloads."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if path:
        p = Path(path)
        if p.is_file():
            return p
        where = f"--inception-weights {path}: no such file"
    elif hub.is_file():
        return hub
    else:
        where = f"Inception-v3 FID weights not found (looked for {hub}, torch.hub's cache)"
    raise InceptionWeightsMissing(
        f"{where}. Nothing is downloaded. Fetch {INCEPTION_FILE} on a machine with internet from "
        f"{URL_INCEPTION_V3} (torch-fidelity's TF-FID Inception weights), then copy it to {hub} or pass "
        f"--inception-weights PATH. For an offline number on Shapes use --features shapes-net "
        f"(Shapes-FID, not comparable to Inception FID).")


def _check_plain_weights(path: Path) -> None:
    # torch-fidelity unpickles this file without restriction; first make sure it is a plain
    # tensor state dict (the restricted, tensors-only load below refuses anything else).
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a plain PyTorch state dict of tensors ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ValueError(f"{path}: does not look like torch-fidelity's Inception-v3 weights (no 'fc.weight')")


def check_features(features: str = "shapes-net", *, inception_weights=None, shapes_weights=None) -> str:
    """The weights file of feature network ``features``, checked without building the network
    (jobs call this before sampling); raises a one-line error naming what is missing."""
    if features not in FEATURES:
        raise ValueError(f"--features: expected one of {sorted(FEATURES)}, got {features!r}")
    if features == "inception":
        weights = inception_weights_path(inception_weights)
        _check_plain_weights(weights)
        return str(weights)
    from eval.features import NAME, WEIGHTS_TAG
    from zoo.checkpoint import WEIGHTS_NAME
    from zoo.registry import resolve_weights

    weights = Path(shapes_weights or resolve_weights(NAME, WEIGHTS_TAG)) / WEIGHTS_NAME
    if not weights.is_file():
        where = f"--shapes-weights {shapes_weights}" if shapes_weights else f"{NAME}:{WEIGHTS_TAG}"
        raise FileNotFoundError(f"{where}: no {weights} (expected a ShapesNet checkpoint folder)")
    return str(weights)


def make_extractor(features: str = "shapes-net", *, inception_weights=None, shapes_weights=None, device=None,
                   isc: bool = True):
    """A torch-fidelity feature extractor and ``(layer, is_layer_or_None)`` for ``features``."""
    from torch_fidelity.utils import create_feature_extractor

    weights = check_features(features, inception_weights=inception_weights, shapes_weights=shapes_weights)
    layer, is_layer, _, _ = _LAYERS[features]
    cuda = _use_cuda(device)
    if features == "inception":
        layers = [layer] + ([is_layer] if isc else [])
        fe = create_feature_extractor(INCEPTION, layers, cuda=cuda, feature_extractor_weights_path=weights,
                                      verbose=False)
        return fe, layer, (is_layer if isc else None), weights
    fe = create_feature_extractor(FIDELITY_NAME, [layer], cuda=cuda, verbose=False,
                                  feature_extractor_weights_path=shapes_weights)
    return fe, layer, None, weights


def _use_cuda(device) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return str(device).startswith("cuda")


def extract(dataset: Dataset, fe, *, batch_size: int = 64, device=None, progress: bool = False) -> dict:
    """``{layer: (N, D) float tensor}`` for every image of ``dataset`` (torch-fidelity's loop)."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    # save_cpu_ram=True: no DataLoader worker processes (2-core machines; images are small).
    return get_featuresdict_from_dataset(dataset, fe, batch_size, _use_cuda(device), True, progress)


# ---------------------------------------------------------------------------- metrics
def precision_recall(gen: torch.Tensor, ref: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """k-NN manifold precision/recall (Kynkäänniemi et al. 2019) via torch-fidelity's PRC."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    m = prc_features_to_metric(gen.float(), ref.float(), prc_neighborhood=k, prc_batch_size=10000,
                               save_cpu_ram=False, verbose=False)
    return m["precision"], m["recall"]


def kernel_distance(gen: torch.Tensor, ref: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 2020) -> tuple[float, float, int]:
    """KID mean, std and the subset size used: ``min(subset_size, min(N1, N2) // 2)`` (at least 2),
    so that with few images the subsets still differ and the std means something."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = int(min(subset_size, max(2, min(len(gen), len(ref)) // 2)))
    m = kid_features_to_metric(gen.float(), ref.float(), kid_subsets=subsets, kid_subset_size=size,
                               rng_seed=seed, verbose=False)
    return m["kernel_inception_distance_mean"], m["kernel_inception_distance_std"], size


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    from torch_fidelity.metric_isc import isc_features_to_metric

    m = isc_features_to_metric(logits, splits=min(splits, len(logits)), shuffle=True, rng_seed=2020)
    return m["inception_score_mean"], m["inception_score_std"]


def environment() -> dict:
    """Library versions (and the git commit when run from a checkout) for reports."""
    import importlib.metadata as md

    out = {}
    for pkg in ("arzoo", "torch", "torch-fidelity", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if out["arzoo"] is None:  # not installed: read the checkout's setup.cfg
        import configparser

        cfg = configparser.ConfigParser()
        cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
        out["arzoo"] = cfg.get("metadata", "version", fallback=None)
    try:
        import subprocess

        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                           text=True, timeout=10, check=False)
        if r.returncode == 0:
            out["git_commit"] = r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def compute_metrics(inputs, ref=None, *, features: str = "shapes-net", inception_weights=None, shapes_weights=None,
                    batch_size: int = 64, device=None, kid: bool = True, prc: bool = True, isc: bool = True,
                    k: int = 3, kid_subsets: int = 100, kid_subset_size: int = 1000, save_stats_path=None,
                    stats_with_features: bool = False, progress: bool = False) -> dict:
    """Metrics of ``inputs`` against ``ref`` (images or a stats npz); see the module docstring.

    Returns a JSON-able report: ``metrics`` (keys prefixed ``shapes_`` for Shapes-net
    features), the inputs, feature network, resize rule and library versions. With
    ``save_stats_path`` the statistics of ``inputs`` are saved (ADM npz keys ``mu``, ``sigma``).
    """
    layer, is_layer, prefix, family = _LAYERS.get(features, (None, None, None, None))
    if layer is None:
        raise ValueError(f"features: expected one of {sorted(FEATURES)}, got {features!r}")
    if ref is None and save_stats_path is None:
        raise ValueError("nothing to do: give a reference (--ref) and/or --save-stats PATH")
    ref_stats = load_stats(ref) if ref is not None and is_stats_file(ref) else None
    ds1, d1 = open_images(inputs)
    ds2 = d2 = None
    if ref is not None and ref_stats is None:
        ds2, d2 = open_images(ref, default_resolution=(d1["image_size"] or (64,))[0])
    elif ref_stats is not None:
        d2 = {"source": str(ref), "kind": "statistics (mu, sigma)", "num_images": ref_stats.get("num_images")}
        if "arr_0" in ref_stats and (kid or prc):
            ds2 = ArrayImages(ref_stats.pop("arr_0"), str(ref))
            d2["images_for_kid_pr"] = f"arr_0 ({len(ds2)} images)"
    fe, layer, is_layer, weights = make_extractor(features, inception_weights=inception_weights,
                                                  shapes_weights=shapes_weights, device=device,
                                                  isc=isc and is_layer is not None)
    f1 = extract(ds1, fe, batch_size=batch_size, device=device, progress=progress)
    g = f1[layer]
    from eval.fid_job import sha256_file

    report = {"metric_family": family, "features": features, "feature_extractor": fe.get_name(),
              "feature_layer": layer, "feature_dim": int(g.shape[1]), "feature_weights": weights,
              "feature_weights_sha256": sha256_file(weights),
              "resize": RESIZE[features], "input": d1}
    if features == "shapes-net":
        report["note"] = NOT_COMPARABLE
    if d2 is not None:
        report["ref"] = d2
    metrics: dict = {}
    if save_stats_path is not None:
        save_stats(save_stats_path, g, features_name=features, with_features=stats_with_features,
                   extra={"source": d1["source"], "feature_layer": layer})
        report["saved_stats"] = str(save_stats_path)
    if is_layer is not None:
        metrics["is_mean"], metrics["is_std"] = inception_score(f1[is_layer])
    if ref is not None:
        ref_feats = None
        if ds2 is not None:
            ref_feats = extract(ds2, fe, batch_size=batch_size, device=device, progress=progress)[layer]
        elif ref_stats is not None and "features" in ref_stats:
            ref_feats = torch.from_numpy(np.asarray(ref_stats["features"], np.float32))
            d2["features_for_kid_pr"] = "stored features"
        if ref_stats is not None:
            if ref_stats.get("feature_extractor") not in (None, features):
                raise ValueError(f"{ref}: statistics of {ref_stats['feature_extractor']} features, but --features "
                                 f"is {features}")
            if ref_stats["mu"].shape[0] != g.shape[1]:
                raise ValueError(f"{ref}: statistics are {ref_stats['mu'].shape[0]}-d but {features} features are "
                                 f"{g.shape[1]}-d (Inception pool_3 is 2048-d, shapes-net 256-d)")
            mu2, s2 = ref_stats["mu"], ref_stats["sigma"]
        else:
            mu2, s2 = feature_statistics(ref_feats)
        mu1, s1 = feature_statistics(g)
        metrics[f"{prefix}fid"] = frechet_distance(mu1, s1, mu2, s2)
        if ref_feats is not None:
            if kid:
                m, s, size = kernel_distance(g, ref_feats, subsets=kid_subsets, subset_size=kid_subset_size)
                metrics[f"{prefix}kid_mean"], metrics[f"{prefix}kid_std"] = m, s
                metrics["kid_subset_size"] = size
            if prc:
                metrics[f"{prefix}precision"], metrics[f"{prefix}recall"] = precision_recall(g, ref_feats, k)
                metrics["pr_k"] = k
    report["metrics"] = metrics
    report["environment"] = environment()
    return report


def format_report(report: dict) -> str:
    """Human-readable lines; Shapes-net numbers carry their not-comparable label on every line."""
    m = report.get("metrics", {})
    shapes = report["features"] == "shapes-net"
    tag = " [Shapes-net features; NOT comparable to Inception metrics]" if shapes else " [Inception-v3]"
    lines = [f"input : {report['input']['source']} ({report['input']['num_images']} images)"]
    if "ref" in report:
        lines.append(f"ref   : {report['ref']['source']} ({report['ref'].get('num_images')} images)")
    names = {"fid": "Shapes-FID" if shapes else "FID", "kid_mean": "Shapes-KID" if shapes else "KID",
             "precision": "precision", "recall": "recall"}
    p = "shapes_" if shapes else ""
    for key, label in names.items():
        if p + key in m:
            extra = f" ± {m[p + 'kid_std']:.5f}" if key == "kid_mean" else ""
            lines.append(f"{label:<10}: {m[p + key]:.5f}{extra}{tag}")
    if "is_mean" in m:
        lines.append(f"IS        : {m['is_mean']:.3f} ± {m['is_std']:.3f}{tag}")
    if report.get("saved_stats"):
        lines.append(f"saved statistics ({report['features']} features) -> {report['saved_stats']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI
def add_feature_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", choices=sorted(FEATURES), default="shapes-net",
                   help="feature network: shapes-net (Shapes-FID, offline; not comparable to Inception FID) "
                        "or inception (torch-fidelity inception-v3-compat)")
    p.add_argument("--inception-weights", metavar="PATH",
                   help=f"{INCEPTION_FILE} (default: torch.hub's cache; never downloaded)")
    p.add_argument("--shapes-weights", metavar="DIR", help="a ShapesNet checkpoint folder (default: shipped)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arzoo eval fid", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="inputs: folder of PNGs | samples.npz (arr_0) | shapes:<split>[:N][:objects=A-B]"
                                       "[:res=R]; --ref may also be a stats npz (mu, sigma)")
    p.add_argument("input", help="samples: folder, npz (arr_0 uint8 NHWC) or shapes:<split>[:N]")
    p.add_argument("--ref", help="reference: images as for INPUT, or a stats npz with mu/sigma")
    p.add_argument("--save-stats", metavar="PATH", help="save mu/sigma of INPUT's features to this npz")
    p.add_argument("--stats-with-features", action="store_true",
                   help="also store the features in --save-stats (then KID and P/R work against it)")
    add_feature_args(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--no-kid", action="store_true")
    p.add_argument("--no-prc", action="store_true", help="skip precision/recall")
    p.add_argument("--no-is", action="store_true", help="skip the Inception Score")
    p.add_argument("--k", type=int, default=3, help="k of the k-NN manifolds for precision/recall")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--json", metavar="PATH", help="write the report here (it is always printed)")
    p.add_argument("--progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = compute_metrics(args.input, args.ref, features=args.features, inception_weights=args.inception_weights,
                                 shapes_weights=args.shapes_weights, batch_size=args.batch_size, device=args.device,
                                 kid=not args.no_kid, prc=not args.no_prc, isc=not args.no_is, k=args.k,
                                 kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                                 save_stats_path=args.save_stats, stats_with_features=args.stats_with_features,
                                 progress=args.progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"arzoo eval fid: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    emit_json(report, args.json)
    return 0


def emit_json(report: dict, path=None) -> None:
    """Print a report as JSON and, when ``path`` is given, also write it there."""
    text = json.dumps(report, indent=2)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
