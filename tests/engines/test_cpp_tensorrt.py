"""The TensorRT C++ runner icmoe_trt on a real engine (GPU hosts with TensorRT 10 and its C++ headers).

Builds a tiny TensorRT build with `export.build`, builds icmoe_trt with CMake (TENSORRT_ROOT or system
TensorRT), runs one image and compares the mask and expert with eager (FP16 engine: Dice >= 0.995).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tests.skips import tensorrt_gpu_missing


def _tensorrt_reason():
    reason = tensorrt_gpu_missing()
    if reason is None and shutil.which("cmake") is None:
        return "needs cmake on PATH"
    return reason


REASON = _tensorrt_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.tensorrt, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


@pytest.fixture(scope="module")
def trt_build(tiny_checkpoint, tmp_path_factory):
    from export.build import build

    out = tmp_path_factory.mktemp("trt") / "tiny-fp16"
    return build(tiny_checkpoint, precision="fp16", out=out, batch=(1, 2, 4), backend="tensorrt", verify=False,
                 progress=False)


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    from engines.cpp import build_programs, program_path

    build = build_programs(tmp_path_factory.mktemp("cpp") / "build", targets=())  # configure
    exe = program_path(build, "icmoe_trt")
    if not exe.parent.joinpath("CMakeFiles/icmoe_trt.dir").is_dir():
        line = [l for l in (build / "icmoe-configure.log").read_text().splitlines() if "icmoe_trt" in l]
        pytest.skip(f"CMake did not find TensorRT's C++ headers/libraries: {line[0].strip() if line else '?'}"
                    " (set TENSORRT_ROOT)")
    build_programs(build, targets=("icmoe_trt",))
    return exe


def test_trt_program_matches_eager(program, trt_build, tiny_checkpoint, tmp_path):
    import icmoe
    from engines.cpp import read_pgm, run_program, write_ppm
    from icmoe.data.synthetic import synthetic_images

    x, _ = synthetic_images(2, 128, 5)
    x = np.clip(np.rint(x), 0, 255).astype(np.float32)
    with torch.no_grad():
        vote = icmoe.load(tiny_checkpoint)(torch.from_numpy(x))
    for i in range(len(x)):
        image = write_ppm(tmp_path / f"img{i}.ppm", x[i])
        proc = run_program(program, trt_build / "model.plan", image, tmp_path / f"mask{i}.pgm")
        assert proc.returncode == 0, proc.stderr
        lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
        assert int(lines["expert"]) == int(vote.expert[i])
        mask = read_pgm(tmp_path / f"mask{i}.pgm") > 0
        ref = vote.mask[i, 0].numpy() > 0
        dice = 2 * (mask & ref).sum() / max(mask.sum() + ref.sum(), 1)
        assert dice >= 0.995, f"Dice {dice:.4f}"


def test_trt_program_refuses_damaged_plan(program, trt_build, tmp_path):
    from engines.cpp import run_program, write_ppm

    bad = tmp_path / "bad.plan"
    data = (trt_build / "model.plan").read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    image = write_ppm(tmp_path / "img.ppm", np.zeros((3, 128, 128), np.float32))
    proc = run_program(program, bad, image, tmp_path / "m.pgm")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "m.pgm").exists()
