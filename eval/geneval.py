"""GenEval: the object-focused text-to-image evaluation protocol, with pluggable detectors.

Implements the protocol of Ghosh et al., 2023, "GenEval: An Object-Focused Framework for
Evaluating Text-to-Image Alignment" (NeurIPS 2023 Datasets & Benchmarks; Sec. 3 and the
official code, djghosh13/geneval ``evaluation/evaluate_images.py`` and
``evaluation/summary_scores.py``), re-implemented here:

Layout (read and written): ``<root>/<idx:05d>/metadata.jsonl`` holds the prompt's metadata as
one JSON object, ``<root>/<idx:05d>/samples/<n:05d>.png`` its samples (``grid.png`` beside them
is optional). Metadata: ``tag`` (single_object, two_object, counting, colors, position,
color_attr), ``prompt``, ``include`` (list of ``{"class", "count", "color"?, "position"?:
[relation, index of an earlier include clause]}``) and optionally ``exclude`` (list of
``{"class", "count"}``).

Scoring rules, as the official scorer applies them (Sec. 3.2 of the paper):

* detections of each class are sorted by confidence, those with score ``> 0.3`` kept
  (``> 0.9`` for the ``counting`` task), at most 16 per class, optional greedy NMS
  (``max_overlap``, off by default = 1.0);
* in the official order and precision: its ``np.argsort(scores)[::-1]`` puts the *last* of
  equally scored detections first (numpy's introsort, ported in :func:`official_order`), and
  scores, thresholds, boxes and relations are float32 (mmdet's output dtype), so a score of
  ``float32(0.3)`` is not above the threshold ``0.3``. A detector that gives every good fit the
  same confidence (the Shapes one) makes this order decide which objects are checked;
* ``include`` clauses are ANDed: the class needs ``count`` detections; the top-``count`` ones
  (most confident first) must all have the clause's colour and must all stand in the
  clause's relation to every object of the referenced clause;
* ``exclude`` clauses are ORed: the image fails if any class has ``>= count`` detections
  (with the counting threshold, this is how "exactly N" is enforced);
* relations use the centre offset shrunk by ``0.1 x`` the summed box sizes per axis and
  normalised by the raw offset's length; a component beyond ``+-0.5`` gives the relation
  (``zoo.data.shapes.relative_position``);
* the per-task score is the fraction of correct images, the overall score the unweighted
  mean over the tasks present (six for the full suite).

The official scorer uses Mask2Former (mmdet, COCO) boxes/masks and a CLIP ViT-L/14 zero-shot
colour classifier on the masked crop. Here both are interfaces (:class:`Detector`,
:class:`ColorClassifier`); the built-in pair for the Shapes domain lives in
``eval/geneval_shapes.py``, and ``eval/geneval_natural.py``'s ``TorchvisionDetector`` /
``OpenCLIPColorClassifier`` are lazily loaded alternatives for natural images when the user
has the weights. Scores from any detector other than the official one are labelled as not comparable to GenEval.

CLI (``arzoo eval geneval`` / ``python -m eval.geneval``)::

    arzoo eval geneval --make-prompts shapes_geneval.jsonl            # Shapes-GenEval prompt set
    arzoo sample --tokenizer ... --generator ... --geneval-metadata shapes_geneval.jsonl --out S
    arzoo eval geneval S                                              # -> S/results.jsonl + summary
    arzoo eval geneval --oracle O --metadata shapes_geneval.jsonl     # ground-truth renders
    arzoo eval geneval --summary S/results.jsonl                      # re-print a summary
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from eval.geneval_order import official_order

#: The six GenEval tasks, in the order of the official prompt file.
TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position",
                          "color_attr")
#: GenEval's colour names (``evaluate_images.COLORS``), in its order.
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown",
                           "black", "white")
POSITIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OFFICIAL_DETECTOR = "Mask2Former Swin-S (mmdet, COCO) + CLIP ViT-L/14 colours"

_PNG = re.compile(r"^\d+\.png$")


# ----------------------------------------------------------------------------- settings


@dataclass
class GenEvalConfig:
    """Scorer options, named and defaulted as the official ``--options`` (``threshold``,
    ``counting_threshold``, ``max_objects``, ``max_overlap``, ``position_threshold``)."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0  # NMS IoU; 1.0 = no NMS (official default)
    position_threshold: float = 0.1

    def __post_init__(self):
        if self.max_objects < 1:
            raise ValueError(f"GenEvalConfig: max_objects must be >= 1, got {self.max_objects}")
        if not 0 < self.max_overlap <= 1:
            raise ValueError(f"GenEvalConfig: max_overlap must be in (0, 1], got {self.max_overlap}")


