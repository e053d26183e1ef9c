"""The learning demonstration as a slow test: tiny IC-MoE on the synthetic set reaches DSC >= 0.85.

Minutes of CPU: runs only with --runslow or ICMOE_SLOW=1. The time limit is checked by
benchmarks/train_synthetic.py (timings belong in benchmarks), not here.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT


@pytest.mark.slow
def test_default_synthetic_recipe_learns(tmp_path):
    spec = importlib.util.spec_from_file_location("train_synthetic", ROOT / "benchmarks" / "train_synthetic.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.run(out=tmp_path / "run", data_root=tmp_path / "data", test_root=tmp_path / "test",
                    time_limit=float("inf"), progress=False)
    assert res["recipe"] == "demo" and res["test"]["n_images"] == 64
    assert res["test_dsc_pooled"] >= 0.85, res["test"]
    assert res["val_dsc_pooled"] >= 0.85, res["val"]
