"""Shapes: the embedded procedural dataset of coloured shapes, with captions and a detector.

Every tiny model in the zoo trains on these images: coloured circles, squares and upward
isosceles triangles drawn with hard edges on a plain grey background. Each sample is a pure
function of ``(seed, index)``, so no data needs to be downloaded or stored.

Captions follow the six GenEval task families (Ghosh et al., 2023, "GenEval: An
Object-Focused Framework for Evaluating Text-to-Image Alignment"; prompts in
djghosh13/geneval ``prompts/evaluation_metadata.jsonl``: single object, two objects,
counting, colours, position, colour attribution) with the 80 COCO classes replaced by 3
shapes and the same 10 colour names. Spatial captions use GenEval's
relative-position rule (``relative_position``; the official scorer's
``evaluate_images.relative_position`` with ``position_threshold=0.1``).

``detect`` parses an image back into objects. It stands in for GenEval's Mask2Former
detector + CLIP colour classifier on this domain, and is meant for generated
samples as well as ground truth, so it tolerates mild blur and noise: every pixel is
explained as a mixture ``background + alpha * (colour - background)`` of the background
with its best-fitting palette colour; a pixel is foreground when ``alpha >= 0.5`` (so a
symmetric blur leaves the edges where they were), 4-connected components are labelled in
numpy (min-label propagation with pointer jumping), the colour is an alpha-weighted vote
over the component's inner pixels, and shape and box come from a least-squares fit of the
rendered templates to the component's alpha map (robust where blur eats thin corners).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from zoo.data import text as _text

# ---------------------------------------------------------------------------- vocabulary

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
UNKNOWN = "unknown"  # shape reported by detect() for a blob that fits no shape template
#: The 10 GenEval colour names, in GenEval's order.
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink",
                           "brown", "black", "white")
# Chosen so that (a) every pair of colours is >= 98 apart in RGB, (b) every colour is >= 114
# from the background, and (c) blurring a colour into the background never passes closer to
# another colour's background-mixing segment than ~35 (what ``detect`` relies on).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "orange": (255, 140, 0),
    "yellow": (255, 230, 40),
    "green": (30, 160, 60),
    "blue": (30, 70, 230),
    "purple": (140, 40, 200),
    "pink": (255, 140, 210),
    "brown": (120, 65, 20),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}
BACKGROUND: tuple[int, int, int] = (128, 128, 128)

#: Class-conditional label set: one object, (shape, colour); id = shape * 10 + colour.
CLASSES: list[tuple[str, str]] = [(s, c) for s in SHAPES for c in COLORS]
NUM_CLASSES = len(CLASSES)  # 30

MAX_OBJECTS = 4
#: Bbox side as a fraction of the image side: (single-object range, multi-object range).
SINGLE_SIZE = (0.30, 0.55)
MULTI_SIZE = (0.18, 0.32)
MIN_SIDE = 8  # keeps objects detectable at 32x32
#: Chance that a multi-object image repeats one class (GenEval's "counting" prompts).
SAME_CLASS_PROB = 0.3
#: Chance that two different objects in a clear spatial relation get a "left of"-style caption.
POSITION_CAPTION_PROB = 0.5
POSITION_THRESHOLD = 0.1  # GenEval's default
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
#: Caption styles of ``caption_for`` / ``ShapesDataset``: "default" (what every shipped model saw)
#: and "geneval" (relations only where the Shapes-GenEval position task can check them).
CAPTION_STYLES = ("default", "geneval")
_FIT_MARGIN = 4  # px of context around a component for the template fit
_SPLIT_SEEDS = {"train": 0, "test": 1}

_BG = np.asarray(BACKGROUND, dtype=np.float32)
_PAL = np.asarray([PALETTE[c] for c in COLORS], dtype=np.float32)  # (10, 3)
_DIR = _PAL - _BG  # mixing direction background -> colour
_DIR_SQ = (_DIR ** 2).sum(1)


def class_id(shape: str, color: str) -> int:
    """Class id of a single (shape, colour) object: ``SHAPES.index(shape) * 10 + COLORS.index(color)``."""
    if shape not in SHAPES or color not in COLORS:
        raise ValueError(f"class_id: expected a shape in {SHAPES} and a colour in {COLORS}, "
                         f"got ({shape!r}, {color!r})")
    return SHAPES.index(shape) * len(COLORS) + COLORS.index(color)


def class_caption(c: int) -> str:
    """Caption of class ``c``, e.g. ``class_caption(0) == "a red circle"``."""
    if not 0 <= int(c) < NUM_CLASSES:
        raise ValueError(f"class_caption: expected a class id in [0, {NUM_CLASSES}), got {c}")
    shape, color = CLASSES[int(c)]
    return f"{_article(color)} {color} {shape}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------------------- captions


def relative_position(box: Sequence[float], ref: Sequence[float],
                      threshold: float = POSITION_THRESHOLD, dtype=np.float64) -> set[str]:
    """Spatial relations of ``box`` with respect to ``ref`` (both ``(x0, y0, x1, y1)``).

    GenEval's rule (``evaluate_images.relative_position``): the offset between box centres
    is shrunk towards zero by ``threshold * (size_a + size_b)`` on each axis and divided by
    the norm of the raw offset; a component below -0.5 / above 0.5 gives "left of" /
    "right of" (x) or "above" / "below" (y, image rows grow downwards). ``dtype``: the
    captions use float64; the GenEval scorer passes float32, the official scorer's precision
    on mmdet's boxes (verdicts at a margin's edge can differ).
    """
    boxes = np.stack([np.asarray(box, dtype=dtype).ravel()[:4],
                      np.asarray(ref, dtype=dtype).ravel()[:4]]).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - dtype(threshold) * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < dtype(1e-3)):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def _noun_phrase(n: int, color: str, shape: str) -> str:
    if n == 1:
        return f"{_article(color)} {color} {shape}"
    return f"{_NUMBER_WORDS[n]} {color} {shape}s"


def caption_for(objects: Sequence[dict], rng: np.random.Generator | None = None,
                style: str = "default") -> str:
    """GenEval-style caption of ``objects`` (dicts with "shape", "color", "bbox").

    Identical objects are grouped and counted ("two red circles"), groups are joined with
    "and" in order of first appearance. For two different objects in a clear spatial
    relation, and when ``rng`` draws below ``POSITION_CAPTION_PROB``, the caption names the
    relation of the first object to the second ("a red circle left of a blue square").

    ``style="geneval"`` (opt-in; see :data:`CAPTION_STYLES`) states a relation only where the
    Shapes-GenEval position task can check it: the two objects have **different shapes** (the
    scorer finds objects by shape, so "a red circle left of a blue circle" is ambiguous to it)
    and the relation holds in the float64 geometry of the captions **and** in the scorer's
    float32 one. The random draws are the same in both styles, so the images and every other
    caption are identical.
    """
    if style not in CAPTION_STYLES:
        raise ValueError(f"caption_for: style must be one of {CAPTION_STYLES}, got {style!r}")
    if not objects:
        raise ValueError("caption_for: expected at least one object, got none")
    groups: dict[tuple[str, str], int] = {}
    for o in objects:
        key = (o["shape"], o["color"])
        groups[key] = groups.get(key, 0) + 1
    if len(objects) == 2 and len(groups) == 2 and rng is not None:
        a, b = objects
        rels = relative_position(a["bbox"], b["bbox"])
        if style == "geneval":
            rels &= relative_position(a["bbox"], b["bbox"], dtype=np.float32)
            if a["shape"] == b["shape"]:
                rels = set()
        rels = sorted(rels)
        # Always draw, so the stream of random numbers does not depend on the geometry.
        u, pick = rng.random(), rng.integers(0, 4)
        if rels and u < POSITION_CAPTION_PROB:
            rel = rels[int(pick) % len(rels)]
            return (f"{_noun_phrase(1, a['color'], a['shape'])} {rel} "
                    f"{_noun_phrase(1, b['color'], b['shape'])}")
    return " and ".join(_noun_phrase(n, c, s) for (s, c), n in groups.items())


# ---------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of ``shape`` filling a side x side box (pixel-centre test).

    The triangle is upward isosceles with its base on the bottom row and its apex at the top
    centre; for an even side the apex row is empty, so use the tight bbox of the mask.
    """
    c = (np.arange(side, dtype=np.float64) + 0.5)  # pixel centres
    y, x = c[:, None], c[None, :]
    h = side / 2
    if shape == "circle":
        m = (x - h) ** 2 + (y - h) ** 2 <= h * h
    elif shape == "square":
        m = np.ones((side, side), dtype=bool)
    elif shape == "triangle":
        m = np.abs(x - h) <= y / 2  # half-width grows from 0 at the top to side/2 at the bottom
    else:
        raise ValueError(f"shape_mask: expected a shape in {SHAPES}, got {shape!r}")
    m = np.ascontiguousarray(m)
    m.setflags(write=False)
    return m


