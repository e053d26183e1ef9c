"""export.build / export.verify CLIs: one-line errors, the --force rule, directories left intact."""

from __future__ import annotations

import json
import shutil

import pytest

from export import build as build_mod
from export import verify as verify_mod
from export.build import BuildError, newest_run_checkpoint, parse_batch
from tests.helpers import tree_digest


def one_line_error(capsys, rc, match):
    err = capsys.readouterr().err.strip()
    assert rc == 2
    last = err.splitlines()[-1]  # progress bars may come first (stderr)
    assert last.startswith("error: ") and "Traceback" not in err, err
    assert match in last, err


def test_no_checkpoint_says_how_to_get_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/ here
    rc = build_mod.main(["--out", str(tmp_path / "b")])
    one_line_error(capsys, rc, "python -m icmoe.train")
    assert not (tmp_path / "b").exists()


def test_bad_flags(tmp_path, capsys, tiny_checkpoint):
    rc = build_mod.main(["--checkpoint", str(tiny_checkpoint), "--dynamic-batch", "4,2,8", "--out", str(tmp_path / "b")])
    one_line_error(capsys, rc, "MIN <= OPT <= MAX")
    rc = build_mod.main(["--random-init", "--config", "nope", "--out", str(tmp_path / "b")])
    one_line_error(capsys, rc, "unknown icmoe config 'nope'")
    assert parse_batch("1,2,8") == (1, 2, 8)
    with pytest.raises(BuildError):
        parse_batch("1,x,8")


def test_truncated_checkpoint_is_refused(tmp_path, capsys, tiny_checkpoint):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    w = next(ck.glob("weights-*.safetensors"))
    w.write_bytes(w.read_bytes()[:100])
    rc = build_mod.main(["--checkpoint", str(ck), "--out", str(tmp_path / "b")])
    one_line_error(capsys, rc, "truncated")
    assert not (tmp_path / "b").exists()


def test_existing_build_of_other_model_needs_force(tmp_path, capsys, tiny_build, tiny_checkpoint):
    dst = tmp_path / "b"
    shutil.copytree(tiny_build, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["model"]["name"], m["model"]["config"]["name"], m["model"]["config"]["depth"] = "vit_b", "vit_b", 12
    (dst / "manifest.json").write_text(json.dumps(m))
    before = tree_digest(dst)
    rc = build_mod.main(["--checkpoint", str(tiny_checkpoint), "--out", str(dst)])
    one_line_error(capsys, rc, "pass --force")
    assert tree_digest(dst) == before


def test_non_build_folder_needs_force(tmp_path, capsys, tiny_checkpoint):
    dst = tmp_path / "notes"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep me")
    rc = build_mod.main(["--checkpoint", str(tiny_checkpoint), "--out", str(dst)])
    one_line_error(capsys, rc, "not a build directory")
    assert (dst / "mine.txt").read_text() == "keep me"


def test_newest_run_checkpoint(tmp_path, tiny_checkpoint):
    runs = tmp_path / "runs"
    assert newest_run_checkpoint(runs) is None
    shutil.copytree(tiny_checkpoint, runs / "a" / "last")
    assert newest_run_checkpoint(runs) == runs / "a" / "last"
    shutil.copytree(tiny_checkpoint, runs / "a" / "best")
    assert newest_run_checkpoint(runs) == runs / "a" / "best"


def test_verify_cli(tiny_build, tmp_path, capsys):
    rc = verify_mod.main([str(tiny_build), "-n", "4", "--json", str(tmp_path / "v.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "all engines within bounds" in out
    report = json.loads((tmp_path / "v.json").read_text())
    # OpenVINO runs the FP32 graph (also with BF16 arithmetic) where it is installed (and the CPU has BF16),
    # else each is reported as skipped with the reason
    assert set(report["engines"]) | set(report["skipped"]) == {"onnxruntime-fp32", "onnxruntime-fp16", "openvino-fp32",
                                                               "openvino-bf16"}
    assert all(why.strip() for why in report["skipped"].values())
    assert {"onnxruntime-fp32", "onnxruntime-fp16"} <= set(report["engines"]) and report["passed"]
    assert report["engines"]["onnxruntime-fp32"]["max_abs_logit"] <= 1e-3
    # every engine is timed at batch 1 (what predict's automatic choice ranks by), and eager too
    for r in report["engines"].values():
        assert r["timing"]["latency_ms"] > 0 and r["timing"]["batch"] == 1 and r["timing"]["runs"] >= 3
    assert report["eager_timing"]["latency_ms"] > 0 and report["cpu"]


def test_verify_cli_damaged_build(tiny_build, tmp_path, capsys):
    dst = tmp_path / "b"
    shutil.copytree(tiny_build, dst)
    p = dst / "model.onnx"
    p.write_bytes(p.read_bytes()[:-10])
    before = tree_digest(dst)
    rc = verify_mod.main([str(dst), "-n", "2"])
    one_line_error(capsys, rc, "model.onnx: truncated")
    assert tree_digest(dst) == before
    rc = verify_mod.main([str(tmp_path / "missing")])
    one_line_error(capsys, rc, "no such build directory")
