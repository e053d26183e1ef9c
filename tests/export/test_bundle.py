"""`python -m export.bundle`: a MONAI Bundle of a build that `python -m monai.bundle run` (a subprocess, offline)
runs on a folder of a PNG, a NIfTI volume and DICOM series, giving the masks `predict` gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from engines.predict import main as predict_main
from export.bundle import main as bundle_main
from icmoe.core.io import sha256_file
from tests.helpers import REPO_ROOT, tree_digest
from tests.icmoe.data.samples import blob_image, write_nifti
from tests.icmoe.data.series_samples import write_study

pytest.importorskip("monai.bundle", reason="needs MONAI (the monai extra)")
pytest.importorskip("fire", reason="needs fire (the monai extra: monai.bundle's command line)")
hd = pytest.importorskip("highdicom", reason="needs highdicom (the dicom extra)")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle_inputs")
    Image.fromarray(blob_image(40, 52, 1), "L").save(folder / "photo.png")
    write_nifti(folder / "volume.nii.gz", np.random.default_rng(0).normal(0, 1, (24, 20, 3)).astype(np.float32))
    specs = write_study(folder / "dicom", n=4)
    return folder, specs


def bundle_run(bundle, inputs, out, *extra):
    """`python -m monai.bundle run` in the bundle's folder, offline, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "NO_PROXY": "*"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--dataset_dir", str(inputs), "--output_dir", str(out), *extra]
    proc = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def same_outputs(a, b, folder, specs):
    """The PNG, NIfTI and SEG outputs of two runs hold the same masks (SEGs: frame by frame, same source)."""
    np.testing.assert_array_equal(np.asarray(Image.open(a / "photo.png")), np.asarray(Image.open(b / "photo.png")))
    va, vb = nib.load(str(a / "volume_mask.nii.gz")), nib.load(str(b / "volume_mask.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(va.dataobj), np.asanyarray(vb.dataobj))
    np.testing.assert_array_equal(va.affine, vb.affine)
    for spec in specs.values():
        sa, sb = (hd.seg.segread(str(x / "dicom" / f"{spec.uid}.seg.dcm")) for x in (a, b))
        ref = [[f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                for f in s.PerFrameFunctionalGroupsSequence] for s in (sa, sb)]
        assert ref[0] == ref[1] and sa.NumberOfFrames == sb.NumberOfFrames > 0
        np.testing.assert_array_equal(sa.pixel_array, sb.pixel_array)
        assert [x.SegmentLabel for x in sa.SegmentSequence] == [x.SegmentLabel for x in sb.SegmentSequence]


@pytest.mark.parametrize("build_name, backend", [("tiny_build", "onnxruntime"), ("moesam_build", "eager")])
def test_monai_bundle_run_gives_predicts_masks(build_name, backend, inputs, tmp_path, request, capsys):
    build = request.getfixturevalue(build_name)
    folder, specs = inputs
    bundle = tmp_path / "bundle"
    assert bundle_main([str(build), "--out", str(bundle), "--backend", backend, "-q"]) == 0
    assert {p.name for p in bundle.iterdir()} == {"configs", "models", "docs"}
    assert sha256_file(bundle / "models" / "manifest.json") == sha256_file(build / "manifest.json")
    bundle_run(bundle, folder, tmp_path / "monai")
    assert predict_main([str(build), str(folder), "--out", str(tmp_path / "predict"), "--backend", backend,
                         "--no-progress", "-q"]) == 0
    same_outputs(tmp_path / "monai", tmp_path / "predict", folder, specs)
    report = json.loads((tmp_path / "monai" / "predict_report.json").read_text())
    assert report["engine"].startswith("monai-SimpleInferer-") and len(report["series"]) == len(specs)


def test_metadata_declares_the_manifests_contract(tiny_build, moesam_build, tmp_path):
    for build in (tiny_build, moesam_build):
        out = tmp_path / build.name
        assert bundle_main([str(build), "--out", str(out), "-q"]) == 0
        meta = json.loads((out / "configs" / "metadata.json").read_text())
        manifest = json.loads((build / "manifest.json").read_text())
        fmt = meta["network_data_format"]
        assert list(fmt["inputs"]) == [s["name"] for s in manifest["inputs"]]
        assert list(fmt["outputs"]) == [s["name"] for s in manifest["outputs"]]
        size = manifest["image_size"]
        assert fmt["inputs"]["image"]["spatial_shape"] == [size, size] and fmt["inputs"]["image"]["num_channels"] == 3
        classes = manifest["model"]["classes"] or ["background", "foreground"]
        assert fmt["outputs"]["mask"]["channel_def"] == {str(i): n for i, n in enumerate(classes)}
        assert meta["icmoe"]["classes"] == classes
        assert meta["icmoe"]["segment_codes"] == manifest["model"]["segment_codes"]
        assert meta["icmoe"]["version"] and meta["version"] and "Research use only" in meta["intended_use"]
        config = json.loads((out / "configs" / "inference.json").read_text())
        assert config["run"] == ["$@predictor.run()"] and config["network_def"]["_target_"].endswith("EngineNetwork")
        assert "MONAI Label" in (out / "docs" / "README.md").read_text()


def test_an_existing_folder_is_never_replaced(tiny_build, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = tree_digest(out)
    assert bundle_main([str(tiny_build), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {out} exists; choose a new --out folder"
    assert tree_digest(out) == before and [p.name for p in tmp_path.iterdir()] == ["taken"]
