"""Datasets: readers for ISIC 2018, BUSI and GlaS, the synthetic lesion set, and 3-D volume sets.

`build_dataset(name, root, split, image_size=...)` reads one split into memory;
samples are float32 RGB images in 0..255 (the model normalises inside) and
binary float masks. See `icmoe.data.readers` for the layouts and split rules.

3-D (multi-class) sets: `build_slice_dataset(name, root, split, image_size=...)`
reads ACDC, BTCV, MMWHS, Synapse or the synthetic volume set and holds every
slice; `load_volumes` gives the volumes themselves. See `icmoe.data.volumes`
and docs/datasets-3d.md.
"""

from icmoe.core.lazy import lazy_exports

# Imported on first use: `icmoe.data.images` (prediction) must not import torch through the datasets.
_EXPORTS = {
    "SegmentationDataset": "icmoe.data.dataset",
    "build_dataset": "icmoe.data.dataset",
    "load_image": "icmoe.data.dataset",
    "load_mask": "icmoe.data.dataset",
    "DATASETS": "icmoe.data.readers",
    "DataError": "icmoe.core.errors",
    "Item": "icmoe.data.readers",
    "list_split": "icmoe.data.readers",
    "make_synthetic_dataset": "icmoe.data.synthetic",
    "synthetic_images": "icmoe.data.synthetic",
    "has_synthetic_volumes": "icmoe.data.synthetic_volumes",
    "make_synthetic_volumes": "icmoe.data.synthetic_volumes",
    "VOLUME_DATASETS": "icmoe.data.volumes",
    "Case": "icmoe.data.volumes",
    "SliceDataset": "icmoe.data.volumes",
    "Volume": "icmoe.data.volumes",
    "VolumeDatasetSpec": "icmoe.data.volumes",
    "build_slice_dataset": "icmoe.data.volumes",
    "list_cases": "icmoe.data.volumes",
    "load_volumes": "icmoe.data.volumes",
    "read_volume": "icmoe.data.volumes",
    "resize_image": "icmoe.data.volumes",
    "resize_label": "icmoe.data.volumes",
    "to_nifti_order": "icmoe.data.volumes",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

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
