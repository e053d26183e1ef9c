"""The C++ programs built with AddressSanitizer and UndefinedBehaviorSanitizer, fed the fuzz corpus.

Both programs are built sanitized: icmoe_aoti by CMake with -DICMOE_SANITIZE=ON (against the torch wheel), and
icmoe_trt against the TensorRT stand-in (test_cpp_trt_standin.py) with the same flags. Every hostile file of
tests/icmoe/data/hostile.py must be refused with one line naming it, exit code 1, no mask written and no
temporary file left, and without a single sanitizer report (the sanitizers exit with their own codes, 97 and
98, and print "ERROR: AddressSanitizer", "LeakSanitizer" or "runtime error"). The mutants (random damage
with CRCs repaired, so it reaches the decoders' inner loops) may be decoded or refused but never crash; and
good images still decode under the sanitizers to the pixels Python reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engines.cpp import build_programs, program_path, read_mask, run_program
from icmoe.data.images import model_input, read_image
from tests.engines.test_cpp_aoti import parse_stdout
from tests.engines.test_cpp_trt_standin import S, compile_standin, fake_plan
from tests.icmoe.data.hostile import write_corpus, write_mutants
from tests.icmoe.data.samples import blob_image
from tests.skips import cpp_toolchain_missing

NO_TOOLCHAIN = cpp_toolchain_missing()
pytestmark = pytest.mark.skipif(NO_TOOLCHAIN is not None, reason=NO_TOOLCHAIN or "")

SANITIZE = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g")
SANITIZER_ENV = {"ASAN_OPTIONS": "exitcode=97:detect_leaks=1:abort_on_error=0",
                 "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=98"}
REPORTS = ("AddressSanitizer", "LeakSanitizer", "runtime error", "UndefinedBehaviorSanitizer")


@pytest.fixture(scope="module", autouse=True)
def sanitizer_environment():
    saved = {k: os.environ.get(k) for k in SANITIZER_ENV}
    os.environ.update(SANITIZER_ENV)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """(icmoe_trt on the stand-in, sanitized; a fake plan whose outputs are a mask and the input's sum)."""
    folder = tmp_path_factory.mktemp("sanitized_trt")
    exe = compile_standin(folder / "icmoe_trt", *SANITIZE)
    plan = fake_plan(folder / "fake.plan", [("mask", "uint8", (-1, 1, S, S), np.zeros((1, 1, S, S), np.uint8)),
                                            ("image_sum", "float32", (-1,), None)])
    return exe, plan


@pytest.fixture(scope="module")
def aoti(tmp_path_factory, labels_package):
    """(icmoe_aoti built by CMake with -DICMOE_SANITIZE=ON, the toy labels package)."""
    build = build_programs(tmp_path_factory.mktemp("sanitized_cpp") / "build", extra_args=["-DICMOE_SANITIZE=ON"])
    return program_path(build), labels_package


def _sanitized(exe: Path) -> bool:
    data = exe.read_bytes()
    return b"libasan.so" in data and b"libubsan.so" in data


def _refused(program, model, path: Path, out: Path) -> str:
    """Runs `program` on one hostile file; checks the refusal; returns its error line."""
    mask = out / "mask.png"
    proc = run_program(program, model, path, mask)
    assert not any(r in proc.stderr for r in REPORTS), proc.stderr[-4000:]
    assert proc.returncode == 1, f"{path.name}: exit {proc.returncode}: {proc.stderr[-2000:]}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), proc.stderr
    assert proc.stdout == "" and list(out.iterdir()) == [], f"{path.name} wrote {list(out.iterdir())}"
    return lines[0]


@pytest.mark.parametrize("which", ["icmoe_trt", "icmoe_aoti"])
def test_corpus_refused_with_zero_sanitizer_reports(request, corpus, tmp_path, which):
    program, model = request.getfixturevalue("standin" if which == "icmoe_trt" else "aoti")
    assert _sanitized(program), f"{program} is not linked with libasan and libubsan"
    out = tmp_path / "out"
    out.mkdir()
    reasons = {name: _refused(program, model, path, out) for name, path in sorted(corpus.items())}
    examples = ("png_65535x65535.png", "jpeg_huffman_counts_over_256.jpg")
    print(f"\n{which} (ASan+UBSan): {len(reasons)} hostile files refused, 0 sanitizer reports; e.g. "
          + "; ".join(reasons[n].split(": ", 2)[-1] for n in examples))
    limit = {n: r for n, r in reasons.items() if "ICMOE_MAX_IMAGE_PIXELS" in r}
    assert {"png_65535x65535.png", "bmp_65535x65535.bmp", "ppm_65535x65535.ppm"} <= set(limit)


def test_mutants_never_crash_the_sanitized_program(standin, tmp_path):
    """Random damage (CRCs repaired): decoded (a mask at the image's size) or refused in one line, never a report."""
    program, plan = standin
    outcomes = {"decoded": 0, "refused": 0}
    for path in write_mutants(tmp_path / "mutants"):
        out = tmp_path / "out" / path.stem
        out.mkdir(parents=True)
        proc = run_program(program, plan, path, out / "mask.png")
        assert not any(r in proc.stderr for r in REPORTS), proc.stderr[-4000:]
        assert proc.returncode in (0, 1), f"{path.name}: exit {proc.returncode}: {proc.stderr[-2000:]}"
        if proc.returncode == 0:
            width, height = map(int, parse_stdout(proc.stdout)["image"].split("x"))
            assert read_mask(out / "mask.png").shape == (height, width)
            outcomes["decoded"] += 1
        else:
            assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(f"error: {path}: ")
            assert list(out.iterdir()) == []
            outcomes["refused"] += 1
    print(f"\nmutants under ASan+UBSan: {outcomes}")
    assert outcomes["decoded"] > 0 and outcomes["refused"] > 0  # both paths were exercised


@pytest.mark.parametrize("name", ["rgb.png", "gray16.png", "palette.png", "photo.jpg", "progressive.jpg", "rgb.bmp"])
def test_good_images_decode_under_the_sanitizers(standin, tmp_path, name):
    """The image reaches the (fake) engine's input as Python prepares it: the sum of its pixels agrees."""
    program, plan = standin
    rgb = blob_image(37, 53, 7, 3)
    writers = {"rgb.png": lambda p: Image.fromarray(rgb).save(p),
               "gray16.png": lambda p: Image.fromarray(rgb[..., 0].astype(np.uint16) * 60).save(p),
               "palette.png": lambda p: Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=9).save(p),
               "photo.jpg": lambda p: Image.fromarray(rgb).save(p, quality=88),
               "progressive.jpg": lambda p: Image.fromarray(rgb).save(p, quality=80, progressive=True),
               "rgb.bmp": lambda p: Image.fromarray(rgb).save(p)}
    path = tmp_path / name
    writers[name](path)
    proc = run_program(program, plan, path, tmp_path / "mask.png")
    assert proc.returncode == 0 and not any(r in proc.stderr for r in REPORTS), proc.stderr[-4000:]
    expected = float(model_input(read_image(path), S).sum())
    assert float(parse_stdout(proc.stdout)["image_sum"]) == pytest.approx(expected, rel=1e-6)


