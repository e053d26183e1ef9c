"""The torch-tensorrt engine (model.trt.ts): refusals that run everywhere; the real run needs a GPU host."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from engines import EngineError, load_engine
from icmoe.core.manifest import TORCH_TENSORRT_NAME, add_artifact
from tests.skips import tensorrt_gpu_missing

REASON = tensorrt_gpu_missing()


def test_build_without_the_module_is_refused(tiny_build):
    with pytest.raises(EngineError, match="no artifact 'model.trt.ts'"):
        load_engine(tiny_build, "torch-tensorrt")


def test_registered_module_is_checked_before_loading(tiny_build, tmp_path):
    d = tmp_path / "b"
    shutil.copytree(tiny_build, d)
    (d / TORCH_TENSORRT_NAME).write_bytes(b"not a TorchScript archive")
    add_artifact(d, TORCH_TENSORRT_NAME, kind="torch_tensorrt", precision="fp16")
    with pytest.raises(EngineError, match="compiled for fp16, not fp32"):
        load_engine(d, "torch-tensorrt", "fp32")
    (d / TORCH_TENSORRT_NAME).write_bytes(b"not a TorchScript archive!")  # changed after registration
    with pytest.raises(EngineError, match="truncated or damaged"):
        load_engine(d, "torch-tensorrt")


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_torch_tensorrt_build_runs_and_verifies(tiny_checkpoint, tmp_path):
    if REASON:
        pytest.skip(REASON)
    pytest.importorskip("torch_tensorrt", reason="needs torch-tensorrt")
    from export.build import build
    from export.verify import verify_build

    out = build(tiny_checkpoint, precision="fp16", out=tmp_path / "b", batch=(1, 2, 4), backend="torch-tensorrt",
                verify=False, progress=False)
    report = verify_build(out, n=8, progress=False)
    assert "torch-tensorrt-fp16" in report["engines"] and report["engines"]["torch-tensorrt-fp16"]["passed"], report
    with load_engine(out, "torch-tensorrt") as engine:
        x = np.full((2, 3, 128, 128), 128, np.float32)
        assert set(engine.infer(x)) == {"logits", "mask", "expert"}
