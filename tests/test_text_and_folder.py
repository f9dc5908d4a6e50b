"""Caption vocabulary (zoo.data.text) and image folders with the ADM center crop."""
import numpy as np
import pytest
import torch
from PIL import Image

from zoo.data import shapes as S
from zoo.data import text
from zoo.data.imagefolder import ImageFolderDataset, center_crop_arr


# ---------------------------------------------------------------- text

def test_vocab_layout():
    assert text.VOCAB[text.PAD] == "<pad>" and text.VOCAB[text.UNK] == "<unk>"
    assert text.PAD == 0 and text.UNK == 1
    assert text.vocab_size() == len(text.VOCAB) == len(set(text.VOCAB))
    for w in list(S.COLORS) + list(S.SHAPES) + [s + "s" for s in S.SHAPES]:
        assert w in text.VOCAB, w
    for w in ("a", "an", "one", "two", "three", "four", "and", "left", "right", "of", "above", "below"):
        assert w in text.VOCAB, w


def test_every_dataset_caption_encodes_and_round_trips():
    caps = set()
    for n in (1, 2, 3, 4, (1, 4)):
        ds = S.ShapesDataset("train", 64, n, length=400)
        caps.update(ds.sample(i)[1] for i in range(400))
    caps.update(S.class_caption(c) for c in range(S.NUM_CLASSES))
    caps = sorted(caps)
    ids = text.encode(caps, max_len=16)
    assert ids.shape == (len(caps), 16) and ids.dtype == torch.long
    assert not (ids == text.UNK).any()
    assert text.decode(ids) == caps
    # the longest possible caption (4 different objects) still fits in 16 words
    longest = " and ".join(["an orange triangle"] * 4)
    assert len(text.tokenize(longest)) <= 16


def test_encode_details():
    ids = text.encode(["A Red, circle", "a mauve blob"], max_len=5)
    assert ids[0].tolist() == [text.WORD_TO_ID["a"], text.WORD_TO_ID["red"], text.WORD_TO_ID["circle"], 0, 0]
    assert ids[1, 1] == text.UNK and ids[1, 2] == text.UNK
    assert text.decode(ids[0]) == ["a red circle"]
    assert text.encode("two blue squares", max_len=3).shape == (1, 3)
    with pytest.raises(ValueError, match="max_len"):
        text.encode(["a red circle and a blue square"], max_len=4)
    cut = text.encode(["a red circle and a blue square"], max_len=4, truncate=True)
    assert text.decode(cut) == ["a red circle and"]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        text.decode(torch.tensor([[2, 999]]))


# ---------------------------------------------------------------- center crop

def _marked(w, h):
    """Grey image with a red block at the centre and green bands at the far ends of the long side."""
    a = np.full((h, w, 3), 100, np.uint8)
    cy, cx = h // 2, w // 2
    a[cy - h // 8:cy + h // 8, cx - h // 8:cx + h // 8] = (255, 0, 0)
    if w > h:
        a[:, :w // 10] = (0, 255, 0)
        a[:, -(w // 10):] = (0, 255, 0)
    else:
        a[:h // 10] = (0, 255, 0)
        a[-(h // 10):] = (0, 255, 0)
    return Image.fromarray(a)


@pytest.mark.parametrize("w,h,size", [(300, 200, 64), (200, 300, 64), (1000, 600, 64), (40, 30, 64),
                                      (256, 256, 64)])
def test_center_crop_arr(w, h, size):
    out = center_crop_arr(_marked(w, h), size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    c = out[size // 2, size // 2].astype(int)
    assert c[0] > 200 and c[1] < 60 and c[2] < 60, c  # the centre marker stays at the centre
    # the red block is centred: its columns/rows are symmetric about the middle (within 1 px)
    red = (out[..., 0] > 200) & (out[..., 1] < 60)
    ys, xs = np.nonzero(red)
    assert abs((xs.min() + xs.max()) / 2 - (size - 1) / 2) <= 1
    assert abs((ys.min() + ys.max()) / 2 - (size - 1) / 2) <= 1
    if w != h:  # the bands at the ends of the long side are cropped away
        assert not ((out[..., 1] > 200) & (out[..., 0] < 60)).any()


def test_center_crop_box_downsampling_matches_manual():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (520, 700, 3), dtype=np.uint8))
    out = center_crop_arr(img, 64)
    # short side 520 -> 260 -> 130 -> 65 (BOX halvings while >= 2 * 64), then BICUBIC to 64
    ref = img.resize((350, 260), Image.BOX).resize((175, 130), Image.BOX).resize((87, 65), Image.BOX)
    ref = np.asarray(ref.resize((round(87 * 64 / 65), 64), Image.BICUBIC))
    left = (ref.shape[1] - 64) // 2
    np.testing.assert_array_equal(out, ref[:, left:left + 64])


# ---------------------------------------------------------------- image folder

def _save(path, color, size=(40, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), color, np.uint8)).save(path, format=fmt)


def test_image_folder(tmp_path):
    _save(tmp_path / "cats" / "a.png", (255, 0, 0))
    _save(tmp_path / "cats" / "nested" / "b.JPG", (250, 0, 0), fmt="JPEG")
    _save(tmp_path / "dogs" / "c.jpeg", (0, 0, 255), fmt="JPEG")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, 16)
    assert len(ds) == 3 and ds.classes == ["cats", "dogs"] and ds.num_classes == 2
    items = [ds[i] for i in range(3)]
    assert [it["label"] for it in items] == [0, 0, 1]
    for it in items:
        assert it["image"].shape == (3, 16, 16) and it["image"].dtype == torch.float32
        assert -1 <= it["image"].min() and it["image"].max() <= 1 and it["caption"] == ""
    assert items[0]["image"][0].mean() > 0.9 and items[2]["image"][2].mean() > 0.9
    flat = ImageFolderDataset(tmp_path, 16, labels_from_subdirs=False)
    assert [flat[i]["label"] for i in range(3)] == [0, 0, 0]


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path, 16)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ImageFolderDataset(tmp_path / "missing", 16)
    _save(tmp_path / "loose.png", (0, 0, 0))
    assert ImageFolderDataset(tmp_path, 16)[0]["label"] == 0  # no subfolders: label 0
    _save(tmp_path / "sub" / "x.png", (0, 0, 0))
    with pytest.raises(ValueError, match="directly in the root"):
        ImageFolderDataset(tmp_path, 16)
