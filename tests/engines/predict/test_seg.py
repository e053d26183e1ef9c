"""`python -m engines.predict` on a folder of DICOM series: one DICOM SEG per series that highdicom reads
back with every frame at its source slice (position, orientation, spacing of the source) and masks equal
to `--format png` for the same pixels; for a binary model (the tiny IC-MoE build) and a multi-class one
(the tiny MoE-SAM build). Generated study: tests/icmoe/data/series_samples.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from engines import load_engine
from engines.predict import main as predict_main
from engines.predict import predict
from engines.predict.journal import JOURNAL_NAME
from engines.predict.seg import SegSpec, make_seg
from engines.predict.series import predict_series
from engines.select import split_label
from icmoe.core.codes import generic_codes
from icmoe.core.io import sha256_file
from icmoe.core.manifest import RUNTIME_PRECISIONS
from icmoe.data.dicom_series import read_dicom_series
from tests.engines.predict.seg_checks import check_seg, png_of
from tests.helpers import tree_digest
from tests.icmoe.data.samples import write_nifti
from tests.icmoe.data.series_samples import bad_mixed_sizes, bad_no_pixels, write_study

hd = pytest.importorskip("highdicom", reason="needs highdicom (the dicom extra)")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("series")
    return folder, write_study(folder)


def run(args, capsys):
    code = predict_main([str(a) for a in args] + ["--no-progress", "--threads", "1"])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def outputs(study, tiny_build, moesam_build, tmp_path_factory):
    """PNG and SEG runs of both builds over the study folder: {build: (png dir, seg dir, report)}."""
    folder, _ = study
    out = {}
    for name, build in (("icmoe", tiny_build), ("moesam", moesam_build)):
        base = tmp_path_factory.mktemp(f"out_{name}")
        for fmt in ("png", "auto"):
            assert predict_main([str(build), str(folder), "--out", str(base / fmt), "--format", fmt, "--no-progress",
                                 "--threads", "1", "-q", "--json", str(base / f"{fmt}.json")]) == 0
        out[name] = (base / "png", base / "auto", json.loads((base / "auto.json").read_text()), build)
    return out


@pytest.mark.parametrize("name", ["icmoe", "moesam"])
def test_seg_frames_sit_at_their_source_slices_and_equal_the_pngs(outputs, study, name):
    folder, specs = study
    png_dir, seg_dir, report, build = outputs[name]
    binary = name == "icmoe"
    labels = [(1, "foreground")] if binary else list(enumerate(report["classes"], start=1))
    assert len(report["series"]) == len(specs) and report["totals"]["segs"] == len(specs)
    for spec in specs.values():
        (entry,) = [e for e in report["series"] if e["source_series"] == spec.uid]
        assert entry["path"].endswith(f"{spec.uid}.seg.dcm")
        seg = check_seg(hd.seg.segread(str(seg_dir / f"{spec.uid}.seg.dcm")), spec, folder, png_dir, labels, binary)
        assert entry["sop_instance_uid"] == seg.SOPInstanceUID and entry["frames"] == seg.NumberOfFrames
        assert len(seg.SegmentSequence) == len(labels)
        for item, (value, class_name) in zip(seg.SegmentSequence, labels):
            assert item.SegmentNumber == value and item.SegmentAlgorithmType == "AUTOMATIC"
            algo = item.SegmentationAlgorithmIdentificationSequence[0]
            params = dict(kv.split("=", 1) for kv in algo.AlgorithmParameters.split(","))
            precision = report["precision"]  # the engine's that ran (engines.select's choice)
            assert params["family"] == name and params["config"] == "tiny" and params["precision"] == precision
            assert precision in RUNTIME_PRECISIONS and report["engine"].endswith(precision)
            assert params["build_sha256"] == sha256_file(build / "manifest.json")
            category = item.SegmentedPropertyCategoryCodeSequence[0]
            kind = item.SegmentedPropertyTypeCodeSequence[0]
            if binary:  # IC-MoE's declaration: a lesion
                assert (category.CodeValue, kind.CodeValue, item.SegmentLabel) == ("49755003", "52988006", "Lesion")
            else:  # tiny MoE-SAM's classes (class1..class3) are no organ: the generic code, the class names as labels
                assert (category.CodeValue, kind.CodeValue, item.SegmentLabel) == ("85756007", "85756007", class_name)


def test_the_python_api_gives_the_commands_masks(outputs, study, tiny_build):
    folder, specs = study
    png_dir, _, report, _ = outputs["icmoe"]
    with load_engine(tiny_build, *split_label(report["engine"]), threads=1) as engine:  # the engine the command chose
        results = predict_series(engine, folder)
        flat = predict(engine, folder)  # the plain API: every series' slices in volume order
    assert [p.mask.tobytes() for _, preds in results for p in preds] == [p.mask.tobytes() for p in flat]
    assert sorted(s.uid for s, _ in results) == sorted(s.uid for s in specs.values())
    for series, preds in results:
        for ref, pred in zip(series.slices, preds):
            want = png_of(png_dir, folder, Path(series.sources[ref.instance]), ref.frame)
            np.testing.assert_array_equal(pred.mask * 255, want)


def test_fractional_seg_holds_probabilities_over_half_exactly_where_the_mask_is(study, tiny_build, tmp_path, capsys):
    folder, specs = study
    spec = specs["ct"]
    code, _, err = run([tiny_build, *spec.files, "--out", tmp_path / "f", "--seg-type", "fractional", "-q"], capsys)
    assert code == 0, err
    code, _, err = run([tiny_build, *spec.files, "--out", tmp_path / "p", "--format", "png", "-q"], capsys)
    assert code == 0, err
    seg = hd.seg.segread(str(tmp_path / "f" / f"{spec.uid}.seg.dcm"))
    assert seg.SegmentationType == "FRACTIONAL" and seg.MaximumFractionalValue == 255
    stored = seg.get_pixels_by_source_instance(source_sop_instance_uids=[d.SOPInstanceUID for d in spec.datasets],
                                               segment_numbers=[1], rescale_fractional=False)[..., 0]
    for z, path in enumerate(spec.files):
        png = np.asarray(Image.open(tmp_path / "p" / f"{path.stem}.png"))
        np.testing.assert_array_equal(stored[z] > 127, png == 255)
        assert len(np.unique(stored[z])) > 2  # probabilities, not a mask in disguise


def test_empty_slices_get_no_frame(study):
    _, specs = study
    (series,) = read_dicom_series(specs["ct"].files)
    masks = np.zeros((len(series.slices), *series.pictures[0].size), np.uint8)
    masks[1, 3:9, 4:12] = 1
    masks[3, :2, :] = 1
    spec = SegSpec("binary", ((1, "foreground"),), True, tuple(generic_codes(1)),
                   {"family": "x", "config": "y", "precision": "fp32", "engine": "e"})
    seg = make_seg(series, masks, spec)
    assert seg.NumberOfFrames == 2
    refs = [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for f in seg.PerFrameFunctionalGroupsSequence]
    assert sorted(refs) == sorted(series.instances[series.slices[z].instance].SOPInstanceUID for z in (1, 3))


def test_seg_codes_file_overrides_the_build(study, tiny_build, tmp_path, capsys):
    _, specs = study
    codes = tmp_path / "codes.json"
    liver = {"category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
             "type": {"value": "10200004", "scheme": "SCT", "meaning": "Liver"}}
    codes.write_text(json.dumps({"foreground": liver}))
    code, _, err = run([tiny_build, *specs["ct"].files, "--out", tmp_path / "o", "--seg-codes", codes, "-q"], capsys)
    assert code == 0, err
    seg = hd.seg.segread(str(tmp_path / "o" / f"{specs['ct'].uid}.seg.dcm"))
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert seg.SegmentSequence[0].SegmentLabel == "Liver"
    codes.write_text(json.dumps({"7": liver}))
    code, _, err = run([tiny_build, *specs["ct"].files, "--out", tmp_path / "n", "--seg-codes", codes], capsys)
    assert code == 2 and err.strip().splitlines() == [f"error: {codes}: '7' names no label of this model "
                                                      "(labels: 1 (foreground))"]
    assert not (tmp_path / "n").exists()


def test_bad_series_are_refused_in_one_line_and_written_nowhere(study, tiny_build, tmp_path, capsys):
    folder, specs = study
    bad = tmp_path / "bad"
    mixed, empty = bad_mixed_sizes(bad), bad_no_pixels(bad)
    code, _, err = run([tiny_build, bad, "--out", tmp_path / "o1"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: series "), err
    assert "mixed image sizes" in lines[0] or "DICOM file has no pixel data" in lines[0]
    assert not (tmp_path / "o1").exists() or tree_digest(tmp_path / "o1") == {}
    code, _, err = run([tiny_build, bad, *specs["ct"].files, "--out", tmp_path / "o2", "--skip-bad", "--json",
                        tmp_path / "r.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    reasons = {s["path"]: s["error"] for s in report["skipped"]}
    assert any(mixed.uid in p and "mixed image sizes: 32x32 (4 instances) and 24x32 (1 instance)" in e
               for p, e in reasons.items()), reasons
    assert any(empty.uid in p and "DICOM file has no pixel data" in e for p, e in reasons.items()), reasons
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == [f"{specs['ct'].uid}.seg.dcm", JOURNAL_NAME]


def test_format_seg_refuses_inputs_that_are_no_series(tiny_build, tmp_path, capsys):
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "a.png")
    code, _, err = run([tiny_build, tmp_path / "a.png", "--out", tmp_path / "o", "--format", "seg"], capsys)
    assert code == 2 and "--format seg writes DICOM SEG of DICOM series" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_format_png_writes_a_nifti_volume_slice_by_slice(tiny_build, tmp_path, capsys):
    volume = np.random.default_rng(1).normal(0, 1, (30, 26, 3)).astype(np.float32)
    write_nifti(tmp_path / "v.nii.gz", volume)
    code, _, err = run([tiny_build, tmp_path / "v.nii.gz", "--out", tmp_path / "png", "--format", "png"], capsys)
    assert code == 0, err
    code, _, err = run([tiny_build, tmp_path / "v.nii.gz", "--out", tmp_path / "nii"], capsys)
    assert code == 0, err
    labels = np.asanyarray(nib.load(str(tmp_path / "nii" / "v_mask.nii.gz")).dataobj)  # (X, Y, Z)
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [JOURNAL_NAME, "v_f000.png", "v_f001.png",
                                                                    "v_f002.png"]
    for z in range(3):
        png = np.asarray(Image.open(tmp_path / "png" / f"v_f{z:03d}.png"))
        np.testing.assert_array_equal(png, labels[..., z] * 255)


def test_resume_knows_a_series_by_all_its_files(study, tiny_build, tmp_path, capsys):
    """The journal records a DICOM series as one input: a rerun with --resume skips every finished series,
    and redoes a series one of whose files changed since (any file of it, not only the first)."""
    folder, specs = study
    out, args = tmp_path / "out", ["--out", tmp_path / "out", "--json", tmp_path / "r.json", "-q"]
    assert run([tiny_build, folder, *args], capsys)[0] == 0
    before = tree_digest(out)
    assert run([tiny_build, folder, *args, "--resume"], capsys)[0] == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["totals"]["resumed"] == len(specs) == report["totals"]["files"] and report["totals"]["segs"] == 0
    assert tree_digest(out) == before
    changed = specs["ct"].files[-1]  # the series' last file in input order
    changed.touch()
    assert run([tiny_build, folder, *args, "--resume"], capsys)[0] == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["totals"]["resumed"] == len(specs) - 1
    assert [e["source_series"] for e in report["series"]] == [specs["ct"].uid]
    assert tree_digest(out)[f"{specs['ct'].uid}.seg.dcm"] != before[f"{specs['ct'].uid}.seg.dcm"]  # new UIDs
