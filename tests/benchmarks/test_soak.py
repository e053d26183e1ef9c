"""benchmarks/soak.py for 60 seconds on the real Triton server (the shared tiny build's python model):
concurrency 16, 5% malformed requests of four kinds; every good answer equals the local engine's, every
malformed request is refused, the server's RSS grows less than 5% after the warm-up (the script's default,
0.4 x the duration: 24 seconds), and it exits cleanly. The 10-minute run and its figures are in docs/reliability.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (the test extra)")
pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (the test extra)")

SCRIPT = REPO_ROOT / "benchmarks" / "soak.py"


def test_soak_60_seconds(tiny_build, tmp_path):
    from engines.triton.server import ServerError, fetch_server

    try:
        fetch_server()
    except ServerError as e:
        pytest.skip(f"needs the Triton server of the nvidia-pytriton wheel: {e}")
    report = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tiny_build), "--duration", "60", "--json", str(report)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=900)
    print(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(report.read_text())
    assert r["concurrency"] == 16 and r["bad_fraction"] == 0.05 and r["warmup_s"] == 24
    assert r["good_requests"] > 0 and r["good_correct"] == r["good_requests"] and r["n_problems"] == 0
    assert all(n > 0 for n in r["bad_requests"].values()) and r["bad_refused"] == r["bad_requests"]
    assert r["rss_growth"] < 0.05 and r["alive"] and r["exit_code"] == 0
