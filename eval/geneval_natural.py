"""GenEval detectors and colour classifiers for natural images (``eval/geneval.py`` interfaces).

The official GenEval scorer (Ghosh et al., 2023, Sec. 3.2) uses Mask2Former (mmdet) boxes and
masks and a CLIP ViT-L/14 zero-shot colour classifier. These are the closest pieces that load
without mmdet: a torchvision COCO detector and an open_clip colour classifier. Both load their
weights lazily from files the user provides (nothing is downloaded), and scores made with them
are labelled as not comparable to the official GenEval numbers. The Shapes-domain pair lives in
``eval/geneval_shapes.py``; ``eval.geneval.make_detector`` / ``make_color_classifier`` pick one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from eval.geneval import ColorClassifier, Detection, Detector

#: torchvision COCO category names that GenEval spells differently (its object_names.txt).
COCO_TO_GENEVAL = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}


class TorchvisionDetector(Detector):
    """A torchvision COCO detector (default Mask R-CNN R50-FPN; He et al., 2017) as a GenEval
    detector, for natural images. Not the official Mask2Former: scores are not comparable.

    Weights are never downloaded: pass the state-dict file (e.g. torchvision's
    ``maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth``). Loaded on the first ``detect``. ``model``
    injects an already-built torchvision-style detector (used by tests).
    """

    name = "torchvision"

    def __init__(self, weights: str | Path | None = None, arch: str = "maskrcnn_resnet50_fpn",
                 device: str = "cpu", mask_threshold: float = 0.5, model=None):
        self.weights, self.arch, self.device = weights, arch, device
        self.mask_threshold = mask_threshold
        self._model = model
        self.name = f"torchvision {arch}"

    def _load(self):
        import torch
        import torchvision

        if self._model is not None:
            return self._model
        if self.weights is None or not Path(self.weights).is_file():
            raise FileNotFoundError(
                f"TorchvisionDetector: COCO weights for {self.arch} not found (got {self.weights!r}). "
                f"Download the state dict once (e.g. https://download.pytorch.org/models/"
                f"maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth) and pass --detector-weights PATH.")
        builder = getattr(torchvision.models.detection, self.arch, None)
        if builder is None:
            raise ValueError(f"TorchvisionDetector: no torchvision detection model named {self.arch!r}")
        model = builder(weights=None, weights_backbone=None, num_classes=91)
        model.load_state_dict(torch.load(self.weights, map_location="cpu", weights_only=True))
        self._model = model.eval().to(self.device)
        return self._model

    def detect(self, image: np.ndarray) -> dict[str, list]:
        import torch
        from torchvision.models import _meta

        model = self._load()
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255).to(self.device)
        with torch.no_grad():
            res = model([x])[0]
        cats = _meta._COCO_CATEGORIES
        masks = res.get("masks")
        out: dict[str, list] = {}
        for k in range(len(res["scores"])):
            cat = cats[int(res["labels"][k])]
            if cat in ("__background__", "N/A"):
                continue
            mask = None if masks is None else (masks[k, 0] >= self.mask_threshold).cpu().numpy()
            out.setdefault(COCO_TO_GENEVAL.get(cat, cat), []).append(
                Detection(tuple(res["boxes"][k].tolist()), float(res["scores"][k]), mask))
        return out


class OpenCLIPColorClassifier(ColorClassifier):
    """Zero-shot CLIP colour classifier as in the official scorer (Radford et al., 2021): the
    masked object pasted on a grey (#999) canvas, cropped to its box, classified against the
    prompts "a photo of a {c} {class}", "a photo of a {c}-colored {class}", "a photo of a
    {c} object" (text embeddings averaged per colour). Needs ``open_clip`` and local weights;
    loaded on first use."""

    name = "open_clip"

    def __init__(self, model: str = "ViT-L-14", weights: str | Path | None = None, device: str = "cpu",
                 bgcolor: str = "#999"):
        self.arch, self.weights, self.device, self.bgcolor = model, weights, device, bgcolor
        self._loaded = None
        self._text: dict = {}
        self.name = f"open_clip {model}"

    def _load(self):
        if self._loaded is not None:
            return self._loaded
        try:
            import open_clip
        except ImportError:
            raise ImportError("OpenCLIPColorClassifier needs the open_clip package (pip install "
                              "open_clip_torch), which is not installed") from None
        if self.weights is None or not Path(self.weights).is_file():
            raise FileNotFoundError(f"OpenCLIPColorClassifier: CLIP weights not found (got {self.weights!r}); "
                                    f"pass --clip-weights PATH to the {self.arch} (OpenAI) checkpoint file")
        model, _, transform = open_clip.create_model_and_transforms(self.arch, pretrained=str(self.weights),
                                                                    device=self.device)
        self._loaded = (model.eval(), transform, open_clip.get_tokenizer(self.arch))
        return self._loaded

    def _classifier(self, class_name: str, colors: tuple[str, ...]):
        import torch

        key = (class_name, colors)
        if key not in self._text:
            model, _, tok = self._load()
            templates = [f"a photo of a {{c}} {class_name}", f"a photo of a {{c}}-colored {class_name}",
                         "a photo of a {c} object"]
            with torch.no_grad():
                rows = []
                for c in colors:
                    e = model.encode_text(tok([t.format(c=c) for t in templates]).to(self.device))
                    e = torch.nn.functional.normalize(e, dim=-1).mean(0)
                    rows.append(torch.nn.functional.normalize(e, dim=0))
            self._text[key] = torch.stack(rows, 1)
        return self._text[key]

    def classify(self, image, box, mask, candidate_colors, class_name=None):
        import torch
        from PIL import Image

        model, transform, _ = self._load()
        weights = self._classifier(class_name or "object", tuple(candidate_colors))
        img = Image.fromarray(np.asarray(image))
        if mask is not None:
            img = Image.composite(img, Image.new("RGB", img.size, self.bgcolor),
                                  Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255))
        img = img.crop(tuple(float(v) for v in box[:4]))
        with torch.no_grad():
            f = model.encode_image(transform(img).unsqueeze(0).to(self.device))
            f = torch.nn.functional.normalize(f, dim=-1)
        return candidate_colors[int((f @ weights).argmax())]

__all__ = ["COCO_TO_GENEVAL", "OpenCLIPColorClassifier", "TorchvisionDetector"]
