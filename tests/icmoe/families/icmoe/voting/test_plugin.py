"""The TensorRT AOT plugin: graph pass (structure, onnx.checker, semantics of the cut), registration schema, PTX.

TensorRT is not needed here: the plugin graph is checked structurally and against
the original graph with ONNX Runtime; the registration code is run against a
recording stand-in of `tensorrt.plugin` and checked with the rules TensorRT's
own validator applies (parameter order, outputs/tactic); the kernel's PTX is
compiled by Triton for sm_80 and assembled with ptxas. Running the plugin inside
an engine needs a GPU with TensorRT: tests/export/test_tensorrt_build.py.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import types
import typing
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icmoe.families.icmoe.voting import plugin, ppav

SIZE = 32


class TinyVoter(nn.Module):
    """Three conv 'experts' upsampled with Resize, then the real PPAV, with the experts passed out of order."""

    def __init__(self, alpha: float = 0.5) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(image_size=SIZE)
        self.alpha = alpha
        self.convs = nn.ModuleList(nn.Conv2d(3, 1, 3, stride=4, padding=1) for _ in range(3))

    def forward(self, x):
        x = x / 255.0
        z = [F.interpolate(c(x), size=x.shape[-2:], mode="bilinear", align_corners=False) for c in self.convs]
        # z[1] is the basic expert, z[2] the semantic one, z[0] the adaptive one: the pass must find that out
        return ppav(z[1], z[2], z[0], alpha=self.alpha)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    from export.onnx_export import export_onnx
    from icmoe.families import get_family

    d = tmp_path_factory.mktemp("plugin")
    torch.manual_seed(0)
    # TinyVoter has IC-MoE's outputs (logits, mask, expert), so it exports through IC-MoE's contract.
    src = export_onnx(TinyVoter(alpha=0.75), d / "model.onnx", batch=(1, 2, 4), family=get_family("icmoe"))
    dst = plugin.make_plugin_graph(src, d / plugin.PLUGIN_GRAPH_NAME, alpha=0.75)
    return onnx.load(str(src)), onnx.load(str(dst)), d


def test_plugin_graph_passes_checker_with_custom_domain(graphs):
    _, pg, _ = graphs
    onnx.checker.check_model(pg, full_check=True)
    assert any(o.domain == plugin.ONNX_DOMAIN and o.version == 1 for o in pg.opset_import)
    ops = [n.op_type for n in pg.graph.node]
    # the voting ops are gone: one plugin node, and none of the argmin/abs/reduce tail remains
    assert len(plugin.plugin_nodes(pg)) == 1
    assert not {"ArgMin", "GatherElements", "ReduceSum", "Abs"} & set(ops)


def test_plugin_node_matches_the_registered_plugin(graphs):
    _, pg, _ = graphs
    (node,) = plugin.plugin_nodes(pg)
    assert node.op_type == plugin.PLUGIN_NAME and node.domain == plugin.ONNX_DOMAIN
    assert len(node.input) == len(plugin.PLUGIN_INPUTS) == 3
    assert list(node.output) == list(plugin.PLUGIN_OUTPUTS) == [o.name for o in pg.graph.output]
    attrs = {a.name: a for a in node.attribute}
    assert set(attrs) == set(plugin.PARSER_ATTRIBUTES) | set(plugin.PLUGIN_ATTRIBUTES)
    assert attrs["plugin_namespace"].s.decode() == plugin.PLUGIN_NAMESPACE
    assert attrs["plugin_version"].s.decode() == plugin.PLUGIN_VERSION
    assert attrs["aot"].type == onnx.AttributeProto.INT and attrs["aot"].i == 1
    for name, kind in plugin.PLUGIN_ATTRIBUTES.items():
        assert attrs[name].type == kind, name
    assert attrs["alpha"].f == pytest.approx(0.75) and attrs["balance"].i == 0 and attrs["threshold"].i == -1
    # the plugin's inputs are FP32 maps and its outputs keep the graph's output types
    types_ = {vi.name: vi.type.tensor_type.elem_type for vi in pg.graph.output}
    assert [types_[n] for n in plugin.PLUGIN_OUTPUTS] == list(plugin.PLUGIN_OUTPUT_DTYPES)


def test_plugin_inputs_are_z0_z1_z2_of_the_original_graph(graphs):
    """Feeding the plugin node's inputs (read from the original graph) to the reference reproduces its outputs."""
    og, pg, _ = graphs
    (node,) = plugin.plugin_nodes(pg)
    taps = onnx.ModelProto()
    taps.CopyFrom(og)
    for name in node.input:
        taps.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(taps.SerializeToString(), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(1).uniform(0, 255, (3, 3, SIZE, SIZE)).astype(np.float32)
    logits, mask, expert, *z = sess.run(None, {"image": images})
    ref = ppav(*(torch.from_numpy(t) for t in z), alpha=0.75)
    assert np.array_equal(expert, ref.expert.numpy()) and np.array_equal(mask, ref.mask.numpy())
    np.testing.assert_allclose(logits, ref.logits.numpy(), rtol=0, atol=1e-5)


def test_pass_refuses_a_tail_that_is_not_ppav(graphs, tmp_path):
    og, _, d = graphs
    with pytest.raises(plugin.PluginGraphError, match="does not reproduce"):
        plugin.make_plugin_graph(d / "model.onnx", tmp_path / "x.onnx", alpha=0.5)  # the model's alpha is 0.75
    assert not (tmp_path / "x.onnx").exists()
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["image"], ["logits"])],
        "norelu",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
    )
    with pytest.raises(plugin.PluginGraphError, match="3 upsampled expert maps"):
        plugin.make_plugin_node_graph(onnx.helper.make_model(g), alpha=0.5)


