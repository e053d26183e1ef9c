"""3-D volume readers, splits, the slice dataset and the synthetic volume set, on tiny files in the real layouts."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Optional, Tuple

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from icmoe.data import (
    VOLUME_DATASETS,
    Case,
    DataError,
    SliceDataset,
    build_slice_dataset,
    has_synthetic_volumes,
    list_cases,
    load_volumes,
    make_synthetic_volumes,
    read_volume,
    resize_image,
    resize_label,
    synthetic_volumes,
    to_nifti_order,
)

ZOOMS = (1.25, 1.5, 6.0)  # (X, Y, Z) mm written into the test headers


def _nii(path: Path, data: np.ndarray, zooms: Tuple[float, float, float] = ZOOMS) -> np.ndarray:
    """Write `data` (X, Y, Z) as NIfTI with a diagonal affine of `zooms`; returns the affine."""
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = (-10.0, 20.0, -5.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return affine


def _noise(shape, seed: int, lo: int = -1000, hi: int = 1000) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, size=shape).astype(np.int16)


def _labels(shape, n_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_classes + 1, size=shape).astype(np.uint8)


def _acdc(root: Path, train: Iterable[int] = range(1, 11), test: Iterable[int] = range(101, 104),
          shape=(16, 16, 3)) -> Path:
    """ACDC's layout: two labelled frames per patient, an unlabelled frame, the 4-D cine and Info.cfg."""
    for pool, patients in (("training", train), ("testing", test)):
        for p in patients:
            folder = root / "database" / pool / f"patient{p:03d}"
            for f in (1, 12):
                _nii(folder / f"patient{p:03d}_frame{f:02d}.nii.gz", _noise(shape, p * 100 + f, 0, 900))
                _nii(folder / f"patient{p:03d}_frame{f:02d}_gt.nii.gz", _labels(shape, 3, p * 100 + f))
            _nii(folder / f"patient{p:03d}_frame05.nii.gz", _noise(shape, p))  # no _gt: not a case
            _nii(folder / f"patient{p:03d}_4d.nii.gz", _noise(shape + (2,), p))
            (folder / "Info.cfg").write_text("ED: 1\nES: 12\nGroup: NOR\n")
    return root


BTCV_IDS = list(range(1, 11)) + list(range(21, 41))  # the 30 labelled cases of the release


def _btcv(root: Path, ids: Iterable[int] = BTCV_IDS, shape=(16, 16, 3)) -> Path:
    for i in ids:
        _nii(root / "RawData" / "Training" / "img" / f"img{i:04d}.nii.gz", _noise(shape, i))
        _nii(root / "RawData" / "Training" / "label" / f"label{i:04d}.nii.gz", _labels(shape, 13, i))
    # The unlabelled test images sit in a sibling folder without `label`: never listed.
    _nii(root / "RawData" / "Testing" / "img" / "img0061.nii.gz", _noise(shape, 61))
    return root


MMWHS_VALUES = (205, 420, 500, 550, 600, 820, 850)


def _mmwhs(root: Path, n: int = 20, shape=(16, 16, 3)) -> Path:
    for i in range(1001, 1001 + n):
        _nii(root / "ct_train" / f"ct_train_{i}_image.nii.gz", _noise(shape, i))
        raw = np.array((0,) + MMWHS_VALUES, dtype=np.int16)[_labels(shape, 7, i)]
        _nii(root / "ct_train" / f"ct_train_{i}_label.nii.gz", raw)
    return root


def _synapse(root: Path, train=(("case0005", 4), ("case0006", 3)), test=(("case0001", 5),), hw=(16, 16)) -> Path:
    """TransUNet's release: one npz per training slice, one h5 per test volume; images in [0, 1]."""
    npz = root / "Synapse" / "train_npz"
    npz.mkdir(parents=True)
    for c, (name, depth) in enumerate(train):
        for z in reversed(range(depth)):  # written out of order: the reader sorts by slice number
            image = np.full(hw, (z + 1) / 10, dtype=np.float32)
            label = np.full(hw, (z + c) % 9, dtype=np.float32)
            np.savez(npz / f"{name}_slice{z:03d}.npz", image=image, label=label)
    h5 = root / "Synapse" / "test_vol_h5"
    h5.mkdir(parents=True)
    for name, depth in test:
        with h5py.File(h5 / f"{name}.npy.h5", "w") as f:
            f["image"] = np.random.default_rng(1).random((depth, *hw), dtype=np.float32)
            f["label"] = _labels((depth, *hw), 8, 1).astype(np.float32)
    return root


