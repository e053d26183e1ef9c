"""A case read into a `Volume`: NIfTI, HDF5 and npz files, labels mapped to 0..C, images to 0..255.

Axis order: NIfTI arrays are (X, Y, Z) and slices are along Z, so a `Volume` holds
`np.moveaxis(a, -1, 0)` = (Z, X, Y) with spacing (dz, dx, dy); `to_nifti_order` is the inverse.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from pathlib import Path
from typing import List, Optional, Tuple

import h5py
import nibabel as nib
import numpy as np
from tqdm import tqdm

from icmoe.core.errors import DataError, first_line
from icmoe.core.io import PathLike
from icmoe.data.images import from_nifti_order as _from_nifti_order
from icmoe.data.images import load_nifti, scale_to_0_255
from icmoe.data.volumes.layouts import SYNAPSE_SLICE, list_cases
from icmoe.data.volumes.spec import TITLES, Case, Volume, VolumeDatasetSpec, get_volume_spec

log = logging.getLogger("icmoe.data.volumes")

SYNAPSE_RANGE_TOLERANCE = 1e-4  # TransUNet's images are exactly [0, 1]; allow rounding only


# What numpy's npz and h5py raise on a damaged, truncated or foreign file.
_NPZ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


_H5_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError)


def _values_text(values: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(v)) if float(v).is_integer() else f"{float(v):g}" for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _class_labels(arr: np.ndarray, spec: VolumeDatasetSpec, path: Path) -> np.ndarray:
    """A label file's values as class indices, uint8, same shape; DataError naming any value that is no class."""
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: label data type {arr.dtype} is not numeric")
    if arr.dtype.kind == "f" and not (np.isfinite(arr).all() and np.array_equal(arr, np.rint(arr))):
        odd = np.unique(arr[~np.isfinite(arr) | (arr != np.rint(arr))])
        raise DataError(f"{path}: non-integer label values {_values_text(odd)}")
    n = len(spec.classes)
    if spec.label_values is None:
        if arr.size == 0 or (arr.min() >= 0 and arr.max() <= n):
            return arr.astype(np.uint8)
        bad = np.unique(arr[(arr < 0) | (arr > n)])
        raise DataError(f"{path}: label values {_values_text(bad)} outside 0..{n} ({spec.name} has {n} classes)")
    out = np.zeros(arr.shape, dtype=np.uint8)
    for k, value in enumerate(spec.label_values, start=1):  # one pass per class: no int64 copy of a big volume
        out[arr == value] = k
    stray = (out == 0) & (arr != 0)
    if stray.any():
        allowed = ", ".join(map(str, (0,) + spec.label_values))
        raise DataError(f"{path}: label values {_values_text(np.unique(arr[stray]))} are not "
                        f"{TITLES.get(spec.name, spec.name)} labels ({allowed})")
    return out


def _as_3d(arr: np.ndarray, path: Path) -> np.ndarray:
    """Drop trailing length-1 axes ((X, Y, Z, 1) files exist); anything else than 3-D is an error."""
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {arr.shape}")
    return arr


def _load_nifti(path: Path, what: str, label: bool) -> Tuple[np.ndarray, nib.Nifti1Image]:
    """The data of a NIfTI file ((X, Y, Z); float32 image with scaling applied, or the label's stored values)."""
    arr, img = load_nifti(path, what, label)
    return _as_3d(arr, path), img


def _spacing(img: nib.Nifti1Image) -> Optional[Tuple[float, float, float]]:
    """(dz, dx, dy) in the header's units (mm for these sets); None if the header has no valid voxel size."""
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    if len(zooms) < 3 or not all(np.isfinite(z) and z > 0 for z in zooms):
        return None
    return (zooms[2], zooms[0], zooms[1])


def _read_nifti_case(case: Case, spec: VolumeDatasetSpec):
    """(image (Z, X, Y) raw float32, label (Z, X, Y) uint8 or None, spacing, affine) of a NIfTI case."""
    image, img = _load_nifti(case.image, "image", label=False)
    label = None
    if case.label is not None:
        raw, _ = _load_nifti(case.label, "label", label=True)
        if raw.shape != image.shape:
            raise DataError(f"{case.label}: label shape {raw.shape} differs from image shape {image.shape} "
                            f"({case.image.name})")
        label = _from_nifti_order(_class_labels(raw, spec, case.label))
    return _from_nifti_order(image), label, _spacing(img), np.array(img.affine, dtype=np.float64)


def _check_unit_range(image: np.ndarray, path: Path) -> None:
    """TransUNet's Synapse images are in [0, 1]; raw HU (or another scaling) would be silently clipped."""
    lo, hi = float(image.min()), float(image.max())
    if lo < -SYNAPSE_RANGE_TOLERANCE or hi > 1 + SYNAPSE_RANGE_TOLERANCE:
        raise DataError(f"{path}: image values span [{lo:.4g}, {hi:.4g}], expected [0, 1] "
                        "(TransUNet's preprocessed Synapse release)")


