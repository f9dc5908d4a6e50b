"""Image sources for the evaluation commands: folders, ADM-style ``.npz`` and procedural Shapes.

``open_images(source)`` turns a command-line source into a ``Dataset`` of uint8 (3, H, W)
tensors plus a description: a folder of PNG/JPEG files (sorted by name; not recursive; only
the samples ``samples.json`` lists when ``arzoo sample`` wrote the folder), an
ADM-style ``.npz`` (``arr_0`` uint8 NHWC), or ``shapes:<split>[:N][:objects=1-4][:res=64]``.
Used by ``arzoo eval fid`` / ``fid-job`` / ``recon`` (``eval/fid.py`` re-exports the names).
``shapes_test_batch`` is the held-out Shapes batch (images in [-1, 1] + labels) that the
tokenizer/generator probes (``eval.prefix_recon``, ``decoder_steps``, ``comit_crops``,
``mask_loss``) measure on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

_IMAGE_EXT = (".png", ".jpg", ".jpeg")


def npz_array(path, key: str = "arr_0") -> np.ndarray:
    """``key`` of an ``.npz`` file, memory-mapped when the member is stored uncompressed
    (``np.savez``, what ADM's and our samplers write), so a 50k x 256^2 sample file is read
    lazily batch by batch instead of as one 10 GB array (ADM's evaluator streams it too)."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        name = key + ".npy"
        if name not in zf.namelist():
            raise KeyError(f"{path}: no {key!r} in this npz (keys: {[n[:-4] for n in zf.namelist()]})")
        info = zf.getinfo(name)
        if info.compress_type != zipfile.ZIP_STORED:
            with zf.open(name) as f:
                return np.lib.format.read_array(f)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # zip local file header; name and extra field lengths at 26..30
        f.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little")
               + int.from_bytes(local[28:30], "little"))
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: {key} holds Python objects; expected a uint8 image array")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


class ArrayImages(Dataset):
    """uint8 (N, H, W, 3) array -> items uint8 (3, H, W) tensors (torch-fidelity's input format)."""

    def __init__(self, arr: np.ndarray, source: str = "array"):
        arr = np.asarray(arr)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"{source}: expected uint8 images of shape (N, H, W, 3) (ADM arr_0), "
                             f"got {arr.dtype} {arr.shape}")
        self.arr = arr

    def __len__(self):
        return len(self.arr)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.arr[i])).permute(2, 0, 1)  # a copy: the array may be a read-only memmap


