"""A build that fails anywhere leaves the previous build untouched; builds are movable and checked.

- every stage of `export.build.STAGES` failing in turn, and the final renames failing half-way: the
  previous build and Triton repository are byte-for-byte intact and no staging or set-aside folder
  is left beside them; a `--triton` target that cannot be a folder is refused before anything is written;
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
from export.build import Stage, build
from icmoe.core.io import current_umask
from icmoe.core.manifest import ManifestError, read_manifest
from tests.helpers import tree_digest


@pytest.fixture()
def old_build(tiny_build, tmp_path):
    """A copy of the shared good build, to be (not) replaced."""
    out = tmp_path / "b"
    shutil.copytree(tiny_build, out)
    return out, tree_digest(out)


@pytest.fixture()
def previous(tiny_build, tmp_path):
    """A previous build (`b`) and a Triton repository written from it (`tri/repo`), with their digests."""
    from engines.triton import make_repository

    out, repo = tmp_path / "b", tmp_path / "tri" / "repo"
    shutil.copytree(tiny_build, out)
    make_repository(out, repo, kinds=["onnxruntime", "python"])  # what a build without verify results writes
    (repo / "other_model").mkdir()  # a model of another build: a new build must leave it alone
    (repo / "other_model" / "config.pbtxt").write_text('name: "other_model"\n')
    return out, repo, tree_digest(out), tree_digest(repo)


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def _failing(stage: Stage) -> Stage:
    """`stage`, made to run in every build and then fail: where it applies, after its real work; elsewhere
    (another precision, a GPU backend) after writing a file into the staging folder as such a stage would."""

    def run(state):
        if stage.applies(state):
            stage.run(state)
        else:
            (state.staging / f"{stage.name}.partial").write_bytes(b"half-written")
        raise OSError(f"simulated failure inside stage {stage.name}")

    return Stage(stage.name, run, lambda state: True)


@pytest.fixture()
def reuse_graph(tiny_build, monkeypatch):
    """The ONNX export of `tiny_checkpoint` at batch 1..4 is `tiny_build`'s model.onnx: copy it instead of
    exporting again (the stage itself, its manifest entry included, runs as usual)."""
    def export_onnx(model, path, **kwargs):
        shutil.copyfile(tiny_build / "model.onnx", path)
        return path

    monkeypatch.setattr(build_mod, "export_onnx", export_onnx)


@pytest.mark.parametrize("failing", [s.name for s in build_mod.STAGES])
def test_any_failing_stage_leaves_everything_as_it_was(failing, previous, tiny_checkpoint, monkeypatch, reuse_graph):
    out, repo, out_before, repo_before = previous
    parent_before, repo_parent_before = _listing(out.parent), _listing(repo.parent)
    monkeypatch.setattr(build_mod, "STAGES", [_failing(s) if s.name == failing else s for s in build_mod.STAGES])
    with pytest.raises(OSError, match=f"simulated failure inside stage {failing}"):
        build(tiny_checkpoint, out=out, precision="fp32", batch=(1, 2, 4), backend="onnxruntime",
              verify_images=2, triton=repo, progress=False)
    assert tree_digest(out) == out_before and tree_digest(repo) == repo_before
    assert _listing(out.parent) == parent_before, "a staging or set-aside folder was left next to the build"
    assert _listing(repo.parent) == repo_parent_before, "a staging folder was left next to the Triton repository"


def test_triton_models_and_build_are_put_in_place_together(previous, tiny_checkpoint, reuse_graph):
    out, repo, _, repo_before = previous
    build(tiny_checkpoint, out=out, precision="fp32", batch=(1, 2, 4), backend="onnxruntime", verify=False,
          triton=repo, progress=False)
    assert read_manifest(out)["precision"] == "fp32" and not (out / ".triton").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert _listing(out.parent) == ["b", "tri"] and _listing(repo.parent) == ["repo"]
    assert _listing(repo) == ["icmoe_onnxruntime", "icmoe_python", "other_model"]
    after = tree_digest(repo)
    assert after["other_model/config.pbtxt"] == repo_before["other_model/config.pbtxt"]
    assert after["icmoe_onnxruntime/1/model.onnx"] == tree_digest(out)["model.onnx"]  # the new graph, not the old
    assert after["icmoe_onnxruntime/1/model.onnx"] != repo_before["icmoe_onnxruntime/1/model.onnx"]


def test_renames_failing_half_way_are_undone(tmp_path):
    """`_commit` sets every existing target aside before replacing it; a rename that fails puts back the ones done."""
    old, new = tmp_path / "target", tmp_path / ".staged"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "f").write_text(text)
    with pytest.raises(FileNotFoundError):
        build_mod._commit([(new, old), (tmp_path / ".gone", tmp_path / "other")])
    assert (old / "f").read_text() == "old" and (new / "f").read_text() == "new"
    assert _listing(tmp_path) == [".staged", "target"]
    build_mod._commit([(new, old)])
    assert (old / "f").read_text() == "new" and _listing(tmp_path) == ["target"]


def test_triton_target_under_a_file_is_refused_before_anything_is_written(previous, tiny_checkpoint, capsys):
    out, _, out_before, _ = previous
    blocker = out.parent / "X"
    blocker.write_text("a regular file")
    listing = _listing(out.parent)
    rc = build_mod.main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--force", "--triton",
                         str(blocker / "repo"), "--no-progress", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"error: --triton {blocker / 'repo'}: {blocker} is not a directory"], err
    assert tree_digest(out) == out_before and _listing(out.parent) == listing


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
        build(tiny_checkpoint, out=out, batch=(1, 2, 4), verify=False, triton=tmp_path / "new" / "repo",
              progress=False)
    assert tree_digest(out) == before
    assert not (tmp_path / "new").exists(), "the folders made for the repository are removed again"
    assert not any(p.name.startswith(".") for p in (out.parent / "b.failed").iterdir())


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
