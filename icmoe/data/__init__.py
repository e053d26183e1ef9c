"""Datasets: readers for ISIC 2018, BUSI and GlaS, and the synthetic lesion set.

`build_dataset(name, root, split, image_size=...)` reads one split into memory;
samples are float32 RGB images in 0..255 (the model normalises inside) and
binary float masks. See `icmoe.data.readers` for the layouts and split rules.
"""

from icmoe.data.dataset import SegmentationDataset, build_dataset, load_image, load_mask
from icmoe.data.readers import DATASETS, DataError, Item, list_split
from icmoe.data.synthetic import make_synthetic_dataset, synthetic_images

__all__ = [
    "DATASETS",
    "DataError",
    "Item",
    "SegmentationDataset",
    "build_dataset",
    "list_split",
    "load_image",
    "load_mask",
    "make_synthetic_dataset",
    "synthetic_images",
]
