"""Shapes-GenEval: the GenEval protocol on the embedded Shapes domain.

GenEval (Ghosh et al., 2023, "GenEval: An Object-Focused Framework for Evaluating
Text-to-Image Alignment", Sec. 3) checks six tasks with an object detector. This module
provides the Shapes version of its three domain-specific parts:

* :func:`make_prompts` -- the prompt set, in the official metadata format
  (``prompts/evaluation_metadata.jsonl`` of djghosh13/geneval), with the 80 COCO classes
  replaced by the 3 shapes (circle, square, triangle), the same 10 colours, counts 2-4 and the
  4 relations. Prompts are produced by ``zoo.data.shapes.caption_for`` -- the function that
  writes the training captions -- so they are phrased exactly as Shapes captions are. Every
  Shapes caption names a colour, so every prompt does; tasks that do not check colour
  (single_object, two_object, counting, position) simply do not check it, as in GenEval.
  Forms (all occur in Shapes training captions with ``num_objects=(1, 4)``):

  ============== ===================================== ========================================
  task           prompt                                checked
  ============== ===================================== ========================================
  single_object  "a red circle"                        one circle
  two_object     "a red circle and a blue square"      a circle and a square
  counting       "three red circles"                   exactly three circles (exclude >= 4)
  colors         "a red circle"                        a circle, classified red
  position       "a red circle left of a blue square"  a circle left of a square
  color_attr     "a red circle and a blue square"      a red circle and a blue square
  ============== ===================================== ========================================

  A model trained on single-object Shapes (the shipped ``generator/raster-ar-tiny:shapes``)
  has only seen the first form: for it two_object, counting, position and color_attr are out
  of distribution (:data:`SINGLE_OBJECT_OOD_TASKS`).
* :class:`ShapesDetector` / :class:`ShapesColorClassifier` -- ``zoo.data.shapes.detect`` and
  a palette vote, standing in for Mask2Former + CLIP (offline, exact on clean renders; the
  scores are not comparable to GenEval's).
* :func:`oracle_objects` / :func:`write_oracle` -- ground-truth renders that satisfy each
  prompt, to check scorer + detector end to end (they should score ~100%).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from eval.geneval import (
    COLORS,
    POSITIONS,
    TASKS,
    ColorClassifier,
    Detection,
    Detector,
    GenEvalConfig,
    evaluate_metadata,
    filter_detections,
    validate_metadata,
    write_prompt_folder,
)
from zoo.data import shapes as S

SHAPE_CLASSES: tuple[str, ...] = S.SHAPES
COUNTS: tuple[int, ...] = (2, 3, 4)
#: Tasks whose prompt form a model trained on single-object Shapes captions never saw.
SINGLE_OBJECT_OOD_TASKS: tuple[str, ...] = ("two_object", "counting", "position", "color_attr")

_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}


# ----------------------------------------------------------------------------- prompts


def _phrase(*objects: tuple[str, str]) -> str:
    """Caption of objects ``(shape, colour)`` exactly as the training data words it."""
    return S.caption_for([{"shape": s, "color": c} for s, c in objects])


def _single(shape, color):
    return {"tag": "single_object", "include": [{"class": shape, "count": 1}],
            "prompt": _phrase((shape, color))}


def _two(sa, ca, sb, cb):
    return {"tag": "two_object", "include": [{"class": sa, "count": 1}, {"class": sb, "count": 1}],
            "prompt": _phrase((sa, ca), (sb, cb))}


def _counting(shape, color, n):
    return {"tag": "counting", "include": [{"class": shape, "count": n}],
            "exclude": [{"class": shape, "count": n + 1}], "prompt": _phrase(*[(shape, color)] * n)}


def _colors(shape, color):
    return {"tag": "colors", "include": [{"class": shape, "count": 1, "color": color}],
            "prompt": _phrase((shape, color))}


def _position(sa, ca, rel, sb, cb):
    # As GenEval: the reference object is include[0], the positioned one include[1].
    return {"tag": "position",
            "include": [{"class": sb, "count": 1}, {"class": sa, "count": 1, "position": [rel, 0]}],
            "prompt": f"{_phrase((sa, ca))} {rel} {_phrase((sb, cb))}"}


def _color_attr(sa, ca, sb, cb):
    return {"tag": "color_attr",
            "include": [{"class": sa, "count": 1, "color": ca}, {"class": sb, "count": 1, "color": cb}],
            "prompt": _phrase((sa, ca), (sb, cb))}


def _combos(task: str) -> list[tuple]:
    sc = [(s, c) for s in SHAPE_CLASSES for c in COLORS]
    pairs = [(sa, ca, sb, cb) for sa, ca in sc for sb, cb in sc if sa != sb]
    if task in ("single_object", "colors"):
        return sc
    if task == "two_object":
        return pairs
    if task == "counting":
        return [(s, c, n) for s, c in sc for n in COUNTS]
    if task == "position":
        return [(sa, ca, r, sb, cb) for sa, ca, sb, cb in pairs for r in POSITIONS]
    if task == "color_attr":
        return [p for p in pairs if p[1] != p[3]]  # two different colours, as GenEval
    raise ValueError(f"unknown GenEval task {task!r}; expected one of {TASKS}")


_MAKERS = {"single_object": _single, "two_object": _two, "counting": _counting, "colors": _colors,
           "position": _position, "color_attr": _color_attr}


def make_prompts(per_task: int = 50, seed: int = 43, tasks: Sequence[str] = TASKS) -> list[dict]:
    """The Shapes-GenEval prompt set: per task, ``per_task`` distinct prompts drawn without
    replacement from all combinations (single_object and colors have only 30, so at most 30).

    Deterministic in ``seed``; task ``t`` uses its own stream, so asking for a subset of tasks
    gives the same prompts for those tasks. Default 260 prompts (30 + 50 + 50 + 30 + 50 + 50).
    """
    if per_task < 1:
        raise ValueError(f"make_prompts: per_task must be >= 1, got {per_task}")
    out = []
    for task in tasks:
        combos = _combos(task)
        rng = np.random.default_rng([seed, TASKS.index(task)])
        pick = rng.choice(len(combos), size=min(per_task, len(combos)), replace=False)
        out.extend(_MAKERS[task](*combos[int(i)]) for i in pick)
    return out


def parse_prompt(prompt: str) -> dict:
    """Parse a Shapes caption: ``{"groups": [(count, colour, shape), ...], "relation": str | None}``.

    Grammar of ``zoo.data.shapes.caption_for``: noun phrases ("a red circle", "three blue
    squares") joined by "and", or two single objects joined by a relation ("a red circle left
    of a blue square": the first relative to the second). Raises ValueError otherwise.
    """
    words = prompt.lower().split()

    def noun_phrase(i):
        if i + 3 > len(words):
            raise ValueError(f"parse_prompt: {prompt!r} ends inside a noun phrase")
        det, color, noun = words[i:i + 3]
        n = _NUMBERS.get(det)
        shape = noun if n == 1 else (noun[:-1] if noun.endswith("s") else None)
        if n is None or color not in COLORS or shape not in SHAPE_CLASSES:
            raise ValueError(f"parse_prompt: expected '<a|an|two|three|four> <colour> <shape(s)>' in "
                             f"{prompt!r}, got {' '.join(words[i:i + 3])!r}")
        return (n, color, shape), i + 3

    group, i = noun_phrase(0)
    groups, relation = [group], None
    while i < len(words):
        w = words[i]
        if w == "and" and relation is None:
            group, i = noun_phrase(i + 1)
        elif len(groups) == 1 and (w in ("above", "below") or
                                   (w in ("left", "right") and words[i + 1:i + 2] == ["of"])):
            relation = w if w in ("above", "below") else f"{w} of"
            group, i = noun_phrase(i + (1 if w in ("above", "below") else 2))
            if i != len(words):
                raise ValueError(f"parse_prompt: unexpected words after the relation in {prompt!r}")
        else:
            raise ValueError(f"parse_prompt: unexpected {w!r} in {prompt!r}")
        groups.append(group)
    return {"groups": groups, "relation": relation}


# ----------------------------------------------------------------------------- detector


def _template_mask(shape: str, box: Sequence[int], hw: tuple[int, int]) -> np.ndarray:
    """Full-image mask of ``shape`` rendered as ``zoo.data.shapes.render`` draws its tight box."""
    x0, y0, x1, y1 = (int(v) for v in box)
    side = max(x1 - x0, y1 - y0)
    y0 = y1 - side  # the triangle's tight box may have lost its (empty) apex row
    out = np.zeros(hw, dtype=bool)
    m = S.shape_mask(shape, side)
    ys, xs = slice(max(y0, 0), min(y0 + side, hw[0])), slice(max(x0, 0), min(x0 + side, hw[1]))
    out[ys, xs] = m[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
    return out


class ShapesDetector(Detector):
    """``zoo.data.shapes.detect`` as a GenEval detector (classes: circle, square, triangle).

    Confidence (``score``): with ``"binary"`` (default) 1.0 for an object whose template fit
    (detect's ``score``) reaches ``min_fit``, else its fit score (below 0.3, so the scorer drops
    it): detect's score measures fit quality, not a calibrated probability, and good generated
    shapes fit at ~0.6-0.93, so the counting threshold 0.9 would otherwise drop real objects.
    ``"fit"`` reports the raw fit. Blobs of unknown shape are not reported (no class).
    Masks are the fitted templates (for the colour classifier).
    """

    name = "shapes"
    description = "zoo.data.shapes.detect (connected components + template fit)"

    def __init__(self, score: str = "binary", min_fit: float = 0.3, min_area: int | None = None,
                 masks: bool = True):
        if score not in ("binary", "fit"):
            raise ValueError(f"ShapesDetector: score must be 'binary' or 'fit', got {score!r}")
        self.score, self.min_fit, self.min_area, self.masks = score, float(min_fit), min_area, masks
        if score == "fit":
            self.name = "shapes (raw fit score)"

    def detect(self, image: np.ndarray) -> dict[str, list[Detection]]:
        objs = S.detect(image, min_area=self.min_area)
        hw = np.asarray(image).shape[:2]
        out: dict[str, list[Detection]] = {}
        for o in objs:
            if o["shape"] == S.UNKNOWN:
                continue
            fit = float(o["score"])
            conf = (1.0 if fit >= self.min_fit else fit) if self.score == "binary" else fit
            mask = _template_mask(o["shape"], o["bbox"], hw) if self.masks else None
            out.setdefault(o["shape"], []).append(Detection(tuple(float(v) for v in o["bbox"]), conf, mask))
        return out


class ShapesColorClassifier(ColorClassifier):
    """Colour of a Shapes object: alpha-weighted vote of its pixels over the candidate colours.

    Each pixel (inside ``mask``, else inside ``box``) is explained as ``background + alpha *
    (colour - background)`` with the candidate colour whose mixing segment passes closest (the
    model ``zoo.data.shapes.detect`` uses); pixels with ``alpha >= 0.5`` vote with weight alpha.
    Blurred rims and background corners of the box therefore do not sway the vote.
    """

    name = "shapes palette"

    def classify(self, image, box, mask, candidate_colors, class_name=None) -> str:
        unknown = [c for c in candidate_colors if c not in S.PALETTE]
        if unknown:
            raise ValueError(f"ShapesColorClassifier: colours {unknown} are not in the Shapes palette "
                             f"{tuple(S.PALETTE)}")
        img = np.asarray(image, dtype=np.float32)
        h, w = img.shape[:2]
        x0, y0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
        x1, y1 = min(int(np.ceil(box[2])), w), min(int(np.ceil(box[3])), h)
        sel = np.zeros((h, w), dtype=bool)
        sel[y0:y1, x0:x1] = True
        if mask is not None:
            sel &= np.asarray(mask, dtype=bool)
        bg = np.asarray(S.BACKGROUND, dtype=np.float32)
        pal = np.asarray([S.PALETTE[c] for c in candidate_colors], dtype=np.float32)
        pix = img[sel]
        if len(pix) == 0:
            return candidate_colors[0]
        v, d = pix - bg, pal - bg
        d2 = (d * d).sum(1)
        vd = v @ d.T
        alpha = np.clip(vd / d2, 0.0, 1.0)
        res = (v * v).sum(1, keepdims=True) - 2 * alpha * vd + alpha * alpha * d2
        best = res.argmin(1)
        a = alpha[np.arange(len(best)), best]
        keep = a >= 0.5
        if keep.any():
            votes = np.bincount(best[keep], weights=a[keep], minlength=len(pal))
            return candidate_colors[int(votes.argmax())]
        # nothing but background-like pixels: nearest palette colour to the mean
        return candidate_colors[int(((pal - pix.mean(0)) ** 2).sum(1).argmin())]


# ----------------------------------------------------------------------------- oracle


def _tight_bbox(shape: str, x0: int, y0: int, side: int) -> tuple[int, int, int, int]:
    m = S.shape_mask(shape, side)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1


def _satisfies_counts(objs: list[tuple[str, str]], metadata: dict) -> bool:
    for req in metadata.get("include", []):
        n = sum(s == req["class"] and req.get("color", c) == c for s, c in objs)
        if n < req["count"]:
            return False
    return all(sum(s == req["class"] for s, _ in objs) < req["count"] for req in metadata.get("exclude", []))


def _oracle_spec(metadata: dict, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Objects (shape, colour) to draw: those the prompt names when it parses and satisfies
    the include/exclude counts, else built from the include clauses."""
    try:
        parsed = parse_prompt(metadata["prompt"])
        objs = [(s, c) for n, c, s in parsed["groups"] for _ in range(n)]
        if _satisfies_counts(objs, metadata):
            return objs
    except ValueError:
        pass
    objs = []
    for req in metadata.get("include", []):
        if req["class"] not in SHAPE_CLASSES:
            raise ValueError(f"oracle: class {req['class']!r} is not a Shapes class {SHAPE_CLASSES}")
        color = req.get("color") or COLORS[int(rng.integers(len(COLORS)))]
        have = sum(s == req["class"] and c == color for s, c in objs)
        objs += [(req["class"], color)] * max(req["count"] - have, 0)
    if not _satisfies_counts(objs, metadata):
        raise ValueError(f"oracle: cannot draw objects satisfying {metadata!r}")
    return objs


class _TruthColors(ColorClassifier):
    name = "ground truth"

    def __init__(self, objects):
        self.by_box = {tuple(float(v) for v in o["bbox"]): o["color"] for o in objects}

    def classify(self, image, box, mask, candidate_colors, class_name=None):
        return self.by_box[tuple(float(v) for v in box)]


def oracle_objects(metadata: dict, rng: np.random.Generator, resolution: int = 64,
                   position_threshold: float = 0.1, tries: int = 4000) -> list[dict]:
    """A Shapes scene satisfying ``metadata``: dicts with "shape", "color", "bbox", "box".

    Sizes and spacing as ``ShapesDataset`` multi-object scenes; random placements are drawn
    until the scene, scored with its exact boxes and colours, passes every rule (the
    relations included, with ``position_threshold``).
    """
    validate_metadata(metadata)
    spec = _oracle_spec(metadata, rng)
    n = len(spec)
    if not 1 <= n <= S.MAX_OBJECTS:
        raise ValueError(f"oracle: expected 1..{S.MAX_OBJECTS} objects, the prompt needs {n}")
    lo, hi = S.size_range(resolution, n)
    gap = S.min_gap(resolution)
    config = GenEvalConfig(position_threshold=position_threshold)
    for t in range(tries):
        sizes = rng.integers(lo, hi + 1, size=n) if t < tries // 2 else np.full(n, lo)
        placed: list[tuple[int, int, int]] = []
        for s in (int(v) for v in sizes):
            x0, y0 = (int(v) for v in rng.integers(0, resolution - s + 1, size=2))
            if not all(x0 >= px + ps + gap or px >= x0 + s + gap or y0 >= py + ps + gap or py >= y0 + s + gap
                       for px, py, ps in placed):
                break
            placed.append((x0, y0, s))
        if len(placed) < n:
            continue
        objs = [{"shape": sh, "color": c, "bbox": _tight_bbox(sh, *b), "box": b}
                for (sh, c), b in zip(spec, placed)]
        truth = {}
        for o in objs:
            truth.setdefault(o["shape"], []).append(Detection(tuple(float(v) for v in o["bbox"]), 1.0))
        dets = filter_detections(truth, metadata["tag"], config)
        if evaluate_metadata(None, dets, metadata, _TruthColors(objs), config)[0]:
            return objs
    raise ValueError(f"oracle: no placement of {n} objects at {resolution}px satisfies {metadata['prompt']!r}")


def render_oracle(metadata: dict, n: int, resolution: int = 64, seed: int = 0, index: int = 0,
                  position_threshold: float = 0.1) -> list[np.ndarray]:
    """``n`` ground-truth renders of one prompt; render ``j`` is a pure function of (seed, index, j)."""
    return [S.render(oracle_objects(metadata, np.random.default_rng([seed, index, j]), resolution,
                                    position_threshold), resolution) for j in range(n)]


def write_oracle(outdir: str | Path, metadatas: Sequence[dict], n_per_prompt: int = 4, resolution: int = 64,
                 seed: int = 0, position_threshold: float = 0.1) -> Path:
    """Write oracle renders of ``metadatas`` in the GenEval layout (refuses a non-empty layout)."""
    outdir = Path(outdir)
    if outdir.is_dir() and any(p.is_dir() and p.name.isdigit() for p in outdir.iterdir()):
        raise ValueError(f"{outdir} already holds GenEval prompt folders; choose an empty folder")
    if n_per_prompt < 1:
        raise ValueError(f"n_per_prompt must be >= 1, got {n_per_prompt}")
    for i, m in enumerate(metadatas):
        write_prompt_folder(outdir, i, m, render_oracle(m, n_per_prompt, resolution, seed, i,
                                                        position_threshold))
    return outdir


__all__ = [
    "COUNTS",
    "SHAPE_CLASSES",
    "SINGLE_OBJECT_OOD_TASKS",
    "ShapesColorClassifier",
    "ShapesDetector",
    "make_prompts",
    "oracle_objects",
    "parse_prompt",
    "render_oracle",
    "write_oracle",
]