def _names(cases) -> list:
    return [c.name for c in cases]


def _one_line_error(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory) -> Path:
    return _acdc(tmp_path_factory.mktemp("acdc") / "ACDC")


# ----------------------------------------------------------------------------- listing and splits


def test_acdc_splits_counts_patients_and_determinism(acdc_root):
    train, val, test = (list_cases("acdc", acdc_root, s) for s in ("train", "val", "test"))
    # 10 training patients: round(0.2 * 10) = 2 validation patients, both labelled frames each.
    assert (len(train), len(val), len(test)) == (16, 4, 6)
    assert "patient001_frame05" not in _names(train + val)  # frames without _gt are not cases
    patients = {s: {c.name.split("_")[0] for c in cases} for s, cases in (("train", train), ("val", val))}
    assert patients["train"].isdisjoint(patients["val"]) and len(patients["val"]) == 2
    groups = [f"patient{p:03d}" for p in range(1, 11)]
    assert patients["val"] == {groups[i] for i in np.random.default_rng(0).permutation(10)[:2]}
    assert _names(test) == [f"patient{p}_frame{f}" for p in (101, 102, 103) for f in ("01", "12")]
    assert _names(list_cases("acdc", acdc_root, "val")) == _names(val)  # deterministic
    case = train[0]
    assert case.dataset == "acdc" and case.label is not None and case.label.name.endswith("_gt.nii.gz")


def test_case_folders_found_below_the_root_but_not_in_hidden_folders(tmp_path):
    _acdc(tmp_path / "downloads" / "cardiac" / "ACDC", train=range(1, 4), test=())
    assert len(list_cases("acdc", tmp_path, "train")) + len(list_cases("acdc", tmp_path, "val")) == 6
    hidden = tmp_path / "other"
    _acdc(hidden / ".partial", train=range(1, 4), test=())
    with pytest.raises(DataError) as e:
        list_cases("acdc", hidden, "train")
    _one_line_error(e, str(hidden), "no ACDC cases (expected database/training/patientNNN/")


def test_btcv_release_split_24_6_and_val(tmp_path):
    root = _btcv(tmp_path)
    train, val, test = (list_cases("btcv", root, s) for s in ("train", "val", "test"))
    assert _names(test) == [f"img{i:04d}" for i in range(35, 41)]  # the last 6 in sorted order
    assert (len(train), len(val)) == (19, 5)  # val: round(0.2 * 24) of the first 24
    assert set(_names(train)) | set(_names(val)) == {f"img{i:04d}" for i in BTCV_IDS[:24]}
    assert set(_names(train)).isdisjoint(_names(val))
    assert test[0].label == root / "RawData" / "Training" / "label" / "label0035.nii.gz"


def test_btcv_partial_download_keeps_the_ratio_and_warns(tmp_path, caplog):
    root = _btcv(tmp_path, ids=range(1, 11))
    with caplog.at_level(logging.WARNING, logger="icmoe.data.volumes"):
        test = list_cases("btcv", root, "test")
    assert _names(test) == ["img0009", "img0010"]
    assert "10 BTCV cases where the release has 30" in caplog.text


def test_mmwhs_split_16_4(tmp_path):
    root = _mmwhs(tmp_path)
    train, val, test = (list_cases("mmwhs", root, s) for s in ("train", "val", "test"))
    assert _names(test) == [f"ct_train_{i}" for i in range(1017, 1021)]
    assert (len(train), len(val)) == (13, 3)  # round(0.2 * 16) = 3
    assert test[0].label.name == "ct_train_1017_label.nii.gz"


def test_split_json_overrides_and_is_checked(tmp_path):
    root = _acdc(tmp_path, train=range(1, 4), test=range(101, 102))
    split = {"train": ["patient002_frame01"], "val": ["patient003_frame12"], "test": ["patient101_frame01"]}
    (root / "split.json").write_text(json.dumps(split))
    for s, names in split.items():
        assert _names(list_cases("acdc", root, s)) == names
    for bad, needle in (({**split, "val": ["patient009_frame01"]}, "1 val case(s) not in the dataset"),
                        ({**split, "test": ["patient002_frame01"]}, "is in both 'train' and 'test'"),
                        ({"train": [], "val": []}, "bad split file (KeyError")):
        (root / "split.json").write_text(json.dumps(bad))
        with pytest.raises(DataError) as e:
            list_cases("acdc", root, "train")
        _one_line_error(e, "split.json", needle)
    (root / "split.json").write_text("{not json")
    with pytest.raises(DataError, match="bad split file"):
        list_cases("acdc", root, "train")


