"""DICOM series read as volumes: grouping, slice order along the normal, intensities, and the one-line
errors of inconsistent series, on generated CT-like and MR-like series (tests/icmoe/data/series_samples.py)."""

from __future__ import annotations

import numpy as np
import pytest

from icmoe.core.errors import DataError
from icmoe.data.dicom_series import group_series, read_dicom, read_dicom_series, series_from_datasets
from tests.icmoe.data.samples import write_dicom
from tests.icmoe.data.series_samples import OBLIQUE, make_series, shifted, write_study

pytest.importorskip("highdicom", reason="needs highdicom (the dicom extra)")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    return folder, write_study(folder)


def by_uid(series):
    return {s.uid: s for s in series}


def test_every_series_is_found_and_ordered_along_its_normal(study):
    folder, specs = study
    series = by_uid(read_dicom_series([folder]))
    assert set(series) == {s.uid for s in specs.values()}
    for name, spec in specs.items():
        s = series[spec.uid]
        if name == "mr_enhanced":  # one object: frames ordered by their per-frame positions
            positions = [np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float)
                         for f in spec.datasets[0].PerFrameFunctionalGroupsSequence]
            got = [positions[r.frame] for r in s.slices]
        else:  # true order: the datasets as made (file names are random, InstanceNumber reversed for one)
            want = [ds.SOPInstanceUID for ds in spec.datasets]
            assert [s.instances[r.instance].SOPInstanceUID for r in s.slices] == want, name
            got = [np.asarray(s.instances[r.instance].ImagePositionPatient, float) for r in s.slices]
        d = np.array([p @ s.normal for p in got])
        assert (np.diff(d) > 0).all(), name
        np.testing.assert_allclose(np.diff(d), s.slice_spacing, rtol=1e-3, err_msg=name)


def test_reversed_instance_numbers_do_not_decide_the_order(study):
    _, specs = study
    spec = specs["ct_reversed"]
    numbers = [int(ds.InstanceNumber) for ds in spec.datasets]
    assert numbers == sorted(numbers, reverse=True)  # the file names and numbers say the opposite order
    (s,) = [x for x in read_dicom_series(spec.files) if x.uid == spec.uid]
    assert [int(s.instances[r.instance].InstanceNumber) for r in s.slices] == numbers


def test_oblique_series_keeps_its_orientation_and_spacing(study):
    _, specs = study
    (s,) = read_dicom_series(specs["mr_oblique"].files)
    np.testing.assert_allclose(s.orientation, OBLIQUE, atol=1e-6)
    assert s.pixel_spacing == (0.8, 0.7)
    assert s.slice_spacing == pytest.approx(4.0, rel=1e-3)


def test_ct_intensities_are_rescaled_and_windowed(study):
    _, specs = study
    spec = specs["ct"]
    (s,) = read_dicom_series(spec.files)
    for z, ds in enumerate(spec.datasets):
        hu = ds.pixel_array.astype(np.float64) - 1024  # signed stored values, intercept -1024
        lo, hi = 40 - 0.5 - 399 / 2, 40 - 0.5 + 399 / 2  # DICOM's linear window of center 40, width 400
        want = (np.clip(hu, lo, hi) - lo) / (hi - lo) * 255
        np.testing.assert_allclose(s.pictures[z].pixels, want, atol=1e-3)
        assert s.pictures[z].pixels.dtype == np.float32


def test_mr_monochrome1_without_window_is_inverted_min_max(study):
    _, specs = study
    spec = specs["mr_oblique"]
    (s,) = read_dicom_series(spec.files)
    for z, ds in enumerate(spec.datasets):
        v = ds.pixel_array.astype(np.float64)
        want = 255 - (v - v.min()) / (v.max() - v.min()) * 255
        np.testing.assert_allclose(s.pictures[z].pixels, want, atol=1e-3)


def test_an_explicit_window_wins_over_the_files(study):
    _, specs = study
    (s,) = read_dicom_series(specs["ct"].files, window=(-150.0, 500.0))
    hu = specs["ct"].datasets[0].pixel_array.astype(np.float64) - 1024
    np.testing.assert_allclose(s.pictures[0].pixels, (np.clip(hu, -150, 500) + 150) / 650 * 255, atol=1e-3)


def test_enhanced_multiframe_slices_come_from_its_frames(study):
    _, specs = study
    spec = specs["mr_enhanced"]
    (s,) = read_dicom_series(spec.files)
    frames = spec.datasets[0].pixel_array.astype(np.float64)
    assert sorted(r.frame for r in s.slices) == list(range(len(frames)))
    for z, r in enumerate(s.slices):
        v = frames[r.frame]
        np.testing.assert_allclose(s.pictures[z].pixels, (v - v.min()) / (v.max() - v.min()) * 255, atol=1e-3)


def test_files_without_positions_and_non_images_are_not_series(tmp_path, study):
    folder, specs = study
    sc = write_dicom(tmp_path / "sc.dcm", np.arange(12, dtype=np.uint16).reshape(3, 4))  # no series geometry
    headers = [(str(p), read_dicom(p, headers_only=True)) for p in [sc, *specs["ct"].files]]
    seg_like = read_dicom(specs["ct"].files[0], headers_only=True)
    seg_like.Modality = "SEG"
    groups, singles, others = group_series(headers + [("seg", seg_like)])
    assert [g.uid for g in groups] == [specs["ct"].uid] and singles == [str(sc)] and others == ["seg"]


def ct(n=4, rows=16, **kw):
    from pydicom.uid import generate_uid

    return make_series(generate_uid(), generate_uid(), modality="CT", number=9, description="bad", rows=rows,
                       cols=16, n=n, spacing=2.0, **kw)


def refused(datasets, match):
    with pytest.raises(DataError, match=match) as err:
        series_from_datasets([(f"f{i}.dcm", ds) for i, ds in enumerate(datasets)])
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"series {datasets[0].SeriesInstanceUID} (bad): ")
    return msg


def test_mixed_sizes_are_refused():
    a, b = ct(), ct(rows=12)
    b[0].SeriesInstanceUID = a[0].SeriesInstanceUID
    refused(a + b[:1], r"mixed image sizes: 16x16 \(4 instances\) and 12x16 \(1 instance\)")


def test_mixed_orientations_are_refused():
    a, b = ct(), ct(orientation=OBLIQUE)
    refused(a[:2] + b[2:], "mixed orientations")


def test_duplicate_positions_are_refused():
    a = ct()
    shifted(a, 2, 0.0, copy_position_of=1)
    refused(a, "two slices at the same position .*f1.dcm and f2.dcm|f2.dcm and f1.dcm")


def test_uneven_spacing_beyond_the_tolerance_is_refused_and_within_it_accepted():
    a = ct(n=5)
    shifted(a, 4, 0.01)  # 0.5% of the 2 mm spacing: within the 1% tolerance
    assert series_from_datasets([(str(i), ds) for i, ds in enumerate(a)]).slice_spacing == pytest.approx(2.0, rel=1e-2)
    shifted(a, 4, 0.5)
    refused(a, r"uneven slice spacing \(2 to 2.51 mm")


def test_a_slice_without_pixel_data_or_position_is_refused():
    a = ct()
    del a[1].PixelData
    refused(a, "f1.dcm: DICOM file has no pixel data")
    b = ct()
    del b[3].ImagePositionPatient
    refused(b, "f3.dcm has no ImagePositionPatient")
