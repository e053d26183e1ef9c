"""benchmarks/volume.py on the tiny build: a small generated volume as NIfTI and as a DICOM series, end to
end and inference alone per engine, in a process per engine; the figures are consistent and the label
volume predict writes is the one the benchmark timed. Speed targets are not asserted here (a shared CI
machine; docs/measurements.md records measured runs), only that the report holds what it claims."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "volume.py"
pytest.importorskip("pydicom", reason="needs pydicom (the dicom extra) to write the DICOM series")


@pytest.fixture(scope="module")
def report(tiny_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("volume")
    cmd = [sys.executable, str(SCRIPT), "--build", str(tiny_build), "--slices", "6", "--size", "160",
           "--batch-size", "4", "--engines", "eager-shared,onnxruntime-fp32,openvino-int8", "--out", str(out),
           "--no-progress", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "volume-icmoe-tiny-6x160.json").read_text()), proc.stdout


def test_every_engine_and_format_is_measured(report):
    r, stdout = report
    assert set(r["engines"]) == {"eager-shared", "onnxruntime-fp32"}
    assert r["skipped"] == {"openvino-int8": "not run: the build holds no INT8 graph (build it with --precision "
                                             "fp16,int8)"}
    for name, by_format in r["engines"].items():
        assert set(by_format) == {"nifti", "dicom"}
        for fmt, e in by_format.items():
            assert e["slices"] == 6 and e["files"] == 1  # one NIfTI file, or one DICOM series of 6 files
            assert e["seconds"] > 0 and e["inference_seconds"] > 0 and e["peak_mib"] > 0
            assert e["ratio"] == pytest.approx(e["seconds"] / e["inference_seconds"])
            assert e["mode"] == "throughput"  # a volume, or a series of files: throughput settings
    assert "end to end / inference" in stdout and "Largest end to end / inference" in stdout
    assert r["load_avg_before"] >= 0 and r["cpu"]