# ----------------------------------------------------------------------------- reading: intensity, labels, axes


def _window_case(tmp_path: Path, dataset: str, values) -> Case:
    """A one-case volume whose first column holds `values` (X = len(values), Y = 2, Z = 2)."""
    data = np.zeros((len(values), 2, 2), dtype=np.float32)
    data[:, 0, 0] = values
    image, label = tmp_path / f"{dataset}_image.nii.gz", tmp_path / f"{dataset}_label.nii.gz"
    _nii(image, data)
    _nii(label, np.zeros(data.shape, np.uint8))
    return Case(dataset, "window", image, label)


def test_ct_windows_map_edges_exactly(tmp_path):
    btcv = read_volume(_window_case(tmp_path, "btcv", [-1000, -150, 175, 500, 1000]))
    assert btcv.image[0, :, 0].tolist() == [0.0, 0.0, 127.5, 255.0, 255.0]  # HU window [-150, 500]
    mmwhs = read_volume(_window_case(tmp_path, "mmwhs", [-751, -750, 0, 750, 751]))
    assert mmwhs.image[0, :, 0].tolist() == [0.0, 0.0, 127.5, 255.0, 255.0]  # HU clip [-750, 750]
    assert btcv.image.dtype == np.float32


def test_mri_min_max_per_slice_and_constant_slice(tmp_path):
    data = np.zeros((3, 2, 3), dtype=np.int16)  # (X, Y, Z): three slices
    data[:, :, 0] = [[100, 100], [200, 200], [300, 300]]
    data[:, :, 1] = [[-5, -5], [0, 0], [5, 5]]
    data[:, :, 2] = 42  # constant
    _nii(tmp_path / "img.nii.gz", data)
    _nii(tmp_path / "gt.nii.gz", np.zeros(data.shape, np.uint8))
    vol = read_volume(Case("acdc", "mri", tmp_path / "img.nii.gz", tmp_path / "gt.nii.gz"))
    assert vol.image[0, :, 0].tolist() == [0.0, 127.5, 255.0]
    assert vol.image[1, :, 0].tolist() == [0.0, 127.5, 255.0]  # its own range, not the volume's
    assert (vol.image[2] == 0).all()


def test_axis_order_round_trip_spacing_and_affine(tmp_path):
    shape = (16, 12, 3)  # (X, Y, Z), all different
    label = _labels(shape, 3, 7)
    affine = _nii(tmp_path / "p_frame01.nii.gz", _noise(shape, 7, 0, 500), zooms=(1.25, 1.5, 6.0))
    _nii(tmp_path / "p_frame01_gt.nii.gz", label, zooms=(1.25, 1.5, 6.0))
    vol = read_volume(Case("acdc", "p_frame01", tmp_path / "p_frame01.nii.gz", tmp_path / "p_frame01_gt.nii.gz"))
    assert vol.image.shape == vol.label.shape == (3, 16, 12)
    assert vol.label.dtype == np.uint8
    np.testing.assert_array_equal(to_nifti_order(vol.label), label)
    np.testing.assert_array_equal(vol.label[1], label[:, :, 1])  # slice z is the file's [:, :, z]
    assert vol.spacing == (6.0, 1.25, 1.5)
    np.testing.assert_array_equal(vol.affine, affine)
    assert vol.source == str(tmp_path / "p_frame01.nii.gz")
    with pytest.raises(DataError, match=r"expected a \(Z, H, W\) array"):
        to_nifti_order(np.zeros((2, 2)))


def test_trailing_singleton_axis_is_accepted(tmp_path):
    _nii(tmp_path / "i.nii.gz", _noise((8, 8, 2, 1), 1))
    _nii(tmp_path / "l.nii.gz", _labels((8, 8, 2, 1), 3, 1))
    vol = read_volume(Case("acdc", "x", tmp_path / "i.nii.gz", tmp_path / "l.nii.gz"))
    assert vol.image.shape == (2, 8, 8)


