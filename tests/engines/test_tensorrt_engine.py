"""TensorRT engine of the tiny build: FP16 plan vs eager FP32, reload, manifest/runtime mismatches refused.

Needs TensorRT (>= 10.9) and a CUDA GPU; elsewhere every test here skips with the reason.
Manifest checks that happen before TensorRT is touched are tested without it.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from engines.base import EngineError
from tests.skips import tensorrt_gpu_missing

REASON = tensorrt_gpu_missing()
needs_trt = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2 * (a & b).sum() / denom)


@pytest.fixture(scope="module")
def trt_build(tiny_build, tmp_path_factory):
    """A copy of the shared tiny build with model.plan built from the FP16 graph (plugin voting)."""
    if REASON:
        pytest.skip(REASON)
    from export.tensorrt import EngineSettings, build_engine

    d = tmp_path_factory.mktemp("trt") / "tiny-fp16"
    shutil.copytree(tiny_build, d)
    build_engine(d, onnx_name="model.fp16.onnx", batch=(1, 2, 4),
                 settings=EngineSettings(progress=False, timing_cache_dir=tmp_path_factory.mktemp("timing")))
    return d


@pytest.fixture(scope="module")
def images():
    from icmoe.data.synthetic import synthetic_images

    x, _ = synthetic_images(8, 128, seed=3)
    return x


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_fp16_engine_matches_eager_fp32(trt_build, images, cuda_graphs):
    from engines import load_engine

    with load_engine(trt_build, backend="eager") as eager:
        ref = [eager.infer(images[i : i + 4]) for i in (0, 4)]
    with load_engine(trt_build, backend="tensorrt", precision="fp16", cuda_graphs=cuda_graphs) as engine:
        got = [engine.infer(images[i : i + 4]) for i in (0, 4)]
        got_again = [engine.infer(images[i : i + 4]) for i in (0, 4)]  # graph replay / second enqueue
    masks_r = np.concatenate([r["mask"] for r in ref])
    masks_g = np.concatenate([g["mask"] for g in got])
    dices = [_dice(masks_g[i], masks_r[i]) for i in range(len(masks_r))]
    assert min(dices) >= 0.995, dices
    agree = float((np.concatenate([g["expert"] for g in got]) == np.concatenate([r["expert"] for r in ref])).mean())
    assert agree >= 0.99, agree
    for a, b in zip(got, got_again):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert got[0]["mask"].dtype == np.uint8 and got[0]["expert"].dtype == np.int32


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
def test_engine_reloads_from_disk(trt_build, images):
    from engines.tensorrt import TensorRTEngine

    with TensorRTEngine.from_build(trt_build) as e1:
        a = e1.infer(images[:2])
    with TensorRTEngine.from_build(trt_build) as e2:  # a fresh deserialization of model.plan
        b = e2.infer(images[:2])
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
def test_manifest_and_runtime_mismatches_are_refused(trt_build, tmp_path):
    from engines.tensorrt import TensorRTEngine

    with pytest.raises(EngineError, match="compiled for fp16, not fp32"):
        TensorRTEngine.from_build(trt_build, precision="fp32")
    with pytest.raises(EngineError, match="expected icmoe/vit_b"):
        TensorRTEngine.from_build(trt_build, expect="vit_b")
    d = tmp_path / "b"
    shutil.copytree(trt_build, d)
    m = json.loads((d / "manifest.json").read_text())
    m["artifacts"]["model.plan"]["compute_capability"] = "1.0"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="compute capability 1.0"):
        TensorRTEngine.from_build(d)
    m["artifacts"]["model.plan"].update(compute_capability=None, tensorrt="0.0.1")
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="TensorRT 0.0.1"):
        TensorRTEngine.from_build(d)
    plan = d / "model.plan"
    plan.write_bytes(plan.read_bytes()[: plan.stat().st_size // 2])
    with pytest.raises(EngineError, match="truncated or damaged"):
        TensorRTEngine.from_build(d)


def test_plan_missing_from_manifest_is_refused_without_tensorrt(tiny_build):
    """A build without model.plan is refused before TensorRT is needed (runs everywhere)."""
    from engines.tensorrt import TensorRTEngine

    with pytest.raises(EngineError, match="no artifact 'model.plan'"):
        TensorRTEngine.from_build(tiny_build)
