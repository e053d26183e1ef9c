"""The FP16 graph is strongly typed: experts in FP16, LayerNorm/Softmax/voting/fusion really FP32."""

from __future__ import annotations

import onnx
import pytest

from export.precision import tensor_types
from icmoe.families.icmoe.family import FAMILY, voting_island

F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


@pytest.fixture(scope="module")
def graphs(tiny_build):
    fp32 = onnx.load(str(tiny_build / "model.onnx"))
    fp16 = onnx.load(str(tiny_build / "model.fp16.onnx"))
    return fp32, fp16, tensor_types(fp16)


def _float_io(node, types):
    """Element types of a node's float inputs/outputs (skipping empty optional slots and int tensors)."""
    names = [n for n in list(node.input) + list(node.output) if n]
    return {n: types.get(n) for n in names if types.get(n) in (F32, F16)}


def test_io_types_unchanged(graphs):
    _, fp16, _ = graphs
    T = onnx.TensorProto
    assert [(i.name, i.type.tensor_type.elem_type) for i in fp16.graph.input] == [("image", T.FLOAT)]
    assert [(o.name, o.type.tensor_type.elem_type) for o in fp16.graph.output] == [
        ("logits", T.FLOAT), ("mask", T.UINT8), ("expert", T.INT32)]


def test_experts_are_fp16(graphs):
    _, fp16, types = graphs
    heavy = [n for n in fp16.graph.node if n.op_type in ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum")]
    assert heavy
    fp16_heavy = [n for n in heavy if set(_float_io(n, types).values()) == {F16}]
    assert len(fp16_heavy) / len(heavy) > 0.9, f"{len(fp16_heavy)}/{len(heavy)} heavy ops in FP16"
    n16 = sum(1 for i in fp16.graph.initializer if i.data_type == F16)
    assert n16 > 100  # weights stored in FP16


@pytest.mark.parametrize("op_type", ["LayerNormalization", "Softmax"])
def test_normalisations_are_fp32(graphs, op_type):
    _, fp16, types = graphs
    nodes = [n for n in fp16.graph.node if n.op_type == op_type]
    assert nodes, f"no {op_type} in the graph"
    for n in nodes:
        io = _float_io(n, types)
        assert io and set(io.values()) == {F32}, (n.name, {k: onnx.TensorProto.DataType.Name(v) for k, v in io.items()})


def test_voting_and_fusion_are_fp32(graphs):
    fp32, fp16, types = graphs
    island = set(voting_island(fp32))
    by_name = {n.name: n for n in fp16.graph.node}
    voting_ops = {by_name[n].op_type for n in island if n in by_name}
    assert {"Resize", "ArgMin", "GatherElements", "ReduceSum", "Abs", "Greater"} <= voting_ops
    for name in island:
        io = _float_io(by_name[name], types)
        assert all(t == F32 for t in io.values()), (name, by_name[name].op_type)
    # no cast to FP16 anywhere downstream of the expert logits
    for name in island:
        for a in by_name[name].attribute:
            if by_name[name].op_type == "Cast" and a.name == "to":
                assert a.i != F16, name


def test_fp32_op_types_list_covers_layernorm_softmax():
    assert {"LayerNormalization", "Softmax"} <= set(FAMILY.precision.fp32_op_types)
