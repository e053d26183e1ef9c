"""3-D medical volumes for multi-class models: ACDC, BTCV, MMWHS, Synapse and the synthetic set.

A reader lists `Case`s (one volume on disk), `read_volume` turns a case into a
`Volume` (image mapped to 0..255, label as class indices 0..C, spacing,
affine), and `SliceDataset` holds every slice of a list of volumes, resized to
the model's input, for slice-by-slice training. Volumes are evaluated whole.

Layouts (the case folders are found at the data root or up to `SEARCH_DEPTH`
folders below it, shallowest first, hidden folders skipped):

- ACDC (cine MRI, RV/MYO/LV): `database/{training,testing}/patientNNN/patientNNN_frameMM.nii.gz`
  with `patientNNN_frameMM_gt.nii.gz`; only frames with a `_gt` file are cases.
- BTCV (CT, 13 organs): `img/imgNNNN.nii.gz` with `label/labelNNNN.nii.gz`.
- MMWHS (CT, 7 heart structures): `ct_train_NNNN_image.nii.gz` with `ct_train_NNNN_label.nii.gz`;
  label values 205, 420, 500, 550, 600, 820, 850 become 1..7.
- Synapse (TransUNet's preprocessed CT, 8 organs): `train_npz/caseNNNN_sliceNNN.npz` grouped into
  volumes by case, `test_vol_h5/caseNNNN.npy.h5` for the test split.
- synthetic3d: written by `icmoe.data.synthetic_volumes` in the ACDC layout.

Splits: "test" is the published test split (ACDC `testing`, the last 6 of BTCV's 30 and the
last 4 of MMWHS's 20 sorted cases, Synapse's `test_vol_h5`); "val" is a seeded choice
(`numpy.random.default_rng(0)`) of max(1, round(0.2 n)) of the n training cases (ACDC: of
patients, both frames together); "train" is the rest. A `split.json` in the data root
({"train": [...], "val": [...], "test": [...]}, case names) overrides the rule.

Axis order: NIfTI arrays are (X, Y, Z) and slices are along Z, so a `Volume` holds
`np.moveaxis(a, -1, 0)` = (Z, X, Y) with spacing (dz, dx, dy); `to_nifti_order` is the inverse,
so a prediction can be saved with the source affine. docs/datasets-3d.md has every decision.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import h5py
import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from icmoe.core.errors import first_line
from icmoe.core.io import PathLike
from icmoe.data.images import (  # noqa: F401 (to_nifti_order, resize_image, resize_label re-exported)
    from_nifti_order as _from_nifti_order,
    load_nifti,
    resize_image,
    resize_label,
    scale_to_0_255,
    to_nifti_order,
)
from icmoe.data.readers import DataError

log = logging.getLogger(__name__)

VOLUME_SPLITS = ("train", "val", "test")
SPLIT_FILE = "split.json"
SEARCH_DEPTH = 6  # "anywhere below the root", bounded so that a wrong root (say /) fails fast
VAL_FRACTION = 0.2
VAL_SEED = 0
SYNAPSE_RANGE_TOLERANCE = 1e-4  # TransUNet's images are exactly [0, 1]; allow rounding only

# What numpy's npz and h5py raise on a damaged, truncated or foreign file.
_NPZ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)
_H5_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError)


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

_TITLES = {"acdc": "ACDC", "btcv": "BTCV", "mmwhs": "MMWHS", "synapse": "Synapse"}


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


# ----------------------------------------------------------------------------- finding and listing cases


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _subdirs(folder: Path) -> List[Path]:
    """Visible sub-folders of `folder`, naturally sorted; hidden ones (temporary sets) are skipped."""
    try:
        with os.scandir(folder) as it:
            names = [e.name for e in it if e.is_dir() and not e.name.startswith(".")]
    except OSError:
        return []
    return [folder / n for n in sorted(names, key=_natural_key)]


def _matching(folder: Path, pattern: re.Pattern, dirs: bool = False) -> List[Path]:
    """Entries of `folder` whose name matches `pattern` (folders if `dirs`, else files), naturally sorted."""
    try:
        with os.scandir(folder) as it:
            names = [e.name for e in it if pattern.match(e.name) and e.is_dir() == dirs]
    except OSError:
        return []
    return [folder / n for n in sorted(names, key=_natural_key)]


def _find_dir(root: Path, accept: Callable[[Path], bool]) -> Optional[Path]:
    """The shallowest folder at or below `root` (at most SEARCH_DEPTH levels) that `accept`s, first by name."""
    level = [root]
    for _ in range(SEARCH_DEPTH + 1):
        for folder in level:
            if accept(folder):
                return folder
        level = [sub for folder in level for sub in _subdirs(folder)]
    return None


def _nifti_file(folder: Path, stem: str) -> Optional[Path]:
    """`folder/stem.nii.gz` or `folder/stem.nii`, whichever exists."""
    for suffix in (".nii.gz", ".nii"):
        if (folder / (stem + suffix)).is_file():
            return folder / (stem + suffix)
    return None


def _no_cases(root: Path, dataset: str, expected: str) -> DataError:
    return DataError(f"{root}: no {_TITLES.get(dataset, dataset)} cases (expected {expected})")


_ACDC_PATIENT = re.compile(r"^patient\d+$")
_ACDC_FRAME = re.compile(r"^(?P<name>patient\d+_frame\d+)\.nii(?:\.gz)?$")


def _acdc_pool(root: Path, dataset: str, pool: str) -> List[Case]:
    """ACDC frames with a `_gt` label: `training` (pool "train") or `testing` (pool "test")."""
    folder_name = "training" if pool == "train" else "testing"
    folder = _find_dir(root, lambda d: d.name == folder_name and bool(_matching(d, _ACDC_PATIENT, dirs=True)))
    cases = []
    for patient in _matching(folder, _ACDC_PATIENT, dirs=True) if folder else []:
        for frame in _matching(patient, _ACDC_FRAME):
            name = _ACDC_FRAME.match(frame.name)["name"]  # type: ignore[index]
            gt = _nifti_file(patient, name + "_gt")
            if gt is not None:  # frames without ground truth (the 4-D cine, unlabelled phases) are not cases
                cases.append(Case(dataset, name, frame, gt))
    if not cases:
        raise _no_cases(root, dataset, f"database/{folder_name}/patientNNN/patientNNN_frameMM[_gt].nii.gz")
    return cases


def _acdc_patient(case: Case) -> str:
    return case.name.split("_frame")[0]


def _ordered_pool(cases: List[Case], pool: str, paper: Tuple[int, int], dataset: str, folder: Path) -> List[Case]:
    """The first cases in sorted order train, the last test, in the paper's ratio (its exact counts on the release)."""
    n = len(cases)
    n_test = round(n * paper[1] / sum(paper))
    if n != sum(paper):
        log.warning(f"{folder}: {n} {_TITLES[dataset]} cases where the release has {sum(paper)}; "
                    f"test = the last {n_test} (the paper's {paper[0]}/{paper[1]} ratio)")
    return cases[: n - n_test] if pool == "train" else cases[n - n_test:]


