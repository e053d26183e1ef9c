"""Triton model repositories from build directories: every config.pbtxt parses as Triton's ModelConfig."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (the test extra)")
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

from engines.triton import (  # noqa: E402
    RepositoryError,
    RepositoryOptions,
    make_repository,
    parse_config,
)
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: mc.TYPE_FP32, onnx.TensorProto.UINT8: mc.TYPE_UINT8,
                  onnx.TensorProto.INT32: mc.TYPE_INT32}


def _parse(path: Path) -> mc.ModelConfig:
    """Triton's own parser, independent of the code under test."""
    return text_format.Parse(path.read_text(), mc.ModelConfig())


@pytest.fixture(scope="module")
def cpu_repo(tiny_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "model_repository"
    make_repository(tiny_build, out, kinds=["onnxruntime", "python"],
                    options=RepositoryOptions(instances=2, max_queue_delay_us=500))
    return out


def _with_timings(build, dst, timings):
    """A copy of `build` whose verify results give these batch-1 milliseconds (label -> ms; None: failed)."""
    shutil.copytree(build, dst)
    m = json.loads((dst / "manifest.json").read_text())
    for label, ms in timings.items():
        r = m["verify"]["engines"].setdefault(label, {"required": True})
        r["passed"] = ms is not None
        r["timing"] = {"latency_ms": ms if ms is not None else 0.1}
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.mark.parametrize("timings, models, precision", [
    ({"onnxruntime-fp32": 1.0}, ["icmoe_onnxruntime", "icmoe_python"], "fp32"),
    ({"openvino-bf16": 1.0, "onnxruntime-fp32": None}, ["icmoe_openvino", "icmoe_python"], "bf16"),
    ({"openvino-fp32": 1.0, "openvino-bf16": None}, ["icmoe_openvino", "icmoe_python"], "fp32"),
])
def test_default_serves_the_fastest_engine_that_passed(tiny_build, tmp_path, caplog, timings, models, precision):
    """Without --kind the writer serves the fastest engine whose gates passed (a failed one, however fast,
    is not served), says so, and writes the python model beside it on the graph that engine runs."""
    build = _with_timings(tiny_build, tmp_path / "b", timings)
    label = next(k for k, v in timings.items() if v is not None)
    with caplog.at_level("INFO", logger="engines"):
        make_repository(build, tmp_path / "repo")
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == models
    assert f"serving {label}" in caplog.text and "parity gates passed" in caplog.text
    py = _parse(tmp_path / "repo/icmoe_python/config.pbtxt")
    assert py.parameters["precision"].string_value == ("fp32" if precision == "bf16" else precision)
    if models[0] == "icmoe_openvino":
        ov = _parse(tmp_path / "repo/icmoe_openvino/config.pbtxt")
        assert ov.default_model_filename == "model.onnx"
        assert ov.parameters["INFERENCE_PRECISION_HINT"].string_value == ("bf16" if precision == "bf16" else "f32")


def test_default_without_verify_results(tiny_build, tmp_path):
    """A build made with --no-verify records no gates: the writer falls back to onnxruntime + python."""
    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    m = json.loads((build / "manifest.json").read_text())
    del m["verify"]
    (build / "manifest.json").write_text(json.dumps(m))
    make_repository(build, tmp_path / "repo")
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["icmoe_onnxruntime", "icmoe_python"]


@pytest.fixture(scope="module")
def trt_build(tiny_build, tmp_path_factory):
    """A copy of the tiny build that lists a model.plan (arbitrary bytes: no TensorRT here to build one)."""
    from icmoe.core.manifest import add_artifact

    build = tmp_path_factory.mktemp("trt") / "tiny-fp16"
    shutil.copytree(tiny_build, build)
    (build / "model.plan").write_bytes(b"not a real engine: this test checks the config only" * 10)
    add_artifact(build, "model.plan", kind="tensorrt", precision="fp16")
    # as verify records it on a GPU host: the plan passed its gates and is the fastest engine
    m = json.loads((build / "manifest.json").read_text())
    m["verify"]["engines"]["tensorrt-fp16"] = {"passed": True, "required": True, "timing": {"latency_ms": 0.5}}
    (build / "manifest.json").write_text(json.dumps(m))
    return build


def _check_io(cfg, manifest):
    s = manifest["image_size"]
    assert cfg.max_batch_size == manifest["batch"]["max"] == 4
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("image", mc.TYPE_FP32, [3, s, s])]
    outs = {o.name: o for o in cfg.output}
    assert (outs["logits"].data_type, list(outs["logits"].dims)) == (mc.TYPE_FP32, [1, s, s])
    assert (outs["mask"].data_type, list(outs["mask"].dims)) == (mc.TYPE_UINT8, [1, s, s])
    assert (outs["expert"].data_type, list(outs["expert"].dims)) == (mc.TYPE_INT32, [1])
    assert outs["expert"].HasField("reshape") and list(outs["expert"].reshape.shape) == []
    assert not outs["logits"].HasField("reshape")
    assert cfg.HasField("dynamic_batching")
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4]
    # IC-MoE's mask is binary: the config says so (a label model's names its labels, tests/engines/test_mask_labels.py).
    assert (cfg.parameters["mask_kind"].string_value, cfg.parameters["class_names"].string_value) == ("binary", "")


