"""INT8 builds: NNCF's OpenVINO IR and the QDQ graph, calibrated on real or synthetic images.

- the build registers both INT8 artifacts, OpenVINO's caches and what stayed in floating point;
- the QDQ graph is explicit INT8 as TensorRT's strongly typed build takes it: INT8 weights per output
  channel (axis on every weight's DequantizeLinear), symmetric INT8 activations (zero point 0), FP32
  biases, and the kept nodes (LayerNorm, softmax, the family's island) FP32 with no dequantized input;
- ONNX Runtime runs the QDQ graph and OpenVINO the IR; a damaged IR is refused;
- an empty, damaged or unknown calibration source is one line and no build (before any export);
- calibration images come from a dataset folder the family reads (2-D and 3-D), seeded;
- slow: a trained tiny IC-MoE and MoE-SAM pass verify in INT8 on OpenVINO and ONNX Runtime, held-out
  Dice included;
- GPU: TensorRT builds its strongly typed INT8 engine from the QDQ graph (skipped here with the reason).

Skipped with the reason where NNCF and OpenVINO are not installed (the [openvino] extra).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engines import EngineError, load_engine
from engines.triton.repository import RepositoryOptions, make_repository, parse_config
from export import build as build_mod
from export.build import BuildError, build
from export.precision import tensor_types
from export.quantize import PRODUCT, QUANTIZED_OPS, int8_unavailable, kept_fp32
from icmoe.core.errors import DataError
from icmoe.core.manifest import read_manifest
from icmoe.families import get_family
from tests.helpers import flip_middle_byte, tree_digest
from tests.skips import tensorrt_gpu_missing

REASON = int8_unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
TRT_REASON = tensorrt_gpu_missing()
CALIBRATION = 8  # images: enough to exercise the path; the accuracy tests below use the default 64


@pytest.fixture(scope="module")
def int8_build(tiny_checkpoint, tmp_path_factory):
    """INT8 build of the shared random-init tiny checkpoint (batch 1..4, 8 synthetic calibration images,
    OpenVINO caches; not verified: a random-init model's logits sit at zero, see the slow tests)."""
    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    return build(tiny_checkpoint, precision="int8", out=out, batch=(1, 2, 4), backend="openvino", verify=False,
                 calibration_size=CALIBRATION, progress=False)


def test_build_registers_the_int8_artifacts(int8_build):
    m = read_manifest(int8_build)
    a = m["artifacts"]
    assert m["precision"] == "int8" and m["backend"] == "openvino"
    assert a["model.onnx"]["precision"] == "fp32"
    assert a["model.int8.onnx"]["kind"] == "onnx" and a["model.int8.onnx"]["precision"] == "int8"
    assert a["model.int8.onnx"]["tool"] == "onnxruntime.quantization.quantize_static"
    assert a["model.int8.xml"]["kind"] == "openvino_ir" and a["model.int8.xml"]["files"] == ["model.int8.bin"]
    assert a["model.int8.bin"]["kind"] == "openvino_ir_weights" and a["model.int8.xml"]["fake_quantize"] > 0
    assert {a["openvino-fp32.blob"]["source"], a["openvino-int8.blob"]["source"]} == {"model.onnx", "model.int8.xml"}
    q = m["quantization"]
    assert q["calibration"] == {"source": "synthetic", "images": CALIBRATION, "seed": 0}
    kept = q["kept_fp32"]
    assert {"LayerNormalization", "Softmax"} <= set(kept["op_types"]) and kept["island"] and kept["why"]
    ir = a["model.int8.xml"]  # NNCF's transformer recipe
    assert (ir["model_type"], ir["smooth_quant"], ir["bias_correction"]) == ("transformer", {"matmul_alpha": 0.95}, "fast")
    assert ir["matmuls_int8"]["int8"] > 0
    # What happened to the attention products, per graph, and why: the gates were checked (the checkpoint is
    # a saved model, so "auto" checks them) and they stayed INT8 only where they passed.
    for graph, record in q["attention_products"].items():
        assert graph in ("onnxruntime", "openvino") and record["check"]["checked"]
        assert record["quantized"] == record["check"]["passed"] or not record["quantized"]
        assert record["quantized"] or record["why"] == "the INT8 gates failed with them quantized"


def _producers(g):
    return {o: n for n in g.node for o in n.output}


def test_qdq_graph_is_explicit_int8_for_tensorrt(int8_build):
    family = get_family("icmoe")
    fp32 = onnx.load(str(int8_build / "model.onnx"))
    qdq = onnx.load(str(int8_build / "model.int8.onnx"))
    g = qdq.graph
    assert max(o.version for o in qdq.opset_import if o.domain in ("", "ai.onnx")) >= 13  # per-channel Q/DQ
    assert {o.domain for o in qdq.opset_import} <= {"", "ai.onnx"}, "only standard ops (TensorRT parses them)"
    inits = {i.name: i for i in g.initializer}
    producer = _producers(g)
    # Weights: INT8 initializers, dequantized per output channel (scale of the channel count, axis set).
    weight_dq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weight_dq
    for n in weight_dq:
        w, scale = inits[n.input[0]], inits[n.input[1]]
        axis = {a.name: a.i for a in n.attribute}.get("axis")
        assert w.data_type == onnx.TensorProto.INT8, n.name
        assert axis is not None and len(scale.dims) == 1 and scale.dims[0] == w.dims[axis] > 1, n.name
        assert not numpy_helper.to_array(inits[n.input[2]]).any(), f"{n.name}: weights must be symmetric"
    # Activations: symmetric INT8 (zero point 0: TensorRT takes no other).
    for n in (n for n in g.node if n.op_type == "QuantizeLinear"):
        zp = inits[n.input[2]]
        assert zp.data_type == onnx.TensorProto.INT8 and not numpy_helper.to_array(zp).any(), n.name
    # Every matrix op outside the kept set reads a dequantized weight; biases stay FP32. The products of two
    # activations (attention) are in the kept set only where the manifest says they stayed in floating point.
    why = kept_fp32(fp32, family)
    products = {n for n, w in why.items() if w == PRODUCT}
    attention = read_manifest(int8_build)["quantization"]["attention_products"]["onnxruntime"]
    assert read_manifest(int8_build)["artifacts"]["model.int8.onnx"]["attention_products_int8"] == attention["quantized"]
    kept = set(why) - (products if attention["quantized"] else set())
    assert set(family.precision.fp32_nodes(fp32)) | {n.name for n in fp32.graph.node if n.op_type in family.precision.fp32_op_types} <= kept
    matrix = [n for n in g.node if n.op_type in QUANTIZED_OPS and n.name not in kept | products]
    assert matrix and all(producer.get(n.input[1]) is not None and producer[n.input[1]].op_type == "DequantizeLinear"
                          for n in matrix)
    dequantized = [all(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input[:2])
                   for n in g.node if n.name in products]
    assert products and all(dequantized) == attention["quantized"] and (any(dequantized) or not attention["quantized"])
    biases = [n.input[2] for n in matrix if n.op_type in ("Gemm", "Conv", "ConvTranspose") and len(n.input) > 2]
    assert biases and all(inits[b].data_type == onnx.TensorProto.FLOAT for b in biases if b in inits)
    # The kept nodes: all still there, FP32 in and out, none fed by a DequantizeLinear.
    nodes = {n.name: n for n in g.node}
    assert kept <= set(nodes)
    types = tensor_types(qdq)
    float_ok = (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL,
                onnx.TensorProto.UINT8)
    for name in kept:
        node = nodes[name]
        for t in [i for i in node.input if i] + list(node.output):
            assert types.get(t, onnx.TensorProto.FLOAT) in float_ok, f"{name}: {t} is not FP32"
        fed = [producer[i].op_type for i in node.input if i in producer]
        assert "DequantizeLinear" not in fed and "QuantizeLinear" not in fed, f"{name} reads a quantized tensor"
    readers = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    softmax = [o for n in g.node if n.op_type == "Softmax" for o in n.output]
    quantized = any("QuantizeLinear" in readers.get(o, []) for o in softmax)
    assert softmax and quantized == attention["quantized"], "softmax outputs are quantized with the products only"


def test_int8_engines_run_both_graphs(int8_build):
    family = get_family("icmoe")
    x = family.parity.synthetic_inputs(4, 128, seed=5).astype(np.float32)
    with load_engine(int8_build, "eager") as eager:
        ref = eager.infer(x)
    for backend in ("onnxruntime", "openvino"):
        with load_engine(int8_build, backend, "int8") as engine:
            assert engine.precision == "int8" and engine.name == f"{backend}-int8"
            out = engine.infer(x)
        assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: (v.shape, v.dtype) for k, v in ref.items()}
        assert np.isfinite(out["logits"]).all()
        assert (out["mask"] == ref["mask"]).mean() > 0.9, backend  # a random-init model: loose
    with load_engine(int8_build, "openvino") as engine:  # None: the build's precision
        assert engine.precision == "int8" and engine.from_cache


