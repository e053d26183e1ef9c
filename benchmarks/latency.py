"""Latency, throughput, peak memory and parity of every engine, measured in one run.

    python benchmarks/latency.py                         # vit_b at 256, random init, batch 1,4,8
    python benchmarks/latency.py --checkpoint runs/x/best --json out.json
    python benchmarks/latency.py --config tiny --batch 1 --iters 3   # quick

Engines: eager-naive (three full experts, as the paper stores them), eager-shared
(the frozen ViT once), onnxruntime-fp32, onnxruntime-fp16, and tensorrt when TensorRT,
a GPU and a plan are present. The build is made (or reused) with `export.build`.

Fairness: every CPU engine uses the same intra-op thread count (the usable cores);
eager runs under `torch.inference_mode`; ONNX Runtime has all graph optimizations on.
Each engine runs in its own subprocess, so its peak memory is that process's RSS
high-water mark (`ru_maxrss`, which includes the Python/torch runtime: `base_mib` is
the RSS before the engine was loaded). Latency: `--warmup` untimed runs, then `--iters`
timed runs per batch size; p50/p95 over the runs; images/s = batch / mean latency.
Parity columns compare each engine with eager-shared FP32 on `--parity-images` images
(half synthetic lesions, half random).

Writes JSON, a Markdown table and a PNG plot to `benchmarks/results/` (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

ENGINES = ("eager-naive", "eager-shared", "onnxruntime-fp32", "onnxruntime-fp16", "tensorrt")
REFERENCE = "eager-shared"


def _rss_mib() -> float:
    """This process's peak RSS in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load(build_dir: Path, engine: str, threads: Optional[int]):
    """Load one engine of the build by its benchmark name."""
    from engines import load_engine

    if engine == "eager-naive":
        return load_engine(build_dir, "eager", naive=True, threads=threads)
    if engine == "eager-shared":
        return load_engine(build_dir, "eager", threads=threads)
    if engine.startswith("onnxruntime-"):
        return load_engine(build_dir, "onnxruntime", engine.split("-")[1], threads=threads)
    if engine == "tensorrt":
        return load_engine(build_dir, "tensorrt")
    raise ValueError(f"unknown engine {engine!r}")


def worker(args) -> int:
    """Child process: measure one engine, write {latency, memory} JSON and parity outputs (npz)."""
    from export.verify import parity_inputs, run_batched

    base = _rss_mib()
    engine = load(args.build, args.worker, args.threads).activate()
    s = engine.image_size
    loaded = _rss_mib()
    rng = np.random.default_rng(0)
    result: Dict = {"engine": args.worker, "base_mib": base, "loaded_mib": loaded, "batches": {}}
    for b in args.batch:
        x = (rng.random((b, 3, s, s)) * 255).astype(np.float32)
        for _ in range(args.warmup):
            engine.infer(x)
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            engine.infer(x)
            times.append(time.perf_counter() - t)
        ms = np.array(times) * 1e3
        result["batches"][str(b)] = {
            "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(ms.mean()),
            "images_per_s": float(b / (ms.mean() / 1e3)),
            "iters": args.iters,
        }
        print(f"  {args.worker} batch {b}: p50 {result['batches'][str(b)]['p50_ms']:.1f} ms", file=sys.stderr, flush=True)
    if args.parity_images:
        images = parity_inputs(args.parity_images, s, seed=0)
        out = run_batched(engine, images, max(1, min(max(args.batch), 8)))
        np.savez(args.result.with_suffix(".npz"), **out)
    engine.deactivate()
    result["peak_mib"] = _rss_mib()
    result["threads"] = getattr(engine, "threads", None)
    args.result.write_text(json.dumps(result))
    return 0


def tensorrt_available(build_dir: Path) -> Optional[str]:
    """None if a TensorRT engine can run here, else the reason it cannot."""
    from export.manifest import read_manifest
    from export.tensorrt import unavailable_reason

    why = unavailable_reason()
    if why:
        return why

    if not any(a.get("kind") == "tensorrt" for a in read_manifest(build_dir)["artifacts"].values()):
        return "the build has no TensorRT plan (build on a GPU host with --backend tensorrt)"
    return None