_BTCV_IMAGE = re.compile(r"^img(?P<id>\d+)\.nii(?:\.gz)?$")


def _btcv_pool(root: Path, dataset: str, pool: str) -> List[Case]:
    """BTCV's labelled cases (an `img` folder beside a `label` folder); 24 train / 6 test on the release."""
    folder = _find_dir(root, lambda d: d.name == "img" and (d.parent / "label").is_dir()
                       and bool(_matching(d, _BTCV_IMAGE)))
    if folder is None:
        raise _no_cases(root, dataset, "img/imgNNNN.nii.gz with label/labelNNNN.nii.gz")
    labels = folder.parent / "label"
    cases = []
    for image in _matching(folder, _BTCV_IMAGE):
        num = _BTCV_IMAGE.match(image.name)["id"]  # type: ignore[index]
        # A missing label is reported when the case is read (or skipped with skip_bad).
        label = _nifti_file(labels, f"label{num}") or labels / f"label{num}.nii.gz"
        cases.append(Case(dataset, f"img{num}", image, label))
    return _ordered_pool(cases, pool, (24, 6), dataset, folder)


_MMWHS_IMAGE = re.compile(r"^(?P<name>ct_train_\d+)_image\.nii(?:\.gz)?$")


def _mmwhs_pool(root: Path, dataset: str, pool: str) -> List[Case]:
    """MMWHS CT training volumes with their `_label` files; 16 train / 4 test on the release."""
    folder = _find_dir(root, lambda d: bool(_matching(d, _MMWHS_IMAGE)))
    if folder is None:
        raise _no_cases(root, dataset, "ct_train_NNNN_image.nii.gz with ct_train_NNNN_label.nii.gz")
    cases = []
    for image in _matching(folder, _MMWHS_IMAGE):
        name = _MMWHS_IMAGE.match(image.name)["name"]  # type: ignore[index]
        label = _nifti_file(folder, f"{name}_label") or folder / f"{name}_label.nii.gz"
        cases.append(Case(dataset, name, image, label))
    return _ordered_pool(cases, pool, (16, 4), dataset, folder)


_SYNAPSE_SLICE = re.compile(r"^(?P<case>case\d+)_slice(?P<z>\d+)\.npz$")
_SYNAPSE_VOLUME = re.compile(r"^(?P<case>case\d+)(?:\.npy)?\.h5$")


