"""icmoe_trt compiled and run without TensorRT or a GPU, against the stand-in headers in trt_standin/.

The stand-in (NvInfer.h, NvInferPlugin.h, cuda_runtime_api.h) declares the TensorRT 10 and CUDA calls the
program makes, in host memory, and its "engine" is a fake plan: the I/O tensors and canned output values
(see trt_standin/NvInfer.h). That checks what the program does around TensorRT, not TensorRT: argument
parsing, I/O enumeration, buffers sized from shapes and element types, the image reaching the input
buffer (a computed `image_sum` output), and the outputs handled by common/outputs.h, binary masks and
label maps (`--classes`) alike. The real engine is tests/engines/test_cpp_tensorrt.py's (GPU hosts).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from engines.cpp import SOURCE_DIR, read_pgm, run_program, write_ppm
from tests.engines.test_cpp_aoti import _expect_error, parse_stdout

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler on PATH")

STANDIN = Path(__file__).with_name("trt_standin")
S = 16


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    exe = tmp_path_factory.mktemp("trt_standin") / "icmoe_trt"
    cmd = ["c++", "-std=c++20", "-O1", "-Wall", "-Wextra", "-Werror", "-I", str(STANDIN), "-I",
           str(SOURCE_DIR / "common"), str(SOURCE_DIR / "tensorrt" / "icmoe_trt.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exe


def fake_plan(path, outputs, *, input_dims=(-1, 3, S, S)):
    """A stand-in plan: `outputs` is [(name, dtype, dims with -1 for batch, values or None (computed))]."""
    lines = ["ICMOE-FAKE-PLAN", "input image float32 " + " ".join(map(str, input_dims))]
    payload = b""
    for name, dtype, dims, values in outputs:
        lines.append(f"output {name} {dtype} " + " ".join(map(str, dims)))
        if values is not None:
            payload += np.ascontiguousarray(values, dtype=dtype).tobytes()
    path.write_bytes(("\n".join(lines) + "\nend\n").encode() + payload)
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    x = np.random.default_rng(0).integers(0, 256, (3, S, S)).astype(np.float32)
    return write_ppm(tmp_path_factory.mktemp("img") / "img.ppm", x), x


def _labels(seed=1):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(1, 4, S, S)).astype(np.float32)
    return logits, logits.argmax(1, keepdims=True).astype(np.uint8)  # every label 0..3 appears


def test_binary_engine(program, image, tmp_path):
    path, x = image
    logits = np.random.default_rng(2).normal(size=(1, 1, S, S)).astype(np.float32)
    mask = (logits > 0).astype(np.uint8)
    plan = fake_plan(tmp_path / "bin.plan", [("logits", "float32", (-1, 1, S, S), logits),
                                              ("mask", "uint8", (-1, 1, S, S), mask),
                                              ("expert", "int32", (-1,), np.array([2])),
                                              ("image_sum", "float32", (-1,), None)])
    proc = run_program(program, plan, path, tmp_path / "m.pgm", "--logits", tmp_path / "l.f32")
    assert proc.returncode == 0, proc.stderr
    lines = parse_stdout(proc.stdout)
    assert lines["outputs"] == (f"logits:float32[1,1,{S},{S}] mask:uint8[1,1,{S},{S}] expert:int32[1] "
                                "image_sum:float32[1]")
    assert lines["expert"] == "2" and float(lines["image_sum"]) == pytest.approx(float(x.sum()), rel=1e-6)
    np.testing.assert_array_equal(read_pgm(tmp_path / "m.pgm"), mask[0, 0] * 255)  # binary: 0/255
    np.testing.assert_array_equal(np.fromfile(tmp_path / "l.f32", np.float32).reshape(1, 1, S, S), logits)
    assert int(lines["foreground"].split()[0]) == int(mask.sum())
    assert not any(key.startswith("label") for key in lines)


def test_label_engine_with_classes(program, image, tmp_path):
    logits, mask = _labels()
    plan = fake_plan(tmp_path / "labels.plan", [("logits", "float32", (-1, 4, S, S), logits),
                                                 ("mask", "uint8", (-1, 1, S, S), mask)])
    names = ["background", "liver", "left kidney", "spleen"]  # a space inside a name is fine
    proc = run_program(program, plan, image[0], tmp_path / "m.pgm", "--classes", ",".join(names))
    assert proc.returncode == 0, proc.stderr
    lines = parse_stdout(proc.stdout)
    labels = read_pgm(tmp_path / "m.pgm")
    np.testing.assert_array_equal(labels, mask[0, 0])  # raw label values
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    for value, name in enumerate(names):
        assert lines[f"label{value}"] == f"{int((labels == value).sum())} {name}"
    assert lines["foreground"] == f"{int((labels > 0).sum())} of {S * S} pixels"


@pytest.mark.parametrize("args, match", [
    ((), "output mask holds the value 2"),  # a label map without --classes: not binary
    (("--classes", "background,liver,kidney"), "holds the value 3"),
    (("--classes", "background,liver,kidney,spleen,lung"), "but the mask has 5 classes"),
    (("--classes", "background"), "--classes: a label mask needs 2..256 class names"),
    (("--classes", "background,liver,liver"), "--classes: class name 'liver' given twice"),
])
def test_label_engine_contradicted_refused(program, image, tmp_path, args, match):
    logits, mask = _labels()
    plan = fake_plan(tmp_path / "labels.plan", [("logits", "float32", (-1, 4, S, S), logits),
                                                 ("mask", "uint8", (-1, 1, S, S), mask)])
    _expect_error(program, plan, image[0], tmp_path / "m.pgm", *args, match=match)
    assert not (tmp_path / "m.pgm").exists()


def test_damaged_plan_and_usage(program, image, tmp_path):
    logits, mask = _labels()
    plan = fake_plan(tmp_path / "labels.plan", [("logits", "float32", (-1, 4, S, S), logits),
                                                 ("mask", "uint8", (-1, 1, S, S), mask)])
    data = plan.read_bytes()
    (tmp_path / "cut.plan").write_bytes(data[: len(data) - 100])
    _expect_error(program, tmp_path / "cut.plan", image[0], tmp_path / "m.pgm", match="could not deserialize")
    small = fake_plan(tmp_path / "small.plan", [("mask", "uint8", (-1, 1, 8, 8), np.zeros((1, 1, 8, 8)))],
                      input_dims=(-1, 3, 8, 8))
    _expect_error(program, small, image[0], tmp_path / "m.pgm", match=f"image is {S}x{S}, this engine takes 8x8")
    proc = run_program(program)
    assert proc.returncode == 2 and "--classes NAMES" in proc.stderr and "model.classes" in proc.stderr