def test_cpu_repository_layout_and_configs(cpu_repo, tiny_build):
    from icmoe.core.manifest import read_manifest

    manifest = read_manifest(tiny_build)
    assert sorted(p.name for p in cpu_repo.iterdir()) == ["icmoe_onnxruntime", "icmoe_python"]
    ort = _parse(cpu_repo / "icmoe_onnxruntime/config.pbtxt")
    assert (ort.name, ort.backend, ort.platform, ort.default_model_filename) == (
        "icmoe_onnxruntime", "onnxruntime", "onnxruntime_onnx", "model.onnx")
    py = _parse(cpu_repo / "icmoe_python/config.pbtxt")
    assert (py.name, py.backend) == ("icmoe_python", "python")
    for cfg in (ort, py):
        _check_io(cfg, manifest)
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
        assert [(g.kind, g.count) for g in cfg.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 2)]
    # The build is FP16: both serve its FP16 graph, byte for byte.
    assert py.parameters["precision"].string_value == "fp16"
    graph = (tiny_build / "model.fp16.onnx").read_bytes()
    assert (cpu_repo / "icmoe_onnxruntime/1/model.onnx").read_bytes() == graph
    assert (cpu_repo / "icmoe_python/1/build/model.fp16.onnx").read_bytes() == graph
    assert (cpu_repo / "icmoe_python/1/model.py").read_text().startswith('"""Triton python-backend model')



def test_configs_name_nothing_of_this_machine(cpu_repo):
    """A repository is portable: no config carries a path of the machine (or environment) that wrote it;
    the python model's stub finds the packages through the server's environment instead."""
    import site

    machine_paths = {str(ROOT), sys.prefix, sys.base_prefix, *site.getsitepackages()}
    for path in cpu_repo.glob("*/config.pbtxt"):
        text = path.read_text()
        assert not [p for p in machine_paths if p in text], path
        assert "python_path" not in text and "site-packages" not in text, path


def test_uint8_input_repository(tiny_build, tmp_path):
    """--input-dtype uint8: both CPU models take UINT8 images; the onnxruntime graph casts, checked by ORT."""
    import numpy as np
    import onnxruntime as ort

    from icmoe.core.manifest import read_manifest
    from icmoe.data.synthetic import synthetic_images

    out = tmp_path / "repo"
    make_repository(tiny_build, out, options=RepositoryOptions(input_dtype="uint8", precision="fp32"))
    s = read_manifest(tiny_build)["image_size"]
    for model in ("icmoe_onnxruntime", "icmoe_python"):
        cfg = _parse(out / model / "config.pbtxt")
        assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("image", mc.TYPE_UINT8, [3, s, s])]
    graph = out / "icmoe_onnxruntime/1/model.onnx"
    onnx.checker.check_model(str(graph))
    assert onnx.load(str(graph)).graph.node[0].op_type == "Cast"
    assert (out / "icmoe_python/1/build/model.onnx").read_bytes() == (tiny_build / "model.onnx").read_bytes()
    assert not list(out.glob(".*")), "a temporary file was left in the repository"
    images = np.rint(synthetic_images(3, s, 5)[0]).clip(0, 255).astype(np.float32)  # integer-valued RGB
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    run = lambda path, x: ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"image": x})
    for want, got in zip(run(tiny_build / "model.onnx", images), run(graph, images.astype(np.uint8))):
        np.testing.assert_array_equal(got, want)  # the Cast is exact: the same answers, bit for bit


def test_uint8_input_refused_for_tensorrt(trt_build, tmp_path):
    with pytest.raises(RepositoryError, match="fixed when it is built"):
        make_repository(trt_build, tmp_path / "repo", options=RepositoryOptions(input_dtype="uint8"))


