"""benchmarks/fullsize.py: its edge measure on shapes with known answers, and one run on the tiny build
(both ways on the same engine and images, every figure present and in range)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tests.helpers import REPO_ROOT


@pytest.fixture(scope="module")
def fullsize():
    spec = importlib.util.spec_from_file_location("fullsize_for_test", REPO_ROOT / "benchmarks" / "fullsize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_boundary_and_edge_figures(fullsize):
    square = np.zeros((20, 20), np.uint8)
    square[5:15, 5:15] = 1
    edge = fullsize.boundary(square)
    assert edge.sum() == 36 + 40  # the square's own ring (36) and the 4-neighbours just outside it (40)
    same = fullsize.edge_figures([square], [square])
    assert same == {"boundary_ratio": 1.0, "on_true_boundary": 1.0}
    shifted = np.roll(square, 3, axis=1)
    assert fullsize.edge_figures([shifted], [square])["on_true_boundary"] < 1.0


def test_run_on_the_tiny_build(fullsize, tiny_build):
    r = fullsize.run(tiny_build, 192, 3, backend="onnxruntime", precision="fp32")
    assert r["full_size"] == 192 and r["images"] == 3 and r["engine"] == "onnxruntime-fp32"
    for way in ("logits", "nearest"):
        assert set(r[way]["dice"]) == {"1"} and 0.0 <= r[way]["mean_dice"] <= 1.0
        assert r[way]["boundary_ratio"] >= 0.0 and 0.0 <= r[way]["on_true_boundary"] <= 1.0
    assert "| logits resized bilinearly, then the rule |" in fullsize.markdown(r)
