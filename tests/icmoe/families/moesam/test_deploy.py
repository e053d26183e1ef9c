"""MoE-SAM end to end: trained on synthetic NIfTI volumes, exported, run on every CPU engine and deployed
(the real Triton server over HTTP and gRPC, and the C++ program icmoe_aoti).

`tiny` trains for 40 short epochs (about 10 s) on a few synthetic3d volumes (NIfTI, ACDC layout, 64x64
slices), long enough to find every class on part of the test images; `export.build` exports the last checkpoint
(FP32 + FP16, batch 1..4) and verifies both ONNX Runtime graphs with the family's gates. MoE-SAM's mask
is a label map (argmax over C+1 = 4 logits channels, 0 = background) and the build records the label
names. Every engine must agree with eager PyTorch: FP32 logits within 1e-4 and equal masks (a pixel may
differ only where the eager top-2 logits are within that tolerance, a float tie; the tests print how many
did), FP16 within the family's FP16 gates. A load of single-image gRPC requests from 8 threads must be
answered without an error. icmoe_aoti, given the build's AOTInductor package, writes the label values
themselves, equal to eager's mask (marked slow: Inductor compiles for minutes here; run with --runslow or
ICMOE_SLOW=1).

The server fixtures and load helpers are tests/engines/test_triton_server.py's, the C++ ones
tests/engines/test_cpp_aoti.py's and tests/engines/conftest.py's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engines import load_engine
from engines.cpp import read_pgm, run_program, write_ppm
from export.aoti import package_aoti
from export.build import build
from icmoe.core.manifest import read_manifest
from icmoe.core.parity import dice_per_class
from icmoe.data.synthetic_volumes import CLASSES, make_synthetic_volumes
from icmoe.families import get_family
from icmoe.training import train
from tests.engines.label_checks import check_label_mask
from tests.engines.test_cpp_aoti import parse_stdout
from tests.engines.test_triton_server import (
    _inputs,
    report_load,
    run_load,
    serving,
    tritonclient_grpc,
    tritonclient_http,
)

MODEL = "moesam_python"
N_IMAGES = 8
LOAD_REQUESTS = 64  # a multiple of the concurrency; MoE-SAM tiny takes about 0.1 s per image here
CONCURRENCY = 8
LOGIT_ATOL = 1e-4
SIZE = 64  # training and export size; small so that training takes seconds
NAMES = ["background", *CLASSES]  # the training set's label names, which the checkpoint and build carry
LABELS = len(NAMES)  # C + 1


@pytest.fixture(scope="module")
def family():
    return get_family("moesam")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The last checkpoint of tiny MoE-SAM trained for 40 epochs of 6 steps (batch 4) on synthetic NIfTI volumes."""
    root = tmp_path_factory.mktemp("moesam_train")
    data = make_synthetic_volumes(root / "synthetic3d", n_train=4, n_test=1, size=SIZE, depth=8, seed=0)
    assert any(p.name.endswith(".nii.gz") for p in (data / "database" / "training" / "patient001").iterdir())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny at 64x64: a second thread mostly waits for a core
    try:
        summary = train(model="moesam", dataset="synthetic3d", data_root=data, out=root / "run", config="tiny",
                        image_size=SIZE, epochs=40, batch_size=4, progress=False, device="cpu")
    finally:
        torch.set_num_threads(threads)
    return Path(summary["out"]) / "last"


