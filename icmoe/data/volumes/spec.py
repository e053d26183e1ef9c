"""What each 3-D dataset is (`VolumeDatasetSpec`, `VOLUME_DATASETS`), a volume on disk (`Case`) and read
(`Volume`). docs/datasets-3d.md has every decision."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from icmoe.core.errors import DataError


@dataclass(frozen=True)
class VolumeDatasetSpec:
    """What a 3-D dataset holds and how its files are read.

    Attributes:
      name: registry key ("acdc", "btcv", "mmwhs", "synapse", "synthetic3d").
      classes: foreground class names; class k (1-based) is label value k in `Volume.label`, 0 is background.
      modality: "ct" or "mri".
      image_size: the paper's square input side for this dataset.
      layout: the folder layout its cases are listed from ("acdc", "btcv", "mmwhs", "synapse"; "" = name).
      window: raw (low, high) mapped linearly to 0..255 with clipping; None: each slice's own min..max.
      label_values: the raw label value of each class where files do not store 1..C (MMWHS); None: 1..C.
    """

    name: str
    classes: Tuple[str, ...]
    modality: str
    image_size: int
    layout: str = ""
    window: Optional[Tuple[float, float]] = None
    label_values: Optional[Tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if self.modality not in ("ct", "mri"):
            raise ValueError(f"{self.name}: modality must be 'ct' or 'mri', got {self.modality!r}")
        if self.label_values is not None and len(self.label_values) != len(self.classes):
            raise ValueError(f"{self.name}: {len(self.label_values)} label values for {len(self.classes)} classes")
        if self.window is not None and not self.window[0] < self.window[1]:
            raise ValueError(f"{self.name}: window {self.window} is empty")


VOLUME_DATASETS: Dict[str, VolumeDatasetSpec] = {
    "acdc": VolumeDatasetSpec("acdc", ("RV", "MYO", "LV"), "mri", 256),
    "btcv": VolumeDatasetSpec(
        "btcv",
        ("spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
         "inferior vena cava", "portal and splenic veins", "pancreas", "right adrenal gland", "left adrenal gland"),
        "ct", 256, window=(-150.0, 500.0)),
    "mmwhs": VolumeDatasetSpec(
        "mmwhs", ("MYO", "LA", "LV", "RA", "RV", "AA", "PA"), "ct", 256,
        window=(-750.0, 750.0), label_values=(205, 420, 500, 550, 600, 820, 850)),
    # TransUNet's release stores images already windowed to [0, 1]: the window (0, 1) is "x 255".
    "synapse": VolumeDatasetSpec(
        "synapse", ("aorta", "gallbladder", "spleen", "left kidney", "right kidney", "liver", "pancreas", "stomach"),
        "ct", 224, window=(0.0, 1.0)),
    "synthetic3d": VolumeDatasetSpec("synthetic3d", ("disc", "ring", "bar"), "mri", 128, layout="acdc"),
}


TITLES = {"acdc": "ACDC", "btcv": "BTCV", "mmwhs": "MMWHS", "synapse": "Synapse"}


@dataclass(frozen=True)
class Case:
    """One volume on disk.

    `image` is the image file (Synapse training cases: the pattern `train_npz/caseNNNN_slice*.npz`
    of its slice files); `label` the label file (the same file for Synapse), None for an unlabelled case.
    """

    dataset: str
    name: str
    image: Path
    label: Optional[Path]


@dataclass
class Volume:
    """A volume in memory, slices first.

    Attributes:
      name: case name, e.g. "patient001_frame01", "img0001", "case0008".
      image: float32 (Z, H, W), mapped to 0..255 by the dataset's intensity rule.
      label: uint8 (Z, H, W), class indices 0..C; None for an unlabelled case.
      spacing: mm per voxel along (Z, H, W); None where the file has none (h5/npz).
      affine: (4, 4) NIfTI affine of the source file; None for h5/npz.
      source: path of the image file.
    """

    name: str
    image: np.ndarray
    label: Optional[np.ndarray]
    spacing: Optional[Tuple[float, float, float]]
    affine: Optional[np.ndarray]
    source: str


def get_volume_spec(name: str) -> VolumeDatasetSpec:
    """The registered spec of a 3-D dataset, or a DataError listing the known names."""
    if name not in VOLUME_DATASETS:
        raise DataError(f"unknown 3-D dataset {name!r}; choose from {', '.join(VOLUME_DATASETS)}")
    return VOLUME_DATASETS[name]
