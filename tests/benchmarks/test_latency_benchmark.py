"""benchmarks/latency.py on the tiny build: one quick run, its JSON/Markdown/PNG and figures are sane.

Speed targets are not asserted here (timings are noisy on a shared CI machine); the
benchmark prints the ratios and the README records a measured table.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
SCRIPT = ROOT / "benchmarks" / "latency.py"


@pytest.fixture(scope="module")
def bench(tiny_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, str(SCRIPT), "--build", str(tiny_build), "--batch-sizes", "1,2", "--iters", "2", "--warmup", "1",
           "--parity-images", "4", "--out", str(out), "--json", str(out / "copy.json"),
           # torch.compile (the eager-shared-compiled row) takes minutes per batch size: not in a unit test
           "--engines", "eager-naive,eager-shared,onnxruntime-fp32,onnxruntime-fp16,openvino-int8,tensorrt"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


def test_outputs_written(bench):
    out, proc = bench
    stem = "latency-icmoe-tiny-128"
    for ext in ("json", "md", "png"):
        assert (out / f"{stem}.{ext}").stat().st_size > 0
    assert json.loads((out / "copy.json").read_text()) == json.loads((out / f"{stem}.json").read_text())
    assert "| engine | batch | p50 ms" in proc.stdout  # the table is printed


def test_report_figures(bench):
    out, _ = bench
    r = json.loads((out / "latency-icmoe-tiny-128.json").read_text())
    assert set(r["engines"]) == {"eager-naive", "eager-shared", "onnxruntime-fp32", "onnxruntime-fp16"}
    assert "tensorrt" in r["skipped"] or "tensorrt" in r["engines"]
    # a row that cannot run says why in words, never a bare error line
    assert all(why.startswith("not run: ") and "error:" not in why for why in r["skipped"].values()), r["skipped"]
    assert r["skipped"]["openvino-int8"] == "not run: the build holds no INT8 graph (build it with --precision fp16,int8)"
    for name, e in r["engines"].items():
        assert set(e["batches"]) == {"1", "2"}
        assert e["peak_mib"] >= e["loaded_mib"] >= e["base_mib"] > 0
        for b, row in e["batches"].items():
            assert 0 < row["p50_ms"] <= row["p95_ms"] * 1.0001
            assert row["images_per_s"] > 0 and row["iters"] == 2
            assert row["speedup_vs_eager-shared"] > 0 and row["speedup_vs_eager-naive"] > 0
    assert r["engines"]["eager-shared"]["batches"]["1"]["speedup_vs_eager-shared"] == pytest.approx(1.0)
    # parity columns against eager FP32
    assert r["engines"]["onnxruntime-fp32"]["parity"]["max_abs_logit"] <= 1e-3
    assert r["engines"]["onnxruntime-fp32"]["parity"]["agreement"] == 1.0
    assert r["engines"]["onnxruntime-fp32"]["parity"]["passed"] and r["engines"]["onnxruntime-fp16"]["parity"]["passed"]
    assert r["engines"]["eager-naive"]["parity"]["max_abs_logit"] <= 1e-3
    assert r["engines"]["onnxruntime-fp16"]["parity"]["min_dice"] >= 0.99
    assert r["threads"] >= 1
    # Each engine in a process of its own that imports what it needs: the graph runtimes without torch.
    assert r["engines"]["eager-shared"]["torch_imported"] and not r["engines"]["onnxruntime-fp32"]["torch_imported"]
    assert r["engines"]["onnxruntime-fp32"]["peak_mib"] < r["engines"]["eager-shared"]["peak_mib"]


def test_throughput_and_the_headline(bench):
    """Graph engines are also timed with their throughput settings; each engine's best throughput names the
    settings that gave it, and the summary's ratio is the best throughput over the best batch-1 images/s."""
    out, proc = bench
    r = json.loads((out / "latency-icmoe-tiny-128.json").read_text())
    ort = r["engines"]["onnxruntime-fp32"]
    assert set(ort["throughput"]) == {"1", "2"} and "throughput" not in r["engines"]["eager-shared"]
    for row in ort["throughput"].values():
        assert row["images_per_s"] > 0 and row["streams"] == min(4, r["threads"]) and row["settings"]["streams"] >= 1
    for name, e in r["engines"].items():
        rows = [row["images_per_s"] for row in e["batches"].values()] + \
            [row["images_per_s"] for row in (e.get("throughput") or {}).values()]
        assert e["best_throughput"]["images_per_s"] == max(rows) and e["best_throughput"]["batch"] in (1, 2)
    sm = r["summary"]
    one = {n: e["batches"]["1"]["images_per_s"] for n, e in r["engines"].items()}
    assert sm["batch1_engine"] == max(one, key=one.get)
    assert sm["throughput_vs_batch1"] == pytest.approx(sm["throughput"]["images_per_s"] / max(one.values()))
    assert "Best throughput: " in proc.stdout and "the best batch-1 images/s" in proc.stdout


def test_roofline_columns(bench):
    """GFLOPs per image of what each engine runs; achieved rate = GFLOPs x images/s; share of the stated peak."""
    out, proc = bench
    r = json.loads((out / "latency-icmoe-tiny-128.json").read_text())
    peak = r["cpu_peak"]
    assert peak["fp32_gflops"] == pytest.approx(peak["cores"] * peak["clock_ghz"] * peak["vector_bits"] / 32 * 2
                                                * peak["fma_units"])
    e = r["engines"]
    # The naive structure runs the frozen trunk three times; the graphs run the shared one (tiny has no
    # padded windows, so the export-time rewrite changes nothing here).
    assert e["eager-naive"]["gflops_per_image"] > e["eager-shared"]["gflops_per_image"] > 0
    assert e["onnxruntime-fp32"]["gflops_per_image"] == pytest.approx(e["eager-shared"]["gflops_per_image"])
    for row in e["onnxruntime-fp32"]["batches"].values():
        assert row["achieved_gflops"] == pytest.approx(e["onnxruntime-fp32"]["gflops_per_image"] * row["images_per_s"])
        assert 0 < row["peak_fraction"] < 1
    assert "CPU: " in proc.stdout and "GFLOP/s FP32" in proc.stdout


def test_operator_profile_of_the_fastest_engine(bench):
    out, proc = bench
    r = json.loads((out / "latency-icmoe-tiny-128.json").read_text())
    fastest = max(r["engines"], key=lambda n: r["engines"][n]["batches"]["1"]["images_per_s"])
    prof = r["profile"]
    assert prof["engine"] == fastest and prof["ops"], prof
    assert sum(o["share"] for o in prof["ops"]) <= 1.0 + 1e-9
    assert f"Where {fastest}'s time goes" in proc.stdout


def test_bad_engine_name(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--engines", "warp-drive", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown engine(s) warp-drive") and len(proc.stderr.strip().splitlines()) == 1