@pytest.fixture(scope="module")
def moesam_build(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("moesam") / "moesam-tiny-fp16"
    return build(trained, precision="fp16", out=out, batch=(1, 2, 4), backend="onnxruntime", verify=True,
                 verify_images=8, progress=False)


@pytest.fixture(scope="module")
def images(family, moesam_build):
    x = family.parity.synthetic_inputs(N_IMAGES, read_manifest(moesam_build)["image_size"], seed=7)
    return np.ascontiguousarray(np.clip(np.rint(x), 0, 255), dtype=np.float32)  # what a PPM holds, too


@pytest.fixture(scope="module")
def eager(moesam_build, images):
    with load_engine(moesam_build, "eager") as engine:
        return engine.infer(images)


@pytest.fixture(scope="module")
def server(moesam_build, tmp_path_factory):
    with serving(moesam_build, tmp_path_factory.mktemp("triton") / "model_repository", MODEL) as srv:
        yield srv


def test_build_names_the_labels(moesam_build, family, eager):
    m = read_manifest(moesam_build)
    names = NAMES
    assert m["model"]["classes"] == names and LABELS == 4
    assert [(o["name"], o["shape"][1]) for o in m["outputs"]] == [("logits", LABELS), ("mask", 1)]
    with load_engine(moesam_build, "onnxruntime") as engine:
        assert engine.class_names == names and engine.mask_kind == "labels"
    assert len(np.unique(eager["mask"])) >= 3, "the trained model should find most classes on the test images"


def _in_batches(engine, images, size=4):
    """`engine.infer` over batches of the build's largest size, outputs concatenated."""
    parts = [engine.infer(images[i:i + size]) for i in range(0, len(images), size)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_every_cpu_engine_agrees_with_eager(moesam_build, family, images, eager):
    """The build's ONNX Runtime graphs on the test images: FP32 as tight as float rounding allows, FP16
    within the family's FP16 gates (per-class Dice and label agreement), and `export.verify`'s own
    report (run by the build on its own images) passed for both."""
    gates = family.parity.tolerances("fp16")
    with load_engine(moesam_build, "onnxruntime", "fp32") as fp32, load_engine(moesam_build, "onnxruntime", "fp16") as fp16:
        out32, out16 = (_in_batches(engine, images) for engine in (fp32, fp16))
    diff = float(np.abs(out32["logits"] - eager["logits"]).max())
    assert diff <= LOGIT_ATOL, f"FP32 max |logit diff| {diff:.3g}"
    check_label_mask(out32["mask"], eager["mask"], eager["logits"], LOGIT_ATOL)
    agreement = float((out16["mask"] == eager["mask"]).mean())
    dice = dice_per_class(eager["mask"], out16["mask"], LABELS)
    present = [d for d in dice.values() if d is not None]
    print(f"\nmoesam fp16: label agreement {agreement:.4%}, class Dice {dice}")
    assert agreement >= 0.99 and present and min(present) >= gates.min_class_dice
    report = read_manifest(moesam_build)["verify"]
    assert report["passed"] and {"onnxruntime-fp32", "onnxruntime-fp16"} <= set(report["engines"])


def test_server_config_names_the_labels(server, family):
    client = tritonclient_http.InferenceServerClient(server.http_url)
    config = client.get_model_config(MODEL)
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert params["mask_kind"] == "labels"
    assert params["class_names"].split(",") == NAMES
    outputs = {o["name"]: (o["data_type"], [int(d) for d in o["dims"]]) for o in config["output"]}
    assert outputs == {"logits": ("TYPE_FP32", [LABELS, SIZE, SIZE]), "mask": ("TYPE_UINT8", [1, SIZE, SIZE])}
    client.close()


def _check(res, eager, idx):
    """Server answer for images `idx` against eager: logits within LOGIT_ATOL, masks equal but for float ties."""
    logits, mask = res.as_numpy("logits"), res.as_numpy("mask")
    assert logits.dtype == np.float32 and logits.shape == (len(idx), LABELS, SIZE, SIZE)
    diff = float(np.abs(logits - eager["logits"][idx]).max())
    assert diff <= LOGIT_ATOL, f"max |logit diff| {diff:.3g} > {LOGIT_ATOL}"
    return diff, check_label_mask(mask, eager["mask"][idx], eager["logits"][idx], LOGIT_ATOL)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_parity_with_eager(server, images, eager, protocol):
    module = tritonclient_http if protocol == "http" else tritonclient_grpc
    client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    worst, ties = 0.0, 0
    for idx in ([0], [1, 2], [3, 4, 5, 6], [7]):  # batch 1, 2 and the build's largest (4)
        diff, differ = _check(client.infer(MODEL, _inputs(module, images[idx])), eager, idx)
        worst, ties = max(worst, diff), ties + differ
    print(f"\nmoesam {protocol}: max |logit diff| vs eager {worst:.3g} over {N_IMAGES} images; "
          f"{ties} mask pixels differ (float ties)")
    client.close()


def test_load(server, images, eager):
    load = run_load(server, MODEL, images, lambda res, idx: _check(res, eager, idx),
                    requests=LOAD_REQUESTS, concurrency=CONCURRENCY)
    print(f"\nmoesam load: {report_load(load, CONCURRENCY)}")
    assert not load["errors"], load["errors"][:3]
    assert load["answered"] == load["inferences"] == LOAD_REQUESTS


@pytest.mark.slow  # Inductor compiles MoE-SAM for minutes here; tests/engines/test_cpp_labels.py runs a toy label model
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                    reason="needs cmake and a C++ compiler on PATH")
def test_icmoe_aoti_writes_the_label_map(moesam_build, family, images, eager, aoti_program_future, tmp_path):
    package = package_aoti(moesam_build, tmp_path / "moesam.pt2", fast_compile=True)  # the build's checkpoint
    program = aoti_program_future.result()
    names = NAMES
    for i in range(2):
        image = write_ppm(tmp_path / f"img{i}.ppm", images[i])
        proc = run_program(program, package, image, tmp_path / f"m{i}.pgm", "--logits", tmp_path / f"l{i}.f32")
        assert proc.returncode == 0, proc.stderr
        lines = parse_stdout(proc.stdout)
        logits = np.fromfile(tmp_path / f"l{i}.f32", np.float32).reshape(1, LABELS, SIZE, SIZE)
        assert float(np.abs(logits - eager["logits"][i:i + 1]).max()) <= LOGIT_ATOL
        mask = read_pgm(tmp_path / f"m{i}.pgm")[None, None]  # raw label values
        check_label_mask(mask, eager["mask"][i:i + 1], eager["logits"][i:i + 1], LOGIT_ATOL)
        assert [lines[f"label{v}"] for v in range(LABELS)] == [f"{int((mask == v).sum())} {n}" for v, n in enumerate(names)]
