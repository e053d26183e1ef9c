"""The CPU C++ program: an AOTInductor package of the tiny model run by icmoe_aoti (libtorch from the torch wheel).

The module fixture compiles the package (fast-compile settings) and builds the program with CMake once,
side by side; that takes a couple of minutes on 2 cores. The program's mask, expert and logits are compared with eager
PyTorch on the very same pixels (the PPM it reads is the rounded image, so eager gets the rounded image too).
"""

from __future__ import annotations

import concurrent.futures as cf
import shutil

import numpy as np
import pytest
import torch

from engines.cpp import build_programs, program_path, read_pgm, run_program, write_ppm
from engines.cpp.aoti import package_aoti

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                                reason="needs cmake and a C++ compiler on PATH")

LOGIT_ATOL = 1e-3
N_IMAGES = 2


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tmp_path_factory):
    """(package, program): the CMake build runs in a thread while Inductor compiles (2 cores, both mostly serial)."""
    folder = tmp_path_factory.mktemp("aoti")
    with cf.ThreadPoolExecutor(1) as pool:
        cmake = pool.submit(build_programs, folder / "build", targets=("icmoe_aoti",), log=lambda _m: None)
        package = package_aoti(tiny_checkpoint, folder / "tiny.pt2", fast_compile=True, log=lambda _m: None)
        build = cmake.result()
    return package, program_path(build, "icmoe_aoti")


@pytest.fixture(scope="module")
def package(built):
    return built[0]


@pytest.fixture(scope="module")
def program(built):
    return built[1]


@pytest.fixture(scope="module")
def cases(tiny_checkpoint, tmp_path_factory):
    """PPM files of synthetic lesion images and eager outputs on their exact pixels."""
    import icmoe
    from icmoe.data.synthetic import synthetic_images

    folder = tmp_path_factory.mktemp("images")
    x, _ = synthetic_images(N_IMAGES, 128, 3)
    x = np.clip(np.rint(x), 0, 255).astype(np.float32)  # what the PPM stores
    model = icmoe.load(tiny_checkpoint)
    with torch.no_grad():
        vote = model(torch.from_numpy(x))
    return [(write_ppm(folder / f"img{i}.ppm", x[i]), vote.logits[i, 0].numpy(), vote.mask[i, 0].numpy(),
             int(vote.expert[i])) for i in range(N_IMAGES)]


def test_program_matches_eager(program, package, cases, tmp_path):
    worst = 0.0
    for i, (image, ref_logits, ref_mask, ref_expert) in enumerate(cases):
        mask_path, logits_path = tmp_path / f"mask{i}.pgm", tmp_path / f"logits{i}.f32"
        proc = run_program(program, package, image, mask_path, "--logits", logits_path)
        assert proc.returncode == 0, proc.stderr
        lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
        assert int(lines["expert"]) == ref_expert
        mask = read_pgm(mask_path)
        assert mask.shape == (128, 128) and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask > 0, ref_mask > 0)
        logits = np.fromfile(logits_path, np.float32).reshape(128, 128)
        diff = float(np.abs(logits - ref_logits).max())
        assert diff <= LOGIT_ATOL
        worst = max(worst, diff)
        assert int(lines["foreground"].split()[0]) == int((ref_mask > 0).sum())
    print(f"\nicmoe_aoti vs eager on {N_IMAGES} images: masks equal, experts equal, max |logit diff| {worst:.3g}")


def test_program_latency_line(program, package, cases, tmp_path):
    proc = run_program(program, package, cases[0][0], tmp_path / "m.pgm", "--repeat", "3")
    assert proc.returncode == 0, proc.stderr
    print("\n" + proc.stdout.strip().splitlines()[-1] + " (icmoe_aoti, tiny, 2 shared cores)")
    assert "latency" in proc.stdout


def _expect_error(program, *args, match):
    proc = run_program(program, *args)
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.startswith("error: ") and match in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_wrong_image_size_refused(program, package, tmp_path):
    small = write_ppm(tmp_path / "small.ppm", np.zeros((3, 64, 64), np.float32))
    _expect_error(program, package, small, tmp_path / "m.pgm", match="this model takes 128x128")
    assert not (tmp_path / "m.pgm").exists()


@pytest.mark.parametrize("damage", ["not_an_image", "truncated", "sixteen_bit"])
def test_bad_image_refused(program, package, cases, tmp_path, damage):
    bad = tmp_path / "bad.ppm"
    data = cases[0][0].read_bytes()
    if damage == "not_an_image":
        bad.write_bytes(b"hello, not an image\n")
        match = "not a binary PPM"
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
        match = "truncated image data"
    else:
        bad.write_bytes(b"P6\n128 128\n65535\n" + bytes(128 * 128 * 6))
        match = "only 8-bit"
    _expect_error(program, package, bad, tmp_path / "m.pgm", match=match)


def test_bad_package_refused(program, cases, tmp_path):
    fake = tmp_path / "fake.pt2"
    fake.write_bytes(b"PK\x03\x04 not really a package")
    proc = run_program(program, fake, cases[0][0], tmp_path / "m.pgm")
    assert proc.returncode == 1 and proc.stderr.startswith("error: ")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "m.pgm").exists()


def test_usage(program):
    proc = run_program(program)
    assert proc.returncode == 2 and "usage: icmoe_aoti" in proc.stderr
