"""IC-MoE checkpoints: round trip, atomic layout, and refusal of damaged or mismatched ones."""

from __future__ import annotations

import json

import pytest
import torch

import icmoe
from icmoe import CheckpointError, save_checkpoint
from icmoe.families import get_family
from icmoe.families.icmoe import NaiveICMoE, build_icmoe

ICMOE = get_family("icmoe")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = build_icmoe("tiny")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    path = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "best", dataset="synthetic", epoch=3, metrics={"dsc": 0.5})
    return model, path


def test_round_trip(saved):
    model, path = saved
    loaded = icmoe.load(path)
    assert loaded.config == model.config and not loaded.training
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    meta = json.loads((path / "config.json").read_text())
    assert meta["dataset"] == "synthetic" and meta["epoch"] == 3 and meta["model"]["alpha"] == 0.5
    assert meta["family"] == "icmoe" and meta["version"] == 2
    assert meta["normalization"]["pixel_mean"] == list(model.config.pixel_mean)
    x = torch.rand(1, 3, 128, 128) * 255
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_resave_keeps_one_weights_file(saved, tmp_path):
    model, _ = saved
    save_checkpoint(model, tmp_path, epoch=1)
    with torch.no_grad():
        model.decoders[0].iou_token.weight.add_(1.0)
    save_checkpoint(model, tmp_path, epoch=2)
    assert len(list(tmp_path.glob("weights-*.safetensors"))) == 1
    assert json.loads((tmp_path / "config.json").read_text())["epoch"] == 2
    assert not list(tmp_path.glob(".*.tmp"))


def _copy(path, tmp_path):
    import shutil

    return shutil.copytree(path, tmp_path / "copy")


def test_truncated_weights_refused(saved, tmp_path):
    ckpt = _copy(saved[1], tmp_path)
    weights = next(ckpt.glob("weights-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        icmoe.load(ckpt)
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        icmoe.load(ckpt, verify_hash=False)


def test_missing_pieces_refused(saved, tmp_path):
    ckpt = _copy(saved[1], tmp_path)
    next(ckpt.glob("weights-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        icmoe.load(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="damaged JSON"):
        icmoe.load(ckpt)
    with pytest.raises(CheckpointError, match="no config.json"):
        icmoe.load(tmp_path)


def test_mismatching_model_refused(saved, tmp_path):
    ckpt = _copy(saved[1], tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint is for icmoe/tiny, expected icmoe/vit_b"):
        icmoe.load(ckpt, expect="vit_b")
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"]["embed_dim"] = 96  # description says another architecture than the weights hold
    meta["model"]["num_heads"] = 3
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="has shape"):
        icmoe.load(ckpt)


def test_naive_load_matches(saved):
    _, path = saved
    naive = icmoe.load(path, variant="naive")
    assert isinstance(naive, NaiveICMoE)
    assert naive.config == ICMOE.get_config("tiny")