def test_mmwhs_label_values_map_to_classes(tmp_path):
    root = _mmwhs(tmp_path, n=1)
    raw = np.asanyarray(nib.load(str(root / "ct_train" / "ct_train_1001_label.nii.gz")).dataobj)
    folder = root / "ct_train"
    vol = read_volume(Case("mmwhs", "ct_train_1001", folder / "ct_train_1001_image.nii.gz",
                           folder / "ct_train_1001_label.nii.gz"))
    expected = np.zeros(raw.shape, np.uint8)
    for k, value in enumerate(MMWHS_VALUES, start=1):
        expected[raw == value] = k
    np.testing.assert_array_equal(to_nifti_order(vol.label), expected)
    assert set(np.unique(vol.label).tolist()) == set(range(8))
    bad = raw.copy()
    bad[0, 0, 0], bad[1, 0, 0] = 300, 421
    _nii(folder / "ct_train_1001_label.nii.gz", bad)
    with pytest.raises(DataError) as e:
        read_volume(Case("mmwhs", "x", folder / "ct_train_1001_image.nii.gz", folder / "ct_train_1001_label.nii.gz"))
    _one_line_error(e, "ct_train_1001_label.nii.gz", "[300, 421] are not MMWHS labels", "205, 420")


def test_synapse_npz_grouping_and_h5_test_volumes(tmp_path, caplog):
    root = _synapse(tmp_path)
    train_val = list_cases("synapse", root, "train") + list_cases("synapse", root, "val")
    assert sorted(_names(train_val)) == ["case0005", "case0006"]
    case = next(c for c in train_val if c.name == "case0005")
    assert case.image.name == "case0005_slice*.npz" and case.label == case.image
    vol = read_volume(case)
    assert vol.image.shape == (4, 16, 16) and vol.spacing is None and vol.affine is None
    # Ordered by slice number: slice z holds (z + 1) / 10, i.e. (z + 1) * 25.5 after x 255.
    np.testing.assert_allclose(vol.image[:, 0, 0], [25.5, 51.0, 76.5, 102.0], rtol=1e-6)
    assert vol.label[:, 0, 0].tolist() == [0, 1, 2, 3] and vol.label.dtype == np.uint8
    (test,) = list_cases("synapse", root, "test")
    assert test.name == "case0001"
    h5 = read_volume(test)
    with h5py.File(test.image, "r") as f:
        np.testing.assert_allclose(h5.image, f["image"][()] * 255, rtol=1e-6)
        np.testing.assert_array_equal(h5.label, f["label"][()].astype(np.uint8))
    assert VOLUME_DATASETS["synapse"].image_size == 224
    # A missing slice is reported (the slices are still usable for training).
    (root / "Synapse" / "train_npz" / "case0005_slice001.npz").unlink()
    with caplog.at_level(logging.WARNING, logger="icmoe.data.volumes"):
        assert read_volume(case).image.shape == (3, 16, 16)
    assert "have gaps" in caplog.text


def test_synapse_bad_files(tmp_path):
    root = _synapse(tmp_path)
    npz = root / "Synapse" / "train_npz" / "case0006_slice002.npz"
    np.savez(npz, image=np.full((16, 16), 300.0, np.float32), label=np.zeros((16, 16), np.float32))
    with pytest.raises(DataError) as e:
        read_volume(Case("synapse", "case0006", npz.parent / "case0006_slice*.npz", None))
    _one_line_error(e, str(npz), "span [300, 300], expected [0, 1]")
    npz.write_bytes(b"PK\x03\x04 damaged")
    with pytest.raises(DataError) as e:
        read_volume(Case("synapse", "case0006", npz.parent / "case0006_slice*.npz", None))
    _one_line_error(e, str(npz), "unreadable npz slice")
    h5 = root / "Synapse" / "test_vol_h5" / "case0001.npy.h5"
    h5.write_bytes(b"\x89HDF not really" * 10)
    with pytest.raises(DataError) as e:
        read_volume(Case("synapse", "case0001", h5, h5))
    _one_line_error(e, str(h5), "unreadable HDF5 file")
    with h5py.File(h5, "w") as f:
        f["image"] = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(DataError) as e:
        read_volume(Case("synapse", "case0001", h5, h5))
    _one_line_error(e, str(h5), "no 'label' dataset")


# ----------------------------------------------------------------------------- errors


def _pair(tmp_path: Path, image: np.ndarray, label: Optional[np.ndarray], dataset: str = "acdc") -> Case:
    _nii(tmp_path / "case.nii.gz", image)
    if label is not None:
        _nii(tmp_path / "case_gt.nii.gz", label)
    return Case(dataset, "case", tmp_path / "case.nii.gz", tmp_path / "case_gt.nii.gz")


