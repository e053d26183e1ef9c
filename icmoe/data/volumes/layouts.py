"""Where each 3-D dataset's cases lie on disk (its folder layout), and its train / val / test split.

- ACDC: `database/{training,testing}/patientNNN/patientNNN_frameMM.nii.gz` with `_gt` label files.
- BTCV: `img/imgNNNN.nii.gz` with `label/labelNNNN.nii.gz`.
- MMWHS: `ct_train_NNNN_image.nii.gz` with `ct_train_NNNN_label.nii.gz`.
- Synapse: `train_npz/caseNNNN_sliceNNN.npz` grouped by case, `test_vol_h5/caseNNNN.npy.h5`.

A `split.json` in the data root overrides the split rule (docs/datasets-3d.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from icmoe.core.errors import DataError
from icmoe.core.io import PathLike
from icmoe.data.volumes.spec import TITLES, Case, VolumeDatasetSpec, get_volume_spec

log = logging.getLogger("icmoe.data.volumes")

VOLUME_SPLITS = ("train", "val", "test")


SPLIT_FILE = "split.json"


SEARCH_DEPTH = 6  # "anywhere below the root", bounded so that a wrong root (say /) fails fast


VAL_FRACTION = 0.2


VAL_SEED = 0


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
    return DataError(f"{root}: no {TITLES.get(dataset, dataset)} cases (expected {expected})")


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
        log.warning(f"{folder}: {n} {TITLES[dataset]} cases where the release has {sum(paper)}; "
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


SYNAPSE_SLICE = re.compile(r"^(?P<case>case\d+)_slice(?P<z>\d+)\.npz$")


_SYNAPSE_VOLUME = re.compile(r"^(?P<case>case\d+)(?:\.npy)?\.h5$")


def _synapse_pool(root: Path, dataset: str, pool: str) -> List[Case]:
    """Synapse: `train_npz` slices grouped by case (pool "train"), `test_vol_h5` volumes (pool "test")."""
    if pool == "train":
        folder = _find_dir(root, lambda d: d.name == "train_npz" and bool(_matching(d, SYNAPSE_SLICE)))
        if folder is None:
            raise _no_cases(root, dataset, "train_npz/caseNNNN_sliceNNN.npz")
        names = sorted({SYNAPSE_SLICE.match(p.name)["case"] for p in _matching(folder, SYNAPSE_SLICE)},  # type: ignore[index]
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
