"""`python -m engines.predict` on the fuzz corpus (tests/icmoe/data/hostile.py): every hostile file alone is
refused with one line naming it and exit code 2, and nothing is written; with --skip-bad, a folder mixing
them with good files of every kind still gets every good file's mask, equal to the engine's own answer.

The model is the multi-class toy build (conftest.py `labels_build`: 64x64, ONNX Runtime, labels 0..2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engines import load_engine
from engines.predict import main as predict_main
from icmoe.data.images import IMAGE_SUFFIXES
from tests.engines.predict.test_predict import GOOD, check_masks
from tests.helpers import REPO_ROOT
from tests.icmoe.data.hostile import write_corpus
from tests.icmoe.data.samples import write_samples

pytest.importorskip("pydicom", reason="needs pydicom (the dicom extra)")

# A few hostile files through the real command (a new interpreter each): the rest run in-process.
SUBPROCESS_CASES = ("nifti_30000_cubed_gzip.nii.gz", "png_65535x65535.png", "dicom_pixel_length_lies.dcm",
                    "jpeg_huffman_counts_over_256.jpg")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("hostile"))


def _command(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "engines.predict", *map(str, args), "--no-progress", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env)


def test_each_hostile_file_is_refused_in_one_line(labels_build, corpus, tmp_path, capsys):
    refused = {}
    for name, path in sorted(corpus.items()):
        out = tmp_path / name
        code = predict_main([str(labels_build), str(path), "--out", str(out), "--no-progress", "--threads", "1"])
        err = capsys.readouterr().err
        assert code == 2, f"{name}: exit {code}: {err}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), f"{name}: {err}"
        assert not out.exists(), f"{name}: {out} was written"
        refused[name] = lines[0].split(": ", 2)[-1]
    print(f"\n{len(refused)} hostile files refused; e.g. nifti_30000_cubed_gzip.nii.gz: "
          f"{refused['nifti_30000_cubed_gzip.nii.gz']}")


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_the_real_command_refuses_them(labels_build, corpus, tmp_path, name):
    """A new interpreter running `python -m engines.predict` (tests/icmoe/data/test_limits.py shows that the
    headers are refused before any pixel data is read)."""
    out = tmp_path / "out"
    proc = _command(labels_build, corpus[name], "--out", out)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {corpus[name]}: "), proc.stderr
    assert not out.exists()


def test_skip_bad_over_a_hostile_folder_writes_every_good_mask(labels_build, corpus, tmp_path):
    folder = next(iter(corpus.values())).parent  # searched for the image suffixes (PPM and PGM only by name)
    samples = write_samples(folder)  # the good files of every kind (and one corrupt PNG) in the same folder
    out, report = tmp_path / "out", tmp_path / "report.json"
    proc = _command(labels_build, folder, "--out", out, "--skip-bad", "--json", report)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    bad = {str(p) for p in corpus.values() if p.name.endswith(IMAGE_SUFFIXES)} | {str(samples["corrupt"].path)}
    skipped = json.loads(report.read_text())["skipped"]
    assert {s["path"] for s in skipped} == bad and len(errors) == len(bad)
    with load_engine(labels_build, "onnxruntime", threads=1) as engine:
        check_masks(engine, (folder, samples), out, binary=False, kinds=GOOD)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    print(f"\n--skip-bad: {len(bad)} hostile files skipped, {len(written) - 1} masks written for the "
          f"{len(GOOD)} good files (+ the journal)")
