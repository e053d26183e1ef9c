"""Trainer: checkpoints, resume after SIGKILL, DistributedDataParallel with gloo, the CLI convention.

All runs use the tiny config at 64x64 on a small synthetic set so they take seconds.
Progress lines go to stderr (logging); stdout carries only `--json -`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import icmoe
from icmoe.checkpoint import read_meta
from icmoe.data import make_synthetic_dataset
from icmoe.families import get_family
from icmoe.families.icmoe import build_icmoe
from icmoe.train import main as train_main
from icmoe.training import TrainOptions, default_run_dir, train
from tests.helpers import REPO_ROOT

ICMOE = get_family("icmoe")

ROOT = REPO_ROOT
SIZE = 64


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _train_cmd(data: Path, out: Path, *extra: str, torchrun: int = 0) -> list:
    args = ["-m", "icmoe.train", "--dataset", "synthetic", "--data-root", str(data), "--config", "tiny",
            "--image-size", str(SIZE), "--out", str(out), "--no-progress", *extra]
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", *args]
    return [sys.executable, *args]


def _run(cmd: list, timeout: float = 240) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _weights(ckpt: Path) -> dict:
    meta = read_meta(ckpt)
    return load_file(str(ckpt / meta["weights"]))


def _log(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root, n_train=16, n_val=4, size=SIZE, seed=0)
    return root


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory) -> Path:
    """3 epochs x 4 steps, uninterrupted (demo recipe: AdamW, flips, SgCL, balancing)."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    _run(_train_cmd(data, out, "--epochs", "3", "--batch-size", "4"))
    return out


def test_run_writes_checkpoints_and_log(reference_run):
    rows = _log(reference_run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 1e-3 * 0.5, 1e-3 * 0.1])  # drops at 50% / 75%
    for r in rows:
        assert set(r["val"]["pooled"]) == {"dsc", "iou", "accuracy", "recall", "precision"}
        assert set(r["val"]["per_image"]) == set(r["val"]["pooled"])
        assert r["train"]["sgcl"] > 0 and r["val"]["n_images"] == 4
    # best/ is the epoch with the best pooled DSC; last/ the final epoch; both load.
    best_epoch = max(rows, key=lambda r: (r["val"]["pooled"]["dsc"], -r["epoch"]))["epoch"]
    assert read_meta(reference_run / "best")["epoch"] == best_epoch
    assert read_meta(reference_run / "last")["epoch"] == 3
    model = icmoe.load(reference_run / "last", expect="tiny")
    assert model.config.image_size == SIZE and not model.training
    # Training moved the trainable weights and left the frozen backbone alone.
    torch.manual_seed(0)  # the run's seed-0 init is the first use of the RNG
    init = build_icmoe(model.config)
    w = _weights(reference_run / "last")
    assert torch.equal(w["encoder.vit.blocks.0.attn.qkv.weight"], init.state_dict()["encoder.vit.blocks.0.attn.qkv.weight"])
    assert not torch.allclose(w["decoders.2.output_upscaling.0.weight"], init.state_dict()["decoders.2.output_upscaling.0.weight"])
    state = torch.load(reference_run / "last" / "trainer_state.pt", weights_only=True)
    assert state["epoch"] == 3 and any(k.startswith("sgcl.w1") for k in state["trainable"])
    assert state["family"] == "icmoe" and state["dataset"] == "synthetic"


