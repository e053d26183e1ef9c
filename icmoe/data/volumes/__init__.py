"""3-D medical volumes for multi-class models: ACDC, BTCV, MMWHS, Synapse and the synthetic set.

    spec.py      what each dataset is (`VOLUME_DATASETS`), a case on disk, a volume read
    layouts.py   where each dataset's cases lie (its folder layout) and its splits (`list_cases`)
    read.py      a case read into a `Volume` (`read_volume`, `load_volumes`)
    slices.py    every slice of the volumes at the model's size, for training (`SliceDataset`)

docs/datasets-3d.md has the layouts, splits, label values, windows and axis order.
"""

from icmoe.data.images import resize_image, resize_label, to_nifti_order
from icmoe.data.volumes.layouts import SPLIT_FILE, VOLUME_SPLITS, list_cases
from icmoe.data.volumes.read import load_volumes, map_to_0_255, read_volume
from icmoe.data.volumes.slices import SliceDataset, build_slice_dataset
from icmoe.data.volumes.spec import VOLUME_DATASETS, Case, Volume, VolumeDatasetSpec, get_volume_spec

__all__ = ["SPLIT_FILE", "VOLUME_DATASETS", "VOLUME_SPLITS", "Case", "SliceDataset", "Volume", "VolumeDatasetSpec",
           "build_slice_dataset", "get_volume_spec", "list_cases", "load_volumes", "map_to_0_255", "read_volume",
           "resize_image", "resize_label", "to_nifti_order"]