def test_shape_mismatch(tmp_path):
    case = _pair(tmp_path, _noise((16, 16, 3), 0), _labels((16, 16, 4), 3, 0))
    with pytest.raises(DataError) as e:
        read_volume(case)
    _one_line_error(e, str(case.label), "label shape (16, 16, 4) differs from image shape (16, 16, 3)")


def test_label_values_outside_classes_are_named(tmp_path):
    label = _labels((8, 8, 2), 3, 0)
    label[0, 0, 0], label[1, 1, 1] = 9, 4
    with pytest.raises(DataError) as e:
        read_volume(_pair(tmp_path, _noise((8, 8, 2), 0), label))
    _one_line_error(e, "case_gt.nii.gz", "label values [4, 9] outside 0..3")
    float_label = label.astype(np.float32)
    float_label[0, 0, 0] = 1.5
    with pytest.raises(DataError, match=r"non-integer label values \[1.5\]"):
        read_volume(_pair(tmp_path, _noise((8, 8, 2), 0), float_label))


def test_truncated_and_foreign_nifti(tmp_path):
    case = _pair(tmp_path, _noise((32, 32, 8), 0), _labels((32, 32, 8), 3, 0))
    data = case.image.read_bytes()
    case.image.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        read_volume(case)
    _one_line_error(e, str(case.image), "unreadable NIfTI image (EOFError")
    case.image.write_bytes(b"this is not a NIfTI file")
    with pytest.raises(DataError) as e:
        read_volume(case)
    _one_line_error(e, str(case.image), "unreadable NIfTI image")
    plain = tmp_path / "plain.nii"
    nib.save(nib.Nifti1Image(_noise((16, 16, 4), 0), np.eye(4)), str(plain))
    plain.write_bytes(plain.read_bytes()[:600])
    with pytest.raises(DataError) as e:
        read_volume(Case("acdc", "plain", plain, None))
    _one_line_error(e, str(plain), "NIfTI header claims 16x16x4 voxels of int16 (2.0 KiB), more than a file of 600")


def test_missing_label_file_and_non_finite_image(tmp_path):
    root = _btcv(tmp_path, ids=range(1, 6))
    (root / "RawData" / "Training" / "label" / "label0002.nii.gz").unlink()
    case = next(c for c in list_cases("btcv", root, "train") + list_cases("btcv", root, "val") if c.name == "img0002")
    with pytest.raises(DataError) as e:
        read_volume(case)
    _one_line_error(e, "label0002.nii.gz", "label file is missing")
    image = np.zeros((4, 4, 2), np.float32)
    image[1, 1, 1] = np.nan
    with pytest.raises(DataError, match="NaN or infinite"):
        read_volume(_pair(tmp_path / "nan", image, np.zeros((4, 4, 2), np.uint8)))


def test_empty_or_missing_root_and_split(tmp_path):
    with pytest.raises(DataError) as e:
        list_cases("acdc", tmp_path / "absent", "train")
    _one_line_error(e, "absent: data root does not exist")
    with pytest.raises(DataError) as e:
        list_cases("acdc", tmp_path, "train")
    _one_line_error(e, f"{tmp_path}: no ACDC cases (expected database/training/patientNNN/")
    _acdc(tmp_path / "only_training", train=range(1, 3), test=())
    with pytest.raises(DataError) as e:
        list_cases("acdc", tmp_path / "only_training", "test")
    _one_line_error(e, "no ACDC cases (expected database/testing/patientNNN/")
    for name, split, needle in (("kits", "train", "unknown 3-D dataset 'kits'"), ("acdc", "dev", "unknown split")):
        with pytest.raises(DataError, match=needle):
            list_cases(name, tmp_path, split)
    for name, needle in (("btcv", "no BTCV cases"), ("mmwhs", "no MMWHS cases"), ("synapse", "no Synapse cases")):
        with pytest.raises(DataError, match=needle):
            list_cases(name, tmp_path, "test")


