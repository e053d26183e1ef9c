"""Every slice of a list of volumes, resized to the model's input, for slice-by-slice training."""

from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from icmoe.core.errors import DataError
from icmoe.core.io import PathLike
from icmoe.data.images import resize_image, resize_label
from icmoe.data.volumes.read import load_volumes
from icmoe.data.volumes.spec import Case, Volume, get_volume_spec


def _check_sliceable(volume: Volume, n_classes: int) -> None:
    if volume.label is None:
        raise DataError(f"{volume.source}: volume {volume.name} has no label; a slice dataset needs labels")
    if volume.image.ndim != 3 or volume.label.shape != volume.image.shape:
        raise DataError(f"{volume.source}: image {volume.image.shape} and label {volume.label.shape} "
                        "are not matching (Z, H, W) arrays")
    if volume.label.size and int(volume.label.max()) > n_classes:
        raise DataError(f"{volume.source}: label value {int(volume.label.max())} outside 0..{n_classes}")


class SliceDataset(Dataset):
    """Every slice of every volume, resized to the model input and held in memory.

    `ds[i]` -> (image float32 (3, S, S) RGB 0..255 (the gray slice repeated), label int64 (S, S) in 0..C, i).
    Images are resized bilinearly, labels by nearest neighbour. `slices[i]` is (volume index, z) of item i,
    `volumes` the volumes themselves (for per-volume evaluation), `skipped` what `build_slice_dataset` dropped.
    """

    def __init__(
        self, volumes: List[Volume], *, image_size: int, classes: Tuple[str, ...], progress: bool = True
    ) -> None:
        if not volumes:
            raise DataError("no volumes to slice")
        if int(image_size) < 1:
            raise DataError(f"image_size must be >= 1, got {image_size}")
        self.volumes: List[Volume] = list(volumes)
        self.classes: Tuple[str, ...] = tuple(classes)
        self.image_size = int(image_size)
        self.skipped: List[Tuple[Case, str]] = []
        for volume in self.volumes:
            _check_sliceable(volume, len(self.classes))
        self.slices: List[Tuple[int, int]] = [(v, z) for v, vol in enumerate(self.volumes)
                                              for z in range(vol.image.shape[0])]
        s = self.image_size
        images = np.empty((len(self.slices), s, s), dtype=np.float32)
        labels = np.empty((len(self.slices), s, s), dtype=np.uint8)
        i = 0
        for vol in tqdm(self.volumes, desc="slices", disable=not progress, leave=False):
            for z in range(vol.image.shape[0]):
                images[i] = resize_image(vol.image[z], s)
                labels[i] = resize_label(vol.label[z], s)  # type: ignore[index]
                i += 1
        self.images = torch.from_numpy(images)  # (N, S, S) float32, one channel: RGB is made per item
        self.labels = torch.from_numpy(labels)  # (N, S, S) uint8

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        image = self.images[i].unsqueeze(0).repeat(3, 1, 1)  # (3, S, S): gray -> RGB
        return image, self.labels[i].long(), i


def build_slice_dataset(
    name: str,
    root: PathLike,
    split: str,
    *,
    image_size: int,
    skip_bad: bool = False,
    progress: bool = True,
) -> SliceDataset:
    """Read one split of a 3-D dataset and slice it for training.

    Arguments:
      name: a key of `VOLUME_DATASETS`.
      root: the data root.
      split: "train", "val" or "test".
      image_size: square side the slices are resized to.
      skip_bad: drop unreadable cases with a warning (listed in `.skipped`) instead of raising.
      progress: show progress bars.

    Returns:
      SliceDataset over the split's volumes, with the dataset's class names.
    """
    spec = get_volume_spec(name)
    volumes, skipped = load_volumes(name, root, split, skip_bad=skip_bad, progress=progress)
    ds = SliceDataset(volumes, image_size=image_size, classes=spec.classes, progress=progress)
    ds.skipped = skipped
    return ds
