"""Graph rewrites the INT8 path makes before quantizing (export/quantize.py)."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from export.quantize import gemm_as_matmul


def _gemm_graph(trans_b: int, bias: bool, name: str = "fc") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 5) if trans_b else (5, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node("Gemm", inputs, ["y"], name=name, transB=trans_b)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_gemm_becomes_matmul_plus_bias_with_the_same_output():
    x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    for trans_b in (0, 1):
        for bias in (False, True):
            proto = _gemm_graph(trans_b, bias)
            before = _run(proto, x)
            assert gemm_as_matmul(proto, kept=[]) == 1
            onnx.checker.check_model(proto)
            assert [n.op_type for n in proto.graph.node] == (["MatMul", "Add"] if bias else ["MatMul"])
            assert {i.name for i in proto.graph.initializer} == ({"fc_weight", "b"} if bias else {"fc_weight"})
            np.testing.assert_allclose(_run(proto, x), before, rtol=1e-6, atol=1e-6)


def test_a_kept_gemm_stays_as_it_is():
    proto = _gemm_graph(1, True)
    assert gemm_as_matmul(proto, kept=["fc"]) == 0
    assert [n.op_type for n in proto.graph.node] == ["Gemm"]