# ----------------------------------------------------------------------------- interfaces


class Detection(NamedTuple):
    """One detected object: ``box`` (x0, y0, x1, y1) in pixels, confidence ``score``, and an
    optional boolean (H, W) ``mask`` (used to isolate the object for colour classification)."""

    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = None


class Detector:
    """Object detector interface: ``detect(image) -> {class_name: [Detection | (box, score[, mask]), ...]}``.

    ``image`` is a uint8 (H, W, 3) RGB array. Scores should be confidences in [0, 1]: the
    scorer keeps those above 0.3 (0.9 for counting). Set ``official = True`` only for the
    detector of the GenEval paper; every other detector's report carries a warning.
    """

    name: str = "detector"
    official: bool = False
    description: str = ""

    def detect(self, image: np.ndarray) -> dict[str, list]:
        raise NotImplementedError

    def label(self) -> str:
        if self.official:
            return f"detector: {self.name} (official GenEval detector)"
        return (f"detector: {self.name} (not the official Mask2Former; scores not comparable to "
                f"GenEval)")


class ColorClassifier:
    """Colour interface: ``classify(image, box, mask, candidate_colors, class_name=None) -> colour``.

    Called on each of the top-``count`` detections of a clause that names a colour;
    ``candidate_colors`` is GenEval's 10 colour names, ``class_name`` the detected class (the
    official CLIP prompts use it: "a photo of a {colour} {class}").
    """

    name: str = "colour classifier"

    def classify(self, image: np.ndarray, box, mask: np.ndarray | None,
                 candidate_colors: Sequence[str], class_name: str | None = None) -> str:
        raise NotImplementedError


def as_detection(d) -> Detection:
    """A :class:`Detection` from a ``Detection`` or a ``(box, score[, mask])`` tuple."""
    if isinstance(d, Detection):
        return d
    if not isinstance(d, (tuple, list)) or len(d) not in (2, 3):
        raise ValueError(f"a detection must be (box, score) or (box, score, mask), got {d!r:.120}")
    box = tuple(float(v) for v in np.asarray(d[0], dtype=np.float64).ravel()[:4])
    if len(box) != 4:
        raise ValueError(f"a detection box must be (x0, y0, x1, y1), got {d[0]!r:.120}")
    return Detection(box, float(d[1]), d[2] if len(d) == 3 else None)


# ----------------------------------------------------------------------------- the rules