def test_load_volumes_raises_first_or_skips_bad(tmp_path, caplog):
    root = _acdc(tmp_path, train=range(1, 6), test=())
    bad = root / "database" / "training" / "patient002" / "patient002_frame12.nii.gz"
    bad.write_bytes(bad.read_bytes()[:100])
    (root / "split.json").write_text(json.dumps({
        "train": [f"patient{p:03d}_frame{f}" for p in (1, 2, 3) for f in ("01", "12")],
        "val": ["patient004_frame01"], "test": []}))
    with pytest.raises(DataError) as e:
        load_volumes("acdc", root, "train", progress=False)
    _one_line_error(e, str(bad))
    with caplog.at_level(logging.WARNING, logger="icmoe.data.volumes"):
        volumes, skipped = load_volumes("acdc", root, "train", skip_bad=True, progress=False)
    assert len(volumes) == 5 and "patient002_frame12" not in [v.name for v in volumes]
    assert [(c.name, str(bad) in why) for c, why in skipped] == [("patient002_frame12", True)]
    assert "skipping patient002_frame12" in caplog.text
    ds = build_slice_dataset("acdc", root, "train", image_size=8, skip_bad=True, progress=False)
    assert [c.name for c, _ in ds.skipped] == ["patient002_frame12"] and len(ds) == 5 * 3


# ----------------------------------------------------------------------------- slices


def test_slice_dataset_items(acdc_root):
    volumes, _ = load_volumes("acdc", acdc_root, "val", progress=False)
    ds = SliceDataset(volumes, image_size=24, classes=VOLUME_DATASETS["acdc"].classes, progress=False)
    assert len(ds) == len(ds.slices) == sum(v.image.shape[0] for v in volumes) == 12
    assert ds.slices[:4] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    image, label, i = ds[4]
    assert (image.shape, image.dtype, label.shape, label.dtype, i) == ((3, 24, 24), torch.float32, (24, 24),
                                                                      torch.int64, 4)
    v, z = ds.slices[4]
    assert torch.equal(image[0], image[2]) and torch.equal(image[0], image[1])
    np.testing.assert_array_equal(image[0].numpy(), resize_image(volumes[v].image[z], 24))
    np.testing.assert_array_equal(label.numpy(), resize_label(volumes[v].label[z], 24))
    assert 0 <= float(image.min()) and float(image.max()) <= 255
    xb, yb, ib = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert xb.shape == (5, 3, 24, 24) and yb.shape == (5, 24, 24) and ib.tolist() == [0, 1, 2, 3, 4]


def test_resize_label_is_nearest_and_keeps_only_existing_values():
    lbl = np.zeros((16, 16), np.uint8)
    lbl[2:9, 3:12] = 2
    lbl[10:14, 1:5] = 7
    for size in (8, 24, 224, (20, 12)):
        out = resize_label(lbl, size)
        assert set(np.unique(out)) <= {0, 2, 7}
        h, w = (size, size) if isinstance(size, int) else size
        expected = torch.nn.functional.interpolate(torch.from_numpy(lbl)[None, None].float(), size=(h, w),
                                                   mode="nearest-exact")[0, 0].numpy().astype(np.uint8)
        np.testing.assert_array_equal(out, expected)
    assert set(np.unique(resize_label(lbl, 24))) == {0, 2, 7}
    assert resize_label(lbl.astype(np.int64), 4).dtype == np.int64


def test_resize_image_bilinear():
    ramp = np.tile(np.arange(16, dtype=np.float32) * 10, (16, 1))
    out = resize_image(ramp, 32)
    assert out.shape == (32, 32) and out.dtype == np.float32
    assert np.all(np.diff(out[0]) >= 0) and out[0, 0] < 5 and out[0, -1] > 145  # smooth, monotone, in range
    assert len(np.unique(out[0])) > 16  # interpolated, not nearest
    np.testing.assert_array_equal(resize_image(np.full((10, 14), 37.25, np.float32), 7), np.full((7, 7), 37.25))
    np.testing.assert_array_equal(resize_image(ramp, 16), ramp)
    with pytest.raises(DataError, match=r"expected an \(H, W\) slice"):
        resize_image(np.zeros((2, 3, 4)), 8)


def test_slice_dataset_refuses_unlabelled_or_out_of_range():
    from icmoe.data import Volume

    image = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(DataError, match="has no label"):
        SliceDataset([Volume("v", image, None, None, None, "v.nii")], image_size=8, classes=("a",), progress=False)
    label = np.full((2, 8, 8), 3, np.uint8)
    with pytest.raises(DataError, match=r"label value 3 outside 0..2"):
        SliceDataset([Volume("v", image, label, None, None, "v.nii")], image_size=8, classes=("a", "b"),
                     progress=False)
    with pytest.raises(DataError, match="no volumes"):
        SliceDataset([], image_size=8, classes=("a",))