def get_build(args) -> Path:
    """Reuse `--build`, or make (and cache) an FP16 build (it holds the FP32 graph too)."""
    from export.build import build
    from export.manifest import ManifestError, read_manifest
    from export.rewrite import REWRITES

    import icmoe

    if args.build:
        return args.build
    if args.checkpoint:
        meta = icmoe.checkpoint.read_meta(args.checkpoint)
        cfg, sha = meta["config"], meta["weights_sha256"]
    else:
        cfg, sha = icmoe.get_config(args.config), None
    out = args.out / f"build-{cfg.name}-{'ckpt-' + sha[:8] if sha else 'random'}"
    bmax = max(max(args.batch), 8)
    try:
        m = read_manifest(out)
        fresh = (m["model"]["config"] == cfg.to_dict() and "model.fp16.onnx" in m["artifacts"]
                 and m.get("rewrites") == list(REWRITES)
                 and m["batch"]["max"] >= bmax and (m["checkpoint"]["sha256"] == sha if sha else m["checkpoint"]["random_init"]))
    except ManifestError:
        fresh = False
    if fresh:
        print(f"benchmark: reusing build {out}", file=sys.stderr)
        return out
    print(f"benchmark: building {out} (export, FP16; verified separately by the parity columns)", file=sys.stderr)
    return build(args.checkpoint, random_init=args.checkpoint is None, config=cfg.name, precision="fp16", out=out,
                 batch=(1, 1, bmax), backend="onnxruntime", force=True, verify=False,
                 log=lambda m: print(m, file=sys.stderr))


