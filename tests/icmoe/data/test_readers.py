"""Dataset readers on small fixture trees in the real ISIC / BUSI / GlaS layouts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icmoe.data import (
    DataError,
    build_dataset,
    list_split,
    make_synthetic_dataset,
    synthetic_images,
)
from icmoe.data.readers import (
    busi_split,
    isic_split,
    list_busi,
    list_isic,
    seeded_split,
)

S = 32  # resize target in these tests


def _rgb(path: Path, w: int, h: int, value: int = 120, fmt: str | None = None) -> None:
    arr = np.full((h, w, 3), value, dtype=np.uint8)
    arr[: h // 2, :, 0] = 200
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path, format=fmt)


def _mask(path: Path, w: int, h: int, box, mode: str = "L") -> np.ndarray:
    """Rectangle mask (x0, y0, x1, y1) saved in `mode` ("1", "L", "RGB" or "P" labels)."""
    m = np.zeros((h, w), dtype=bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "1":
        Image.fromarray(m).convert("1").save(path)
    elif mode == "RGB":
        Image.fromarray(np.repeat(m[..., None].astype(np.uint8) * 255, 3, axis=2), "RGB").save(path)
    else:
        Image.fromarray(m.astype(np.uint8) * 255, "L").save(path)
    return m


@pytest.fixture(scope="module")
def busi_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("busi")
    base = root / "Dataset_BUSI_with_GT"
    for i in range(1, 6):
        _rgb(base / "benign" / f"benign ({i}).png", 64, 48)
        _mask(base / "benign" / f"benign ({i})_mask.png", 64, 48, (8, 8, 24, 24))
    # An extra lesion in a second mask file: the ground truth is the union.
    _mask(base / "benign" / "benign (2)_mask_1.png", 64, 48, (40, 30, 60, 44))
    # A grayscale image with a 1-bit mask, and an RGB mask.
    base.joinpath("malignant").mkdir(parents=True)
    Image.fromarray(np.full((48, 64), 90, np.uint8), "L").save(base / "malignant" / "malignant (1).png")
    _mask(base / "malignant" / "malignant (1)_mask.png", 64, 48, (0, 0, 32, 48), mode="1")
    _rgb(base / "malignant" / "malignant (2).png", 64, 48)
    _mask(base / "malignant" / "malignant (2)_mask.png", 64, 48, (32, 0, 64, 24), mode="RGB")
    _rgb(base / "malignant" / "malignant (3).png", 64, 48)
    _mask(base / "malignant" / "malignant (3)_mask.png", 64, 48, (0, 24, 64, 48))
    # The normal class is not used.
    _rgb(base / "normal" / "normal (1).png", 64, 48)
    _mask(base / "normal" / "normal (1)_mask.png", 64, 48, (0, 0, 1, 1))
    return root


def test_busi_lists_benign_and_malignant_with_all_masks(busi_root):
    items = list_busi(busi_root)
    assert len(items) == 8
    assert all("normal" not in it.name for it in items)
    two = next(it for it in items if it.name.endswith("benign (2).png"))
    assert [p.name for p in two.masks] == ["benign (2)_mask.png", "benign (2)_mask_1.png"]
    # Natural order: (2) before (10)-style names, benign before malignant.
    assert [it.name.split("/")[-1] for it in items[:3]] == ["benign (1).png", "benign (2).png", "benign (3).png"]


def test_busi_masks_merge_by_union_and_all_mask_kinds_load(busi_root):
    ds = build_dataset("busi", busi_root, "train", image_size=64, progress=False)
    ds_val = build_dataset("busi", busi_root, "val", image_size=64, progress=False)
    assert len(ds) + len(ds_val) == 8 and len(ds_val) == 8 // 4
    full = {it.name: (img, m) for d in (ds, ds_val) for img, m, it in
            ((d[i][0], d[i][1], d.items[i]) for i in range(len(d)))}
    img, m = full["Dataset_BUSI_with_GT/benign/benign (2).png"]
    # 64x48 -> 64x64: y scales by 4/3. Both rectangles are present.
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and float(img.max()) <= 255
    assert m.shape == (1, 64, 64) and set(np.unique(m.numpy())) == {0.0, 1.0}
    assert m[0, 20, 15] == 1 and m[0, 50, 50] == 1 and m[0, 60, 5] == 0
    # Grayscale image -> three equal channels; 1-bit mask covers the left half.
    img, m = full["Dataset_BUSI_with_GT/malignant/malignant (1).png"]
    assert np.array_equal(img[0].numpy(), img[1].numpy()) and float(img[0, 5, 5]) == 90.0
    assert float(m[0, :, :31].mean()) == 1.0 and float(m[0, :, 33:].sum()) == 0.0
    # RGB mask: top-right quarter.
    _, m = full["Dataset_BUSI_with_GT/malignant/malignant (2).png"]
    assert m[0, 5, 50] == 1 and m[0, 5, 10] == 0 and m[0, 50, 50] == 0


def test_splits_reproduce_the_published_counts():
    fake = list(range(2694))
    split = seeded_split(fake, 2694 * 3 // 10)  # the ISIC rule
    assert (len(split["train"]), len(split["val"])) == (1886, 808)
    assert (len(isic_split(list(range(2694)))["val"]), len(busi_split(list(range(647)))["val"])) == (808, 161)
    assert len(busi_split(list(range(647)))["train"]) == 486
    # Deterministic: the same seed gives the same split.
    assert seeded_split(fake, 808)["val"] == split["val"]
    assert seeded_split(fake, 808, seed=1)["val"] != split["val"]


def test_isic_layout_and_corrupt_files(tmp_path, caplog):
    inp = tmp_path / "ISIC2018_Task1-2_Training_Input"
    gt = tmp_path / "ISIC2018_Task1_Training_GroundTruth"
    for i in range(10):
        _rgb(inp / f"ISIC_{i:07d}.jpg", 40, 30, fmt="JPEG")
        _mask(gt / f"ISIC_{i:07d}_segmentation.png", 40, 30, (10, 10, 30, 20))
    (inp / "ISIC_0000003.jpg").write_bytes(b"\xff\xd8 not really a jpeg")  # corrupt image
    (gt / "ISIC_0000007_segmentation.png").unlink()  # missing mask
    items = list_isic(tmp_path)
    assert len(items) == 10
    train = [it.name for it in list_split("isic", tmp_path, "train")]
    val = [it.name for it in list_split("isic", tmp_path, "val")]
    assert len(val) == 3 and len(train) == 7 and not set(train) & set(val)
    bad_all = []
    for split in ("train", "val"):
        names = train if split == "train" else val
        bad = [n for n in names if "0000003" in n or "0000007" in n]
        bad_all += bad
        if bad:
            with pytest.raises(DataError) as err:
                build_dataset("isic", tmp_path, split, image_size=S, progress=False)
            assert "ISIC_000000" in str(err.value) and "\n" not in str(err.value)
            assert "unreadable image" in str(err.value) or "mask file is missing" in str(err.value)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="icmoe.data.dataset"):
            ds = build_dataset("isic", tmp_path, split, image_size=S, skip_bad=True, progress=False)
        assert len(ds) == len(names) - len(bad) and len(ds.skipped) == len(bad)
        assert len([r for r in caplog.records if "skipping" in r.getMessage()]) == len(bad)
    assert len(bad_all) == 2


def test_glas_bmp_instance_labels(tmp_path):
    folder = tmp_path / "Warwick QU Dataset (Released 2016_07_08)"
    for prefix, n in (("train", 4), ("testA", 2), ("testB", 1)):
        for i in range(1, n + 1):
            _rgb(folder / f"{prefix}_{i}.bmp", 50, 40, fmt="BMP")
            labels = np.zeros((40, 50), np.uint8)
            labels[5:15, 5:15] = 1  # gland 1
            labels[20:35, 30:45] = 7  # gland 7: a low label value that "> half max" would miss
            labels[20:35, 5:20] = 200
            Image.fromarray(labels, "L").save(folder / f"{prefix}_{i}_anno.bmp")
    tr = build_dataset("glas", tmp_path, "train", image_size=50, progress=False)
    te = build_dataset("glas", tmp_path, "val", image_size=50, progress=False)
    assert (len(tr), len(te)) == (4, 3)
    assert all(it.image.stem.startswith("test") for it in te.items)
    m = tr[0][1][0].numpy()
    # Nearest-ish resize 40 -> 50 rows: every labelled gland is foreground.
    assert m[12, 10] == 1 and m[30, 40] == 1 and m[34, 15] == 1 and m[2, 2] == 0


def test_split_file_and_errors(tmp_path, busi_root):
    with pytest.raises(DataError, match="does not exist"):
        list_split("busi", tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match="no 'ISIC2018_Task1-2_Training_Input' folder"):
        list_split("isic", tmp_path, "train")
    with pytest.raises(DataError, match="unknown dataset"):
        list_split("kvasir", tmp_path, "train")
    # A split.json in the root replaces the seeded rule.
    (tmp_path / "Dataset_BUSI_with_GT").symlink_to(busi_root / "Dataset_BUSI_with_GT")
    names = [it.name for it in list_busi(tmp_path)]
    (tmp_path / "split.json").write_text(json.dumps({"train": names[:2], "val": names[2:3]}))
    assert [it.name for it in list_split("busi", tmp_path, "train")] == names[:2]
    (tmp_path / "split.json").write_text(json.dumps({"train": ["nope.png"], "val": []}))
    with pytest.raises(DataError, match="not in the dataset"):
        list_split("busi", tmp_path, "train")


def test_synthetic_set_is_deterministic_and_read_back_exactly(tmp_path):
    x, m = synthetic_images(6, 48, seed=3)
    assert x.shape == (6, 3, 48, 48) and x.dtype == np.float32 and m.shape == (6, 1, 48, 48) and m.dtype == np.uint8
    assert 0 <= x.min() and x.max() <= 255 and np.array_equal(x, np.rint(x))
    frac = m.reshape(6, -1).mean(1)
    assert (frac > 0.02).all() and (frac < 0.4).all()
    # Image i depends only on (seed, i): a prefix is the same set; another seed differs.
    x2, m2 = synthetic_images(2, 48, seed=3)
    assert np.array_equal(x2, x[:2]) and np.array_equal(m2, m[:2])
    assert not np.array_equal(synthetic_images(2, 48, seed=4)[0], x2)
    # Lesions are darker than their surroundings (what a model has to learn).
    gray = x.mean(1, keepdims=True)
    assert all(gray[i][m[i] == 1].mean() < gray[i][m[i] == 0].mean() - 20 for i in range(6))
    split = make_synthetic_dataset(tmp_path, n_train=4, n_val=2, size=48, seed=3)
    assert len(split["train"]) == 4 and len(split["val"]) == 2
    tr = build_dataset("synthetic", tmp_path, "train", image_size=48, progress=False)
    va = build_dataset("synthetic", tmp_path, "val", image_size=48, progress=False)
    assert np.array_equal(tr.images.numpy(), x[:4].astype(np.uint8))
    assert np.array_equal(va.masks.numpy(), m[4:])