def test_onnxruntime_config_matches_graph(cpu_repo):
    """What Triton's onnxruntime backend checks at load: names, types and non-batch dims agree with the graph."""
    cfg = _parse(cpu_repo / "icmoe_onnxruntime/config.pbtxt")
    graph = onnx.load(str(cpu_repo / "icmoe_onnxruntime/1/model.onnx"), load_external_data=False).graph
    for tensors, entries in ((graph.input, cfg.input), (graph.output, cfg.output)):
        by_name = {t.name: t for t in tensors}
        assert set(by_name) == {e.name for e in entries}
        for e in entries:
            t = by_name[e.name].type.tensor_type
            assert ONNX_TO_TRITON[t.elem_type] == e.data_type, e.name
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
            assert isinstance(dims[0], str), f"{e.name}: batch axis not dynamic"
            model_dims = list(e.reshape.shape) if e.HasField("reshape") else list(e.dims)
            assert dims[1:] == model_dims, e.name


def test_tensorrt_repository(trt_build, tmp_path):
    out = tmp_path / "repo"
    make_repository(trt_build, out)  # a build with a plan -> the tensorrt model only
    assert [p.name for p in out.iterdir()] == ["icmoe_tensorrt"]
    cfg = _parse(out / "icmoe_tensorrt/config.pbtxt")
    assert (cfg.backend, cfg.platform, cfg.default_model_filename) == ("tensorrt", "tensorrt_plan", "model.plan")
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 1)]
    from icmoe.core.manifest import read_manifest

    _check_io(cfg, read_manifest(trt_build))
    assert (out / "icmoe_tensorrt/1/model.plan").read_bytes() == (trt_build / "model.plan").read_bytes()


def test_every_written_config_parses(cpu_repo, trt_build, tmp_path):
    out = tmp_path / "all"
    make_repository(trt_build, out, kinds=["tensorrt", "onnxruntime", "python"])
    configs = sorted(out.glob("*/config.pbtxt")) + sorted(cpu_repo.glob("*/config.pbtxt"))
    assert len(configs) == 5
    for path in configs:
        cfg = parse_config(path)
        assert cfg.name == path.parent.name and cfg.max_batch_size == 4


def test_invalid_config_text_is_refused():
    with pytest.raises(RepositoryError, match="not a valid Triton model config") as err:
        parse_config('name: "x"\nmax_batch_size: "four"\n')
    assert "\n" not in str(err.value)


def test_damaged_artifact_refused_and_nothing_written(tiny_build, tmp_path):
    from icmoe.core.manifest import ManifestError

    build = tmp_path / "build"
    shutil.copytree(tiny_build, build)
    data = (build / "model.fp16.onnx").read_bytes()
    (build / "model.fp16.onnx").write_bytes(data[: len(data) // 2])
    out = tmp_path / "repo"
    with pytest.raises(ManifestError, match="model.fp16.onnx"):
        make_repository(build, out, options=RepositoryOptions(precision="fp16"))
    assert not out.exists() or not list(out.glob("*/config.pbtxt"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "engines.triton", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_cli(tiny_build, tmp_path):
    proc = _cli(tiny_build, "--out", tmp_path / "repo", "--kind", "python", "--precision", "fp32", "--name", "seg",
                "--input-dtype", "uint8")
    assert proc.returncode == 0, proc.stderr
    cfg = _parse(tmp_path / "repo/seg_python/config.pbtxt")
    assert cfg.parameters["precision"].string_value == "fp32"
    assert cfg.input[0].data_type == mc.TYPE_UINT8
    assert (tmp_path / "repo/seg_python/1/build/model.onnx").is_file()


@pytest.mark.parametrize("problem", ["no_build", "no_plan"])
def test_cli_errors_are_one_line(tiny_build, tmp_path, problem):
    if problem == "no_build":
        proc = _cli(tmp_path / "missing", "--out", tmp_path / "repo")
        expected = "no such build directory"
    else:
        proc = _cli(tiny_build, "--out", tmp_path / "repo", "--kind", "tensorrt")
        expected = "no model.plan"
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and expected in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "repo").exists() or not list((tmp_path / "repo").iterdir())


def test_batch_range_must_start_at_one(tiny_build):
    from engines.triton import model_config
    from icmoe.core.manifest import read_manifest

    manifest = read_manifest(tiny_build)
    manifest["batch"] = {"min": 2, "opt": 2, "max": 4}
    with pytest.raises(RepositoryError, match="smallest batch is 2"):
        model_config(manifest, "onnxruntime", RepositoryOptions())
    assert read_manifest(tiny_build)["batch"]["min"] == 1  # the shared build is untouched