def run(args) -> Dict:
    """Measure every engine (one subprocess each) and assemble the report."""
    from tqdm import tqdm

    from engines.eager import default_threads
    from export.manifest import read_manifest
    from export.verify import compare

    build_dir = get_build(args)
    threads = args.threads or default_threads()
    manifest = read_manifest(build_dir)
    report: Dict = {"build": str(build_dir), "model": manifest["model"]["name"], "image_size": manifest["image_size"],
                    "checkpoint": manifest["checkpoint"], "threads": threads, "batches": args.batch,
                    "warmup": args.warmup, "iters": args.iters, "parity_images": args.parity_images,
                    "cpu": _cpu_name(), "cores": os.cpu_count(), "load_avg_before": os.getloadavg()[0],
                    "engines": {}, "skipped": {}, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    outputs = {}
    with tempfile.TemporaryDirectory(prefix="icmoe-bench-") as tmp:
        for name in tqdm(args.engines, desc="benchmark", unit="engine"):
            if name == "tensorrt":
                why = tensorrt_available(build_dir)
                if why:
                    report["skipped"][name] = why
                    continue
            res = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--build", str(build_dir),
                   "--result", str(res), "--batch", ",".join(map(str, args.batch)), "--iters", str(args.iters),
                   "--warmup", str(args.warmup), "--threads", str(threads), "--parity-images", str(args.parity_images)]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0 or not res.is_file():
                lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                report["skipped"][name] = f"failed: {lines[-1] if lines else proc.returncode}"
                continue
            report["engines"][name] = json.loads(res.read_text())
            if res.with_suffix(".npz").is_file():
                outputs[name] = dict(np.load(res.with_suffix(".npz")))
    # Speedups and parity, all from this run.
    for name, r in report["engines"].items():
        for b, row in r["batches"].items():
            for ref in ("eager-naive", "eager-shared"):
                base = report["engines"].get(ref, {}).get("batches", {}).get(b)
                row[f"speedup_vs_{ref}"] = row["images_per_s"] / base["images_per_s"] if base else None
        if REFERENCE in outputs and name in outputs:
            prec = "fp16" if "fp16" in name else "fp32"
            c = compare(outputs[REFERENCE], outputs[name], precision=prec)
            r["parity"] = {k: c[k] for k in ("max_abs_logit", "mean_abs_logit", "min_dice", "mean_dice",
                                               "expert_agreement", "passed")}
    report["load_avg_after"] = os.getloadavg()[0]
    return report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def markdown(report: Dict) -> str:
    """The report as a Markdown table (one row per engine and batch size)."""
    head = (f"IC-MoE `{report['model']}` at {report['image_size']}x{report['image_size']}, "
            f"{'random init' if report['checkpoint'].get('random_init') else 'checkpoint'}, "
            f"{report['threads']} threads, {report['cpu']}, {report['iters']} timed runs after "
            f"{report['warmup']} warm-up, load average {report['load_avg_before']:.1f} -> {report['load_avg_after']:.1f}\n\n")
    rows = ["| engine | batch | p50 ms | p95 ms | img/s | peak MiB | x naive | x shared | max abs dlogit | min Dice | expert agree |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    for name, r in report["engines"].items():
        p = r.get("parity", {})
        for b, row in r["batches"].items():
            rows.append(
                f"| {name} | {b} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {row['images_per_s']:.2f} | "
                f"{r['peak_mib']:.0f} | {f(row['speedup_vs_eager-naive'], '.2f')} | "
                f"{f(row['speedup_vs_eager-shared'], '.2f')} | {f(p.get('max_abs_logit'), '.2e')} | "
                f"{f(p.get('min_dice'), '.4f')} | {f(None if p.get('expert_agreement') is None else 100 * p['expert_agreement'], '.0f')}% |")
    for name, why in report["skipped"].items():
        rows.append(f"| {name} | - | skipped: {why} | | | | | | | | |")
    return head + "\n".join(rows) + "\n"


def plot(report: Dict, path: Path) -> None:
    import matplotlib

    from icmoe.io import atomic_path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in report["engines"].items():
        bs = [int(b) for b in r["batches"]]
        ax.plot(bs, [r["batches"][str(b)]["images_per_s"] for b in bs], marker="o", label=name)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.set_title(f"IC-MoE {report['model']} {report['image_size']}px, {report['threads']} CPU threads")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _batches(text: str) -> List[int]:
    try:
        out = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch must be comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"--batch sizes must be >= 1, got {text!r}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: random init)")
    p.add_argument("--config", default="vit_b", help="configuration without a checkpoint (default vit_b)")
    p.add_argument("--build", type=Path, default=None, help="use this build directory instead of building")
    p.add_argument("--batch", type=_batches, default=[1, 4, 8], help="batch sizes (default 1,4,8)")
    p.add_argument("--iters", type=int, default=10, help="timed runs per batch size (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per batch size (default 2)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per engine (default: usable cores)")
    p.add_argument("--parity-images", type=int, default=8, help="images for the parity columns (0: none)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON report here")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in args.engines if e not in ENGINES]
    if bad:
        print(f"error: unknown engine(s) {', '.join(bad)}; choose from {', '.join(ENGINES)}", file=sys.stderr)
        return 2
    from engines import EngineError
    from export.build import BuildError
    from export.manifest import ManifestError

    import icmoe

    args.out.mkdir(parents=True, exist_ok=True)
    try:
        report = run(args)
    except (BuildError, ManifestError, EngineError, icmoe.CheckpointError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    from icmoe.io import atomic_write_bytes, atomic_write_json

    stem = f"latency-{report['model']}-{report['image_size']}"
    atomic_write_json(args.out / f"{stem}.json", report)
    table = markdown(report)
    atomic_write_bytes(args.out / f"{stem}.md", table.encode())
    if not args.no_plot and report["engines"]:
        plot(report, args.out / f"{stem}.png")
    if args.json:
        atomic_write_json(args.json, report)
    print(table)
    print(f"results: {args.out / stem}.{{json,md{'' if args.no_plot else ',png'}}}")
    return 0 if report["engines"] else 1


if __name__ == "__main__":
    sys.exit(main())
