"""MoE-SAM's training: loss, augmentation, recipes, the step, and the generic trainer and per-volume
evaluation on a few small synthetic volumes (tiny at 32x32, so each run takes seconds)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import icmoe.training.trainer as trainer
from icmoe.checkpoint import load, read_meta
from icmoe.core.errors import DataError, TrainError
from icmoe.data.synthetic_volumes import make_synthetic_volumes
from icmoe.evaluate import main as evaluate_main
from icmoe.evaluation import evaluate
from icmoe.families import get_family
from icmoe.families.moesam import recipe as T
from icmoe.train import main as train_main
from icmoe.training import Recipe, train
from tests.helpers import REPO_ROOT

SIZE = 32
FAMILY = get_family("moesam")


# One torch thread (tests/conftest.py): the models are tiny.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _opts(data: Path, out: Path, **kw) -> dict:
    opts = {"model": "moesam", "dataset": "synthetic3d", "data_root": data, "out": out, "config": "tiny",
            "image_size": SIZE, "epochs": 3, "batch_size": 4, "val_every": 1, "progress": False, "device": "cpu"}
    return {**opts, **kw}


def _weights(ckpt: Path) -> dict:
    return load_file(str(ckpt / read_meta(ckpt)["weights"]))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """4 training volumes (3 train / 1 val by the ACDC rule) and 2 test volumes, 4 slices of 32x32."""
    root = tmp_path_factory.mktemp("synthetic3d")
    return make_synthetic_volumes(root, n_train=4, n_test=2, size=SIZE, depth=4, seed=0)


# ----------------------------------------------------------------------------- loss


def test_dice_loss_follows_its_definition():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 5, generator=g)
    label = torch.randint(0, 4, (2, 5, 5), generator=g)
    p = logits.softmax(1)
    terms = []
    for c in range(4):  # every channel, background included, sums over the whole batch
        gc = (label == c).float()
        num = 2 * (p[:, c] * gc).sum() + 1e-5
        terms.append(1 - num / ((p[:, c] ** 2).sum() + (gc ** 2).sum() + 1e-5))
    torch.testing.assert_close(T.dice_loss(logits, label), torch.stack(terms).mean())
    parts = T.moesam_loss(logits, label)
    torch.testing.assert_close(parts["ce"], torch.nn.functional.cross_entropy(logits, label))
    torch.testing.assert_close(parts["loss"], 0.2 * parts["ce"] + 0.8 * parts["dice"])
    perfect = T.moesam_loss(torch.nn.functional.one_hot(label, 4).permute(0, 3, 1, 2).float() * 30, label)
    assert perfect["dice"] < 1e-6 and perfect["ce"] < 1e-6
    with pytest.raises(ValueError, match="expected logits"):
        T.moesam_loss(logits, label[:, :4])


# ----------------------------------------------------------------------------- augmentation


def _sample(size: int = 16):
    img = torch.arange(3 * size * size, dtype=torch.float32).reshape(3, size, size) % 251
    lbl = torch.zeros(size, size, dtype=torch.int64)
    lbl[2:7, 3:12] = 1
    lbl[9:14, 5:9] = 2
    return img, lbl


def test_quarter_turn_and_crop_are_exact_on_the_pixel_grid():
    img, lbl = _sample()
    r_img, r_lbl = T.rotate(img, lbl, 90.0)
    turned = [k for k in (1, -1) if torch.equal(r_lbl, torch.rot90(lbl, k, (0, 1)))]
    assert len(turned) == 1  # a quarter turn moves pixel centres onto pixel centres
    torch.testing.assert_close(r_img, torch.rot90(img, turned[0], (1, 2)), atol=1e-3, rtol=0)
    c_img, c_lbl = T.crop_resize(img, lbl, 0.5, 0.0, 0.0)  # the top-left quarter, doubled
    assert torch.equal(c_lbl, lbl[:8, :8].repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert c_img.shape == img.shape


def test_augmentation_repeats_per_seed_epoch_and_index():
    recipe = T.RECIPES["paper"]
    img, lbl = _sample()
    images, labels = img[None].repeat(6, 1, 1, 1), lbl[None].repeat(6, 1, 1)
    index = torch.arange(10, 16)
    aug = T.epoch_augmentation(recipe, 3, 100)
    a = aug(images.clone(), labels.clone(), index)
    b = T.epoch_augmentation(recipe, 3, 100)(images.clone(), labels.clone(), index)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # a resumed run repeats it
    c = T.epoch_augmentation(recipe, 4, 100)(images.clone(), labels.clone(), index)
    assert not torch.equal(a[1], c[1])  # another epoch, other draws
    assert a[1].dtype == torch.int64 and set(a[1].unique().tolist()) <= {0, 1, 2}  # labels by nearest
    assert T.epoch_augmentation(Recipe(), 0, 10) is None  # nothing switched on


def test_augmentation_chooses_rotate_crop_elastic_with_the_papers_rates():
    img, lbl = _sample(8)
    kinds = [T.augment_sample(img, lbl, np.random.default_rng([100, 0, i]), T.RECIPES["paper"])[2]
             for i in range(1500)]
    share = {k: kinds.count(k) / len(kinds) for k in ("rotate", "crop", "elastic", "none")}
    assert share["rotate"] == pytest.approx(0.45, abs=0.04)
    assert share["crop"] == pytest.approx(0.55 * 0.75, abs=0.04)
    assert share["elastic"] == pytest.approx(0.55 * 0.25 * 0.9, abs=0.03)
    assert share["none"] < 0.04


# ----------------------------------------------------------------------------- recipes and hooks


def test_paper_recipe_and_its_schedule():
    r = FAMILY.training.recipes()["paper"]
    assert (r.optimizer, r.betas, r.weight_decay, r.lr, r.schedule, r.warmup, r.power) == \
        ("adamw", (0.9, 0.999), 0.1, 5e-4, "poly", 250, 0.9)
    assert (r.batch_size, r.epochs, r.val_every, r.seed, r.ce, r.dice) == (16, 400, 5, 100, 0.2, 0.8)
    assert r.geometric and not (r.hflip or r.intensity or r.sgcl or r.balance)
    per_epoch = 100
    assert r.lr_at(0, per_epoch) == pytest.approx(5e-4 / 250)  # linear warmup
    assert r.lr_at(249, per_epoch) == pytest.approx(5e-4)
    assert r.lr_at(250, per_epoch) == pytest.approx(5e-4)  # then poly from the base rate
    assert r.lr_at(250 + 20000, per_epoch) == pytest.approx(5e-4 * 0.5 ** 0.9)
    assert FAMILY.training.pick_recipe("synthetic3d", "tiny") == "demo" and FAMILY.training.pick_recipe("acdc", "tiny") == "paper"
    assert FAMILY.training.datasets()["synthetic3d"] == {"num_classes": 3, "class_names": ("disc", "ring", "bar")}
    assert FAMILY.training.datasets()["btcv"]["num_classes"] == 13


def test_step_learns_a_batch_and_trains_only_the_trainable_parts():
    torch.manual_seed(0)
    model = FAMILY.build(FAMILY.get_config("tiny", image_size=SIZE)).train()
    step = FAMILY.training.train_step(model, T.RECIPES["demo"])
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    trainable = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    assert frozen and trainable and all(k.startswith(("vit.", "prompt_encoder.", "decoder.iou_prediction_head."))
                                        for k in frozen)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, SIZE, SIZE, generator=g) * 255
    labels = torch.zeros(4, SIZE, SIZE, dtype=torch.int64)
    labels[:, 4:14, 4:14], labels[:, 18:28, 6:12], labels[:, 20:26, 18:30] = 1, 2, 3
    images[:, :, labels[0] > 0] = 40.0 * labels[0][labels[0] > 0].float()  # each class has its own intensity
    opt = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for i in range(15):
        parts = step(images, labels)
        assert set(parts) == {"loss", "ce", "dice"} and torch.isfinite(parts["loss"])
        opt.zero_grad()
        parts["loss"].backward()
        if i == 0:  # every trainable parameter gets a gradient, so DDP needs no unused-parameter search
            assert [n for n, p in step.named_parameters() if p.requires_grad and p.grad is None] == []
        opt.step()
        losses.append(float(parts["loss"].detach()))
    assert losses[-1] < 0.7 * losses[0], losses
    now = dict(model.named_parameters())
    assert all(torch.equal(now[k], v) for k, v in frozen.items())
    assert sum(not torch.equal(now[k], v) for k, v in trainable.items()) == len(trainable)


def test_moesam_refuses_icmoe_only_options(data, tmp_path):
    with pytest.raises(TrainError, match="no SgCL or PPAV balancing"):
        train(**_opts(data, tmp_path / "run", sgcl_weight=0.1))
    with pytest.raises(DataError) as err:
        train(**_opts(data, tmp_path / "run", dataset="busi"))
    assert str(err.value).startswith("unknown dataset 'busi' for moesam; choose from acdc, btcv")


# ----------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "reference"
    summary = train(**_opts(data, out))
    assert summary["model"] == "moesam" and summary["recipe"] == "demo"
    return out


def test_run_trains_checkpoints_and_logs(reference_run):
    rows = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    recipe = T.RECIPES["demo"]
    per_epoch = 3  # 12 training slices, batch 4
    assert [r["lr"] for r in rows] == pytest.approx([recipe.lr_at(3 * e - 1, per_epoch) for e in (1, 2, 3)])
    assert all(math.isfinite(r["train"]["loss"]) and set(r["train"]) == {"loss", "ce", "dice"} for r in rows)
    assert rows[-1]["train"]["loss"] < rows[0]["train"]["loss"]
    assert all(r["val"]["n_volumes"] == 1 and set(r["val"]["per_class"]) == {"disc", "ring", "bar"} for r in rows)
    assert all(r["score"] == r["val"]["mean_dice"] for r in rows)
    model = load(reference_run / "last")
    cfg = model.config
    assert (cfg.name, cfg.num_classes, cfg.class_names, cfg.image_size) == ("tiny", 3, ("disc", "ring", "bar"), SIZE)
    # Frozen parts as initialised (seed 100, the first use of the RNG), trainable parts moved.
    torch.manual_seed(100)
    init = FAMILY.build(cfg).state_dict()
    w = _weights(reference_run / "last")
    assert all(torch.equal(w[k], init[k]) for k in init if k.startswith(("vit.", "prompt_encoder.")))
    assert not torch.equal(w["feb.moe.gate.weight"], init["feb.moe.gate.weight"])
    assert not torch.equal(w["adapters.0.mlp.down.weight"], init["adapters.0.mlp.down.weight"])


def test_resume_after_an_interruption_repeats_the_uninterrupted_run(data, reference_run, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    real = trainer.train_epoch

    def stop_in_epoch_2(run, tr, loader, epoch):
        if epoch == 1:
            raise KeyboardInterrupt  # as a kill in the middle of epoch 2: epoch 1's state is on disk
        return real(run, tr, loader, epoch)

    monkeypatch.setattr(trainer, "train_epoch", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(**_opts(data, out))
    monkeypatch.setattr(trainer, "train_epoch", real)
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(trainer.CheckpointError, match="--resume"):
        train(**_opts(data, out))
    train(**_opts(data, out, resume=True))
    assert _max_diff(_weights(reference_run / "last"), _weights(out / "last")) <= 1e-6
    ref_rows = [json.loads(x) for x in (reference_run / "metrics.jsonl").read_text().splitlines()]
    got_rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # Every epoch's mean loss parts (loss, ce, dice) as in the uninterrupted run, epoch by epoch.
    assert [r["epoch"] for r in got_rows] == [r["epoch"] for r in ref_rows]
    for got, ref in zip(got_rows, ref_rows):
        assert got["train"] == pytest.approx(ref["train"], rel=1e-5, abs=1e-6)
    assert read_meta(out / "best")["epoch"] == read_meta(reference_run / "best")["epoch"]


def test_evaluation_reports_per_class_figures(data, reference_run, tmp_path):
    res = evaluate(reference_run / "best", dataset="synthetic3d", data_root=data, split="test", progress=False,
                   overlays=tmp_path / "ov", n_overlays=1)
    assert res["n_volumes"] == 2 and res["n_slices"] == 8 and res["unit"] == "mm"
    assert set(res["per_class"]) == {"disc", "ring", "bar"}
    assert res["mean_dice"] == pytest.approx(np.mean([p["dice"] for p in res["per_class"].values()]))
    for v in res["volumes"]:
        assert v["spacing"] == [5.0, 1.5, 1.5] and set(v["classes"]) == {"disc", "ring", "bar"}
        for s in v["classes"].values():
            assert 0.0 <= s["dice"] <= 1.0
            assert (s["hd95"] is None) == (s["hd95_note"] is not None)  # a missing HD95 says why
    assert 1 <= len(res["overlays"]) <= 3 and all(Path(p).is_file() for p in res["overlays"])


def test_cli_trains_and_evaluates_synthetic3d_from_nothing(tmp_path, monkeypatch, capsys):
    # The synthetic volumes are generated on first use (smaller here than the default set).
    monkeypatch.setattr(T, "SYNTHETIC3D_DEFAULTS", {"n_train": 3, "n_test": 1, "size": SIZE, "depth": 3, "seed": 0})
    monkeypatch.chdir(tmp_path)
    rc = train_main(["--model", "moesam", "--dataset", "synthetic3d", "--config", "tiny", "--image-size", str(SIZE),
                     "--epochs", "1", "--batch-size", "2", "--no-progress", "--device", "cpu", "--json", "-"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(Path("runs") / "moesam-synthetic3d-tiny") and summary["recipe"] == "demo"
    assert (tmp_path / "data" / "synthetic3d" / "database" / "testing").is_dir()
    ckpt = str(Path("runs") / "moesam-synthetic3d-tiny" / "best")
    rc = evaluate_main([ckpt, "--dataset", "synthetic3d", "--split", "test", "--json", "-", "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_volumes"] == 1 and out["unit"] == "mm" and set(out["per_class"]) == {"disc", "ring", "bar"}
    assert evaluate_main([ckpt, "--dataset", "synthetic3d", "--split", "test", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "1 volumes" in text and "HD95 in mm" in text and "disc" in text
    assert evaluate_main([ckpt, "--checkpoint", ckpt, "--dataset", "synthetic3d"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: give the checkpoint once: as CHECKPOINT or as --checkpoint"]


def test_distributed_two_gloo_processes_validate_each_volume_once(tmp_path):
    data = make_synthetic_volumes(tmp_path / "data", n_train=10, n_test=1, size=SIZE, depth=2, seed=0)  # 8 / 2
    out = tmp_path / "ddp"
    root = REPO_ROOT
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "icmoe.train",
           "--model", "moesam", "--dataset", "synthetic3d", "--data-root", str(data), "--config", "tiny",
           "--image-size", str(SIZE), "--out", str(out), "--epochs", "1", "--batch-size", "4", "--no-progress"]
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 processes x 2" in res.stderr
    (row,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    hashes = row["rank_weights_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]  # the replicas stayed identical
    # Each rank scored one volume; the gathered report equals a single-process evaluation.
    single = evaluate(out / "last", dataset="synthetic3d", data_root=data, split="val", progress=False)
    assert [v["name"] for v in row["val"]["volumes"]] == [v["name"] for v in single["volumes"]]
    assert len(single["volumes"]) == 2
    assert row["val"]["mean_dice"] == pytest.approx(single["mean_dice"])


@pytest.mark.slow
def test_demo_recipe_reaches_the_target_on_held_out_volumes(tmp_path):
    """benchmarks/train_moesam_synthetic.py as a test (minutes of CPU: --runslow or ICMOE_SLOW=1); the time
    limit is the benchmark's to check."""
    spec = importlib.util.spec_from_file_location("bench", REPO_ROOT / "benchmarks"
                                                  / "train_moesam_synthetic.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.run(out=tmp_path / "run", data_root=tmp_path / "data", time_limit=float("inf"), progress=False)
    assert res["recipe"] == "demo" and res["test"]["n_volumes"] == 8 and res["hd95_unit"] == "mm"
    assert res["test_mean_dice"] >= 0.80, res["table"]