def compute_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU with the official scorer's inclusive-pixel convention (``+1`` on widths/heights).

    In its precision: the boxes are float32 (mmdet's), their corner differences float32, and
    the ``+ 1`` and the products float64 (numpy 1.23, the official environment, promotes a
    float32 scalar with a Python number to float64)."""
    a, b = _f32_box(box_a), _f32_box(box_b)

    def area(x0, y0, x1, y1):
        return max(float(x1 - x0) + 1, 0) * max(float(y1 - y0) + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return inter / union if union else 0.0


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      threshold: float = 0.1) -> set[str]:
    """Relations of box A to box B: GenEval's rule (shared with the Shapes captions), in
    float32 as the official scorer computes it on mmdet's float32 boxes, so that verdicts at a
    margin's edge agree with it."""
    from zoo.data.shapes import relative_position as _rel

    return _rel(box_a, box_b, threshold=threshold, dtype=np.float32)


def _f32_box(box) -> np.ndarray:
    return np.asarray(box, dtype=np.float32).ravel()[:4]


def filter_detections(raw: dict[str, Iterable], tag: str,
                      config: GenEvalConfig | None = None) -> dict[str, list[Detection]]:
    """The detections the rules see, as the official ``evaluate_image`` keeps them: per class in
    :func:`official_order` (descending float32 score; among equal scores the detector's last
    first), ``float32(score) > float32(threshold)`` (``counting_threshold`` for the counting
    task), at most ``max_objects``, then greedy NMS when ``max_overlap < 1``. Classes left
    empty are dropped."""
    config = config or GenEvalConfig()
    thr = np.float32(config.counting_threshold if tag == "counting" else config.threshold)
    out: dict[str, list[Detection]] = {}
    for cls, dets in raw.items():
        dets = [as_detection(d) for d in dets]
        scores = np.array([d.score for d in dets], dtype=np.float32)
        order = [dets[i] for i in official_order(scores) if scores[i] > thr][: config.max_objects]
        kept = []
        while order:
            best = order.pop(0)
            kept.append(best)
            if config.max_overlap < 1:
                order = [d for d in order if compute_iou(best.box, d.box) < config.max_overlap]
        if kept:
            out[str(cls)] = kept
    return out


def evaluate_metadata(image: np.ndarray | None, detected: dict[str, list[Detection]], metadata: dict,
                      color_classifier: ColorClassifier | None = None,
                      config: GenEvalConfig | None = None) -> tuple[bool, str]:
    """(correct, reason) of one image given its filtered detections (official ``evaluate``).

    Include clauses are ANDed, exclude clauses ORed; colour and position are checked on the
    top-``count`` detections of the clause's class only. ``reason`` lists every failed check,
    one per line, worded as the official scorer words them.
    """
    config = config or GenEvalConfig()
    correct = True
    reason: list[str] = []
    groups: list[list[Detection] | None] = []  # objects matched by each include clause
    for req in metadata.get("include", []):
        cls, count = req["class"], int(req["count"])
        matched = True
        found = list(detected.get(cls, []))[:count]
        if len(found) < count:
            correct = matched = False
            reason.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                if color_classifier is None:
                    raise ValueError(f"metadata {metadata.get('prompt')!r} checks colours: pass a "
                                     f"ColorClassifier")
                colors = [color_classifier.classify(image, d.box, d.mask, COLORS, class_name=cls)
                          for d in found]
                hits = colors.count(req["color"])
                if hits < count:
                    correct = matched = False
                    reason.append(f"expected {req['color']} {cls}>={count}, found {hits} {req['color']}; and "
                                  + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors))
            if "position" in req and matched:
                rel, target = req["position"]
                if groups[target] is None:
                    correct = matched = False
                    reason.append(f"no target for {cls} to be {rel}")
                else:
                    for obj in found:
                        for ref in groups[target]:
                            true_rels = relative_position(obj.box, ref.box, config.position_threshold)
                            if rel not in true_rels:
                                correct = matched = False
                                reason.append(f"expected {cls} {rel} target, found "
                                              f"{' and '.join(sorted(true_rels))} target")
                                break
                        if not matched:
                            break
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        n = len(detected.get(req["class"], []))
        if n >= int(req["count"]):
            correct = False
            reason.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, "\n".join(reason)


def validate_metadata(m: Any, where: str = "metadata") -> dict:
    """Check one metadata object; returns it, or raises ValueError saying what is wrong."""
    if not isinstance(m, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(m).__name__}")  # noqa: TRY004
    for key in ("tag", "prompt"):
        if not isinstance(m.get(key), str):
            raise ValueError(f"{where}: expected a string {key!r}, got {m.get(key)!r}")  # noqa: TRY004
    inc = m.get("include", [])
    if not isinstance(inc, list):
        raise ValueError(f"{where}: 'include' must be a list, got {type(inc).__name__}")  # noqa: TRY004
    for i, req in enumerate(inc):
        if not isinstance(req, dict) or not isinstance(req.get("class"), str) \
                or not isinstance(req.get("count"), int) or req["count"] < 1:
            raise ValueError(f"{where}: include[{i}] must be {{'class': str, 'count': int >= 1, ...}}, "
                             f"got {req!r}")
        if "color" in req and req["color"] not in COLORS:
            raise ValueError(f"{where}: include[{i}] colour must be one of {COLORS}, got {req['color']!r}")
        if "position" in req:
            p = req["position"]
            if not (isinstance(p, (list, tuple)) and len(p) == 2 and p[0] in POSITIONS
                    and isinstance(p[1], int) and 0 <= p[1] < i):
                raise ValueError(f"{where}: include[{i}] position must be [relation in {POSITIONS}, "
                                 f"index of an earlier include clause], got {p!r}")
    exc = m.get("exclude", [])
    if not isinstance(exc, list) or not all(
            isinstance(r, dict) and isinstance(r.get("class"), str) and isinstance(r.get("count"), int)
            for r in exc):
        raise ValueError(f"{where}: 'exclude' must be a list of {{'class': str, 'count': int}}, got {exc!r}")
    return m