def test_triton_openvino_model_serves_the_int8_ir(int8_build, tmp_path):
    """The repository's OpenVINO-backend model: a config Triton's own parser reads, naming model.xml, and
    an IR that OpenVINO loads from the version folder (model.xml finds model.bin) and that computes
    what the OpenVINO INT8 engine computes. (Triton's OpenVINO backend itself is not in the pytriton
    wheel the server tests use.)"""
    import openvino as ov

    (model_dir,) = make_repository(int8_build, tmp_path / "repo", kinds=["openvino"],
                                   options=RepositoryOptions(precision="int8"))
    cfg = parse_config(model_dir / "config.pbtxt")
    assert cfg.backend == "openvino" and cfg.default_model_filename == "model.xml"
    assert cfg.parameters["INFERENCE_PRECISION_HINT"].string_value == "f32"
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.bin", "model.xml"]
    x = get_family("icmoe").parity.synthetic_inputs(2, 128, seed=6).astype(np.float32)
    compiled = ov.Core().compile_model(str(model_dir / "1" / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    served = compiled(x)
    with load_engine(int8_build, "openvino", "int8") as engine:
        ref = engine.infer(x)
    logits = served[compiled.output("logits")]
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=1e-5)
    make_repository(int8_build, tmp_path / "repo32", kinds=["openvino"], options=RepositoryOptions(precision="fp32"))
    assert parse_config(tmp_path / "repo32" / model_dir.name / "config.pbtxt").default_model_filename == "model.onnx"


def test_damaged_ir_weights_are_refused(int8_build, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(int8_build, copy)
    flip_middle_byte(copy / "model.int8.bin")
    before = tree_digest(copy)
    with pytest.raises(EngineError, match="model.int8.bin: damaged \\(sha256") as e:
        load_engine(copy, "openvino", "int8")
    assert "\n" not in str(e.value) and tree_digest(copy) == before


# ------------------------------------------------------------------------------------------ calibration


def _write_damaged_png(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "case_001.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)  # a PNG signature, then nothing readable
    return p


@pytest.mark.parametrize("kind, match", [
    ("empty", "calibration: .*: no images"),
    ("damaged", "case_001.png: damaged PNG"),
    ("missing", "is neither a folder nor a dataset"),
])
def test_bad_calibration_source_is_one_line_and_no_build(tiny_build, tiny_checkpoint, tmp_path, capsys, kind, match):
    source = tmp_path / "calibration"
    if kind == "empty":
        source.mkdir()
    elif kind == "damaged":
        _write_damaged_png(source)
    out = tmp_path / "out"
    shutil.copytree(tiny_build, out)  # a previous build of the same model: must stay as it is
    before = tree_digest(out)
    rc = build_mod.main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--precision", "int8",
                         "--calibration", str(source), "--no-progress", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(match, err[0]), err
    assert tree_digest(out) == before
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == (["out"] if kind == "missing" else ["calibration", "out"]), \
        f"no staging folder and no .failed build: it stopped before writing anything ({left})"


def test_calibration_needs_int8(tiny_checkpoint, tmp_path):
    with pytest.raises(BuildError, match="--calibration applies to --precision int8 only"):
        build(tiny_checkpoint, out=tmp_path / "x", calibration=str(tmp_path), progress=False)
    with pytest.raises(BuildError, match="--calibration-size must be >= 1"):
        build(tiny_checkpoint, out=tmp_path / "x", precision="int8", calibration_size=0, progress=False)


def test_calibration_images_from_a_2d_dataset_or_folder(tmp_path):
    from icmoe.data.synthetic import make_synthetic_dataset

    family = get_family("icmoe")
    make_synthetic_dataset(tmp_path / "synthetic", n_train=6, n_val=2, size=32, seed=0)
    a = family.precision.calibration_images(tmp_path / "synthetic", 4, 64, seed=0)
    assert a.shape == (4, 3, 64, 64) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 255
    np.testing.assert_array_equal(a, family.precision.calibration_images(str(tmp_path / "synthetic"), 4, 64, seed=0))
    assert not np.array_equal(a, family.precision.calibration_images(tmp_path / "synthetic", 4, 64, seed=1))
    assert len(family.precision.calibration_images(tmp_path / "synthetic", 64, 64, seed=0)) == 6  # the training split only
    plain = tmp_path / "plain"
    plain.mkdir()
    for p in sorted((tmp_path / "synthetic").rglob("*.png"))[:3]:
        shutil.copy(p, plain / p.name.replace(" ", "_"))
    assert family.precision.calibration_images(plain, 8, 32, seed=0).shape == (3, 3, 32, 32)
    _write_damaged_png(plain)
    with pytest.raises(DataError, match="case_001.png"):
        family.precision.calibration_images(plain, 8, 32, seed=0)


def test_calibration_slices_from_a_3d_dataset(tmp_path):
    from icmoe.data.synthetic_volumes import make_synthetic_volumes

    family = get_family("moesam")
    root = make_synthetic_volumes(tmp_path / "synthetic3d", n_train=2, n_test=1, size=32, depth=4, seed=0)
    a = family.precision.calibration_images(root, 3, 32, seed=0)
    assert a.shape == (3, 3, 32, 32) and a.dtype == np.float32 and a.max() <= 255
    np.testing.assert_array_equal(a[:, 0], a[:, 2])  # gray slices repeated to RGB
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no volumes of a known 3-D dataset"):
        family.precision.calibration_images(tmp_path / "empty", 5, 32, seed=0)


# ------------------------------------------------------------------------------------------ accuracy (slow)


def _verified(report, labels):
    for label in labels:
        r = report["engines"][label]
        assert r["passed"] and r["flipped"] <= 0.01, (label, r)
        if label.endswith("int8"):  # the held-out Dice gate is INT8's
            assert r["heldout"]["passed"] and r["heldout"]["max_change"] <= 0.01, (label, r["heldout"])
    return {k: {f: report["engines"][k].get(f) for f in ("max_abs_logit", "flipped", "heldout")} for k in labels}


@pytest.mark.slow
def test_trained_tiny_passes_int8_verify(tmp_path_factory):
    from icmoe.training import train

    root = tmp_path_factory.mktemp("train_int8")
    summary = train(dataset="synthetic", data_root=root / "data", out=root / "run", config="tiny", epochs=3,
                    progress=False, device="cpu")
    out = build(Path(summary["out"]) / "best", precision="int8", out=root / "tiny-int8", batch=(1, 2, 8),
                backend="onnxruntime", verify=True, verify_images=32, progress=False)
    report = read_manifest(out)["verify"]
    print(json.dumps(_verified(report, ["onnxruntime-int8", "openvino-int8", "openvino-fp32"]), indent=1))


@pytest.mark.slow
def test_trained_moesam_passes_int8_verify(tmp_path_factory):
    from icmoe.data.synthetic_volumes import make_synthetic_volumes
    from icmoe.training import train

    root = tmp_path_factory.mktemp("moesam_int8")
    data = make_synthetic_volumes(root / "synthetic3d", n_train=4, n_test=1, size=64, depth=8, seed=0)
    summary = train(model="moesam", dataset="synthetic3d", data_root=data, out=root / "run", config="tiny",
                    image_size=64, epochs=40, batch_size=4, progress=False, device="cpu")
    out = build(Path(summary["out"]) / "last", precision="int8", out=root / "moesam-int8", batch=(1, 2, 4),
                backend="onnxruntime", verify=True, verify_images=32, progress=False, calibration=str(data))
    report = read_manifest(out)["verify"]
    assert read_manifest(out)["quantization"]["calibration"]["source"] == str(Path(data).resolve())
    print(json.dumps(_verified(report, ["onnxruntime-int8", "openvino-int8", "openvino-fp32"]), indent=1))


# ------------------------------------------------------------------------------------------ TensorRT (GPU)


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(TRT_REASON is not None, reason=TRT_REASON or "")
def test_tensorrt_builds_the_strongly_typed_int8_engine(int8_build, tmp_path):
    from export.tensorrt import EngineSettings, build_engine

    copy = tmp_path / "b"
    shutil.copytree(int8_build, copy)
    plan = build_engine(copy, onnx_name="model.int8.onnx", batch=(1, 2, 4), settings=EngineSettings(progress=False))
    assert read_manifest(copy)["artifacts"][plan.name]["precision"] == "int8"
    x = get_family("icmoe").parity.synthetic_inputs(4, 128, seed=5).astype(np.float32)
    with load_engine(copy, "onnxruntime", "int8") as ort_engine:
        ref = ort_engine.infer(x)
    with load_engine(copy, "tensorrt", "int8") as trt_engine:
        out = trt_engine.infer(x)
    assert (out["mask"] == ref["mask"]).mean() >= 0.99