class FolderImages(Dataset):
    """Image files of a folder, as uint8 (3, H, W) tensors (RGB).

    A folder written by ``arzoo sample`` holds more than its samples (``grid.png``,
    ``samples.npz``): when it has that command's ``samples.json``, exactly the files it lists
    are read, in its order. Otherwise every PNG/JPEG (sorted by name; not recursive). Either
    way all images must have one size: a file of another size is named in the error instead
    of failing later inside torch.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.files = _listed_samples(self.folder)
        if self.files is None:
            self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in _IMAGE_EXT)
        if not self.files:
            raise ValueError(f"{folder}: no {'/'.join(e[1:] for e in _IMAGE_EXT)} images in this folder")
        _check_same_size(self.files, self.folder)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


SAMPLES_MANIFEST = "samples.json"  # written by ``arzoo sample`` (sample/cli.py)


def _listed_samples(folder: Path) -> list[Path] | None:
    """The sample files ``folder/samples.json`` lists (``{"samples": [{"file": ...}, ...]}``, as
    ``arzoo sample`` writes it, GenEval layout included), or None when there is no such file."""
    import json

    path = folder / SAMPLES_MANIFEST
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); fix or remove it to read every image of {folder}") from None
    samples = meta.get("samples") if isinstance(meta, dict) else None
    if not isinstance(samples, list) or not all(isinstance(s, dict) and isinstance(s.get("file"), str)
                                                for s in samples):
        return None  # some other samples.json: not arzoo's manifest
    root, files = folder.resolve(), []
    for s in samples:
        f = folder / s["file"]
        if not f.resolve().is_relative_to(root):
            raise ValueError(f"{path}: lists {s['file']!r}, which is outside {folder}")
        if not f.is_file():
            raise ValueError(f"{path}: lists {s['file']!r}, but {f} does not exist")
        files.append(f)
    return files


def _check_same_size(files: list[Path], folder: Path) -> None:
    """Refuse a folder whose images differ in size, naming the first odd file (reads headers only)."""
    from collections import Counter

    from PIL import Image, UnidentifiedImageError

    sizes = []
    for f in files:
        try:
            with Image.open(f) as im:
                sizes.append(im.size)
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"{f}: cannot read this image ({e})") from None
    (common, n), = Counter(sizes).most_common(1)
    for f, size in zip(files, sizes):
        if size != common:
            hint = " (arzoo sample's grid.png, not a sample)" if f.name == "grid.png" else ""
            raise ValueError(f"{f}: {size[0]}x{size[1]} image{hint}, but {n} of the {len(files)} images in "
                             f"{folder} are {common[0]}x{common[1]}; remove it or pass the samples' .npz")


class ShapesImages(Dataset):
    """The Shapes dataset rendered as uint8 (3, H, W) tensors."""

    def __init__(self, split: str, num: int, resolution: int = 64, objects=1):
        from zoo.data.shapes import ShapesDataset

        self.ds = ShapesDataset(split, resolution, objects, length=num)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return torch.from_numpy(self.ds.sample(i)[0]).permute(2, 0, 1)


def parse_shapes(text: str, default_resolution: int = 64) -> dict:
    """``shapes:<split>[:N][:objects=A-B][:res=R]`` -> dict(split, num, objects, resolution)."""
    parts = text.split(":")
    if parts[0] != "shapes" or len(parts) < 2 or parts[1] not in ("train", "test"):
        raise ValueError(f"expected 'shapes:<train|test>[:N][:objects=1-4][:res=64]', got {text!r}")
    out = {"split": parts[1], "num": 10000, "objects": 1, "resolution": default_resolution}
    for p in parts[2:]:
        key, sep, val = p.partition("=")
        try:
            if not sep:
                out["num"] = int(p)
            elif key == "objects":
                lo, _, hi = val.partition("-")
                out["objects"] = (int(lo), int(hi)) if hi else int(lo)
            elif key in ("res", "resolution"):
                out["resolution"] = int(val)
            else:
                raise ValueError(key)
        except ValueError:
            raise ValueError(f"{text!r}: cannot read {p!r}; expected N, objects=A-B or res=R") from None
    if out["num"] < 1:
        raise ValueError(f"{text!r}: N must be >= 1")
    return out


def _image_size(ds: Dataset):
    return tuple(int(s) for s in ds[0].shape[1:]) if len(ds) else None


def open_images(source, *, default_resolution: int = 64) -> tuple[Dataset, dict]:
    """A torch-fidelity input Dataset (uint8 CHW items) and a description of it.

    ``source``: a folder, an ``.npz`` with ``arr_0``, ``shapes:...``, a uint8 NHWC array or
    tensor, or a Dataset of uint8 CHW tensors.
    """
    if isinstance(source, Dataset):
        ds, desc = source, {"source": type(source).__name__}
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        arr = source.numpy() if isinstance(source, torch.Tensor) else source
        ds, desc = ArrayImages(arr), {"source": "array"}
    else:
        s = str(source)
        if s.startswith("shapes:"):
            spec = parse_shapes(s, default_resolution)
            ds = ShapesImages(spec["split"], spec["num"], spec["resolution"], spec["objects"])
            desc = {"source": s, "dataset": spec}
        elif Path(s).is_dir():
            ds, desc = FolderImages(s), {"source": s}
        elif Path(s).is_file() and s.endswith(".npz"):
            with np.load(s) as z:
                if "arr_0" not in z:
                    what = "a statistics file (mu/sigma): pass it as the reference (--ref)" \
                        if "mu" in z else f"keys {sorted(z.keys())}"
                    raise ValueError(f"{s}: no arr_0 images in this npz; it holds {what}")
            ds = ArrayImages(npz_array(s, "arr_0"), s)
            desc = {"source": s}
        elif Path(s).exists():
            raise ValueError(f"{s}: expected a folder of images, an .npz with arr_0, or shapes:<split>[:N]")
        else:
            raise ValueError(f"{s}: no such file or folder (expected a folder of images, an .npz with arr_0, "
                             f"or shapes:<split>[:N])")
    if len(ds) < 2:
        raise ValueError(f"{desc['source']}: need at least 2 images, got {len(ds)}")
    desc["num_images"] = len(ds)
    desc["image_size"] = _image_size(ds)
    return ds, desc


def add_probe_args(p, *, images: int, png_help: str, show_help: str, seed_help: str | None = None) -> None:
    """The options every reconstruction probe on held-out Shapes images takes (``eval.comit_crops``,
    ``eval.decoder_steps``): the image batch, decode seed, device, attribute agreement and outputs."""
    p.add_argument("--images", type=int, default=images, help="Shapes test images")
    p.add_argument("--num-objects", default="1-4", help="Shapes objects per image: N or MIN-MAX")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-attributes", action="store_true", help="skip the Shapes attribute agreement")
    p.add_argument("--png", metavar="PATH", help=png_help)
    p.add_argument("--show", type=int, default=4, help=show_help)
    p.add_argument("--json", metavar="PATH", help="write the report here")


def shapes_test_batch(num: int, num_objects=1, resolution: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num`` Shapes test-split images as one float tensor in [-1, 1] ``(num, 3, R, R)``
    and their class labels ``(num,)`` (-1 for multi-object scenes, as the dataset gives them)."""
    from zoo.data.shapes import ShapesDataset

    ds = ShapesDataset("test", resolution=resolution, num_objects=num_objects, length=num)
    items = [ds[i] for i in range(num)]
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])