def _read_h5_case(case: Case, spec: VolumeDatasetSpec):
    """(image (Z, H, W) in [0, 1], label uint8, None, None) of a Synapse `test_vol_h5` volume."""
    path = case.image
    if not path.is_file():
        raise DataError(f"{path}: image file is missing")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label") if k not in f]
            if missing:
                raise DataError(f"{path}: no {missing[0]!r} dataset in the HDF5 file (has {sorted(f.keys())})")
            image = np.asarray(f["image"][()], dtype=np.float32)
            raw = np.asarray(f["label"][()])
    except DataError:
        raise
    except _H5_ERRORS as e:
        raise DataError(f"{path}: unreadable HDF5 file ({type(e).__name__}: {first_line(e)})") from None
    if image.ndim != 3 or not np.isfinite(image).all():
        raise DataError(f"{path}: expected a finite (Z, H, W) image, got shape {image.shape}")
    if raw.shape != image.shape:
        raise DataError(f"{path}: label shape {raw.shape} differs from image shape {image.shape}")
    _check_unit_range(image, path)
    return image, _class_labels(raw, spec, path), None, None


def _read_npz_slice(path: Path, spec: VolumeDatasetSpec) -> Tuple[np.ndarray, np.ndarray]:
    """image float32 (H, W) in [0, 1] and label uint8 (H, W) of one Synapse `train_npz` slice."""
    try:
        with np.load(path, allow_pickle=False) as z:
            image = np.asarray(z["image"], dtype=np.float32)
            raw = np.asarray(z["label"])
    except _NPZ_ERRORS as e:
        raise DataError(f"{path}: unreadable npz slice ({type(e).__name__}: {first_line(e)})") from None
    if image.ndim != 2 or raw.shape != image.shape or not np.isfinite(image).all():
        raise DataError(f"{path}: expected finite (H, W) image and label, got {image.shape} and {raw.shape}")
    _check_unit_range(image, path)
    return image, _class_labels(raw, spec, path)


def _read_npz_case(case: Case, spec: VolumeDatasetSpec):
    """(image (Z, H, W) in [0, 1], label uint8, None, None): a case's `train_npz` slices by slice number."""
    folder = case.image.parent
    numbered = sorted((int(m["z"]), folder / m.string) for m in map(SYNAPSE_SLICE.match, _slice_names(folder))
                      if m and m["case"] == case.name)
    if not numbered:
        raise DataError(f"{case.image}: no slice files")
    images, labels = [], []
    for _, path in numbered:
        image, label = _read_npz_slice(path, spec)
        if images and image.shape != images[0].shape:
            raise DataError(f"{path}: slice shape {image.shape} differs from {numbered[0][1].name} {images[0].shape}")
        images.append(image)
        labels.append(label)
    zs = [z for z, _ in numbered]
    if zs != list(range(zs[0], zs[0] + len(zs))):
        # The slices are still valid 2-D training data; the gap only matters to volume measures.
        log.warning(f"{case.image}: slice numbers {zs[0]}..{zs[-1]} have gaps ({len(zs)} slices)")
    return np.stack(images), np.stack(labels), None, None


def _slice_names(folder: Path) -> List[str]:
    try:
        return os.listdir(folder)
    except OSError as e:
        raise DataError(f"{folder}: unreadable folder ({type(e).__name__}: {first_line(e)})") from None


def map_to_0_255(image: np.ndarray, spec: VolumeDatasetSpec) -> np.ndarray:
    """Map a (Z, H, W) float32 image to 0..255 in place: the spec's window, or each slice's min..max (MRI)."""
    return scale_to_0_255(image, spec.window)


def read_volume(case: Case, spec: Optional[VolumeDatasetSpec] = None) -> Volume:
    """Read one case into memory.

    Arguments:
      case: from `list_cases`.
      spec: how to read it; default the registered spec of `case.dataset`.

    Returns:
      Volume: image float32 (Z, H, W) in 0..255, label uint8 (Z, H, W) in 0..C (or None), spacing, affine.
      Raises DataError "<file>: <why>" for a missing, damaged or inconsistent file.
    """
    spec = spec or get_volume_spec(case.dataset)
    name = case.image.name
    if "*" in name and name.endswith(".npz"):
        image, label, spacing, affine = _read_npz_case(case, spec)
    elif name.endswith(".h5"):
        image, label, spacing, affine = _read_h5_case(case, spec)
    elif name.endswith((".nii", ".nii.gz")):
        image, label, spacing, affine = _read_nifti_case(case, spec)
    else:
        raise DataError(f"{case.image}: unknown volume format (expected .nii, .nii.gz, .h5 or npz slices)")
    if not np.isfinite(image).all():
        raise DataError(f"{case.image}: image has NaN or infinite values")
    return Volume(case.name, map_to_0_255(image, spec), label, spacing, affine, str(case.image))


def load_volumes(
    name: str, root: PathLike, split: str, *, skip_bad: bool = False, progress: bool = True
) -> Tuple[List[Volume], List[Tuple[Case, str]]]:
    """Read every case of one split into memory.

    Arguments:
      name: a key of `VOLUME_DATASETS`.
      root: the data root.
      split: "train", "val" or "test".
      skip_bad: drop a case that cannot be read, with a warning, instead of raising on the first one.
      progress: show a progress bar.

    Returns:
      (volumes, skipped): the volumes in case order, and the (Case, reason) pairs that were dropped.
    """
    spec = get_volume_spec(name)
    volumes: List[Volume] = []
    skipped: List[Tuple[Case, str]] = []
    for case in tqdm(list_cases(name, root, split), desc=f"{name}/{split}", disable=not progress, leave=False):
        try:
            volumes.append(read_volume(case, spec))
        except DataError as e:
            if not skip_bad:
                raise
            log.warning(f"skipping {case.name}: {e}")
            skipped.append((case, str(e)))
    if not volumes:
        raise DataError(f"{root}: no usable {name} {split} volumes ({len(skipped)} skipped; first: {skipped[0][1]})")
    return volumes, skipped
