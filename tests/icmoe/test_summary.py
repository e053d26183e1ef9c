"""`python -m icmoe.summary`: parameter and FLOP counts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from icmoe.summary import main, summarize


def test_vit_b_counts_meet_the_paper_structure():
    s = summarize("vit_b")
    assert 32.2e6 <= s["params_trainable"] <= 34.2e6  # paper: 33.23M
    assert s["params_stored"] <= 125e6  # the paper's three copies: 279M
    assert 270e6 <= s["params_total"] <= 290e6
    assert s["gflops_shared"] / s["gflops_naive"] <= 0.8


def test_json_cli(capsys):
    assert main(["--config", "tiny", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert set(s) >= {"params_total", "params_stored", "params_trainable", "gflops_shared", "gflops_naive"}
    assert s["params_stored"] < s["params_total"] and s["gflops_shared"] < s["gflops_naive"]


def test_module_entry_point_and_bad_size():
    r = subprocess.run([sys.executable, "-m", "icmoe.summary", "--config", "tiny", "--image-size", "100"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: image_size 100 is not a multiple of patch_size 8"


@pytest.mark.parametrize("size", [64])
def test_text_output(capsys, size):
    assert main(["--config", "tiny", "--image-size", str(size)]) == 0
    assert f"tiny at {size}x{size}" in capsys.readouterr().out
