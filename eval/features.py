"""The Shapes feature network: a small CNN trained on Shapes attributes, for **Shapes-FID**.

Inception-v3 (Szegedy et al. 2016; FID: Heusel et al. 2017, §3) is the feature network of
the field's FID, but its weights cannot be shipped or downloaded here, and ImageNet features
say little about flat coloured shapes. ``eval/shapes-net`` is the offline stand-in for the
Shapes domain: a 5-layer CNN trained (``train/features.py``) to read every attribute of a
Shapes image (which of the 30 shape x colour classes are present, how many objects, which
shapes, which colours), so its pooled feature vector is a semantic embedding of that domain.

**Shapes-FID is not comparable to Inception FID** (different network, different feature
space, different scale); compare it only with other Shapes-FID numbers.

Input
    ``(B, 3, H, W)`` square images with ``32 <= H <= 256``: either ``uint8`` in [0, 255]
    (torch-fidelity's convention) or floating point in [-1, 1] (the zoo's convention). Other
    sizes are resized to 64x64 inside (bilinear, antialiased when shrinking).

Outputs (:meth:`ShapesNet.forward` returns a dict)
    ``patch_features`` (B, 128, 8, 8)
        the last feature map: a spatial semantic map (a tiny teacher for tokenizers that
        distil semantic features, e.g. TokenFlow / UniTok-style alignment losses);
    ``features`` (B, 256)
        the pooled embedding used for Shapes-FID / KID / precision-recall: the mean- and
        the max-pooled feature map, concatenated (as FID uses Inception's pooled pool_3);
    ``class_logits`` (B, 30), ``count_logits`` (B, 4), ``shape_logits`` (B, 3),
    ``color_logits`` (B, 10)
        attribute heads: multi-label class / shape / colour presence (a 1x1 conv on the map,
        max over the 64 locations), and the object count 1-4 (an MLP on ``features``,
        softmax over 4).

``register_torch_fidelity()`` registers the network with torch-fidelity as the feature
extractor ``"shapes-net"`` (layers ``"features"`` and ``"class_logits"``), so
``torch_fidelity.calculate_metrics(..., feature_extractor="shapes-net")`` computes Shapes-FID
with stock torch-fidelity. ``import eval.fid`` calls it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.module import ZooModule
from zoo.registry import register

NAME = "eval/shapes-net"
WEIGHTS_TAG = "shapes"
WEIGHTS_DIR = "weights/features-shapes-net"
#: name of the extractor in torch-fidelity's registry
FIDELITY_NAME = "shapes-net"
NOT_COMPARABLE = "Shapes-FID: shapes-net features, NOT comparable to Inception FID"
INPUT_SIZE = 64
MIN_SIZE, MAX_SIZE = 32, 256


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class ShapesNet(ZooModule):
    """Shapes attribute CNN; see the module docstring for inputs and outputs.

    Args:
        widths: channels of the five 3x3 conv blocks (strides 2, 2, 1, 2, 1: 64 -> 8x8); the
            embedding ``features`` is ``2 * widths[-1]``-d (mean- and max-pooled map).
        num_classes, num_shapes, num_colors, max_objects: head sizes (Shapes vocabulary).
        count_hidden: hidden width of the count MLP.
    """

    def __init__(self, widths: list = (32, 48, 64, 96, 128), num_classes: int = 30, num_shapes: int = 3,
                 num_colors: int = 10, max_objects: int = 4, count_hidden: int = 128):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 5:
            raise ValueError(f"ShapesNet: widths needs 5 channel counts, got {widths}")
        strides = (2, 2, 1, 2, 1)
        chans = [3, *widths]
        self.body = nn.Sequential(*[_block(chans[i], chans[i + 1], s) for i, s in enumerate(strides)])
        self.patch_dim = widths[-1]
        self.feature_dim = 2 * widths[-1]
        self.head_sizes = (int(num_classes), int(num_shapes), int(num_colors))
        # Presence heads read every location of the 8x8 map (1x1 conv) and take the maximum over
        # locations: an object is recognised where it is, so shape and colour stay bound to the
        # same object in multi-object images (multiple-instance learning).
        self.local_head = nn.Conv2d(widths[-1], sum(self.head_sizes), 1)
        self.count_head = nn.Sequential(nn.Linear(self.feature_dim, count_hidden), nn.ReLU(inplace=True),
                                        nn.Linear(count_hidden, max_objects))

    # -- input -----------------------------------------------------------------------------
    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [-1, 1] (B, 3, S, S), 32 <= S <= 256 -> float (B, 3, 64, 64) in [-1, 1]."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"ShapesNet: expected images of shape (B, 3, H, W), got {got}")
        h, w = images.shape[-2:]
        if h != w or not MIN_SIZE <= h <= MAX_SIZE:
            raise ValueError(f"ShapesNet: expected square images with side in [{MIN_SIZE}, {MAX_SIZE}], "
                             f"got {h}x{w}")
        dtype = next(self.parameters()).dtype
        if images.dtype == torch.uint8:
            x = images.to(dtype) / 127.5 - 1.0
        elif images.dtype.is_floating_point:
            x = images.to(dtype)
            if images.numel() and (float(x.min()) < -1.05 or float(x.max()) > 1.05):
                raise ValueError(f"ShapesNet: float images must lie in [-1, 1], got values in "
                                 f"[{float(x.min()):.3g}, {float(x.max()):.3g}] (pass uint8 for [0, 255])")
        else:
            raise ValueError(f"ShapesNet: expected uint8 or float images, got {images.dtype}")
        if h != INPUT_SIZE:
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                              antialias=h > INPUT_SIZE)
        return x

    # -- network ---------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> dict:
        fmap = self.body(self.prepare(images))
        # Mean pooling carries how much of each pattern there is (counts), max pooling whether
        # it is there at all: together the 256-d Shapes-FID embedding (cf. Inception's pool_3).
        feat = torch.cat([fmap.mean((2, 3)), fmap.amax((2, 3))], 1)
        presence = self.local_head(fmap).amax((2, 3))
        cls, shp, col = presence.split(self.head_sizes, 1)
        return {"patch_features": fmap, "features": feat, "class_logits": cls,
                "count_logits": self.count_head(feat), "shape_logits": shp, "color_logits": col}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled (B, 256) embedding (the Shapes-FID feature)."""
        return self.forward(images)["features"]

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Spatial (B, 128, 8, 8) feature map."""
        return self.body(self.prepare(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict:
        """Decoded attributes: ``classes`` (B, 30) bool, ``count`` (B,) in 1..4, ``shapes`` (B, 3)
        bool, ``colors`` (B, 10) bool (presence = logit > 0)."""
        out = self.forward(images)
        return {"classes": out["class_logits"] > 0, "count": out["count_logits"].argmax(1) + 1,
                "shapes": out["shape_logits"] > 0, "colors": out["color_logits"] > 0}


def targets(objects_batch, device=None) -> dict:
    """Attribute targets from ShapesDataset ``objects`` lists (one list per image)."""
    from zoo.data.shapes import COLORS, MAX_OBJECTS, NUM_CLASSES, SHAPES, class_id

    b = len(objects_batch)
    classes = torch.zeros(b, NUM_CLASSES)
    shapes = torch.zeros(b, len(SHAPES))
    colors = torch.zeros(b, len(COLORS))
    count = torch.zeros(b, dtype=torch.long)
    for i, objs in enumerate(objects_batch):
        if not 1 <= len(objs) <= MAX_OBJECTS:
            raise ValueError(f"targets: expected 1..{MAX_OBJECTS} objects per image, got {len(objs)}")
        count[i] = len(objs) - 1
        for o in objs:
            classes[i, class_id(o["shape"], o["color"])] = 1
            shapes[i, SHAPES.index(o["shape"])] = 1
            colors[i, COLORS.index(o["color"])] = 1
    out = {"classes": classes, "count": count, "shapes": shapes, "colors": colors}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def attribute_loss(out: dict, tgt: dict) -> dict:
    """Sum of the four head losses (BCE for presence, cross-entropy for the count)."""
    bce = F.binary_cross_entropy_with_logits
    parts = {"class_loss": bce(out["class_logits"], tgt["classes"]),
             "count_loss": F.cross_entropy(out["count_logits"], tgt["count"]),
             "shape_loss": bce(out["shape_logits"], tgt["shapes"]),
             "color_loss": bce(out["color_logits"], tgt["colors"])}
    # Class presence is 30 sparse labels: weight it up so its mean BCE is not drowned out.
    parts["loss"] = 4 * parts["class_loss"] + parts["count_loss"] + parts["shape_loss"] + parts["color_loss"]
    return parts


@torch.no_grad()
def attribute_accuracy(model: ShapesNet, images: torch.Tensor, objects_batch) -> dict:
    """Counts of correct predictions on one batch: exact class set, count, shape set, colour
    set, every attribute at once, and per-label accuracies (summed over images)."""
    pred = model.predict(images)
    tgt = targets(objects_batch, device=images.device)
    cls_ok = (pred["classes"] == tgt["classes"].bool()).all(1)
    cnt_ok = pred["count"] == tgt["count"] + 1
    shp_ok = (pred["shapes"] == tgt["shapes"].bool()).all(1)
    col_ok = (pred["colors"] == tgt["colors"].bool()).all(1)
    return {"n": len(objects_batch), "class_set": int(cls_ok.sum()), "count": int(cnt_ok.sum()),
            "shape_set": int(shp_ok.sum()), "color_set": int(col_ok.sum()),
            "all": int((cls_ok & cnt_ok & shp_ok & col_ok).sum()),
            "class_label": float((pred["classes"] == tgt["classes"].bool()).float().mean(1).sum()),
            "shape_label": float((pred["shapes"] == tgt["shapes"].bool()).float().mean(1).sum()),
            "color_label": float((pred["colors"] == tgt["colors"].bool()).float().mean(1).sum())}


@register(NAME, paper="arzoo: Shapes attribute CNN for Shapes-FID (feature network in the role of "
          "Inception-v3 in FID, Heusel et al. 2017)", weights={WEIGHTS_TAG: WEIGHTS_DIR})
def shapes_net(**overrides) -> ShapesNet:
    """Shapes feature network: 64x64 attribute CNN, 256-d embedding for Shapes-FID, 8x8 patch features."""
    return ShapesNet(**overrides)


def load_shapes_net(path=None, device="cpu") -> ShapesNet:
    """The shipped network (``eval/shapes-net:shapes``) or a checkpoint folder, in eval mode, frozen."""
    from zoo.checkpoint import load_pretrained
    from zoo.registry import resolve_weights

    src = str(path) if path else str(resolve_weights(NAME, WEIGHTS_TAG))
    model = load_pretrained(src)
    if not isinstance(model, ShapesNet):
        raise TypeError(f"{src}: holds a {type(model).__name__}, expected a ShapesNet checkpoint")
    return model.eval().requires_grad_(False).to(device)


# -- torch-fidelity ------------------------------------------------------------------------
_FIDELITY_CLS = None


def register_torch_fidelity() -> str:
    """Register ``"shapes-net"`` with torch-fidelity (idempotent); returns the name.

    The extractor takes torch-fidelity's uint8 (B, 3, H, W) batches. Its layers are
    ``"features"`` (256-d; the default for FID, KID and PRC) and ``"class_logits"`` (30-d; the
    default for ISC, which on this network is a Shapes class score, not the Inception Score).
    ``feature_extractor_weights_path`` may name a ShapesNet checkpoint folder; default: the
    shipped weights.
    """
    global _FIDELITY_CLS
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if _FIDELITY_CLS is None:
        class ShapesNetFeatureExtractor(FeatureExtractorBase):
            def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
                super().__init__(name, features_list)
                self.net = load_shapes_net(feature_extractor_weights_path)

            @staticmethod
            def get_provided_features_list():
                return ("features", "class_logits")

            @staticmethod
            def get_default_feature_layer_for_metric(metric):
                return {"isc": "class_logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

            @staticmethod
            def can_be_compiled():
                return False

            @staticmethod
            def get_dummy_input_for_compile():
                return None

            def forward(self, x):
                if not (torch.is_tensor(x) and x.dtype == torch.uint8):
                    raise ValueError(f"shapes-net (torch-fidelity): expected uint8 images, got "
                                     f"{getattr(x, 'dtype', type(x).__name__)}")
                out = self.net(x)
                return tuple(out[n].float() for n in self.features_list)

        _FIDELITY_CLS = ShapesNetFeatureExtractor
    if FIDELITY_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(FIDELITY_NAME, _FIDELITY_CLS)
    return FIDELITY_NAME


__all__ = ["FIDELITY_NAME", "NAME", "NOT_COMPARABLE", "ShapesNet", "attribute_accuracy", "attribute_loss",
           "load_shapes_net", "register_torch_fidelity", "shapes_net", "targets"]
