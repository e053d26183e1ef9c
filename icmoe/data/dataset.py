"""Loading, resizing and holding segmentation samples in memory.

Details: docs/training.md.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm import tqdm

from icmoe.core.errors import DataError
from icmoe.core.io import PathLike
from icmoe.data.images import exif_oriented, model_input, read_image, resize_rgb
from icmoe.data.readers import Item, list_split

log = logging.getLogger(__name__)

_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


def load_image(path: Path, size: int) -> np.ndarray:
    """Decode an image file to RGB uint8 (size, size, 3), resized bilinearly.

    Read by `icmoe.data.images.read_image` (EXIF orientation applied, 16-bit gray mapped by its
    range, the first frame of a multi-frame file) and resized by `resize_rgb`, as prediction does.
    Float pictures (DICOM) are resized as float, then rounded: the dataset holds uint8.
    """
    pic = read_image(path)
    if pic.pixels.dtype == np.uint8:
        return resize_rgb(pic.pixels, size)
    return np.rint(model_input(pic, size).transpose(1, 2, 0)).astype(np.uint8)


def _mask_array(path: Path, binarize: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: mask file is missing")
    try:
        with Image.open(path) as im:
            im.load()
            im, _ = exif_oriented(im)  # turned like its image, which is read in a viewer's orientation
            if im.mode in ("RGB", "RGBA", "LA"):
                arr = np.asarray(im.convert("RGB")).max(axis=-1)  # any channel
            else:  # "1", "L", "P" (palette indices = labels), "I", "I;16"
                arr = np.asarray(im)
    except _READ_ERRORS as e:
        raise DataError(f"{path}: unreadable mask ({type(e).__name__}: {e})") from None
    if arr.ndim != 2:
        raise DataError(f"{path}: mask has shape {arr.shape}, expected a single-channel image")
    arr = arr.astype(np.float64)
    if binarize == "nonzero":
        return arr > 0
    top = arr.max()
    return arr > top / 2 if top > 0 else np.zeros(arr.shape, dtype=bool)


def load_mask(paths: Tuple[Path, ...], size: int, binarize: str = "half") -> np.ndarray:
    """Union of the binarised mask files, resized to (size, size) uint8 in {0, 1}."""
    union: Optional[np.ndarray] = None
    for p in paths:
        m = _mask_array(p, binarize)
        if union is not None and m.shape != union.shape:
            raise DataError(f"{p}: mask size {m.shape[::-1]} differs from {paths[0].name} {union.shape[::-1]}")
        union = m if union is None else union | m
    assert union is not None, "an item has at least one mask path"
    im = Image.fromarray(union.astype(np.uint8) * 255, mode="L")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return (np.asarray(im) >= 128).astype(np.uint8)


class SegmentationDataset(Dataset):
    """Images and binary masks of one split, decoded once and held in memory.

    `ds[i]` -> (image float32 (3, S, S) RGB 0..255, mask float32 (1, S, S) in {0, 1}, i).
    """

    def __init__(
        self,
        *,
        items: List[Item],
        image_size: int,
        skip_bad: bool = False,
        progress: bool = True,
        desc: str = "loading",
    ) -> None:
        self.image_size = image_size
        self.items: List[Item] = []
        self.skipped: List[Tuple[Item, str]] = []
        images, masks = [], []
        for item in tqdm(items, desc=desc, disable=not progress, leave=False):
            try:
                img = load_image(item.image, image_size)
                mask = load_mask(item.masks, image_size, item.binarize)
            except DataError as e:
                if not skip_bad:
                    raise
                log.warning(f"skipping {item.name}: {e}")
                self.skipped.append((item, str(e)))
                continue
            self.items.append(item)
            images.append(img)
            masks.append(mask)
        if not self.items:
            raise DataError(f"no usable images ({len(self.skipped)} skipped)" if self.skipped else "no images")
        self.images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S) uint8
        self.masks = torch.from_numpy(np.stack(masks))[:, None]  # (N, 1, S, S) uint8

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        return self.images[i].float(), self.masks[i].float(), i


def build_dataset(
    name: str,
    root: PathLike,
    split: str,
    *,
    image_size: int,
    skip_bad: bool = False,
    progress: bool = True,
) -> SegmentationDataset:
    """Read one split of a dataset into memory.

    Arguments:
      name: isic, busi, glas or synthetic (see `icmoe.data.readers`).
      root: the data root.
      split: "train" or "val".
      image_size: square side the images and masks are resized to.
      skip_bad: drop missing/unreadable files with a warning instead of raising.
      progress: show a progress bar.

    Returns:
      SegmentationDataset.
    """
    items = list_split(name, root, split)
    return SegmentationDataset(
        items=items, image_size=image_size, skip_bad=skip_bad, progress=progress, desc=f"{name}/{split}"
    )
