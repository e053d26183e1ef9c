"""OpenVINO engine: FP32 equals eager within the FP32 gates (both families), its options reach the compiled
model, and a damaged graph or compiled-model cache gives one-line errors and touches nothing.

Skipped with the reason where OpenVINO is not installed (the [openvino] extra).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from engines import EngineError, InputError, engine_class, load_engine
from engines.openvino import OpenVINOEngine, openvino_version, unavailable_reason, write_cache
from export import verify as verify_mod
from icmoe.core.manifest import read_manifest
from icmoe.families import get_family
from tests.helpers import flip_middle_byte, tree_digest

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
N_IMAGES = 8


def images(family, n=N_IMAGES, size=128, seed=3):
    return family.parity.synthetic_inputs(n, size, seed).astype(np.float32)


@pytest.fixture(scope="module")
def cached_build(tiny_build, tmp_path_factory):
    """A copy of the shared tiny build with OpenVINO's FP32 cache compiled for this host."""
    dst = tmp_path_factory.mktemp("openvino") / "build"
    shutil.copytree(tiny_build, dst)
    write_cache(dst, "fp32")
    return dst


@pytest.fixture()
def build_copy(cached_build, tmp_path):
    dst = tmp_path / "build"
    shutil.copytree(cached_build, dst)
    return dst


def _in_batches(engine, x, size):
    parts = [engine.infer(x[i:i + size]) for i in range(0, len(x), size)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("fixture, family_name", [("tiny_build", "icmoe"), ("moesam_build", "moesam")])
def test_fp32_equals_eager_within_the_fp32_gates(request, fixture, family_name):
    build = request.getfixturevalue(fixture)
    family = get_family(family_name)
    x = images(family, size=read_manifest(build)["image_size"])
    batch = read_manifest(build)["batch"]["max"]
    with load_engine(build, "eager") as eager:
        ref = _in_batches(eager, x, batch)
    with load_engine(build, "openvino", "fp32", threads=2) as engine:
        out = _in_batches(engine, x, batch)
        assert not engine.from_cache  # the shared builds have no cache: compiled from model.onnx
    report = family.parity.compare(ref, out, family.parity.tolerances("fp32"))
    assert report["passed"], report
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in ref.items()}


