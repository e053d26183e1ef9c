"""MoE-SAM's graphs: sparse routing as TopK -> gather -> experts -> scatter, chunked token attention,
the routing island in FP32 in the FP16 graph, the gates, batch independence, the dense form."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from engines import load_engine
from export.build import build
from export.precision import tensor_types
from icmoe.families import get_family
from icmoe.families.moesam.family import routing_island

F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
CFG = get_family("moesam").get_config("tiny")
TENSORRT_TOPK_LIMIT = 3840  # TensorRT 10: K of TopK must be below this


@pytest.fixture(scope="module")
def graphs(moesam_build):
    fp32 = onnx.load(str(moesam_build / "model.onnx"))
    fp16 = onnx.load(str(moesam_build / "model.fp16.onnx"))
    return fp32, fp16


def _const(proto, name):
    for init in proto.graph.initializer:
        if init.name == name:
            return onnx.numpy_helper.to_array(init)
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return onnx.numpy_helper.to_array(n.attribute[0].t)
    raise KeyError(name)


def test_sparse_routing_ops(graphs):
    fp32, _ = graphs
    topk = [n for n in fp32.graph.node if n.op_type == "TopK"]
    assert len(topk) == 1
    k = int(_const(fp32, topk[0].input[1]).reshape(-1)[0])
    assert k == CFG.tokens // 2 and k < TENSORRT_TOPK_LIMIT
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in topk[0].attribute}
    assert attrs.get("sorted", 1) == 1
    ops = [n.op_type for n in fp32.graph.node]
    assert ops.count("GatherElements") == CFG.num_experts
    scatters = [n for n in fp32.graph.node if n.op_type == "ScatterElements"]
    assert len(scatters) == CFG.num_experts
    for n in scatters:
        reduction = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}.get("reduction", b"none")
        assert reduction in (b"none", "none")  # no scatter-add: TensorRT takes reduction none only
    assert "ScatterND" not in ops and "RandomNormalLike" not in ops and "Dropout" not in ops


def test_no_full_attention_score_tensor(graphs):
    """No MatMul produces (..., N, N) for the N routed tokens: the attention runs in query chunks."""
    fp32, _ = graphs
    inferred = onnx.shape_inference.infer_shapes(fp32)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    n = CFG.tokens
    outs = [shapes.get(node.output[0]) for node in inferred.graph.node if node.op_type == "MatMul"]
    assert any(s and s[-1] == n for s in outs), "expected attention score MatMuls over the N tokens"
    assert not any(s and s[-2:] == [n, n] for s in outs)


def test_routing_island_stays_fp32(graphs):
    fp32, fp16 = graphs
    types = tensor_types(fp16)
    by_name = {n.name: n for n in fp16.graph.node}
    island = [by_name[name] for name in routing_island(fp32) if name in by_name]
    assert {"TopK", "Softmax", "ScatterElements", "ArgMax", "MatMul"} <= {n.op_type for n in island}
    for node in island:
        floats = {t: types.get(t) for t in list(node.input) + list(node.output) if types.get(t) in (F32, F16)}
        assert set(floats.values()) <= {F32}, (node.op_type, node.name)
    heavy = [n for n in fp16.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and n.name not in
             {m.name for m in island}]
    in_fp16 = [n for n in heavy if {types.get(t) for t in n.output} == {F16}]
    assert len(in_fp16) / len(heavy) > 0.9


def test_manifest_records_outputs_and_classes(moesam_build):
    m = json.loads((moesam_build / "manifest.json").read_text())
    outputs = {o["name"]: o for o in m["outputs"]}
    s, c = CFG.image_size, CFG.num_classes
    assert outputs["logits"]["dtype"] == "float32" and outputs["logits"]["shape"][1:] == [c + 1, s, s]
    assert outputs["mask"]["dtype"] == "uint8" and outputs["mask"]["shape"][1:] == [1, s, s]
    assert m["model"]["classes"] == ["background", "class1", "class2", "class3"]
    assert m["model"]["family"] == "moesam"


def test_parity_gates_passed(moesam_build):
    v = json.loads((moesam_build / "manifest.json").read_text())["verify"]
    assert v["passed"]
    fp32, fp16 = v["engines"]["onnxruntime-fp32"], v["engines"]["onnxruntime-fp16"]
    assert fp32["max_abs_logit"] <= 1e-3 and fp32["clear_flips"] == 0
    assert fp16["min_class_dice"] >= 0.99 and fp16["label_agreement"] >= 0.99


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_batch_independence(moesam_build, precision):
    """An image's outputs alone and inside batches of 2..8: labels equal except where the FP32 reference's
    best two classes tie within the precision's rounding; logits within that rounding."""
    images = get_family("moesam").parity.synthetic_inputs(8, CFG.image_size, seed=5)
    tol = {"fp32": 1e-5, "fp16": 2e-3}[precision]
    with load_engine(moesam_build, "onnxruntime", precision) as engine:
        alone = engine.infer(images[:1])
        for b in range(2, 9):
            out = engine.infer(images[:b])
            np.testing.assert_allclose(out["logits"][:1], alone["logits"], rtol=0, atol=tol)
            top2 = np.sort(alone["logits"][0], axis=0)[-2:]
            decisive = (top2[1] - top2[0]) > 2 * tol
            differ = out["mask"][0, 0] != alone["mask"][0, 0]
            assert not (differ & decisive).any(), f"batch {b}: {int((differ & decisive).sum())} labels changed"


def test_dense_form_build_is_the_same_function(moesam_build, tmp_path):
    out = build(None, random_init=True, model="moesam", config="tiny", precision="fp32", variant="dense",
                out=tmp_path / "dense", batch=(1, 1, 2), backend="onnxruntime", verify=False, progress=False)
    proto = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("GatherElements") == 0 and ops.count("ScatterElements") == 1 and ops.count("TopK") == 1
    assert json.loads((out / "manifest.json").read_text())["variant"] == "dense"
    images = get_family("moesam").parity.synthetic_inputs(2, CFG.image_size, seed=6)
    with load_engine(out, "onnxruntime", "fp32") as dense, load_engine(moesam_build, "onnxruntime", "fp32") as sparse:
        a, b = dense.infer(images), sparse.infer(images)
    np.testing.assert_allclose(a["logits"], b["logits"], rtol=0, atol=1e-4)
