"""Engine build: the AOT plugin alone in TensorRT vs the reference, and the build's refusals.

The plugin and engine tests need TensorRT (>= 10.9) and a CUDA GPU and skip elsewhere with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from icmoe.families.icmoe.voting import plugin, ppav
from tests.skips import tensorrt_gpu_missing

REASON = tensorrt_gpu_missing()
needs_trt = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def plugin_only_graph(size: int, *, alpha: float, balance: bool) -> onnx.ModelProto:
    """z0, z1, z2 -> one icmoe::ppav plugin node -> logits, mask, expert (dynamic batch)."""
    shape = ["batch", 1, size, size]
    node = onnx.helper.make_node(
        plugin.PLUGIN_NAME, list(plugin.PLUGIN_INPUTS), list(plugin.PLUGIN_OUTPUTS), domain=plugin.ONNX_DOMAIN,
        **plugin.PARSER_ATTRIBUTES, alpha=alpha, balance=int(balance), threshold=-1,
    )
    g = onnx.helper.make_graph(
        [node],
        "ppav_plugin_only",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shape) for n in plugin.PLUGIN_INPUTS],
        [
            onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, shape),
            onnx.helper.make_tensor_value_info("mask", onnx.TensorProto.UINT8, shape),
            onnx.helper.make_tensor_value_info("expert", onnx.TensorProto.INT32, ["batch"]),
        ],
    )
    return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid(plugin.ONNX_DOMAIN, 1)])


def test_plugin_only_graph_is_valid():
    onnx.checker.check_model(plugin_only_graph(16, alpha=0.5, balance=False), full_check=True)


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
@pytest.mark.parametrize("balance", [False, True])
def test_aot_plugin_in_tensorrt_equals_reference(tmp_path, balance):
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, TrtRunner

    from tests.icmoe.families.icmoe.voting.test_kernel import CASES, make_inputs

    size = 64
    path = tmp_path / "plugin_only.onnx"
    onnx.save(plugin_only_graph(size, alpha=0.5, balance=balance), str(path))
    plugin.register_plugin()
    profile = Profile()
    for n in plugin.PLUGIN_INPUTS:
        profile.add(n, min=(1, 1, size, size), opt=(8, 1, size, size), max=(32, 1, size, size))
    engine = EngineFromNetwork(NetworkFromOnnxPath(str(path), strongly_typed=True), config=CreateConfig(profiles=[profile]))
    cases = [c for c in CASES if c.height == size and c.balance == balance]
    with TrtRunner(engine) as runner:
        for case in cases:
            z = make_inputs(case)
            out = runner.infer({n: t.numpy() for n, t in zip(plugin.PLUGIN_INPUTS, z)})
            ref = ppav(*z, alpha=0.5, balance=balance)
            assert np.array_equal(out["expert"], ref.expert.numpy()), case.name
            assert np.array_equal(out["mask"], ref.mask.numpy()), case.name
            np.testing.assert_allclose(out["logits"], ref.logits.numpy(), rtol=0, atol=1e-6)


def test_build_engine_refuses_without_tensorrt_or_gpu(tmp_path):
    from export.tensorrt import TensorRTBuildError, build_engine

    if REASON is None:
        pytest.skip("TensorRT and a GPU are present: the refusal path does not apply")
    with pytest.raises(TensorRTBuildError, match="TensorRT is not available|needs a CUDA GPU"):
        build_engine(tmp_path, onnx_name="model.fp16.onnx", batch=(1, 1, 2))
    assert not (tmp_path / "model.plan").exists()
