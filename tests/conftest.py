"""Shared test settings: slow tests run only on request; GPU/TensorRT tests skip with a reason."""

from __future__ import annotations

import logging
import os

import pytest

from icmoe.core import cli
from icmoe.families.icmoe import build_icmoe


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("ICMOE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or ICMOE_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# --- Shared build fixtures: session-scoped (built once for all tests), tiny config, seed 0.
# Do not modify these dirs: copy them first (shutil.copytree) to damage something.


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Checkpoint folder of a random-init tiny IC-MoE (seed 0), written with icmoe.save_checkpoint."""
    import torch

    import icmoe

    torch.manual_seed(0)
    model = build_icmoe("tiny")
    return icmoe.save_checkpoint(model, tmp_path_factory.mktemp("tiny_checkpoint") / "ckpt", dataset="none", epoch=0)


@pytest.fixture(scope="session")
def tiny_build(tiny_checkpoint, tmp_path_factory):
    """FP32 + FP16 build directory of `tiny_checkpoint` (ONNX Runtime backend, batch 1..4, 16 parity images)."""
    from export.build import build

    out = tmp_path_factory.mktemp("tiny_build") / "tiny-fp16"
    return build(tiny_checkpoint, precision="fp16", out=out, batch=(1, 2, 4), backend="onnxruntime",
                 verify=True, verify_images=16, progress=False)


@pytest.fixture(scope="session")
def moesam_build(tmp_path_factory):
    """FP32 + FP16 build of a random-init tiny MoE-SAM (seed 0, 3 classes; ONNX Runtime, batch 1..8,
    16 parity images). Its experts differ (independent random init), so routing matters."""
    from export.build import build

    out = tmp_path_factory.mktemp("moesam_build") / "moesam-tiny-fp16"
    return build(None, random_init=True, model="moesam", config="tiny", precision="fp16", out=out,
                 batch=(1, 2, 8), backend="onnxruntime", verify=True, verify_images=16, progress=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    for tiny models on a shared 2-core machine a second thread mostly waits for a core (every parallel
    region waits for it)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _restore_cli_logging():
    """`cli.setup_logging` (run by every in-process `main([...])`) binds a handler to the test's captured
    stderr and stops propagation; undo that so later tests (and caplog) see the usual loggers."""
    loggers = [logging.getLogger(name) for name in cli.LOGGERS]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, (handlers, level, propagate) in zip(loggers, saved):
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