def load_metadata(path: str | Path) -> list[dict]:
    """Metadata objects of a GenEval prompt file (``evaluation_metadata.jsonl``: one per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GenEval metadata file {path} does not exist (expected a .jsonl file "
                                f"with one metadata object per line, e.g. from --make-prompts)")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            m = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        out.append(validate_metadata(m, f"{path}:{n}"))
    if not out:
        raise ValueError(f"{path}: no metadata lines")
    return out


def write_metadata(path: str | Path, metadatas: Sequence[dict]) -> Path:
    """Write a prompt file, one JSON object per line (the official ``evaluation_metadata.jsonl``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(m) + "\n" for m in metadatas))
    return path


# ----------------------------------------------------------------------------- layout


@dataclass
class PromptFolder:
    """One ``<idx:05d>/`` folder of the layout."""

    index: int
    path: Path
    metadata: dict
    images: list[Path] = field(default_factory=list)


def write_prompt_folder(root: str | Path, index: int, metadata: dict, images: Sequence[np.ndarray],
                        grid: bool = True) -> Path:
    """Write ``<root>/<index:05d>/metadata.jsonl`` and ``samples/<n:05d>.png`` (+ ``grid.png``)."""
    from PIL import Image

    folder = Path(root) / f"{index:05d}"
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text(json.dumps(metadata) + "\n")
    arrs = [np.asarray(a) for a in images]
    for n, a in enumerate(arrs):
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"write_prompt_folder: expected uint8 (H, W, 3) images, got {a.dtype} {a.shape}")
        Image.fromarray(a).save(folder / "samples" / f"{n:05d}.png")
    if grid and arrs:
        pad = 2
        h, w = arrs[0].shape[:2]
        canvas = np.full((h + 2 * pad, len(arrs) * (w + pad) + pad, 3), 255, dtype=np.uint8)
        for n, a in enumerate(arrs):
            if a.shape[:2] == (h, w):
                canvas[pad:pad + h, pad + n * (w + pad):pad + n * (w + pad) + w] = a
        Image.fromarray(canvas).save(folder / "grid.png")
    return folder


def write_layout(root: str | Path, metadatas: Sequence[dict],
                 images_per_prompt: Sequence[Sequence[np.ndarray]], grid: bool = True) -> Path:
    """Write the whole layout: prompt ``i`` -> folder ``i`` with its samples."""
    if len(metadatas) != len(images_per_prompt):
        raise ValueError(f"write_layout: {len(metadatas)} metadata objects but images for "
                         f"{len(images_per_prompt)} prompts")
    for i, (m, ims) in enumerate(zip(metadatas, images_per_prompt)):
        write_prompt_folder(root, i, m, ims, grid=grid)
    return Path(root)


