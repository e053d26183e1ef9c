"""Which engine runs a build: the fastest whose parity gates passed (from the verify results in the manifest),
among those this host can run; --backend / --precision narrow it; without verify results the old default.
The shared tiny build (verified at build time) is copied and its recorded timings edited, so each case
has one right answer."""

from __future__ import annotations

import json
import shutil

import pytest

from engines import EngineError
from engines.select import choose, engine_kwargs, passed_engines, split_label
from icmoe.core.manifest import read_manifest


def _edited(build, dst, timings=None, drop_verify=False):
    """A copy of `build` whose verify results give these batch-1 ms (label -> ms; None: failed its gates)."""
    shutil.copytree(build, dst)
    m = json.loads((dst / "manifest.json").read_text())
    if drop_verify:
        del m["verify"]
    for label, ms in (timings or {}).items():
        r = m["verify"]["engines"].setdefault(label, {"required": True})
        r["passed"], r["timing"] = ms is not None, {"latency_ms": 0.01 if ms is None else ms}
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_the_build_records_what_the_choice_needs(tiny_build):
    ranked = passed_engines(read_manifest(tiny_build))
    assert {"onnxruntime-fp32", "onnxruntime-fp16"} <= {label for label, _ in ranked}
    assert [ms for _, ms in ranked] == sorted(ms for _, ms in ranked) and all(ms > 0 for _, ms in ranked)


def test_default_is_the_fastest_that_passed(tiny_build):
    engine, choice = choose(tiny_build)
    best, ms = passed_engines(read_manifest(tiny_build))[0]
    assert engine.name == choice.label == best and choice.latency_ms == ms
    line = choice.describe()
    assert line.startswith(f"engine {best}, ") and "x eager" in line and "parity gates passed" in line


def test_failed_engines_are_never_chosen(tiny_build, tmp_path):
    build = _edited(tiny_build, tmp_path / "b", {"onnxruntime-fp16": None, "onnxruntime-fp32": 0.5})
    engine, choice = choose(build)
    assert choice.label == "onnxruntime-fp32" and "onnxruntime-fp16" not in choice.passed


def test_an_engine_this_host_cannot_run_is_passed_over_with_the_reason(tiny_build, tmp_path):
    pytest.importorskip("onnxruntime")
    from engines.tensorrt import unavailable_reason

    if unavailable_reason() is None:
        pytest.skip("TensorRT runs here: the fake plan entry would be tried for real")
    build = _edited(tiny_build, tmp_path / "b", {"tensorrt-fp16": 0.01, "onnxruntime-fp32": 0.02})
    engine, choice = choose(build)
    assert choice.label == "onnxruntime-fp32" and "cannot run here: tensorrt-fp16 (" in choice.reason


def test_backend_and_precision_narrow_the_choice(tiny_build, tmp_path):
    build = _edited(tiny_build, tmp_path / "b", {"onnxruntime-fp32": 2.0, "onnxruntime-fp16": 1.0})
    assert choose(build, "onnxruntime")[1].label == "onnxruntime-fp16"
    assert choose(build, "onnxruntime", "fp32")[1].label == "onnxruntime-fp32"
    engine, choice = choose(build, precision="fp32")
    assert split_label(choice.label)[1] == "fp32"


def test_without_verify_results_the_old_default(tiny_build, tmp_path):
    build = _edited(tiny_build, tmp_path / "b", drop_verify=True)
    engine, choice = choose(build)
    assert engine.name == "onnxruntime-fp16" and "no verify results" in choice.reason  # the build's precision
    engine, choice = choose(build, "eager")
    assert engine.name.startswith("eager") and "named backend eager" in choice.reason
    with pytest.raises(EngineError, match="no int8 ONNX graph"):
        choose(build, "onnxruntime", "int8")


def test_throughput_settings():
    assert engine_kwargs("onnxruntime", 2, "throughput") == {"threads": 2, "streams": 2}
    assert engine_kwargs("openvino", None, "throughput") == {"hint": "throughput"}
    assert engine_kwargs("tensorrt", 2, "throughput") == {}
    assert engine_kwargs("openvino", 2) == {"threads": 2}
    with pytest.raises(EngineError, match="mode must be one of latency, throughput"):
        engine_kwargs("openvino", 2, "fast")
    assert split_label("openvino-int8-bf16") == ("openvino", "int8-bf16")
    assert split_label("torch-tensorrt-fp16") == ("torch-tensorrt", "fp16")