def test_pass_on_the_real_fp16_build(request, tmp_path):
    """The shared tiny build (the `tiny_build` fixture of tests/conftest.py) through the pass, when it exists."""
    try:
        build = request.getfixturevalue("tiny_build")
    except pytest.FixtureLookupError:
        pytest.skip("the shared `tiny_build` fixture is not defined in tests/conftest.py")
    import json

    src = Path(build) / "model.fp16.onnx"
    if not src.exists():
        pytest.skip(f"{src} was not built")
    alpha = json.loads((Path(build) / "manifest.json").read_text())["model"]["config"]["alpha"]
    pg = onnx.load(str(plugin.make_plugin_graph(src, tmp_path / plugin.PLUGIN_GRAPH_NAME, alpha=alpha)))
    onnx.checker.check_model(pg)
    (node,) = plugin.plugin_nodes(pg)
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(pg).graph.value_info}
    assert all(elem.get(n, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for n in node.input)


# ------------------------------------------------------------------- registration against TensorRT's rules


class _Recorder(types.ModuleType):
    """Stand-in for `tensorrt.plugin` that records what `register_plugin` registers."""

    def __init__(self):
        super().__init__("tensorrt.plugin")
        self.registered = {}
        self.op = types.SimpleNamespace()

        class TensorDesc:
            def __init__(self, shape_expr=None, dtype=None):
                self.shape_expr, self.dtype = shape_expr, dtype

        class KernelLaunchParams:
            pass

        class SymIntExprs(list):
            def __init__(self, n):
                super().__init__([None] * n)

        self.TensorDesc, self.KernelLaunchParams, self.SymIntExprs = TensorDesc, KernelLaunchParams, SymIntExprs
        self.SymInt32 = lambda v: ("SymInt32", v)
        self.from_shape_expr = lambda shape, dtype: TensorDesc(tuple(shape), dtype)

    def register(self, pid):
        return lambda f: self.registered.setdefault(("register", pid), f)

    def aot_impl(self, pid):
        return lambda f: self.registered.setdefault(("aot_impl", pid), f)


def test_registration_schema_follows_tensorrt_rules(monkeypatch):
    rec = _Recorder()
    fake_trt = types.ModuleType("tensorrt")
    fake_trt.__version__ = "10.9-stand-in"
    fake_trt.float32, fake_trt.uint8, fake_trt.int32 = "FLOAT", "UINT8", "INT32"
    fake_trt.plugin = rec
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", rec)
    plugin.register_plugin()
    desc = rec.registered[("register", plugin.PLUGIN_ID)]
    aot = rec.registered[("aot_impl", plugin.PLUGIN_ID)]
    onnx_to_py = {onnx.AttributeProto.FLOAT: float, onnx.AttributeProto.INT: int}
    # register: tensors first, then attributes, all annotated live (no string annotations), no defaults
    sig = inspect.signature(desc)
    names = list(sig.parameters)
    assert names == list(plugin.PLUGIN_INPUTS) + list(plugin.PLUGIN_ATTRIBUTES)
    for n in plugin.PLUGIN_INPUTS:
        assert sig.parameters[n].annotation is rec.TensorDesc
    for n, kind in plugin.PLUGIN_ATTRIBUTES.items():
        assert sig.parameters[n].annotation is onnx_to_py[kind]
        assert sig.parameters[n].default is inspect.Parameter.empty
    assert typing.get_origin(sig.return_annotation) is tuple and len(typing.get_args(sig.return_annotation)) == 3
    # aot_impl: TensorRT's _validate_aot_impl requires exactly (inputs..., attributes..., outputs, tactic)
    asig = inspect.signature(aot)
    assert list(asig.parameters) == names + ["outputs", "tactic"]
    ret = typing.get_args(asig.return_annotation)
    assert len(ret) == 4 and ret[2] is rec.KernelLaunchParams and ret[3] is rec.SymIntExprs
    # the description gives the output types and shapes of the ONNX node
    zd = rec.TensorDesc(("B", 1, "H", "W"), "FLOAT")
    logits, mask, expert = desc(zd, zd, zd, 0.5, 0, -1)
    assert (logits.dtype, mask.dtype, expert.dtype) == ("FLOAT", "UINT8", "INT32")
    assert logits.shape_expr == mask.shape_expr == ("B", 1, "H", "W") and expert.shape_expr == ("B",)


def test_plugin_ptx_has_tensorrts_argument_list_and_assembles(tmp_path):
    """Triton compiles the kernel to PTX for sm_80 on the CPU; the entry takes exactly TensorRT's 8 arguments."""
    from triton.backends.nvidia.compiler import get_ptxas

    compiled, ptx = plugin.compile_plugin_kernel(alpha=0.5, balance=False, threshold=-1, arch=80)
    entry = ptx[ptx.index(f".entry {compiled.metadata.name}(") :]
    params = entry[: entry.index(")")].count(".param")
    assert params == 8  # z0, z1, z2, B, HW, logits, mask, expert
    assert compiled.metadata.num_warps * 32 == 128 and "div.rn.f32" in ptx and "div.full.f32" not in ptx
    (tmp_path / "ppav.ptx").write_text(ptx)
    proc = subprocess.run(
        [get_ptxas(80).path, "--gpu-name=sm_80", str(tmp_path / "ppav.ptx"), "-o", str(tmp_path / "ppav.cubin")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
