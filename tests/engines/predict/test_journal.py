"""`predict --resume` and the run's journal (engines/predict/journal.py), for real: a run killed with SIGKILL,
a torn journal line, outputs damaged or deleted afterwards, a full disk (a small tmpfs mounted here).

Each case ends with every output equal, byte for byte, to a clean run's, and no temporary file left. The
model is the multi-class toy build (conftest.py `labels_build`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from engines.predict import main as predict_main
from engines.predict.journal import JOURNAL_NAME
from tests.helpers import REPO_ROOT, flip_middle_byte, tree_digest
from tests.icmoe.data.samples import blob_image

N_FILES = 200


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """N_FILES small PNGs of different sizes, two levels deep."""
    folder = tmp_path_factory.mktemp("archive")
    for k in range(N_FILES):
        path = folder / f"part{k % 3}" / f"scan_{k:04d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(blob_image(30 + k % 17, 40 + k % 13, k, 3)).save(path)
    return folder


def run(args, capsys=None):
    code = predict_main([str(a) for a in args] + ["--no-progress", "--threads", "1"])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


@pytest.fixture(scope="module")
def clean(labels_build, inputs, tmp_path_factory):
    """The outputs of one uninterrupted run: relative name -> sha256 (the journal left out)."""
    out = tmp_path_factory.mktemp("clean") / "out"
    assert run([labels_build, inputs, "--out", out])[0] == 0
    return _masks(out)


def _masks(out: Path) -> dict:
    return {k: v for k, v in tree_digest(out).items() if k != JOURNAL_NAME}


def _records(journal: Path) -> list:
    """The complete records of a journal (its header left out; a torn last line ignored)."""
    if not journal.is_file():
        return []
    lines = journal.read_bytes().split(b"\n")
    out = []
    for line in lines[1:]:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _hidden(out: Path) -> list:
    return sorted(p.name for p in out.rglob(".*"))


def test_sigkill_mid_run_then_resume_equals_a_clean_run(labels_build, inputs, clean, tmp_path, capsys):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "engines.predict", str(labels_build), str(inputs), "--out", str(out),
           "--batch-size", "1", "--no-progress", "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while len(_records(out / JOURNAL_NAME)) < 10 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, proc.stderr.read()
    proc.stderr.close()
    done = len(_records(out / JOURNAL_NAME))
    assert 10 <= done < N_FILES, f"the run was not stopped mid-way ({done} of {N_FILES} files recorded)"
    partial = _masks(out)
    assert all(clean[k] == v for k, v in partial.items() if not Path(k).name.startswith("."))  # complete or absent

    code, err = run([labels_build, inputs, "--out", out, "--resume", "--json", tmp_path / "report.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["totals"]["resumed"] >= done and report["totals"]["files"] == N_FILES
    assert len(report["images"]) == N_FILES
    assert _masks(out) == clean and _hidden(out) == []
    assert len(_records(out / JOURNAL_NAME)) == N_FILES
    with capsys.disabled():
        print(f"\nSIGKILL after {done} of {N_FILES} files recorded ({len(partial)} files in --out); --resume skipped "
              f"{report['totals']['resumed']}, redid {N_FILES - report['totals']['resumed']}; every output equals "
              "the clean run's")


def test_resume_drops_a_torn_line_and_redoes_damaged_outputs(labels_build, inputs, clean, tmp_path, capsys):
    out = tmp_path / "out"
    assert run([labels_build, inputs, "--out", out], capsys)[0] == 0
    journal = out / JOURNAL_NAME
    with open(journal, "ab") as f:
        f.write(b'{"input": "/half/a/line')  # what a kill in the middle of an append leaves
    masks = sorted(out.rglob("scan_*.png"))
    flip_middle_byte(masks[0])
    masks[1].unlink()
    source = inputs / "part2" / "scan_0002.png"
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # the input changed
    code, err = run([labels_build, inputs, "--out", out, "--resume", "--json", tmp_path / "r.json"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["totals"]["resumed"] == N_FILES - 3
    assert _masks(out) == clean
    lines = journal.read_bytes().decode().splitlines()
    assert all(json.loads(line) for line in lines)  # the torn line is gone


def test_resume_refuses_a_journal_of_other_settings(labels_build, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    one = inputs / "part0" / "scan_0000.png"
    assert run([labels_build, one, "--out", out, "--resume"], capsys)[0] == 0  # no journal yet: a fresh run
    before = tree_digest(out)
    code, err = run([labels_build, one, "--out", out, "--resume", "--window=0,100"], capsys)
    assert code == 2 and err.startswith("error: --resume: ") and "other settings (window)" in err, err
    assert len(err.strip().splitlines()) == 1 and tree_digest(out) == before


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MiB tmpfs mounted for the test (root and a kernel that allows it), unmounted afterwards."""
    where = tmp_path / "disk"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"needs a small tmpfs (mount as root): {proc.stderr.strip() or proc.returncode}")
    yield where
    subprocess.run(["umount", str(where)], check=True)


def test_full_disk_stops_naming_the_file_and_keeps_what_was_written(labels_build, inputs, clean, tmpfs, capsys):
    filler = tmpfs / "filler"
    filler.write_bytes(bytes(2048 * 1024 - 48 * 1024))  # about a dozen 4 KiB pages left
    out = tmpfs / "out"
    code, err = run([labels_build, inputs, "--out", out], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {out}/") and lines[0].endswith(": cannot write (No space left on device)")
    written = _masks(out)
    assert 0 < len(written) < N_FILES and all(clean[k] == v for k, v in written.items()), written
    assert _hidden(out) == []  # no temporary file left
    recorded = {p for r in _records(out / JOURNAL_NAME) for p in r["outputs"]}
    assert recorded <= set(written)
    with capsys.disabled():
        print(f"\nfull disk: {lines[0].split(': ', 1)[1]}; {len(written)} complete masks kept, {len(recorded)} "
              "recorded")

    filler.unlink()
    code, err = run([labels_build, inputs, "--out", out, "--resume"], capsys)
    assert code == 0, err
    assert _masks(out) == clean
