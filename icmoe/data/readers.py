"""Readers for the public layouts of ISIC 2018 Task 1, BUSI and GlaS, and their splits.

Details: docs/training.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from icmoe.core.errors import DataError
from icmoe.core.io import PathLike

SPLITS = ("train", "val")
SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class Item:
    name: str  # image path relative to the data root (stable id, used by split.json)
    image: Path  # image file
    masks: Tuple[Path, ...]  # mask files; the ground truth is their union
    binarize: str = "half"  # "half": > half the mask's maximum; "nonzero": instance labels > 0


def _find_dir(root: Path, name: str) -> Optional[Path]:
    """`root/name`, `root` itself if so named, or the first `name` folder two levels down."""
    if (root / name).is_dir():
        return root / name
    if root.name == name and root.is_dir():
        return root
    for child in sorted(p for p in root.glob("*/" + name) if p.is_dir()):
        return child
    for child in sorted(p for p in root.glob("*/*/" + name) if p.is_dir()):
        return child
    return None


def _require_dir(root: Path, name: str, dataset: str) -> Path:
    if not root.is_dir():
        raise DataError(f"{root}: data root does not exist")
    found = _find_dir(root, name)
    if found is None:
        raise DataError(f"{root}: no {name!r} folder found for dataset {dataset!r}")
    return found


def _rel(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def list_isic(root: PathLike) -> List[Item]:
    """ISIC 2018 Task 1 training images with their segmentation masks, sorted by name."""
    root = Path(root)
    images = _require_dir(root, "ISIC2018_Task1-2_Training_Input", "isic")
    truth = _require_dir(root, "ISIC2018_Task1_Training_GroundTruth", "isic")
    items = []
    for img in sorted(images.glob("ISIC_*.jpg")):
        items.append(Item(_rel(root, img), img, (truth / f"{img.stem}_segmentation.png",)))
    if not items:
        raise DataError(f"{images}: no ISIC_*.jpg images")
    return items


_BUSI_MASK = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<n>\d+))?$")


def list_busi(root: PathLike, classes: Sequence[str] = ("benign", "malignant")) -> List[Item]:
    """BUSI images of `classes` with all their `_mask*.png` files, sorted by class then name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root does not exist")
    base = _find_dir(root, "Dataset_BUSI_with_GT") or root
    items = []
    for cls in classes:
        folder = base / cls
        if not folder.is_dir():
            raise DataError(f"{root}: no {cls!r} folder found for dataset 'busi' (expected {folder})")
        masks: Dict[str, List[Tuple[int, Path]]] = {}
        images = []
        for f in sorted(folder.glob("*.png")):
            m = _BUSI_MASK.match(f.stem)
            if m:
                masks.setdefault(m["stem"], []).append((int(m["n"] or 0), f))
            else:
                images.append(f)
        for img in sorted(images, key=_natural_key):
            found = tuple(p for _, p in sorted(masks.get(img.stem, [])))
            # A missing mask is reported when the item is loaded (or skipped with --skip-bad).
            items.append(Item(_rel(root, img), img, found or (folder / f"{img.stem}_mask.png",)))
    if not items:
        raise DataError(f"{root}: no BUSI images in {', '.join(classes)}")
    return items


def list_glas(root: PathLike) -> List[Item]:
    """GlaS images (`train_*`, `testA_*`, `testB_*` .bmp) with their `_anno.bmp` instance labels."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root does not exist")
    folder = next((d for d in [root, *sorted(root.glob("*")), *sorted(root.glob("*/*"))]
                   if d.is_dir() and any(d.glob("train_*_anno.bmp"))), None)
    if folder is None:
        raise DataError(f"{root}: no GlaS train_*_anno.bmp files found for dataset 'glas'")
    items = []
    for img in sorted(folder.glob("*.bmp"), key=_natural_key):
        if img.stem.endswith("_anno") or not img.stem.startswith(("train_", "testA_", "testB_")):
            continue
        items.append(Item(_rel(root, img), img, (folder / f"{img.stem}_anno.bmp",), binarize="nonzero"))
    return items


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def seeded_split(items: List[Item], n_val: int, seed: int = 0) -> Dict[str, List[Item]]:
    """Permute `items` (in their listed order) with `default_rng(seed)`; the first `n_val` are validation."""
    perm = np.random.default_rng(seed).permutation(len(items))
    val_idx = set(perm[:n_val].tolist())
    return {
        "train": [it for i, it in enumerate(items) if i not in val_idx],
        "val": [it for i, it in enumerate(items) if i in val_idx],
    }


def isic_split(items: List[Item]) -> Dict[str, List[Item]]:
    return seeded_split(items, len(items) * 3 // 10)  # 7:3, 2694 -> 1886 / 808


def busi_split(items: List[Item]) -> Dict[str, List[Item]]:
    return seeded_split(items, len(items) // 4)  # 3:1, 647 -> 486 / 161


def glas_split(items: List[Item]) -> Dict[str, List[Item]]:
    return {
        "train": [it for it in items if it.image.stem.startswith("train_")],
        "val": [it for it in items if it.image.stem.startswith(("testA_", "testB_"))],
    }


def split_from_file(root: Path, items: List[Item]) -> Dict[str, List[Item]]:
    """Split by `root/split.json`; every name it lists must be a listed item."""
    path = root / SPLIT_FILE
    try:
        spec = json.loads(path.read_text())
        by_name = {it.name: it for it in items}
        out = {}
        for split in SPLITS:
            missing = [n for n in spec[split] if n not in by_name]
            if missing:
                raise DataError(f"{path}: {len(missing)} {split} image(s) not in the dataset, e.g. {missing[0]!r}")
            out[split] = [by_name[n] for n in spec[split]]
        return out
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: bad split file ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class DatasetSpec:
    lister: Callable[[Path], List[Item]]  # lists every item of the dataset
    splitter: Callable[[List[Item]], Dict[str, List[Item]]]  # the default train/val rule
    image_size: int  # the paper's input size for this dataset


DATASETS: Dict[str, DatasetSpec] = {
    "isic": DatasetSpec(list_isic, isic_split, 256),
    "busi": DatasetSpec(list_busi, busi_split, 256),
    "glas": DatasetSpec(list_glas, glas_split, 512),
    # The synthetic set is written in the BUSI layout with a split.json.
    "synthetic": DatasetSpec(list_busi, busi_split, 128),
}


def list_split(name: str, root: PathLike, split: str) -> List[Item]:
    """The items of one split of a dataset.

    Arguments:
      name: a key of `DATASETS` (isic, busi, glas, synthetic).
      root: the data root.
      split: "train" or "val".

    Returns:
      list of Item, in a deterministic order.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    root = Path(root)
    spec = DATASETS[name]
    items = spec.lister(root)
    splits = split_from_file(root, items) if (root / SPLIT_FILE).is_file() else spec.splitter(items)
    return splits[split]
