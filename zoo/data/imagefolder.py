"""Real-image folders with the ADM center crop.

``center_crop_arr`` is the preprocessing of ADM (Dhariwal & Nichol, 2021, "Diffusion Models
Beat GANs on Image Synthesis", guided-diffusion ``image_datasets.py``), which LlamaGen, VAR
and most ImageNet AR generators reuse so that FID reference statistics match: repeated
2x BOX downsampling while the short side is at least twice the target (cheap
anti-aliasing), one BICUBIC resize of the short side to the target, then a center crop.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM center crop: uint8 (image_size, image_size, 3) array from a PIL image of any size."""
    if image_size < 1:
        raise ValueError(f"center_crop_arr: image_size must be >= 1, got {image_size}")
    img = pil_image.convert("RGB")
    # Halve with a box filter first: a single bicubic resize by a large factor would alias.
    while min(img.size) >= 2 * image_size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = image_size / min(img.size)
    new_size = (max(image_size, round(img.width * scale)), max(image_size, round(img.height * scale)))
    img = img.resize(new_size, resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])


class ImageFolderDataset(Dataset):
    """All png/jpg images under ``root`` (recursively), ADM-center-cropped to ``image_size``.

    With ``labels_from_subdirs`` the label is the index of the image's top-level subfolder
    among the sorted subfolder names (torchvision ``ImageFolder`` style); images directly in
    ``root`` are then not allowed unless there are no subfolders at all. Otherwise every
    label is 0. Items: ``image`` float32 (3, H, W) in [-1, 1], ``label`` int, ``caption`` "",
    ``path`` str.
    """

    def __init__(self, root: str | os.PathLike, image_size: int, labels_from_subdirs: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolderDataset: {str(self.root)!r} is not a directory")
        self.image_size = int(image_size)
        files = sorted(p for p in self.root.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"ImageFolderDataset: no images ({', '.join(IMAGE_EXTENSIONS)}) "
                                    f"found under {str(self.root)!r}")
        self.files = files
        rel = [p.relative_to(self.root).parts for p in files]
        if labels_from_subdirs and any(len(r) > 1 for r in rel):
            loose = [str(p) for p, r in zip(files, rel) if len(r) == 1]
            if loose:
                raise ValueError(f"ImageFolderDataset: labels_from_subdirs=True expects every image "
                                 f"inside a class subfolder, but {len(loose)} are directly in the root "
                                 f"(e.g. {loose[0]!r}); move them or pass labels_from_subdirs=False")
            self.classes = sorted({r[0] for r in rel})
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels = [index[r[0]] for r in rel]
        else:
            self.classes = [""]
            self.labels = [0] * len(files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        with Image.open(path) as pil:
            arr = center_crop_arr(pil, self.image_size)
        image = torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return {"image": image, "label": self.labels[index], "caption": "", "path": str(path)}


__all__ = ["center_crop_arr", "ImageFolderDataset", "IMAGE_EXTENSIONS"]
