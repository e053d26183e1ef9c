"""A third family, defined in tests/icmoe/families/toy/ alone, runs through the whole generic pipeline:
build (export, FP16, verify), the ONNX Runtime and eager engines, the Triton repository writer and
the benchmark, with no line about it in export/ or engines/."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from engines import load_engine
from engines.triton import make_repository, parse_config
from export.build import build
from icmoe.core.manifest import read_manifest
from icmoe.families import FAMILIES, get_family
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
TOY = "toy=tests.icmoe.families.toy:FAMILY"


@pytest.fixture(scope="module")
def toy_env():
    """The toy family registered the way a user's plugin is: through ICMOE_FAMILIES (seen by subprocesses)."""
    old = os.environ.get("ICMOE_FAMILIES")
    os.environ["ICMOE_FAMILIES"] = TOY
    yield {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    FAMILIES.pop("toy", None)
    if old is None:
        os.environ.pop("ICMOE_FAMILIES")
    else:
        os.environ["ICMOE_FAMILIES"] = old


@pytest.fixture(scope="module")
def toy_build(toy_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "toy-tiny-fp16"
    return build(random_init=True, model="toy", config="tiny", precision="fp16", out=out, batch=(1, 2, 4),
                 backend="onnxruntime", verify_images=8, progress=False)


def test_registry_finds_the_toy_family(toy_env):
    family = get_family("toy")
    assert family.name == "toy" and [s.name for s in family.graph.outputs(family.get_config("tiny"))] == ["logits", "mask"]


def test_build_and_verify(toy_build):
    m = read_manifest(toy_build)
    assert m["model"]["family"] == "toy" and m["model"]["name"] == "tiny"
    assert [o["name"] for o in m["outputs"]] == ["logits", "mask"]
    ran = set(m["verify"]["engines"]) | set(m["verify"]["skipped"])  # OpenVINO: run, or skipped where not installed
    # OpenVINO BF16 is an optional variant, run where this CPU has BF16 arithmetic
    assert m["verify"]["passed"] and ran - {"openvino-bf16"} == {"onnxruntime-fp32", "onnxruntime-fp16", "openvino-fp32"}
    fp32 = m["verify"]["engines"]["onnxruntime-fp32"]["batch_consistency"]
    assert fp32["mask_differing"] == 0 and fp32["logits_max_abs"] < 1e-5


def test_engines_return_the_family_outputs(toy_build):
    images = get_family("toy").parity.synthetic_inputs(3, 128, seed=1)
    with load_engine(toy_build, "eager") as eager, load_engine(toy_build, "onnxruntime", "fp32") as ort:
        ref, out = eager.infer(images), ort.infer(images)
    assert eager.name == "eager" and set(out) == {"logits", "mask"}
    assert out["mask"].dtype == np.uint8 and out["logits"].shape == (3, 1, 128, 128)
    np.testing.assert_allclose(out["logits"], ref["logits"], rtol=1e-4, atol=1e-4)


def test_triton_repository(toy_build, tmp_path):
    written = make_repository(toy_build, tmp_path / "repo")
    assert sorted(p.name for p in written) == ["toy_onnxruntime", "toy_python"]
    cfg = parse_config(tmp_path / "repo" / "toy_python" / "config.pbtxt")
    assert [o.name for o in cfg.output] == ["logits", "mask"] and cfg.max_batch_size == 4


def test_benchmark(toy_build, toy_env, tmp_path):
    script = ROOT / "benchmarks" / "latency.py"
    cmd = [sys.executable, str(script), "--build", str(toy_build), "--batch-sizes", "1,2", "--iters", "2",
           "--warmup", "1", "--parity-images", "2", "--out", str(tmp_path), "--no-plot", "--no-progress",
           "--no-compiled"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=toy_env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "latency-toy-tiny-128.json").read_text())
    ran = set(report["engines"])
    assert ran - {"openvino-fp32", "openvino-bf16"} == {"eager", "onnxruntime-fp32", "onnxruntime-fp16"}, report["skipped"]
    assert "openvino-fp32" in ran or "openvino-fp32" in report["skipped"]  # where OpenVINO imports, it runs
    assert {"onnxruntime-int8", "openvino-int8"} <= set(report["skipped"])  # the build has no INT8 graphs
    assert report["engines"]["onnxruntime-fp32"]["parity"]["passed"]
    assert "| onnxruntime-fp32 | 1 |" in proc.stdout and "x eager" in proc.stdout
