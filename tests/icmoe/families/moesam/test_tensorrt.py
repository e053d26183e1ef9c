"""MoE-SAM on TensorRT (GPU hosts with TensorRT >= 10.9; elsewhere every test skips with the reason).

The session's tiny MoE-SAM build (random init, FP32 + FP16 graphs; tests/conftest.py) gets a
`model.plan` from its FP16 graph: per-image TopK routing (K = N/2, below TensorRT's TopK limit of
3840), GatherElements / ScatterElements without reduction, the routing island in FP32. `export.verify`
must pass it by the family's FP16 gates (label agreement >= 99%, per-class Dice >= 0.99), its outputs
must not depend on the batch, and icmoe_trt, told the class names with `--classes`, must write the
label map the engine computes.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.engines.test_cpp_tensorrt import program  # noqa: F401  (the icmoe_trt fixture)
from tests.skips import tensorrt_gpu_missing

REASON = tensorrt_gpu_missing()
pytestmark = [pytest.mark.gpu, pytest.mark.tensorrt, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


@pytest.fixture(scope="module")
def trt_build(moesam_build, tmp_path_factory):
    """A copy of the session's MoE-SAM build with model.plan built from its FP16 graph (batch 1..8)."""
    from export.tensorrt import EngineSettings, build_engine

    out = tmp_path_factory.mktemp("moesam_trt") / "moesam-tiny-fp16"
    shutil.copytree(moesam_build, out)
    build_engine(out, onnx_name="model.fp16.onnx", batch=(1, 2, 8),
                 settings=EngineSettings(progress=False, timing_cache_dir=tmp_path_factory.mktemp("timing")))
    return out


def test_plan_passes_the_family_gates(trt_build):
    from export.verify import verify_build

    report = verify_build(trt_build, n=16, progress=False)
    r = report["engines"]["tensorrt-fp16"]
    print(f"\nmoesam tensorrt-fp16: label agreement {r['label_agreement']:.4%}, min class Dice "
          f"{r['min_class_dice']:.4f}, max |dlogit| {r['max_abs_logit']:.3g}")
    assert r["passed"], r
    assert r["label_agreement"] >= 0.99 and r["min_class_dice"] >= 0.99


def test_plan_is_batch_independent(trt_build):
    from engines import load_engine
    from icmoe.families import get_family

    images = get_family("moesam").parity.synthetic_inputs(8, 128, seed=5)
    with load_engine(trt_build, "tensorrt", "fp16") as engine:
        alone = engine.infer(images[:1])
        for b in (2, 4, 8):
            out = engine.infer(images[:b])
            flipped = float((out["mask"][:1] != alone["mask"]).mean())
            assert flipped <= 0.001, f"batch {b}: {flipped:.4%} of the first image's labels changed"


def test_icmoe_trt_writes_the_label_map(program, trt_build, tmp_path):  # noqa: F811
    from engines import load_engine
    from engines.cpp import class_arguments, read_pgm, run_program, write_ppm
    from icmoe.families import get_family

    images = np.clip(np.rint(get_family("moesam").parity.synthetic_inputs(2, 128, seed=9)), 0, 255).astype(np.float32)
    with load_engine(trt_build, "tensorrt", "fp16") as engine:
        ref = engine.infer(images)
    for i in range(len(images)):
        image = write_ppm(tmp_path / f"img{i}.ppm", images[i])
        proc = run_program(program, trt_build / "model.plan", image, tmp_path / f"m{i}.pgm",
                           *class_arguments(trt_build))
        assert proc.returncode == 0, proc.stderr
        mask = read_pgm(tmp_path / f"m{i}.pgm")
        agreement = float((mask == ref["mask"][i, 0]).mean())
        assert agreement >= 0.999, f"image {i}: {agreement:.4%} of labels equal to the Python engine's"