def read_layout(root: str | Path) -> list[PromptFolder]:
    """The prompt folders of a GenEval sample folder, by index; images by sample number.

    As the official reader: folders whose name is all digits, each with ``metadata.jsonl``
    (one JSON object) and PNGs named ``<digits>.png`` under ``samples/``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"GenEval sample folder {root} does not exist")
    out = []
    for sub in root.iterdir():
        if not sub.is_dir() or not sub.name.isdigit():
            continue
        meta_path = sub / "metadata.jsonl"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{sub} has no metadata.jsonl (expected the GenEval layout "
                                    f"<idx>/metadata.jsonl + <idx>/samples/<n>.png)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: expected one JSON object ({e})") from None
        validate_metadata(meta, str(meta_path))
        sdir = sub / "samples"
        imgs = sorted((p for p in sdir.iterdir() if p.is_file() and _PNG.match(p.name)),
                      key=lambda p: int(p.stem)) if sdir.is_dir() else []
        out.append(PromptFolder(int(sub.name), sub, meta, imgs))
    if not out:
        raise ValueError(f"{root} holds no GenEval prompt folders (<idx:05d>/metadata.jsonl); "
                         f"write them with `arzoo sample --geneval-metadata FILE`")
    return sorted(out, key=lambda p: p.index)


def load_image(path: str | Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB, EXIF orientation applied (as the official reader)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


# ----------------------------------------------------------------------------- scoring


def evaluate_image(image: np.ndarray, metadata: dict, detector: Detector,
                   color_classifier: ColorClassifier | None = None, config: GenEvalConfig | None = None,
                   filename: str = "") -> dict:
    """One ``results.jsonl`` record: filename, tag, prompt, correct, reason, metadata (JSON
    string), details (JSON string: class -> kept boxes ``[x0, y0, x1, y1, score]``)."""
    config = config or GenEvalConfig()
    detected = filter_detections(detector.detect(image), metadata["tag"], config)
    correct, reason = evaluate_metadata(image, detected, metadata, color_classifier, config)
    return {
        "filename": str(filename),
        "tag": metadata["tag"],
        "prompt": metadata["prompt"],
        "correct": bool(correct),
        "reason": reason,
        "metadata": json.dumps(metadata),
        "details": json.dumps({k: [[*map(float, d.box), float(d.score)] for d in v]
                               for k, v in detected.items()}),
    }


def evaluate_folder(root: str | Path, detector: Detector, color_classifier: ColorClassifier | None = None,
                    config: GenEvalConfig | None = None, progress: bool = True) -> list[dict]:
    """Records for every sample of a layout folder, prompt by prompt."""
    folders = read_layout(root)
    jobs = [(f, p) for f in folders for p in f.images]
    if not jobs:
        raise ValueError(f"{root}: the prompt folders hold no samples/<n>.png")
    if progress:
        from tqdm.auto import tqdm

        jobs = tqdm(jobs, desc="GenEval", unit="img", leave=False)
    return [evaluate_image(load_image(p), f.metadata, detector, color_classifier, config, filename=str(p))
            for f, p in jobs]


def write_results(path: str | Path, records: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_results(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} does not exist")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(records: Sequence[dict]) -> dict:
    """``summary_scores.py`` numbers: image / prompt accuracy, per-task accuracy (tasks in
    order of first appearance), and the overall score = unweighted mean over tasks."""
    if not records:
        raise ValueError("summarize: no results")
    correct = np.array([bool(r["correct"]) for r in records])
    by_prompt: dict[str, bool] = {}
    tasks: dict[str, list[bool]] = {}
    for r, c in zip(records, correct):
        by_prompt[r["metadata"]] = by_prompt.get(r["metadata"], False) or bool(c)
        tasks.setdefault(r["tag"], []).append(bool(c))
    task_scores = {t: {"score": float(np.mean(v)), "correct": int(sum(v)), "total": len(v)}
                   for t, v in tasks.items()}
    return {
        "total_images": len(records),
        "total_prompts": len(by_prompt),
        "correct_images": float(correct.mean()),
        "correct_prompts": float(np.mean(list(by_prompt.values()))),
        "tasks": task_scores,
        "overall": float(np.mean([s["score"] for s in task_scores.values()])),
        "missing_tasks": [t for t in TASKS if t not in tasks],
    }


def format_summary(summary: dict, label: str | None = None) -> str:
    """The summary as ``summary_scores.py`` prints it, with the detector label on top."""
    lines = []
    if label:
        lines += [label, ""]
    lines += ["Summary", "=======",
              f"Total images: {summary['total_images']}",
              f"Total prompts: {summary['total_prompts']}",
              f"% correct images: {summary['correct_images']:.2%}",
              f"% correct prompts: {summary['correct_prompts']:.2%}", "",
              "Task breakdown", "=============="]
    for tag, s in summary["tasks"].items():
        lines.append(f"{tag:<16} = {s['score']:.2%} ({s['correct']} / {s['total']})")
    lines += ["", f"Overall score (avg. over tasks): {summary['overall']:.5f}"]
    if summary.get("missing_tasks"):
        lines.append(f"(tasks not evaluated: {', '.join(summary['missing_tasks'])})")
    return "\n".join(lines)


def make_detector(name: str = "shapes", weights: str | None = None, arch: str = "maskrcnn_resnet50_fpn",
                  device: str = "cpu", shapes_score: str = "binary") -> Detector:
    """``"shapes"`` (built-in, offline) or ``"torchvision"`` (needs ``weights``)."""
    if name == "shapes":
        from eval.geneval_shapes import ShapesDetector

        return ShapesDetector(score=shapes_score)
    if name == "torchvision":
        from eval.geneval_natural import TorchvisionDetector

        return TorchvisionDetector(weights, arch=arch, device=device)
    raise ValueError(f"unknown detector {name!r}; expected 'shapes' or 'torchvision'")


def make_color_classifier(name: str = "shapes", weights: str | None = None, model: str = "ViT-L-14",
                          device: str = "cpu") -> ColorClassifier:
    """``"shapes"`` (palette vote, for Shapes images) or ``"openclip"`` (needs open_clip + weights)."""
    if name == "shapes":
        from eval.geneval_shapes import ShapesColorClassifier

        return ShapesColorClassifier()
    if name == "openclip":
        from eval.geneval_natural import OpenCLIPColorClassifier

        return OpenCLIPColorClassifier(model, weights, device=device)
    raise ValueError(f"unknown colour classifier {name!r}; expected 'shapes' or 'openclip'")


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="arzoo eval geneval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="GenEval: score a sample folder (<idx>/metadata.jsonl + <idx>/samples/<n>.png), "
                    "make the Shapes-GenEval prompt set, or render oracle samples.",
        epilog=__doc__[__doc__.index("CLI ("):])
    p.add_argument("imagedir", nargs="?", help="sample folder to score (the GenEval layout)")
    p.add_argument("--outfile", help="results.jsonl path (default: IMAGEDIR/results.jsonl); the summary "
                                     "JSON goes next to it as <stem>_summary.json")
    d = p.add_argument_group("detector and colour classifier")
    d.add_argument("--detector", choices=("shapes", "torchvision"), default="shapes")
    d.add_argument("--detector-weights", help="state-dict file for --detector torchvision")
    d.add_argument("--detector-arch", default="maskrcnn_resnet50_fpn")
    d.add_argument("--shapes-score", choices=("binary", "fit"), default="binary",
                   help="shapes detector confidence: 1.0 for a good template fit (binary) or the raw fit")
    d.add_argument("--color-classifier", choices=("auto", "shapes", "openclip"), default="auto",
                   help="auto: shapes for the shapes detector, openclip otherwise")
    d.add_argument("--clip-model", default="ViT-L-14")
    d.add_argument("--clip-weights", help="open_clip checkpoint file for --color-classifier openclip")
    d.add_argument("--device", default="cpu")
    o = p.add_argument_group("scorer options (official defaults)")
    o.add_argument("--threshold", type=float, default=0.3)
    o.add_argument("--counting-threshold", type=float, default=0.9)
    o.add_argument("--max-objects", type=int, default=16)
    o.add_argument("--max-overlap", type=float, default=1.0, help="NMS IoU (1.0 = off)")
    o.add_argument("--position-threshold", type=float, default=0.1)
    m = p.add_argument_group("other modes")
    m.add_argument("--make-prompts", metavar="OUT.jsonl", help="write the Shapes-GenEval prompt set")
    m.add_argument("--per-task", type=int, default=50, help="prompts per task for --make-prompts "
                                                            "(single_object / colors have at most 30)")
    m.add_argument("--seed", type=int, default=43, help="seed of --make-prompts and --oracle")
    m.add_argument("--oracle", metavar="OUTDIR", help="render ground-truth Shapes samples of --metadata")
    m.add_argument("--metadata", help="prompt file (.jsonl) for --oracle")
    m.add_argument("--n-per-prompt", type=int, default=4, help="samples per prompt for --oracle")
    m.add_argument("--resolution", type=int, default=64, help="image side for --oracle")
    m.add_argument("--summary", metavar="RESULTS.jsonl", help="print the summary of a results file")
    p.add_argument("--no-progress", action="store_true")
    return p


def _score(args) -> int:
    config = GenEvalConfig(args.threshold, args.counting_threshold, args.max_objects, args.max_overlap,
                           args.position_threshold)
    detector = make_detector(args.detector, args.detector_weights, args.detector_arch, args.device,
                             args.shapes_score)
    cname = args.color_classifier
    if cname == "auto":
        cname = "shapes" if args.detector == "shapes" else "openclip"
    colors = make_color_classifier(cname, args.clip_weights, args.clip_model, args.device)
    records = evaluate_folder(args.imagedir, detector, colors, config, progress=not args.no_progress)
    outfile = Path(args.outfile) if args.outfile else Path(args.imagedir) / "results.jsonl"
    write_results(outfile, records)
    summary = summarize(records)
    summary.update(detector=detector.name, official_detector=bool(detector.official),
                   label=detector.label(), color_classifier=colors.name, config=asdict(config),
                   imagedir=str(args.imagedir), results=str(outfile))
    spath = outfile.with_name(outfile.stem + "_summary.json")
    spath.write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary, f"{detector.label()}; colours: {colors.name}"))
    print(f"\nwrote {outfile} and {spath}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``arzoo eval geneval ...``; returns the exit status (2 for bad input)."""
    args = build_parser().parse_args(argv)
    modes = [x for x in (args.imagedir, args.make_prompts, args.oracle, args.summary) if x]
    try:
        if len(modes) != 1:
            raise ValueError("give exactly one of: IMAGEDIR (score), --make-prompts OUT.jsonl, "
                             f"--oracle OUTDIR, --summary RESULTS.jsonl (got {len(modes)})")
        if args.make_prompts:
            from eval.geneval_shapes import make_prompts

            metas = make_prompts(per_task=args.per_task, seed=args.seed)
            write_metadata(args.make_prompts, metas)
            counts = {t: sum(m["tag"] == t for m in metas) for t in TASKS}
            print(f"wrote {len(metas)} Shapes-GenEval prompts to {args.make_prompts}: "
                  + ", ".join(f"{t} {n}" for t, n in counts.items()))
            return 0
        if args.oracle:
            from eval.geneval_shapes import write_oracle

            if not args.metadata:
                raise ValueError("--oracle needs --metadata FILE (the prompts to render)")
            metas = load_metadata(args.metadata)
            write_oracle(args.oracle, metas, n_per_prompt=args.n_per_prompt, resolution=args.resolution,
                         seed=args.seed, position_threshold=args.position_threshold)
            print(f"wrote oracle renders of {len(metas)} prompts x {args.n_per_prompt} to {args.oracle}")
            return 0
        if args.summary:
            print(format_summary(summarize(read_results(args.summary))))
            return 0
        return _score(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"arzoo eval geneval: {e}", file=sys.stderr)
        return 2


__all__ = [
    "COLORS",
    "POSITIONS",
    "TASKS",
    "ColorClassifier",
    "Detection",
    "Detector",
    "GenEvalConfig",
    "PromptFolder",
    "as_detection",
    "compute_iou",
    "evaluate_folder",
    "evaluate_image",
    "evaluate_metadata",
    "filter_detections",
    "format_summary",
    "load_image",
    "load_metadata",
    "main",
    "official_order",
    "make_color_classifier",
    "make_detector",
    "read_layout",
    "read_results",
    "relative_position",
    "summarize",
    "validate_metadata",
    "write_layout",
    "write_metadata",
    "write_prompt_folder",
    "write_results",
]


if __name__ == "__main__":
    sys.exit(main())