def _synapse_pool(root: Path, dataset: str, pool: str) -> List[Case]:
    """Synapse: `train_npz` slices grouped by case (pool "train"), `test_vol_h5` volumes (pool "test")."""
    if pool == "train":
        folder = _find_dir(root, lambda d: d.name == "train_npz" and bool(_matching(d, _SYNAPSE_SLICE)))
        if folder is None:
            raise _no_cases(root, dataset, "train_npz/caseNNNN_sliceNNN.npz")
        names = sorted({_SYNAPSE_SLICE.match(p.name)["case"] for p in _matching(folder, _SYNAPSE_SLICE)},  # type: ignore[index]
                       key=_natural_key)
        return [Case(dataset, n, folder / f"{n}_slice*.npz", folder / f"{n}_slice*.npz") for n in names]
    folder = _find_dir(root, lambda d: d.name == "test_vol_h5" and bool(_matching(d, _SYNAPSE_VOLUME)))
    if folder is None:
        raise _no_cases(root, dataset, "test_vol_h5/caseNNNN.npy.h5")
    return [Case(dataset, _SYNAPSE_VOLUME.match(p.name)["case"], p, p)  # type: ignore[index]
            for p in _matching(folder, _SYNAPSE_VOLUME)]


@dataclass(frozen=True)
class _Layout:
    pool: Callable[[Path, str, str], List[Case]]  # (root, dataset, "train" | "test") -> cases, sorted
    group: Callable[[Case], str] = lambda case: case.name  # cases of one group always share a split


_LAYOUTS: Dict[str, _Layout] = {
    "acdc": _Layout(_acdc_pool, _acdc_patient),
    "btcv": _Layout(_btcv_pool),
    "mmwhs": _Layout(_mmwhs_pool),
    "synapse": _Layout(_synapse_pool),
}


def _layout(spec: VolumeDatasetSpec) -> _Layout:
    key = spec.layout or spec.name
    if key not in _LAYOUTS:
        raise DataError(f"{spec.name}: unknown layout {key!r}; choose from {', '.join(_LAYOUTS)}")
    return _LAYOUTS[key]


def _train_val(cases: List[Case], group: Callable[[Case], str]) -> Dict[str, List[Case]]:
    """Validation: the groups at the first max(1, round(0.2 n)) places of default_rng(0)'s permutation."""
    groups = sorted({group(c) for c in cases}, key=_natural_key)
    n_val = max(1, round(VAL_FRACTION * len(groups)))
    perm = np.random.default_rng(VAL_SEED).permutation(len(groups))
    val = {groups[i] for i in perm[:n_val].tolist()}
    return {
        "train": [c for c in cases if group(c) not in val],
        "val": [c for c in cases if group(c) in val],
    }


def _all_cases(root: Path, spec: VolumeDatasetSpec) -> Dict[str, Case]:
    """Every case of both pools that can be listed, by name (a pool that is absent contributes none)."""
    found: Dict[str, Case] = {}
    for pool in ("train", "test"):
        try:
            found.update((c.name, c) for c in _layout(spec).pool(root, spec.name, pool))
        except DataError:
            continue
    return found


def _read_split_file(path: Path) -> Dict[str, List[str]]:
    try:
        doc = json.loads(path.read_text())
        lists = {s: doc[s] for s in VOLUME_SPLITS}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: bad split file ({type(e).__name__}: {e})") from None
    for split, names in lists.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{path}: bad split file ({split!r} must be a list of case names)")
    return lists


def _split_from_file(path: Path, root: Path, spec: VolumeDatasetSpec) -> Dict[str, List[Case]]:
    """The three splits named by `split.json`; every name must be a case, and no case in two splits."""
    lists = _read_split_file(path)
    by_name = _all_cases(root, spec)
    seen: Dict[str, str] = {}
    for split, names in lists.items():
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DataError(f"{path}: {len(missing)} {split} case(s) not in the dataset, e.g. {missing[0]!r}")
        for n in names:
            if seen.setdefault(n, split) != split:
                raise DataError(f"{path}: case {n!r} is in both {seen[n]!r} and {split!r}")
    return {split: [by_name[n] for n in names] for split, names in lists.items()}


def list_cases(name: str, root: PathLike, split: str) -> List[Case]:
    """The cases of one split of a 3-D dataset.

    Arguments:
      name: a key of `VOLUME_DATASETS` (acdc, btcv, mmwhs, synapse, synthetic3d).
      root: the data root (the case folders are found up to SEARCH_DEPTH folders below it).
      split: "train", "val" or "test".

    Returns:
      list of Case, in a deterministic order (sorted by name; split.json's order where one is given).
    """
    spec = get_volume_spec(name)
    if split not in VOLUME_SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(VOLUME_SPLITS)}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root does not exist")
    layout = _layout(spec)
    if (root / SPLIT_FILE).is_file():
        cases = _split_from_file(root / SPLIT_FILE, root, spec)[split]
    elif split == "test":
        cases = layout.pool(root, name, "test")
    else:
        cases = _train_val(layout.pool(root, name, "train"), layout.group)[split]
    if not cases:
        raise DataError(f"{root}: the {split} split of {name} is empty")
    return cases


# ----------------------------------------------------------------------------- reading one volume


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
                        f"{_TITLES.get(spec.name, spec.name)} labels ({allowed})")
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
    numbered = sorted((int(m["z"]), folder / m.string) for m in map(_SYNAPSE_SLICE.match, _slice_names(folder))
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


# ----------------------------------------------------------------------------- slices for training


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