def size_range(resolution: int, num_objects: int) -> tuple[int, int]:
    """Inclusive range of bbox sides (pixels) for an image with ``num_objects`` objects."""
    lo_f, hi_f = SINGLE_SIZE if num_objects == 1 else MULTI_SIZE
    lo = max(MIN_SIDE, int(round(lo_f * resolution)))
    hi = max(lo, int(round(hi_f * resolution)))
    return lo, hi


def min_gap(resolution: int) -> int:
    """Minimum number of background pixels between two objects (>= 2, grows with resolution)."""
    return max(2, resolution // 32)


def render(objects: Sequence[dict], resolution: int) -> np.ndarray:
    """uint8 (H, W, 3) image of ``objects`` on the background (no anti-aliasing).

    Each object is drawn into its ``"box"`` (the square placement box, x0, y0, side) if
    present, else into its ``"bbox"`` (must then be square for circles/squares).
    """
    img = np.empty((resolution, resolution, 3), dtype=np.uint8)
    img[...] = BACKGROUND
    for o in objects:
        if "box" in o:
            x0, y0, side = o["box"]
        else:
            x0, y0, x1, y1 = o["bbox"]
            side = max(x1 - x0, y1 - y0)
            y0 = y1 - side  # the triangle's tight box may have lost its (empty) apex row
        m = shape_mask(o["shape"], side)
        region = img[y0:y0 + side, x0:x0 + side]
        region[m] = PALETTE[o["color"]]
    return img


def _tight_bbox(shape: str, x0: int, y0: int, side: int) -> tuple[int, int, int, int]:
    m = shape_mask(shape, side)
    rows = np.flatnonzero(m.any(1))
    cols = np.flatnonzero(m.any(0))
    return (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)


def sample_scene(rng: np.random.Generator, resolution: int, num_objects: int | tuple[int, int]
                 ) -> list[dict]:
    """Draw object classes, sizes and non-overlapping positions (deterministic given ``rng``).

    Returns dicts with "shape", "color", "bbox" (tight, half-open) and "box"
    (x0, y0, side: the square placement box used for rendering).
    """
    lo_n, hi_n = _count_range(num_objects)
    n = int(rng.integers(lo_n, hi_n + 1))
    if n > 1 and rng.random() < SAME_CLASS_PROB:
        classes = [int(rng.integers(NUM_CLASSES))] * n
    else:
        classes = [int(c) for c in rng.integers(NUM_CLASSES, size=n)]
    lo, hi = size_range(resolution, n)
    gap = min_gap(resolution)
    boxes = None
    # Rejection sampling: a few restarts with fresh sizes, then with the smallest size.
    for attempt in range(40):
        sizes = rng.integers(lo, hi + 1, size=n) if attempt < 30 else np.full(n, lo)
        boxes = _place(rng, resolution, [int(s) for s in sizes], gap)
        if boxes is not None:
            break
    if boxes is None:
        raise RuntimeError(f"sample_scene: could not place {n} objects at {resolution}px")
    objects = []
    for c, (x0, y0, s) in zip(classes, boxes):
        shape, color = CLASSES[c]
        objects.append({"shape": shape, "color": color, "bbox": _tight_bbox(shape, x0, y0, s),
                        "box": (x0, y0, s)})
    return objects


def _place(rng, resolution, sizes, gap, tries=60):
    placed: list[tuple[int, int, int]] = []
    for s in sizes:
        for _ in range(tries):
            x0, y0 = (int(v) for v in rng.integers(0, resolution - s + 1, size=2))
            # separated by >= gap background pixels along x or along y from every placed box
            if all(x0 >= px + ps + gap or px >= x0 + s + gap or
                   y0 >= py + ps + gap or py >= y0 + s + gap for px, py, ps in placed):
                placed.append((x0, y0, s))
                break
        else:
            return None
    return placed


def _count_range(num_objects) -> tuple[int, int]:
    if isinstance(num_objects, (int, np.integer)):
        lo = hi = int(num_objects)
    elif isinstance(num_objects, (tuple, list)) and len(num_objects) == 2:
        lo, hi = (int(v) for v in num_objects)
    else:
        raise ValueError(f"num_objects: expected an int or a (min, max) pair, got {num_objects!r}")
    if not 1 <= lo <= hi <= MAX_OBJECTS:
        raise ValueError(f"num_objects: expected 1 <= min <= max <= {MAX_OBJECTS}, got {num_objects!r}")
    return lo, hi


# ---------------------------------------------------------------------------- dataset


class ShapesDataset(Dataset):
    """Procedural images of 1-4 coloured shapes; sample ``i`` is a pure function of (seed, i).

    Args:
        split: "train" (seed 0) or "test" (seed 1), two different streams so held-out data
            differs; ignored for the stream when ``seed`` is given.
        resolution: image side in pixels (32, 64 and 128 are tested).
        num_objects: an int, or an inclusive (min, max) range, within 1..4.
        length: number of samples (``__len__``).
        seed: overrides the split's default seed.
        caption_style: "default" or "geneval" (:func:`caption_for`); the images do not depend on it.

    Each item is a dict: ``image`` float32 (3, H, W) in [-1, 1]; ``label`` the class id of the
    *first* object (for single-object images, the image's class; for multi-object images it
    is only a convenience); ``caption`` a GenEval-style caption; ``objects`` a list of
    ``{"shape", "color", "bbox": (x0, y0, x1, y1)}`` with half-open, tight pixel boxes.
    """

    def __init__(self, split: str = "train", resolution: int = 64,
                 num_objects: int | tuple[int, int] = 1, length: int = 50000,
                 seed: int | None = None, caption_style: str = "default"):
        if split not in _SPLIT_SEEDS:
            raise ValueError(f"ShapesDataset: split must be one of {list(_SPLIT_SEEDS)}, got {split!r}")
        self.num_objects = _count_range(num_objects)
        lo, _ = size_range(resolution, self.num_objects[1])
        if resolution < 16 or self.num_objects[1] * (lo + min_gap(resolution)) > 2 * resolution:
            raise ValueError(f"ShapesDataset: resolution {resolution} is too small for "
                             f"{self.num_objects[1]} objects (expected >= 32 for 4 objects)")
        if length < 0:
            raise ValueError(f"ShapesDataset: length must be >= 0, got {length}")
        if caption_style not in CAPTION_STYLES:
            raise ValueError(f"ShapesDataset: caption_style must be one of {CAPTION_STYLES}, got {caption_style!r}")
        self.caption_style = caption_style
        self.split = split
        self.resolution = int(resolution)
        self.length = int(length)
        self.seed = _SPLIT_SEEDS[split] if seed is None else int(seed)

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> tuple[np.ndarray, str, list[dict]]:
        """(uint8 HWC image, caption, objects) of sample ``index``."""
        rng = np.random.default_rng([self.seed, int(index)])
        scene = sample_scene(rng, self.resolution, self.num_objects)
        img = render(scene, self.resolution)
        objects = [{"shape": o["shape"], "color": o["color"], "bbox": o["bbox"]} for o in scene]
        return img, caption_for(objects, rng, self.caption_style), objects

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.length <= index < self.length:
            raise IndexError(f"ShapesDataset: index {index} out of range for length {self.length}")
        index = index % self.length
        img, caption, objects = self.sample(index)
        image = torch.from_numpy(img).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        label = class_id(objects[0]["shape"], objects[0]["color"])
        return {"image": image, "label": label, "caption": caption, "objects": objects}


def collate(batch: list[dict], max_text_len: int = 16) -> dict[str, Any]:
    """Batch ShapesDataset items: image (B,3,H,W), label (B,), text (B, max_text_len) word ids,
    caption list[str], objects list[list[dict]]."""
    captions = [b["caption"] for b in batch]
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "label": torch.tensor([b["label"] for b in batch], dtype=torch.long),
        "text": _text.encode(captions, max_len=max_text_len),
        "caption": captions,
        "objects": [b["objects"] for b in batch],
    }


