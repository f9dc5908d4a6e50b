"""Verifiers for test-time search (``generators/search.py``): images + prompts -> scores.

A verifier is any callable ``verifier(images, prompts, **extras) -> scores (B,)``, higher is
better, with an optional ``requires_images`` attribute (default True). ``images`` are float
``(B, 3, H, W)`` in [-1, 1] (``None`` when ``requires_images`` is False), ``prompts`` one entry
per image (a caption, or a GenEval metadata dict). The search passes the extras a verifier's
signature names: ``tokens``, ``log_probs`` (summed log-probability of the scored tokens under
the prior) and ``num_tokens``. The SoTo reference (github.com/EPFL-VILAB/search-over-tokens,
``soto/verifiers/*``) has CLIP, ImageReward, HPSv2, PickScore, Aesthetic, CycleReward,
DreamSim, Grounded-SAM spatial, likelihood and ensembles; here:

* :class:`GenEvalVerifier` -- the Shapes-GenEval protocol per prompt (``eval/geneval.py``
  rules with the ``eval/geneval_shapes.py`` detector and colour classifier). GenEval's verdict
  is binary, and a search must rank failures too, so the score is graded:
  ``score = (correct + fraction of the prompt's requirements met) / 2``. A correct image scores
  1.0, an incorrect one at most 0.5. Requirements, one per check the GenEval rules make:
  per include clause, the object count (credit ``min(found, count) / count``), the colour if
  the clause names one (``hits / count`` over the top-``count`` detections) and the relation
  if it has one (binary, GenEval's rule against the referenced clause's objects); per exclude
  clause, fewer than ``count`` objects (binary). A Shapes caption without metadata is turned
  into the strictest GenEval metadata it states (:func:`shapes_metadata`).
* :class:`LikelihoodVerifier` -- the AR prior's log-probability of the scored tokens, per
  token (``log_probs / num_tokens``, as the reference normalises); needs no images.
* :class:`CLIPVerifier`, :class:`ImageRewardVerifier` -- image-text reward models loaded
  lazily from local weights the user gives (nothing is downloaded; a clear error without
  weights or without the package). CLIP needs ``open_clip``; ImageReward its package.

:func:`make_verifier` builds one by name (``arzoo sample --verifier``).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

VERIFIERS = ("geneval", "likelihood", "clip", "imagereward")


class Verifier:
    """Base class (the protocol is any callable; see the module docstring)."""

    name = "verifier"
    requires_images = True

    def __call__(self, images, prompts: Sequence, **extras) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


def _prompt_text(p) -> str:
    if isinstance(p, dict):
        if not isinstance(p.get("prompt"), str):
            raise ValueError(f"a metadata prompt needs a 'prompt' string, got {p!r:.120}")
        return p["prompt"]
    if not isinstance(p, str):
        raise ValueError(f"expected a caption string or a GenEval metadata dict, got {type(p).__name__}")
    return p


def _uint8(images: torch.Tensor) -> np.ndarray:
    from zoo.pipeline import to_uint8

    return to_uint8(images).numpy()


# ---- Shapes-GenEval ------------------------------------------------------------------------
def shapes_metadata(prompt: str) -> dict:
    """GenEval metadata for a Shapes caption (``zoo.data.shapes.caption_for`` grammar), the
    strictest task the caption states: one object -> ``colors``; ``n`` alike -> ``counting``
    (exactly n; the colour is checked too); two objects -> ``color_attr`` (both colours); a
    relation -> ``position`` with both colours checked."""
    from eval.geneval import validate_metadata
    from eval.geneval_shapes import parse_prompt

    parsed = parse_prompt(prompt)
    groups, rel = parsed["groups"], parsed["relation"]
    clause = lambda n, c, s: {"class": s, "count": n, "color": c}  # noqa: E731
    if rel is not None:  # "a red circle left of a blue square": the reference object first
        (na, ca, sa), (nb, cb, sb) = groups
        m = {"tag": "position", "include": [clause(nb, cb, sb), {**clause(na, ca, sa), "position": [rel, 0]}]}
    elif len(groups) == 1 and groups[0][0] == 1:
        m = {"tag": "colors", "include": [clause(*groups[0])]}
    elif len(groups) == 1:
        n, c, s = groups[0]
        m = {"tag": "counting", "include": [clause(n, c, s)], "exclude": [{"class": s, "count": n + 1}]}
    else:
        m = {"tag": "color_attr", "include": [clause(*g) for g in groups]}
    m["prompt"] = prompt
    return validate_metadata(m, f"metadata of {prompt!r}")


class _MemoColors:
    """A colour classifier that answers each (box, class) of one image once."""

    def __init__(self, inner):
        self.inner, self.memo = inner, {}

    def classify(self, image, box, mask, candidate_colors, class_name=None):
        key = (tuple(float(v) for v in box), class_name, tuple(candidate_colors))
        if key not in self.memo:
            self.memo[key] = self.inner.classify(image, box, mask, candidate_colors, class_name=class_name)
        return self.memo[key]


class GenEvalVerifier(Verifier):
    """Shapes-GenEval as a graded verifier (module docstring): ``(correct + fraction met) / 2``.

    ``prompts``: GenEval metadata dicts (``eval.geneval.load_metadata``) or Shapes captions.
    ``detector`` / ``color_classifier`` default to the Shapes pair; ``config`` to GenEval's.
    :meth:`evaluate` returns the binary verdict and the requirement credits of one image.
    """

    name = "geneval"

    def __init__(self, detector=None, color_classifier=None, config=None):
        from eval.geneval import GenEvalConfig
        from eval.geneval_shapes import ShapesColorClassifier, ShapesDetector

        self.detector = detector if detector is not None else ShapesDetector()
        self.color_classifier = color_classifier if color_classifier is not None else ShapesColorClassifier()
        self.config = config if config is not None else GenEvalConfig()
        self.name = f"geneval ({getattr(self.detector, 'name', 'detector')})"

    @staticmethod
    def metadata(prompt) -> dict:
        if isinstance(prompt, dict):
            from eval.geneval import validate_metadata

            return validate_metadata(prompt)
        return shapes_metadata(_prompt_text(prompt))

    def evaluate(self, image: np.ndarray, metadata: dict) -> tuple[bool, list[float]]:
        """(GenEval correct, credit of each requirement in [0, 1]) for one uint8 image."""
        from eval.geneval import COLORS, evaluate_metadata, filter_detections

        cc = _MemoColors(self.color_classifier)
        det = filter_detections(self.detector.detect(image), metadata["tag"], self.config)
        correct = evaluate_metadata(image, det, metadata, cc, self.config)[0]
        credit = []
        include = metadata.get("include", [])
        for req in include:
            cls, cnt = req["class"], int(req["count"])
            found = list(det.get(cls, []))[:cnt]
            credit.append(min(len(found), cnt) / cnt)
            if "color" in req:
                hits = sum(cc.classify(image, d.box, d.mask, COLORS, class_name=cls) == req["color"] for d in found)
                credit.append(hits / cnt)
            if "position" in req:
                rel, t = req["position"]
                ref = include[t]
                sub = {"tag": metadata["tag"], "prompt": metadata["prompt"],
                       "include": [{"class": ref["class"], "count": int(ref["count"])},
                                   {"class": cls, "count": cnt, "position": [rel, 0]}]}
                credit.append(float(evaluate_metadata(image, det, sub, cc, self.config)[0]))
        for req in metadata.get("exclude", []):
            credit.append(float(len(det.get(req["class"], [])) < int(req["count"])))
        return bool(correct), credit

    def score_image(self, image: np.ndarray, metadata: dict) -> float:
        correct, credit = self.evaluate(image, metadata)
        frac = float(np.mean(credit)) if credit else float(correct)
        return 0.5 * (float(correct) + frac)

    def __call__(self, images, prompts, **extras) -> torch.Tensor:
        if images is None:
            raise ValueError("GenEvalVerifier scores images; got none")
        arr = _uint8(images)
        if len(arr) != len(prompts):
            raise ValueError(f"{len(arr)} images but {len(prompts)} prompts")
        metas = {}
        out = []
        for img, p in zip(arr, prompts):
            key = id(p)
            if key not in metas:
                metas[key] = self.metadata(p)
            out.append(self.score_image(img, metas[key]))
        return torch.tensor(out, dtype=torch.float32)


# ---- likelihood ------------------------------------------------------------------------------
class LikelihoodVerifier(Verifier):
    """The prior's log-probability of the scored tokens (``log_probs`` from the search), per
    token when ``normalize`` (reference: divided by the sequence length). Needs no images; a
    prior without log-probabilities cannot be verified this way (error)."""

    name = "likelihood"
    requires_images = False

    def __init__(self, normalize: bool = True):
        self.normalize = normalize

    def __call__(self, images, prompts, *, log_probs=None, num_tokens=None, **extras) -> torch.Tensor:
        if log_probs is None:
            raise ValueError("LikelihoodVerifier needs log_probs from the search (the prior's log-probabilities)")
        lp = torch.as_tensor(log_probs, dtype=torch.float32).reshape(-1).cpu()
        if len(lp) != len(prompts):
            raise ValueError(f"{len(lp)} log-probabilities for {len(prompts)} sequences")
        if self.normalize and num_tokens:
            lp = lp / float(num_tokens)
        return lp


# ---- image-text reward models (user-given local weights) ------------------------------------
def _need_package(module: str, who: str, install: str) -> None:
    import importlib.util

    from zoo.errors import UserError

    if importlib.util.find_spec(module) is None:
        raise UserError(f"{who} needs the {module} package ({install}), which is not installed")


def _need_weights(weights, who: str, flag: str = "--verifier-weights") -> Path:
    if weights is None:
        raise ValueError(f"{who} needs local weights: pass {flag} PATH (nothing is downloaded)")
    path = Path(weights)
    if not path.exists():
        raise FileNotFoundError(f"{who}: weights {path} do not exist")
    return path


class CLIPVerifier(Verifier):
    """CLIP score ``100 * cos(image, text)`` (Radford et al., 2021; reference
    ``clip_verifier.py``) with an ``open_clip`` model built from a local checkpoint file
    (``weights``; e.g. the OpenAI ViT-L/14 ``.pt``). Loaded on first use; ``model=(model,
    preprocess, tokenizer)`` injects a loaded triple (tests)."""

    name = "clip"

    def __init__(self, weights: str | Path | None = None, arch: str = "ViT-L-14", device: str = "cpu", model=None):
        self.weights, self.arch, self.device = weights, arch, device
        self._loaded = model
        if model is None:
            _need_weights(weights, f"CLIPVerifier ({arch})")
            _need_package("open_clip", "CLIPVerifier", "pip install open_clip_torch")
        self.name = f"clip {arch}"

    def _load(self):
        if self._loaded is None:
            import open_clip
            path = _need_weights(self.weights, f"CLIPVerifier ({self.arch})")
            model, _, preprocess = open_clip.create_model_and_transforms(self.arch, pretrained=str(path),
                                                                         device=self.device)
            self._loaded = (model.eval(), preprocess, open_clip.get_tokenizer(self.arch))
        return self._loaded

    @torch.no_grad()
    def __call__(self, images, prompts, **extras) -> torch.Tensor:
        from PIL import Image

        model, preprocess, tokenizer = self._load()
        pil = [Image.fromarray(a) for a in _uint8(images)]
        x = torch.stack([preprocess(im) for im in pil]).to(self.device)
        f = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
        t = tokenizer([_prompt_text(p) for p in prompts]).to(self.device)
        e = torch.nn.functional.normalize(model.encode_text(t).float(), dim=-1)
        return (100.0 * (f * e).sum(-1)).cpu()


class ImageRewardVerifier(Verifier):
    """ImageReward (Xu et al., 2023; reference ``image_reward_verifier.py``) from local files:
    ``weights`` is ``ImageReward.pt`` (or its folder) with ``med_config.json`` beside it. Runs
    with ``HF_HUB_OFFLINE=1``, so its BERT tokenizer must already be in the Hugging Face cache.
    Needs the ``image-reward`` package (``pip install image-reward --no-deps``). ``model=``
    injects an object with ``score(prompt, [PIL images]) -> list`` (tests)."""

    name = "imagereward"

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", model=None):
        self.weights, self.device, self._model = weights, device, model
        if model is None:
            self._files()
            _need_package("ImageReward", "ImageRewardVerifier", "pip install image-reward --no-deps")

    def _files(self) -> tuple[Path, Path]:
        path = _need_weights(self.weights, "ImageRewardVerifier")
        ckpt = path / "ImageReward.pt" if path.is_dir() else path
        med = ckpt.parent / "med_config.json"
        if not ckpt.is_file() or not med.is_file():
            raise FileNotFoundError(f"ImageRewardVerifier: expected ImageReward.pt and med_config.json in "
                                    f"{ckpt.parent} (the model's two files); nothing is downloaded")
        return ckpt, med

    def _load(self):
        if self._model is None:
            import ImageReward as RM
            ckpt, med = self._files()
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            self._model = RM.load(str(ckpt), device=self.device, med_config=str(med))
        return self._model

    @torch.no_grad()
    def __call__(self, images, prompts, **extras) -> torch.Tensor:
        from PIL import Image

        model = self._load()
        out = []
        for a, p in zip(_uint8(images), prompts):
            s = model.score(_prompt_text(p), [Image.fromarray(a)])
            out.append(float(s[0] if isinstance(s, (list, tuple)) else s))
        return torch.tensor(out, dtype=torch.float32)


def make_verifier(name: str, weights: str | None = None, device: str = "cpu", **kw) -> Verifier:
    """A verifier by name: ``geneval`` (Shapes-GenEval), ``likelihood``, ``clip`` or
    ``imagereward`` (the last two need ``weights``)."""
    if name == "geneval":
        return GenEvalVerifier(**kw)
    if name == "likelihood":
        return LikelihoodVerifier(**kw)
    if name == "clip":
        return CLIPVerifier(weights, device=device, **kw)
    if name == "imagereward":
        return ImageRewardVerifier(weights, device=device, **kw)
    raise ValueError(f"unknown verifier {name!r}; expected one of {VERIFIERS}")


__all__ = ["CLIPVerifier", "GenEvalVerifier", "ImageRewardVerifier", "LikelihoodVerifier", "VERIFIERS",
           "Verifier", "make_verifier", "shapes_metadata"]
