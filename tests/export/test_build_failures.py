"""A build that fails anywhere leaves the previous build untouched; builds are movable and checked.

- parity failure and a failing Triton step: the old build is byte-for-byte intact, the failed
  one is kept in `<out>.failed/` (with its build.log), the CLI says so in one line (exit 1 / 2);
- a GPU backend that this host cannot run is refused before any export;
- the weights travel with the build (relative path), so a moved build still loads;
- a manifest whose precision contradicts its artifacts is refused;
- version-1 builds and checkpoints (before families) still load, as IC-MoE.
"""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

import icmoe
from engines import EngineError, load_engine
from engines.eager import EagerEngine
from export import build as build_mod
from export import verify as verify_mod
from export.aoti import load_model
from export.build import build
from icmoe.core.io import current_umask
from icmoe.core.manifest import ManifestError, read_manifest
from tests.helpers import tree_digest


@pytest.fixture()
def old_build(tiny_build, tmp_path):
    """A copy of the shared good build, to be (not) replaced."""
    out = tmp_path / "b"
    shutil.copytree(tiny_build, out)
    return out, tree_digest(out)


def test_parity_failure_keeps_the_previous_build(old_build, tiny_checkpoint, capsys):
    out, before = old_build
    # zero tolerance: FP32's float rounding (~1e-7) already fails the gate
    rc = build_mod.main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--dynamic-batch", "1,2,4",
                         "--verify-images", "4", "--atol", "0", "--rtol", "0", "--no-progress", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1, err
    assert err[-1].startswith("error: ") and "parity with eager FP32 failed" in err[-1], err
    assert f"{out} is untouched" in err[-1] and f"{out}.failed" in err[-1], err
    assert tree_digest(out) == before
    failed = out.with_name(f"{out.name}.failed")
    assert read_manifest(failed)["verify"]["passed"] is False
    assert "failed: parity" in (failed / "build.log").read_text()
    assert not [p for p in out.parent.iterdir() if ".staging-" in p.name]


def test_failing_triton_step_keeps_the_previous_build(old_build, tiny_checkpoint, tmp_path, monkeypatch):
    from engines.triton import RepositoryError

    out, before = old_build

    def broken(*args, **kwargs):
        raise RepositoryError("simulated: the model repository could not be written")

    monkeypatch.setattr(build_mod, "make_repository", broken)
    with pytest.raises(RepositoryError, match="is untouched, the failed build is kept in"):
        build(tiny_checkpoint, out=out, batch=(1, 2, 4), verify=False, triton=tmp_path / "repo", progress=False)
    assert tree_digest(out) == before
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("backend", ["tensorrt", "torch-tensorrt"])
def test_unavailable_gpu_backend_is_refused_before_export(backend, tmp_path, tiny_checkpoint, capsys):
    from engines.tensorrt import unavailable_reason

    if unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present here")
    rc = build_mod.main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "b"), "--backend", backend])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: --backend {backend} is unavailable here"), err
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []


def test_build_folder_has_the_usual_mode(tiny_build):
    assert stat.S_IMODE(tiny_build.stat().st_mode) == 0o777 & ~current_umask()


def test_moved_build_still_loads(tiny_build, tmp_path, monkeypatch):
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(tiny_build, moved)
    monkeypatch.chdir(tmp_path)  # relative paths must resolve against the build, not the working directory
    assert read_manifest(moved)["checkpoint"]["path"] == "checkpoint"
    with EagerEngine.from_build(moved) as eager:
        assert eager.name == "eager-shared"
    assert load_model(moved).config.name == "tiny"  # the AOTInductor packager finds the weights too


def test_edited_precision_is_refused(tiny_build, tmp_path, capsys):
    dst = tmp_path / "b"
    shutil.copytree(tiny_build, dst)
    m = json.loads((dst / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps({**m, "precision": "fp32"}))  # precisions still says fp16
    with pytest.raises(ManifestError, match="precision 'fp32', but precisions starts with 'fp16'"):
        read_manifest(dst)
    m["precision"] = "fp32"  # the build holds an FP16 graph: the manifest now lies
    del m["precisions"]  # as a manifest written before builds held several precisions
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="lists model.fp16.onnx of another precision"):
        read_manifest(dst)
    with pytest.raises(EngineError, match="another precision"):
        load_engine(dst, "onnxruntime")
    rc = verify_mod.main([str(dst), "-n", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and "another precision" in err[-1]


def test_version_1_build_and_checkpoint_load_as_icmoe(tiny_build, tmp_path):
    dst = tmp_path / "v1"
    shutil.copytree(tiny_build, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["version"] = 1
    del m["model"]["family"]
    m["checkpoint"]["path"] = str((dst / "checkpoint").resolve())  # version 1 stored absolute paths
    (dst / "manifest.json").write_text(json.dumps(m))
    ck = json.loads((dst / "checkpoint" / "config.json").read_text())
    ck["version"] = 1
    del ck["family"]
    (dst / "checkpoint" / "config.json").write_text(json.dumps(ck))
    assert read_manifest(dst)["model"]["family"] == "icmoe"
    assert icmoe.checkpoint.read_meta(dst / "checkpoint")["family"] == "icmoe"
    with load_engine(dst, "onnxruntime", "fp32") as ort, load_engine(dst, "eager") as eager:
        x = icmoe.families.get_family("icmoe").parity.synthetic_inputs(2, 128)
        assert (ort.infer(x)["expert"] == eager.infer(x)["expert"]).all()
    assert os.path.isabs(read_manifest(dst)["checkpoint"]["path"])
