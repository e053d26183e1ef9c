"""Datasets: readers for ISIC 2018, BUSI and GlaS, the synthetic lesion set, and 3-D volume sets.

`build_dataset(name, root, split, image_size=...)` reads one split into memory;
samples are float32 RGB images in 0..255 (the model normalises inside) and
binary float masks. See `icmoe.data.readers` for the layouts and split rules.

3-D (multi-class) sets: `build_slice_dataset(name, root, split, image_size=...)`
reads ACDC, BTCV, MMWHS, Synapse or the synthetic volume set and holds every
slice; `load_volumes` gives the volumes themselves. See `icmoe.data.volumes`
and docs/datasets-3d.md.
"""

from icmoe.data.dataset import SegmentationDataset, build_dataset, load_image, load_mask
from icmoe.data.readers import DATASETS, DataError, Item, list_split
from icmoe.data.synthetic import make_synthetic_dataset, synthetic_images
from icmoe.data.synthetic_volumes import has_synthetic_volumes, make_synthetic_volumes
from icmoe.data.volumes import (
    VOLUME_DATASETS,
    Case,
    SliceDataset,
    Volume,
    VolumeDatasetSpec,
    build_slice_dataset,
    list_cases,
    load_volumes,
    read_volume,
    resize_image,
    resize_label,
    to_nifti_order,
)

__all__ = [
    "DATASETS",
    "VOLUME_DATASETS",
    "Case",
    "DataError",
    "Item",
    "SegmentationDataset",
    "SliceDataset",
    "Volume",
    "VolumeDatasetSpec",
    "build_dataset",
    "build_slice_dataset",
    "has_synthetic_volumes",
    "list_cases",
    "list_split",
    "load_image",
    "load_mask",
    "load_volumes",
    "make_synthetic_dataset",
    "make_synthetic_volumes",
    "read_volume",
    "resize_image",
    "resize_label",
    "synthetic_images",
    "to_nifti_order",
]
