"""icmoe_trt compiled and run without TensorRT or a GPU, against the stand-in headers in trt_standin/.

The stand-in (NvInfer.h, NvInferPlugin.h, cuda_runtime_api.h) declares the TensorRT 10 and CUDA calls the
program makes, in host memory, and its "engine" is a fake plan: the I/O tensors and canned output values
(see trt_standin/NvInfer.h). That checks what the program does around TensorRT, not TensorRT: argument
parsing, I/O enumeration, buffers sized from shapes and element types, the image reaching the input
buffer resized as the Python side resizes it (a computed `image_sum` output), and the outputs handled by
common/outputs.h (the mask back at the image's size), binary masks and label maps (`--classes`) alike. The real engine is tests/engines/test_cpp_tensorrt.py's (GPU hosts).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from engines.cpp import SOURCE_DIR, read_mask, read_pgm, run_program, write_ppm
from tests.engines.test_cpp_aoti import _expect_error, parse_stdout
from tests.skips import cpp_toolchain_missing

NO_TOOLCHAIN = cpp_toolchain_missing(cmake=False)
pytestmark = pytest.mark.skipif(NO_TOOLCHAIN is not None, reason=NO_TOOLCHAIN or "")

STANDIN = Path(__file__).with_name("trt_standin")
S = 16


def compile_standin(exe: Path, *flags: str) -> Path:
    """icmoe_trt compiled against the stand-in headers (`flags`: more compiler flags, e.g. sanitizers)."""
    cmd = ["c++", "-std=c++20", "-O1", "-Wall", "-Wextra", "-Werror", *flags, "-I", str(STANDIN), "-I",
           str(SOURCE_DIR / "common"), str(SOURCE_DIR / "tensorrt" / "icmoe_trt.cpp"), "-o", str(exe),
           "-lpng", "-ljpeg"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exe


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    return compile_standin(tmp_path_factory.mktemp("trt_standin") / "icmoe_trt")


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


@pytest.mark.parametrize("args, match, code", [
    ((), "output mask holds the value 2", 1),  # a label map without --classes: not binary
    (("--classes", "background,liver,kidney"), "holds the value 3", 1),
    (("--classes", "background,liver,kidney,spleen,lung"), "but the mask has 5 classes", 1),
    (("--classes", "background"), "--classes: a label mask needs 2..256 class names", 2),  # a command-line mistake
    (("--classes", "background,liver,liver"), "--classes: class name 'liver' given twice", 2),
])
def test_label_engine_contradicted_refused(program, image, tmp_path, args, match, code):
    logits, mask = _labels()
    plan = fake_plan(tmp_path / "labels.plan", [("logits", "float32", (-1, 4, S, S), logits),
                                                 ("mask", "uint8", (-1, 1, S, S), mask)])
    _expect_error(program, plan, image[0], tmp_path / "m.pgm", *args, match=match, code=code)
    assert not (tmp_path / "m.pgm").exists()


def test_damaged_plan_and_usage(program, image, tmp_path):
    logits, mask = _labels()
    plan = fake_plan(tmp_path / "labels.plan", [("logits", "float32", (-1, 4, S, S), logits),
                                                 ("mask", "uint8", (-1, 1, S, S), mask)])
    data = plan.read_bytes()
    (tmp_path / "cut.plan").write_bytes(data[: len(data) - 100])
    _expect_error(program, tmp_path / "cut.plan", image[0], tmp_path / "m.pgm", match="could not deserialize")
    proc = run_program(program)
    assert proc.returncode == 2 and "--classes NAMES" in proc.stderr and "model.classes" in proc.stderr


def test_png_of_another_size(program, tmp_path):
    """A PNG of any size: resized to the engine's size as the Python side does (the input's sum proves it), the
    mask written back at the PNG's size by nearest neighbour, as PNG."""
    from PIL import Image

    from icmoe.data.images import model_input, read_image, resize_label

    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    logits, mask = _labels()
    plan = fake_plan(tmp_path / "labels.plan", [("logits", "float32", (-1, 4, S, S), logits),
                                                 ("mask", "uint8", (-1, 1, S, S), mask),
                                                 ("image_sum", "float32", (-1,), None)])
    proc = run_program(program, plan, tmp_path / "in.png", tmp_path / "m.png", "--classes", "a,b,c,d")
    assert proc.returncode == 0, proc.stderr
    lines = parse_stdout(proc.stdout)
    expected_input = model_input(read_image(tmp_path / "in.png"), S)
    assert float(lines["image_sum"]) == float(expected_input.sum()) and lines["image"] == "53x37"
    written = read_mask(tmp_path / "m.png")
    np.testing.assert_array_equal(written, resize_label(mask[0, 0], (37, 53)))
    assert lines["foreground"] == f"{int((written > 0).sum())} of {37 * 53} pixels"


def test_mask_rule_makes_the_mask_from_the_logits(program, tmp_path):
    """--mask-rule argmax (the build's model.mask_rule, which class_arguments prints): the mask at the PNG's
    size is the engine's logits resized bilinearly and arg-maxed, as Python's mask_from_logits."""
    from PIL import Image

    from icmoe.data.images import mask_from_logits

    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    logits, mask = _labels()
    plan = fake_plan(tmp_path / "labels.plan", [("logits", "float32", (-1, 4, S, S), logits),
                                                 ("mask", "uint8", (-1, 1, S, S), mask)])
    proc = run_program(program, plan, tmp_path / "in.png", tmp_path / "m.png", "--classes", "a,b,c,d",
                       "--mask-rule", "argmax")
    assert proc.returncode == 0, proc.stderr
    assert parse_stdout(proc.stdout)["upsample"] == "logits argmax"
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), mask_from_logits(logits[0], (37, 53), "argmax"))
    proc = run_program(program, plan, tmp_path / "in.png", tmp_path / "m.png", "--mask-rule", "argmax")
    assert proc.returncode == 2 and "--mask-rule: mask rule 'argmax' does not fit a binary mask" in proc.stderr


@pytest.mark.parametrize("args, match", [
    (("--repeat", "abc"), "--repeat expects a whole number 0..1000000, got 'abc'"),
    (("--repeat", "-1"), "got '-1'"),
    (("--repeat", "1x"), "got '1x'"),
    (("--plugin",), "--plugin needs a value"),
    (("--classes", "a,b", "--classes", "a,b"), "--classes given twice"),
    (("--batch", "2"), "unknown option --batch"),
])
def test_bad_arguments(program, image, tmp_path, args, match):
    proc = run_program(program, tmp_path / "any.plan", image[0], tmp_path / "m.png", *args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and match in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_help(program):
    proc = run_program(program, "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: icmoe_trt MODEL.plan IMAGE MASK") and "--classes NAMES" in proc.stdout