def test_registry_options_and_cache(cached_build):
    assert engine_class("openvino") is OpenVINOEngine
    entry = read_manifest(cached_build)["artifacts"]["openvino-fp32.blob"]
    assert entry["kind"] == "openvino_cache" and entry["source"] == "model.onnx" and entry["precision"] == "fp32"
    assert entry["openvino"] and entry["cpu"]["name"] and entry["batch"] == {"min": 1, "max": 4}
    x = images(get_family("icmoe"), n=2)
    with load_engine(cached_build, "openvino", threads=1, hint="throughput") as engine:
        assert engine.from_cache and engine.batch_range == (1, 4)
        c = engine.compiled
        assert c.get_property("INFERENCE_NUM_THREADS") == 1
        assert str(c.get_property("PERFORMANCE_HINT")).endswith("THROUGHPUT")
        assert str(c.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
        cached = engine.infer(x)
    with load_engine(cached_build, "openvino", use_cache=False) as engine:
        assert not engine.from_cache
        compiled = engine.infer(x)
    for k in compiled:
        np.testing.assert_array_equal(cached[k], compiled[k])
    with pytest.raises(EngineError, match="hint must be one of latency, throughput"):
        load_engine(cached_build, "openvino", hint="fast")


def test_bad_input_is_one_line(cached_build):
    with load_engine(cached_build, "openvino") as engine:
        with pytest.raises(InputError, match="batch 5 outside"):
            engine.infer(images(get_family("icmoe"), n=5))
        with pytest.raises(InputError, match="dtype float64"):
            engine.infer(images(get_family("icmoe"), n=1).astype(np.float64))


def _expect_error(build_dir, match, **kw):
    before = tree_digest(build_dir)
    with pytest.raises(EngineError, match=match) as e:
        load_engine(build_dir, "openvino", **kw).activate()
    assert "\n" not in str(e.value)
    assert tree_digest(build_dir) == before, "a failed load must not change the build directory"


def _edit_manifest(build_dir, fn):
    path = build_dir / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def test_damaged_cache_is_refused(build_copy):
    # OpenVINO itself imports a blob with a flipped byte and computes other numbers: the sha256 must stop it.
    flip_middle_byte(build_copy / "openvino-fp32.blob")
    _expect_error(build_copy, "openvino-fp32.blob: damaged \\(sha256")


def test_truncated_cache_is_refused(build_copy):
    p = build_copy / "openvino-fp32.blob"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    _expect_error(build_copy, "openvino-fp32.blob: truncated")


def test_unverified_truncated_cache_fails_in_openvino(build_copy):
    p = build_copy / "openvino-fp32.blob"
    p.write_bytes(p.read_bytes()[:1000])
    _expect_error(build_copy, "OpenVINO cannot import this compiled model", verify=False)


def test_cache_from_another_graph_is_refused(build_copy):
    def other_source(m):
        m["artifacts"]["openvino-fp32.blob"]["source_sha256"] = "0" * 64
    _edit_manifest(build_copy, other_source)
    _expect_error(build_copy, "compiled from another graph")


def test_cache_for_another_openvino_or_cpu_is_ignored(build_copy, caplog):
    def other_host(m):
        m["artifacts"]["openvino-fp32.blob"]["openvino"] = "2020.1.0"
    _edit_manifest(build_copy, other_host)
    before = tree_digest(build_copy)
    with caplog.at_level("INFO", logger="engines.openvino"):
        with load_engine(build_copy, "openvino") as engine:
            assert not engine.from_cache
            engine.infer(images(get_family("icmoe"), n=1))
    assert "is for OpenVINO 2020.1.0" in caplog.text
    assert tree_digest(build_copy) == before, "loading never writes a cache"

    def other_cpu(m):
        m["artifacts"]["openvino-fp32.blob"]["openvino"] = openvino_version()
        m["artifacts"]["openvino-fp32.blob"]["cpu"] = {"name": "Other CPU", "isa": "sse4_2"}
    _edit_manifest(build_copy, other_cpu)
    assert OpenVINOEngine.from_build(build_copy).cache is None


def test_damaged_graph_is_refused_even_with_a_good_cache(build_copy):
    flip_middle_byte(build_copy / "model.onnx")
    _expect_error(build_copy, "model.onnx: damaged \\(sha256")


def test_unverified_truncated_graph_fails_in_openvino(build_copy):
    (build_copy / "openvino-fp32.blob").unlink()
    _edit_manifest(build_copy, lambda m: m["artifacts"].pop("openvino-fp32.blob"))
    p = build_copy / "model.onnx"
    p.write_bytes(p.read_bytes()[:1000])
    _expect_error(build_copy, "OpenVINO cannot read it", verify=False)


def test_manifest_mismatches_are_refused(build_copy):
    _expect_error(build_copy, r"OpenVINO runs the fp32 and int8 graphs \(also with BF16: bf16, int8-bf16\), "
                              r"not 'fp16'", precision="fp16")
    _expect_error(build_copy, "no int8 graph for OpenVINO in this build", precision="int8")
    _expect_error(build_copy, "build is for icmoe/tiny, expected icmoe/vit_b", expect="vit_b")

    def relabel(m):
        m["artifacts"]["openvino-fp32.blob"]["kind"] = "onnx"
    _edit_manifest(build_copy, relabel)
    _expect_error(build_copy, "registered as 'onnx', not 'openvino_cache'", precision="fp32")


def test_verify_runs_openvino_or_says_why_not(tiny_build, monkeypatch):
    labels = [c[0] for c in verify_mod.engine_candidates(read_manifest(tiny_build))]
    assert labels[:2] == ["onnxruntime-fp32", "onnxruntime-fp16"] and "openvino-fp32" in labels
    monkeypatch.setattr(verify_mod, "openvino_unavailable", lambda: "the OpenVINO engine needs the [openvino] extra")
    report = verify_mod.verify_build(tiny_build, n=2, progress=False)
    assert report["skipped"] == {"openvino-fp32": "the OpenVINO engine needs the [openvino] extra",
                                 "openvino-bf16": "the OpenVINO engine needs the [openvino] extra"}
    assert set(report["engines"]) == {"onnxruntime-fp32", "onnxruntime-fp16"} and report["passed"]


def test_bf16_runs_where_the_cpu_has_it_and_is_refused_elsewhere(tiny_build, monkeypatch):
    """BF16 arithmetic (INFERENCE_PRECISION_HINT bf16): within the family's BF16 gates against eager FP32 where
    the CPU has AVX512-BF16 or AMX; a one-line refusal with the reason where it has not."""
    from engines import openvino as ov_mod

    family = get_family("icmoe")
    x = images(family)
    if ov_mod.bf16_unavailable() is None:
        with load_engine(tiny_build, "eager") as eager:
            ref = _in_batches(eager, x, 4)
        with load_engine(tiny_build, "openvino", "bf16", threads=2) as engine:
            assert engine.name == "openvino-bf16"
            assert str(engine.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'bfloat16'>"
            out = _in_batches(engine, x, 4)
        report = family.parity.compare(ref, out, family.parity.tolerances("bf16"))
        assert report["passed"], report
        assert report["max_abs_logit"] > 1e-6  # BF16 really ran: not FP32's rounding-level differences
    monkeypatch.setattr(ov_mod, "bf16_unavailable", lambda: "BF16 needs a CPU with AVX512-BF16 or AMX; ...")
    with pytest.raises(EngineError, match=r"^--precision bf16: BF16 needs a CPU with AVX512-BF16 or AMX"):
        load_engine(tiny_build, "openvino", "bf16")
    with pytest.raises(EngineError, match="no int8 graph for OpenVINO"):
        load_engine(tiny_build, "openvino", "int8-bf16")


def test_throughput_streams_answer_as_one_request(cached_build):
    """The THROUGHPUT hint compiles several streams, one request each; calls from as many threads at once give
    what the latency engine gives."""
    from concurrent.futures import ThreadPoolExecutor

    x = images(get_family("icmoe"), n=8)
    with load_engine(cached_build, "openvino", threads=2) as engine:
        assert engine.streams == 1
        alone = [engine.infer(x[i:i + 2]) for i in range(0, 8, 2)]
    with load_engine(cached_build, "openvino", threads=2, hint="throughput", streams=2) as engine:
        assert engine.streams == 2 and engine.settings()["num_streams"] == "2"
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda i: engine.infer(x[i:i + 2]), range(0, 8, 2)))
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a["logits"], b["logits"], rtol=0, atol=1e-4)
        assert (a["mask"] != b["mask"]).mean() <= 1e-3