def test_resume_after_sigkill_matches_uninterrupted_run(data, reference_run, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(data, out, "--epochs", "3", "--batch-size", "4"), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "metrics.jsonl"
    deadline = time.time() + 180
    try:
        # Killed as soon as epoch 1 is logged: an epoch takes a fraction of a second on a quiet machine,
        # so any fixed wait could let the run finish first.
        while time.time() < deadline and not (log.is_file() and log.read_text().strip()):
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = [r["epoch"] for r in _log(out)]
    assert done and done[-1] < 3, done
    # Without --resume an existing run is refused (no silent overwrite).
    res = subprocess.run(_train_cmd(data, out, "--epochs", "3", "--batch-size", "4"), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and res.stderr.strip().startswith("error:") and "--resume" in res.stderr
    res = _run(_train_cmd(data, out, "--epochs", "3", "--batch-size", "4", "--resume"))
    assert f"after epoch {done[-1]}" in res.stderr
    assert [r["epoch"] for r in _log(out)] == [1, 2, 3]
    ref, got = _weights(reference_run / "last"), _weights(out / "last")
    assert _max_diff(ref, got) <= 1e-5
    for name in ("best", "last"):
        assert read_meta(out / name)["epoch"] == read_meta(reference_run / name)["epoch"]
    ref_state = torch.load(reference_run / "last" / "trainer_state.pt", weights_only=True)
    got_state = torch.load(out / "last" / "trainer_state.pt", weights_only=True)
    assert _max_diff(ref_state["trainable"], got_state["trainable"]) <= 1e-5  # SgCL heads too


def test_distributed_two_gloo_processes_match_single_process(data, tmp_path):
    # Balancing and SgCL make the loss depend on the batch as a whole (like BatchNorm), so the
    # single-process equivalent of 2 x 2 images is exact only with them off.
    extra = ["--epochs", "2", "--batch-size", "4", "--no-balance", "--sgcl-weight", "0"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    res = _run(_train_cmd(data, ddp, *extra, torchrun=2))
    assert "2 processes x 2" in res.stderr
    _run(_train_cmd(data, single, *extra))
    rows = _log(ddp)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:  # both ranks hold bit-identical trainable weights after every epoch
        hashes = r["rank_weights_sha256"]
        assert len(hashes) == 2 and hashes[0] == hashes[1]
    a, b = _weights(ddp / "last"), _weights(single / "last")
    torch.manual_seed(0)
    init = build_icmoe(ICMOE.get_config("tiny", image_size=SIZE)).state_dict()
    moved = max(float((b[k] - init[k]).abs().max()) for k in b)
    diff = _max_diff(a, b)
    assert moved > 1e-3, "training did not move the weights"
    assert diff <= 1e-4 and diff < moved / 50, (diff, moved)
    # Validation under DDP counts every image once.
    assert rows[-1]["val"]["n_images"] == 4
    assert rows[-1]["val"]["pooled"] == pytest.approx(_log(single)[-1]["val"]["pooled"], abs=1e-3)


def test_cli_errors_are_one_line(tmp_path):
    bad = [sys.executable, "-m", "icmoe.train", "--dataset", "busi", "--data-root", str(tmp_path / "none"),
           "--out", str(tmp_path / "run"), "--no-progress"]
    res = subprocess.run(bad, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {tmp_path / 'none'}: data root does not exist"]
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_run_of_another_family(data, reference_run, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(reference_run, out)
    path = out / "last" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    state["family"] = "another"
    torch.save(state, path)
    with pytest.raises(icmoe.CheckpointError, match="another model or dataset"):
        train(dataset="synthetic", data_root=data, out=out, config="tiny", image_size=SIZE, epochs=4,
              batch_size=4, resume=True, progress=False, device="cpu")


class _RunsCode:
    """Unpickling this creates a file: what a hostile state file could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("kind", ["pickled RNG states", "code"])
def test_resume_refuses_a_pickled_state_without_running_it(kind, data, reference_run, tmp_path, capsys):
    """A state of the older format (Python and NumPy RNG objects) or with an object that runs code on
    unpickling is refused in one line that says how to go on; nothing in it runs."""
    import pickle
    import random

    import numpy as np

    out, marker = tmp_path / "theirs", tmp_path / "ran"
    shutil.copytree(reference_run, out)
    path = out / "last" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    del state["format"]
    state["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if kind == "code":
        state["best"] = _RunsCode(marker)
    torch.save(state, path, pickle_module=pickle)
    before = path.read_bytes()
    rc = train_main(["--dataset", "synthetic", "--data-root", str(data), "--config", "tiny", "--image-size", str(SIZE),
                     "--out", str(out), "--epochs", "4", "--batch-size", "4", "--resume", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {path}: a trainer state in the older pickled format") and "--out" in err[0], err
    assert not marker.exists(), "loading the state ran code"
    assert path.read_bytes() == before and [r["epoch"] for r in _log(out)] == [1, 2, 3]


def test_rng_states_round_trip_as_tensors():
    import random

    import numpy as np

    from icmoe.training.state import rng_state, set_rng_state

    random.gauss(0, 1)  # a cached Gaussian is part of both states
    np.random.standard_normal()
    saved = rng_state()
    expected = (random.random(), random.gauss(0, 1), float(np.random.standard_normal()), float(torch.rand(())))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    set_rng_state(saved)
    assert (random.random(), random.gauss(0, 1), float(np.random.standard_normal()), float(torch.rand(()))) == expected
    assert isinstance(saved["python"]["state"], torch.Tensor) and isinstance(saved["numpy"]["keys"], torch.Tensor)


def test_options_default_paths_name_the_family():
    opts = TrainOptions(dataset="busi", model="icmoe", config="tiny")
    assert opts.out == default_run_dir("icmoe", "busi", "tiny") == Path("runs/icmoe-busi-tiny")
    assert opts.data_root == Path("data/busi")
    assert TrainOptions(dataset="busi").config == "vit_b"  # the default of every command
    with pytest.raises(TypeError):
        train(opts, epochs=1)


def test_cli_default_run_folder_contains_the_family(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = train_main(["--dataset", "synthetic", "--data-root", str(data), "--config", "tiny", "--image-size",
                     str(SIZE), "--epochs", "0", "--batch-size", "4", "--no-progress", "--device", "cpu",
                     "--json", "-"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(Path("runs") / "icmoe-synthetic-tiny") and summary["model"] == "icmoe"
    assert (tmp_path / "runs" / "icmoe-synthetic-tiny" / "metrics.jsonl").is_file()


def test_cli_help_lists_the_common_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--config", "--json", "--no-progress", "--quiet", "--verbose", "--resume", "recipes"):
        assert flag in text, flag


def test_cli_bad_flag_exits_2_with_one_line():
    res = subprocess.run([sys.executable, "-m", "icmoe.train", "--bogus"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--bogus" in lines[0]


def test_cli_unknown_config_and_bad_batch_exit_2(data, tmp_path, capsys):
    base = ["--dataset", "synthetic", "--data-root", str(data), "--out", str(tmp_path / "run"), "--no-progress"]
    assert train_main([*base, "--config", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown icmoe config 'nope'; choose from tiny, vit_b"]
    assert train_main([*base, "--config", "tiny", "--batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: need a batch size >= 1")
    assert not (tmp_path / "run").exists()


def test_a_family_without_training_hooks_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from icmoe.families import FAMILIES

    monkeypatch.setitem(FAMILIES, "toy", "tests.icmoe.families.toy:FAMILY")  # exports and serves, never trains
    rc = train_main(["--model", "toy", "--config", "tiny", "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: Toy SAM has no training recipes (it cannot be trained here)"]
    assert not (tmp_path / "run").exists()


def test_recipe_schedules_are_functions_of_the_iteration():
    from icmoe.families.icmoe.recipe import RECIPES
    from icmoe.training.recipe import Recipe

    step = RECIPES["paper"]  # IC-MoE: 1e-5, x0.5 from 50%, x0.1 from 75% of the epochs, per epoch
    assert [step.lr_at(e * 10, 10) for e in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1e-5, 1e-5, 5e-6, 5e-6, 1e-6, 1e-6])
    assert step.lr_at(509, 10) == step.lr_at(500, 10)  # constant within an epoch
    poly = Recipe(lr=1e-3, schedule="poly", warmup=4, power=0.9, epochs=2)
    assert [poly.lr_at(i, 10) for i in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert [poly.lr_at(i, 10) for i in (4, 14)] == pytest.approx([1e-3, 1e-3 * 0.5 ** 0.9])
    saved = Recipe.from_dict({k: list(v) if isinstance(v, tuple) else v
                              for k, v in {"lr": 2e-3, "betas": (0.8, 0.9), "lr_factors": (0.3,)}.items()})
    assert saved.betas == (0.8, 0.9) and saved.lr_factors == (0.3,) and saved.schedule == "step"