# ----------------------------------------------------------------------------- the synthetic set

SMALL = {"n_train": 3, "n_test": 2, "size": 48, "depth": 4}


def test_synthetic_set_default_size_is_readable_with_every_class_in_every_slice(tmp_path):
    root = make_synthetic_volumes(tmp_path / "s3d")
    assert root == tmp_path / "s3d" and has_synthetic_volumes(root)
    spec = VOLUME_DATASETS["synthetic3d"]
    assert spec.classes == ("disc", "ring", "bar") and spec.modality == "mri"
    splits = {s: list_cases("synthetic3d", root, s) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6, 2, 4]  # val: round(0.2 * 8) patients
    assert all(c.dataset == "synthetic3d" for cases in splits.values() for c in cases)
    patient = root / "database" / "training" / "patient001"
    assert (patient / "Info.cfg").read_text().startswith("ED: 1\n")
    for cases in splits.values():
        for case in cases:
            vol = read_volume(case)
            assert vol.image.shape == (12, 128, 128) and vol.spacing == (5.0, 1.5, 1.5)
            assert vol.image.min() == 0 and vol.image.max() == 255
            for z in range(12):
                assert set(np.unique(vol.label[z])) == {0, 1, 2, 3}, (case.name, z)
            # Each class keeps its own intensity band.
            means = [float(vol.image[vol.label == k].mean()) for k in (1, 2, 3)]
            assert means[1] < means[2] < means[0], (case.name, means)
    hdr = nib.load(str(patient / "patient001_frame01.nii.gz")).header
    assert hdr.get_data_dtype() == np.int16 and hdr.get_xyzt_units() == ("mm", "sec")


def test_synthetic_set_is_deterministic_per_seed(tmp_path):
    a = make_synthetic_volumes(tmp_path / "a", **SMALL, seed=3)
    b = make_synthetic_volumes(tmp_path / "b", **SMALL, seed=3)
    c = make_synthetic_volumes(tmp_path / "c", **SMALL, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
    assert len(files) == 2 * (SMALL["n_train"] + SMALL["n_test"])
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.nii.gz"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    # Volumes differ from each other (position, size, texture).
    v1, v2 = (read_volume(list_cases("synthetic3d", a, "test")[i]) for i in (0, 1))
    assert not np.array_equal(v1.label, v2.label)


def test_synthetic_set_is_atomic(tmp_path, monkeypatch):
    root = tmp_path / "s3d"
    calls = []
    real = synthetic_volumes._write_case

    def failing(*args):
        calls.append(args[1])
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        real(*args)

    monkeypatch.setattr(synthetic_volumes, "_write_case", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        make_synthetic_volumes(root, **SMALL)
    assert calls == [1, 2, 3]
    assert not has_synthetic_volumes(root) and list(root.iterdir()) == []  # nothing half-written, no leftovers
    with pytest.raises(DataError, match="no synthetic3d cases"):
        list_cases("synthetic3d", root, "train")
    monkeypatch.setattr(synthetic_volumes, "_write_case", real)
    make_synthetic_volumes(root, **SMALL, seed=1)
    first = (root / "database" / "testing" / "patient004" / "patient004_frame01_gt.nii.gz").read_bytes()
    make_synthetic_volumes(root, **SMALL, seed=2)  # an earlier synthetic set is replaced
    assert json.loads((root / "database" / "synthetic3d.json").read_text())["seed"] == 2
    assert (root / "database" / "testing" / "patient004" / "patient004_frame01_gt.nii.gz").read_bytes() != first
    assert [p.name for p in root.iterdir()] == ["database"]


def test_synthetic_set_never_replaces_other_data(tmp_path):
    root = _acdc(tmp_path / "real", train=range(1, 3), test=())
    assert not has_synthetic_volumes(root)
    with pytest.raises(DataError) as e:
        make_synthetic_volumes(root, **SMALL)
    _one_line_error(e, "database: exists and is not a synthetic3d set")
    assert len(list_cases("acdc", root, "train")) == 2  # untouched
    (tmp_path / "broken" / "database").mkdir(parents=True)
    (tmp_path / "broken" / "database" / "synthetic3d.json").write_text("{truncated")
    assert not has_synthetic_volumes(tmp_path / "broken")
