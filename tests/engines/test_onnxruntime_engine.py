"""ONNX Runtime engine: loading checks, bad inputs and damaged artifacts give one-line errors and touch nothing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from engines import BACKENDS, EngineError, InputError, engine_class, load_engine
from engines.onnxruntime import OnnxRuntimeEngine
from tests.helpers import flip_middle_byte, tree_digest


@pytest.fixture()
def build_copy(tiny_build, tmp_path):
    dst = tmp_path / "build"
    shutil.copytree(tiny_build, dst)
    return dst


@pytest.fixture(scope="module")
def engine(tiny_build):
    with load_engine(tiny_build, "onnxruntime", "fp32") as eng:
        yield eng


def images(b=1, s=128, seed=0):
    return (np.random.default_rng(seed).random((b, 3, s, s)) * 255).astype(np.float32)


def test_registry_and_session_settings(engine, tiny_build):
    assert set(BACKENDS) >= {"eager", "onnxruntime", "tensorrt"}
    assert engine_class("onnxruntime") is OnnxRuntimeEngine
    assert isinstance(engine, OnnxRuntimeEngine) and engine.precision == "fp32"
    assert engine.batch_range == (1, 4)
    import onnxruntime as ort

    opts = engine.session.get_session_options()
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert opts.intra_op_num_threads == engine.threads >= 1
    with pytest.raises(EngineError, match="unknown backend 'nope'"):
        load_engine(tiny_build, "nope")


def test_tensorrt_backend_missing_is_one_line_error(tiny_build):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(EngineError) as e:
            load_engine(tiny_build, "tensorrt")
        assert "\n" not in str(e.value)
    else:
        pytest.skip("TensorRT is installed: the unavailable-backend path cannot be shown here")


def test_outputs(engine):
    out = engine.infer(images(2))
    assert set(out) == {"logits", "mask", "expert"}
    assert out["logits"].shape == (2, 1, 128, 128) and out["logits"].dtype == np.float32
    assert out["mask"].shape == (2, 1, 128, 128) and out["mask"].dtype == np.uint8
    assert out["expert"].shape == (2,) and out["expert"].dtype == np.int32
    np.testing.assert_array_equal(out["mask"], (out["logits"] > 0).astype(np.uint8))
    assert set(np.unique(out["expert"])) <= {0, 1, 2}


@pytest.mark.parametrize(
    "bad, match",
    [
        (images(1).astype(np.float64), "dtype float64"),
        (images(1).astype(np.uint8), "dtype uint8"),
        (images(1)[0], "3-D shape"),
        (np.zeros((1, 1, 128, 128), np.float32), "3 \\(RGB\\) channels"),
        (np.zeros((1, 4, 128, 128), np.float32), "3 \\(RGB\\) channels"),
        (np.zeros((1, 128, 128, 3), np.float32), "3 \\(RGB\\) channels"),
        (images(1, 64), "128x128, got 64x64"),
        (images(5), "batch 5 outside"),
        (np.where(np.eye(128, dtype=bool), np.nan, images(1)).astype(np.float32), "NaN"),
        (np.full((1, 3, 128, 128), np.inf, np.float32), "NaN or infinite"),
    ],
)
def test_bad_inputs(engine, tiny_build, bad, match):
    before = tree_digest(tiny_build)
    with pytest.raises(InputError, match=match) as e:
        engine.infer(bad)
    assert "\n" not in str(e.value)
    assert tree_digest(tiny_build) == before


def _expect_error(build_dir, match, **kw):
    before = tree_digest(build_dir)
    with pytest.raises(EngineError, match=match) as e:
        load_engine(build_dir, "onnxruntime", **kw).activate()
    assert "\n" not in str(e.value)
    assert tree_digest(build_dir) == before, "a failed load must not change the build directory"


def test_truncated_graph(build_copy):
    p = build_copy / "model.onnx"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    _expect_error(build_copy, "model.onnx: truncated", precision="fp32")


def test_same_size_corruption_is_caught_by_sha256(build_copy):
    flip_middle_byte(build_copy / "model.fp16.onnx")
    _expect_error(build_copy, "model.fp16.onnx: damaged \\(sha256", precision="fp16")


def test_missing_graph(build_copy):
    (build_copy / "model.onnx").unlink()
    _expect_error(build_copy, "model.onnx: missing", precision="fp32")


def test_unverified_truncated_graph_fails_in_onnxruntime(build_copy):
    p = build_copy / "model.onnx"
    p.write_bytes(p.read_bytes()[:1000])
    _expect_error(build_copy, "ONNX Runtime cannot load it", precision="fp32", verify=False)


def _edit_manifest(build_dir, fn):
    path = build_dir / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def test_manifest_of_another_model(build_copy):
    def to_vit_b(m):
        m["model"]["name"] = "vit_b"
    _edit_manifest(build_copy, to_vit_b)
    _expect_error(build_copy, "build is for icmoe/vit_b, expected icmoe/tiny", expect="tiny")


def test_graph_of_another_image_size(build_copy):
    def resize(m):
        m["image_size"] = 256
    _edit_manifest(build_copy, resize)
    _expect_error(build_copy, "image_size 256 disagrees with the model config \\(128\\)", precision="fp32")


def test_precision_not_in_build(build_copy):
    def drop_fp16(m):
        del m["artifacts"]["model.fp16.onnx"]
        m["precision"], m["precisions"] = "fp32", ["fp32"]
    _edit_manifest(build_copy, drop_fp16)
    _expect_error(build_copy, "no fp16 ONNX graph in this build", precision="fp16")


def test_artifact_of_another_precision(build_copy):
    def relabel(m):
        m["artifacts"]["model.fp16.onnx"]["precision"] = "fp32"
    _edit_manifest(build_copy, relabel)
    _expect_error(build_copy, "precision 'fp16', but model.fp16.onnx is not listed as a fp16 graph", precision="fp16")


def test_not_a_build_directory(tmp_path):
    _expect_error(tmp_path, "not a build directory")
    (tmp_path / "manifest.json").write_text("{not json")
    _expect_error(tmp_path, "damaged JSON")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    _expect_error(tmp_path, "not an icmoe build manifest")


def test_graph_runtimes_do_not_import_torch(tiny_build):
    """A process that runs a build's graph (ONNX Runtime, OpenVINO, predict's path) does not load torch:
    it is a deployment's memory and start-up time (about 700 MiB of resident memory here)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from engines import load_engine\n"
            "import engines.openvino\n"
            "from engines.predict import predict\n"
            f"with load_engine({str(tiny_build)!r}, 'onnxruntime', 'fp32') as e:\n"
            "    e.infer(np.zeros((1, 3, 128, 128), np.float32))\n"
            "    predict(e, np.zeros((50, 70), np.uint8))\n"
            "print('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_streams_run_requests_at_once_with_the_same_answers(tiny_build):
    """streams=2: one session, two requests at once from two threads (one intra-op thread each); the answers
    are those of one request at a time."""
    from concurrent.futures import ThreadPoolExecutor

    x = (np.random.default_rng(5).random((8, 3, 128, 128)) * 255).astype(np.float32)
    with load_engine(tiny_build, "onnxruntime", "fp32", threads=2) as engine:
        alone = [engine.infer(x[i:i + 2]) for i in range(0, 8, 2)]
    with load_engine(tiny_build, "onnxruntime", "fp32", threads=2, streams=2) as engine:
        assert engine.streams == 2 and engine.settings()["intra_op_threads"] == 1
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda i: engine.infer(x[i:i + 2]), range(0, 8, 2)))
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a["logits"], b["logits"], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(a["expert"], b["expert"])
    with pytest.raises(EngineError, match="streams must be >= 1"):
        load_engine(tiny_build, "onnxruntime", streams=0)
