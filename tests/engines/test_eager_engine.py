"""Eager engine: same interface, loads from a checkpoint or a build, checks the build's checkpoint hash."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import icmoe
from engines import EngineError, InputError, load_engine
from engines.eager import EagerEngine


def test_from_checkpoint_matches_model(tiny_checkpoint):
    x = (np.random.default_rng(1).random((2, 3, 128, 128)) * 255).astype(np.float32)
    with EagerEngine.from_checkpoint(tiny_checkpoint) as eng:
        out = eng.infer(x)
    assert eng.name == "eager-shared"
    model = icmoe.load(tiny_checkpoint)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x))
    np.testing.assert_allclose(out["logits"], ref.logits.numpy(), rtol=0, atol=1e-6)
    assert out["mask"].dtype == np.uint8 and out["expert"].dtype == np.int32


def test_naive_and_shared_agree(tiny_build):
    x = (np.random.default_rng(2).random((2, 3, 128, 128)) * 255).astype(np.float32)
    with load_engine(tiny_build, "eager") as shared, load_engine(tiny_build, "eager", variant="naive") as naive:
        a, b = shared.infer(x), naive.infer(x)
    assert naive.name == "eager-naive"
    np.testing.assert_allclose(a["logits"], b["logits"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(a["expert"], b["expert"])


def test_bad_input(tiny_checkpoint):
    eng = EagerEngine.from_checkpoint(tiny_checkpoint)
    with pytest.raises(InputError, match="dtype float64"):
        eng.infer(np.zeros((1, 3, 128, 128)))
    with pytest.raises(InputError, match="NaN"):
        eng.infer(np.full((1, 3, 128, 128), np.nan, np.float32))


def test_build_with_other_checkpoint_weights(tiny_build, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(tiny_build, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["checkpoint"]["sha256"] = "0" * 64
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="differ from the ones"):
        load_engine(dst, "eager")
    with pytest.raises(EngineError, match="runs FP32 only"):
        load_engine(tiny_build, "eager", precision="fp16")


def test_wrong_model_checkpoint(tiny_checkpoint):
    with pytest.raises(EngineError, match="checkpoint is for icmoe/tiny, expected icmoe/vit_b"):
        EagerEngine.from_checkpoint(tiny_checkpoint, expect="vit_b")


@pytest.mark.slow  # Inductor compiles the model for about a minute here
def test_compiled_eager_matches_eager(tiny_build):
    from icmoe.data.synthetic import synthetic_images

    x, _ = synthetic_images(2, 128, seed=4)
    with load_engine(tiny_build, "eager") as eager, load_engine(tiny_build, "eager", compile=True) as compiled:
        ref, out = eager.infer(x), compiled.infer(x)
        assert compiled.name == "eager-shared-compiled"
    np.testing.assert_allclose(out["logits"], ref["logits"], rtol=0, atol=1e-4)
    assert np.array_equal(out["expert"], ref["expert"])
    assert (out["mask"] != ref["mask"]).mean() <= 1e-4