def shapes_loader(batch_size: int, split: str = "train", resolution: int = 64,
                  num_objects: int | tuple[int, int] = 1, length: int = 50000,
                  shuffle: bool = True, num_workers: int = 0, seed: int | None = None,
                  drop_last: bool = True, max_text_len: int = 16,
                  caption_style: str = "default") -> DataLoader:
    """DataLoader over ``ShapesDataset`` whose batches are dicts (see ``collate``)."""
    ds = ShapesDataset(split=split, resolution=resolution, num_objects=num_objects,
                       length=length, seed=seed, caption_style=caption_style)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      drop_last=drop_last, collate_fn=functools.partial(collate, max_text_len=max_text_len))


# ---------------------------------------------------------------------------- detector


def _to_uint8_hwc(image) -> np.ndarray:
    """(H, W, 3) float array in [0, 255] from a tensor in [-1, 1], a uint8 array or a PIL image."""
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"detect: expected a (3, H, W) tensor in [-1, 1], got shape {tuple(t.shape)}")
        if t.dtype == torch.uint8:
            return t.permute(1, 2, 0).cpu().numpy().astype(np.float32)
        return ((t.float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"detect: expected a uint8 (H, W, 3) array, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"detect: expected a uint8 (H, W, 3) array, got dtype {image.dtype}")
        return image.astype(np.float32)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    raise TypeError(f"detect: expected a torch tensor, numpy array or PIL image, got {type(image).__name__}")


def explain_pixels(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: best palette colour index and its mixing weight alpha in [0, 1].

    The pixel is modelled as ``bg + alpha * (colour - bg)``; the colour whose segment passes
    closest wins. Blurred edges of an object lie on its own segment (mixtures with the
    background), so they are neither mistaken for another colour nor, below alpha 0.5,
    counted as foreground.
    """
    v = img.reshape(-1, 3) - _BG                                # (N, 3)
    alpha = np.clip(v @ _DIR.T / _DIR_SQ, 0.0, 1.0)             # (N, 10)
    # squared distance to the segment: |v|^2 - 2 a v.d + a^2 |d|^2
    vd = v @ _DIR.T
    res = (v * v).sum(1, keepdims=True) - 2 * alpha * vd + alpha * alpha * _DIR_SQ
    best = res.argmin(1)
    a = alpha[np.arange(len(best)), best]
    return best.reshape(img.shape[:2]), a.reshape(img.shape[:2])


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of ``mask`` (-1 outside), numpy only.

    Min-label propagation to the 4 neighbours, accelerated by pointer jumping (each label is
    the flat index of a pixel of the same component, so ``lab[lab]`` is a valid shortcut).
    """
    h, w = mask.shape
    big = h * w
    flat_idx = np.arange(big).reshape(h, w)
    lab = np.where(mask, flat_idx, big)
    while True:
        new = lab.copy()
        np.minimum(new[1:], lab[:-1], out=new[1:])
        np.minimum(new[:-1], lab[1:], out=new[:-1])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new[~mask] = big
        f = new.ravel()
        fg = f < big
        for _ in range(3):  # pointer jumping
            f[fg] = f[f[fg]]
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(mask, lab, -1)


@functools.lru_cache(maxsize=None)
def _mask_offsets(shape: str, side: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.nonzero(shape_mask(shape, side))
    return ys, xs


def _fit_template(alpha: np.ndarray, weight: np.ndarray, bbox: tuple[int, int, int, int]
                  ) -> tuple[str, tuple[int, int, int], float] | None:
    """Best (shape, (x0, y0, side), error per template pixel) for one component, or None.

    Least-squares fit of a rendered hard mask to the component's alpha map over a window:
    ``sum w (alpha - mask)^2`` for every shape, every side within 2 px of the thresholded
    bbox and placements within 1 px of it. Thresholding a blurred image at alpha 0.5 keeps
    straight edges but eats thin corners (a triangle loses its apex and base corners,
    noise bites into edges); the template is only right when all its edges agree, so the fit
    recovers the rendered box and is a more robust shape classifier than a fill ratio.
    ``alpha``/``weight`` are window crops; ``bbox`` is in window coordinates.
    """
    h, w = alpha.shape
    x0, y0, x1, y1 = bbox
    wa = (weight * alpha).ravel()
    wf = weight.ravel()
    const = float((weight * alpha * alpha).sum())
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    m = max(x1 - x0, y1 - y0)
    best = (np.inf, "", (0, 0, 0))
    for side in range(max(3, m - 2), m + 3):
        bxs = {int(round(cx - side / 2)) + d for d in (-1, 0, 1)}
        # centred vertically, or resting on the bbox bottom (a triangle's apex may be gone)
        bys = {int(round(cy - side / 2)) + d for d in (-1, 0, 1)} | {y1 - side + d for d in (-1, 0, 1)}
        bxs = np.array(sorted(b for b in bxs if 0 <= b <= w - side))
        bys = np.array(sorted(b for b in bys if 0 <= b <= h - side))
        if len(bxs) == 0 or len(bys) == 0:
            continue
        base = (bys[:, None] * w + bxs[None, :]).ravel()
        for shape in SHAPES:
            ys, xs = _mask_offsets(shape, side)
            idx = base[:, None] + (ys * w + xs)[None, :]
            err = wf[idx].sum(1) - 2 * wa[idx].sum(1)
            k = int(err.argmin())
            if err[k] < best[0] - 1e-6:
                t = divmod(int(base[k]), w)
                best = (float(err[k]), shape, (t[1], t[0], side))
    err, shape, box = best
    if not shape:  # e.g. a long thin stripe: no square template fits the window
        return None
    npix = len(_mask_offsets(shape, box[2])[0])
    return shape, box, (err + const) / max(npix, 1)


def detect(image, min_area: int | None = None) -> list[dict]:
    """Objects in a Shapes image: list of ``{"shape", "color", "bbox", "area", "score"}``.

    Args:
        image: (3, H, W) float tensor in [-1, 1], uint8 (H, W, 3) numpy array, or PIL image.
        min_area: components with fewer foreground pixels are dropped (noise, debris);
            default ``max(4, 0.005 * H * W)`` (20 px at 64x64, well below the smallest
            object, a 12 px triangle of ~66 px).

    ``shape`` and ``bbox`` (half-open x0, y0, x1, y1) come from the best-fitting rendered
    template (``_fit_template``), ``area`` is the component's foreground pixel count, and
    ``score`` = (alpha-weighted share of the inner pixels that voted for the chosen colour)
    x (1 - 2 x mean squared template error), in [0, 1]. Sorted by area (descending), then
    y0, then x0.
    """
    img = _to_uint8_hwc(image)
    h, w = img.shape[:2]
    if min_area is None:
        min_area = max(4, int(0.005 * h * w))
    color_idx, alpha = explain_pixels(img)
    # alpha >= 0.5: the pixel is closer to its colour than to the background along the
    # mixing line. Far-off pixels that no segment explains still count as foreground.
    dist_bg = np.sqrt(((img - _BG) ** 2).sum(-1))
    fg = (alpha >= 0.5) | (dist_bg > 0.55 * np.sqrt(_DIR_SQ.max()))
    if not fg.any():
        return []
    lab = _components(fg)
    ids, inverse, counts = np.unique(lab[fg], return_inverse=True, return_counts=True)
    ys, xs = np.nonzero(fg)
    out = []
    # interior = foreground pixels whose 4 neighbours are foreground too (skip the blurred rim)
    pad = np.pad(fg, 1)
    interior = fg & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    for k, (cid, cnt) in enumerate(zip(ids, counts)):
        if cnt < min_area:
            continue
        sel = inverse == k
        cy, cx = ys[sel], xs[sel]
        y0, y1, x0, x1 = int(cy.min()), int(cy.max()) + 1, int(cx.min()), int(cx.max()) + 1
        inner = interior[cy, cx]
        if inner.sum() < max(3, cnt // 4):
            inner = np.ones_like(inner)
        votes = np.bincount(color_idx[cy[inner], cx[inner]], weights=alpha[cy[inner], cx[inner]],
                            minlength=len(COLORS))
        color = int(votes.argmax())
        purity = float(votes[color] / max(votes.sum(), 1e-8))
        # Fit templates on a window around the component, on this colour's mixing weight;
        # pixels of other components do not count.
        wy0, wy1 = max(0, y0 - _FIT_MARGIN), min(h, y1 + _FIT_MARGIN)
        wx0, wx1 = max(0, x0 - _FIT_MARGIN), min(w, x1 + _FIT_MARGIN)
        v = img[wy0:wy1, wx0:wx1] - _BG
        a = np.clip(v @ _DIR[color] / _DIR_SQ[color], 0.0, 1.0)
        wl = lab[wy0:wy1, wx0:wx1]
        weight = ((wl == cid) | (wl < 0)).astype(np.float32)
        fit = _fit_template(a, weight, (x0 - wx0, y0 - wy0, x1 - wx0, y1 - wy0))
        if fit is None:
            # Not shaped like any object (generated images can contain such blobs): report
            # it, so counts stay honest, as an object of unknown shape.
            out.append({"shape": UNKNOWN, "color": COLORS[color], "bbox": (x0, y0, x1, y1),
                        "area": int(cnt), "score": 0.0})
            continue
        shape, (bx, by, side), err = fit
        tb = _tight_bbox(shape, wx0 + bx, wy0 + by, side)
        out.append({"shape": shape, "color": COLORS[color], "bbox": tb, "area": int(cnt),
                    "score": purity * float(np.clip(1.0 - 2.0 * err, 0.0, 1.0))})
    out.sort(key=lambda o: (-o["area"], o["bbox"][1], o["bbox"][0]))
    return out


def classify(image, min_area: int | None = None) -> int:
    """Class id of a single-object image, or -1 unless exactly one object is detected."""
    objs = detect(image, min_area=min_area)
    if len(objs) != 1 or objs[0]["shape"] == UNKNOWN:
        return -1
    return class_id(objs[0]["shape"], objs[0]["color"])


def match_objects(detected: Sequence[dict], expected: Sequence[dict]) -> bool:
    """True when both lists hold the same multiset of (shape, colour)."""
    key = lambda objs: sorted((o["shape"], o["color"]) for o in objs)  # noqa: E731
    return key(detected) == key(expected)


def box_iou(a: Sequence[int], b: Sequence[int]) -> float:
    """IoU of two half-open boxes (x0, y0, x1, y1)."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


__all__ = ["SHAPES", "COLORS", "PALETTE", "BACKGROUND", "CLASSES", "NUM_CLASSES", "class_id",
           "class_caption", "relative_position", "caption_for", "CAPTION_STYLES", "shape_mask", "size_range",
           "min_gap", "render", "sample_scene", "ShapesDataset", "collate", "shapes_loader",
           "detect", "classify", "match_objects", "box_iou"]
