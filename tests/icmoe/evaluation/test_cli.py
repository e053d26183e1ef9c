"""Metrics and the evaluation CLI (`python -m icmoe.evaluate`): JSON output, overlays, the CLI convention."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import icmoe
from icmoe.data import build_dataset, make_synthetic_dataset
from icmoe.evaluate import main as evaluate_main
from icmoe.evaluation import evaluate
from icmoe.evaluation.binary import evaluate_model
from icmoe.evaluation.metrics import MetricAccumulator, confusion, metrics_from_counts
from icmoe.evaluation.overlays import overlay
from icmoe.families import get_family
from icmoe.families.icmoe import build_icmoe
from icmoe.families.icmoe.recipe import _segment
from tests.helpers import REPO_ROOT

ICMOE = get_family("icmoe")

ROOT = REPO_ROOT
SIZE = 64


def test_metrics_pooled_and_per_image():
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2, :2] = 1  # 4 px
    target[1, 0, :, :] = 1  # 16 px
    pred = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    pred[0, 0, :2, :] = 1  # 8 px, 4 right
    pred[1, 0, :2, :] = 1  # 8 px, all right
    c = confusion(pred, target)
    assert c.tolist() == [[4, 4, 0, 8], [8, 0, 8, 0]]
    acc = MetricAccumulator()
    acc.update(pred, target)
    r = acc.compute()
    # Per image: DSC 8/12 and 16/24; pooled: TP 12, FP 4, FN 8 -> 24/36.
    assert r["per_image"]["dsc"] == pytest.approx((8 / 12 + 16 / 24) / 2)
    assert r["pooled"]["dsc"] == pytest.approx(24 / 36)
    assert r["pooled"]["iou"] == pytest.approx(12 / 24)
    assert r["pooled"]["recall"] == pytest.approx(12 / 20) and r["pooled"]["precision"] == pytest.approx(12 / 16)
    assert r["pooled"]["accuracy"] == pytest.approx(20 / 32) and r["n_images"] == 2
    # Empty prediction on an empty truth is a perfect image, not 0/0.
    empty = metrics_from_counts(torch.tensor([0.0, 0.0, 0.0, 16.0]))
    assert all(float(v) == 1.0 for v in empty.values())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    make_synthetic_dataset(data, n_train=4, n_val=6, size=SIZE, seed=5)
    torch.manual_seed(0)
    model = build_icmoe(ICMOE.get_config("tiny", image_size=SIZE))
    ckpt = icmoe.save_checkpoint(model, root / "ckpt", dataset="synthetic", epoch=0)
    return data, ckpt, model


def test_evaluate_matches_direct_computation(setup):
    data, ckpt, model = setup
    res = evaluate(ckpt, dataset="synthetic", data_root=data, progress=False)
    ds = build_dataset("synthetic", data, "val", image_size=SIZE, progress=False)
    with torch.no_grad():
        vote = model(ds.images.float())
    direct = MetricAccumulator()
    direct.update(vote.mask, ds.masks)
    assert res["n_images"] == 6 and res["image_size"] == SIZE
    assert res["pooled"] == pytest.approx(direct.compute()["pooled"])
    assert sum(res["experts"].values()) == 6
    # Batching does not change an image's result (balancing is off at inference).
    assert evaluate_model(model, ds, segment=_segment, batch_size=1, progress=False)["per_image"] == pytest.approx(res["per_image"])


def test_cli_json_and_overlays(setup, tmp_path):
    data, ckpt, _ = setup
    ov = tmp_path / "overlays"
    cmd = [sys.executable, "-m", "icmoe.evaluate", "--checkpoint", str(ckpt), "--dataset", "synthetic",
           "--data-root", str(data), "--json", "--overlays", str(ov), "--n-overlays", "3", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out["pooled"]) == {"dsc", "iou", "accuracy", "recall", "precision"}
    assert set(out["per_image"]) == set(out["pooled"]) and out["n_images"] == 6
    files = sorted(ov.glob("*.png"))
    assert [Path(f).name for f in out["overlays"]] == [f.name for f in files] and len(files) == 3
    pic = np.asarray(Image.open(files[0]).convert("RGB"))
    assert pic.shape[0] >= 384 and pic.shape[1] >= 384
    green = np.all(pic == (0, 230, 0), axis=-1).sum()
    assert green > 50  # the ground-truth contour is drawn
    # Errors: one line, non-zero exit, no traceback.
    bad = [sys.executable, "-m", "icmoe.evaluate", "--checkpoint", str(tmp_path / "missing"), "--dataset",
           "synthetic", "--data-root", str(data)]
    res = subprocess.run(bad, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines == [f"error: {tmp_path / 'missing'}: not a checkpoint folder (no config.json)"]


def test_cli_json_to_stdout_or_file(setup, tmp_path, capsys):
    data, ckpt, _ = setup
    base = ["--checkpoint", str(ckpt), "--dataset", "synthetic", "--data-root", str(data), "--no-progress"]
    assert evaluate_main([*base, "--json", "-"]) == 0
    out = json.loads(capsys.readouterr().out)  # stdout holds the JSON alone
    assert out["n_images"] == 6 and out["checkpoint"] == str(ckpt)
    target = tmp_path / "res.json"
    assert evaluate_main([*base, "--json", str(target)]) == 0
    table = capsys.readouterr().out  # the table is still the result on stdout
    assert "pooled" in table and "per_image" in table and not table.lstrip().startswith("{")
    assert json.loads(target.read_text())["pooled"] == pytest.approx(out["pooled"])


def test_cli_help_lists_the_common_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate_main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--json", "--no-progress", "--quiet", "--verbose"):
        assert flag in text, flag


def test_cli_bad_flags_exit_2_with_one_line(setup, capsys):
    data, ckpt, _ = setup
    cmd = [sys.executable, "-m", "icmoe.evaluate", "--checkpoint", str(ckpt), "--dataset", "synthetic",
           "--data-root", str(data), "--bogus"]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--bogus" in lines[0]
    rc = evaluate_main(["--checkpoint", str(ckpt), "--dataset", "synthetic", "--data-root", str(data),
                        "--batch-size", "0"])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: need --batch-size >= 1 and --n-overlays >= 0, "
                                                            "got 0 and 8"]


def test_overlay_draws_both_contours():
    img = np.full((3, 32, 32), 128, np.float32)
    truth = np.zeros((32, 32))
    truth[8:24, 8:24] = 1
    pred = np.zeros((32, 32))
    pred[4:12, 4:12] = 1
    pic = np.asarray(overlay(img, truth, pred, caption="DSC 0.1", min_side=64))
    assert pic.shape == (64 + 22, 64, 3)
    assert np.all(pic[16, 16:48] == (0, 230, 0), axis=-1).any()  # top edge of the truth square (x2)
    assert np.all(pic[8, 8:24] == (255, 40, 40), axis=-1).any()  # top edge of the prediction
    assert np.all(pic[32, 32] == (128, 128, 128))  # inside: untouched