# What the torch wheel's own libraries leak, once, in their static initializers (not this project's code; LSan
# reports it at exit once the package's kernels have loaded libtorch_cuda): suppressed for the run below only.
TORCH_LEAKS = "leak:libtorch_cuda.so\n"


def test_sanitized_aoti_runs_a_good_image_like_the_plain_build(aoti, aoti_program, tmp_path, monkeypatch):
    """The sanitized icmoe_aoti (libtorch and the package's kernels loaded) segments a good image without a
    report, and its mask equals the plain build's."""
    program, package = aoti
    image = tmp_path / "in.png"
    Image.fromarray(blob_image(45, 70, 9, 3)).save(image)
    (tmp_path / "lsan.supp").write_text(TORCH_LEAKS)
    monkeypatch.setenv("LSAN_OPTIONS", f"suppressions={tmp_path / 'lsan.supp'}:print_suppressions=0")
    proc = run_program(program, package, image, tmp_path / "sanitized.png")
    assert proc.returncode == 0 and not any(r in proc.stderr for r in REPORTS), proc.stderr[-4000:]
    plain = run_program(aoti_program, package, image, tmp_path / "plain.png")
    assert plain.returncode == 0, plain.stderr
    np.testing.assert_array_equal(read_mask(tmp_path / "sanitized.png"), read_mask(tmp_path / "plain.png"))
