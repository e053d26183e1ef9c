"""One engine measured in its own process, for `benchmarks/latency.py` (which starts this script).

    python benchmarks/worker.py ENGINE --build DIR --result FILE.json [--parity FILE.npy] ...

Only what the engine itself needs is imported, so the peak memory is that of a process that deploys
this engine: a graph runtime (ONNX Runtime, OpenVINO) runs without torch, eager with it. Peak memory is
the process's resident high-water mark (`VmHWM`, which starts afresh at exec; `ru_maxrss` would carry
the parent's peak over on Linux). Writes {latency per batch size, memory} as JSON, and the engine's
outputs on the parity images (made by the parent) as .npz next to it; with `--choices`, an eager engine
also saves eager's outputs for the discrete choices another engine could make (the family's
`choice_references`, per precision), under "choices/<precision>/<name>". With --throughput it then loads
the engine again with throughput settings (OpenVINO's THROUGHPUT hint, ONNX Runtime requests in parallel)
and times as many batches at once as it runs streams; the latency engine's peak memory is recorded before.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from engines import load_engine  # noqa: E402
from engines.base import run_batched, time_runs  # noqa: E402
from engines.select import engine_kwargs, split_label  # noqa: E402
from icmoe.core import cli  # noqa: E402
from icmoe.core.manifest import RUNTIME_PRECISIONS, family_of, gate_precision, read_manifest  # noqa: E402
from icmoe.families import FamilyError, get_family  # noqa: E402  (the registry; a family's module loads on lookup)

COMPILED = "-compiled"


def rss_peak_mib() -> float:
    """This process's peak resident memory in MiB (VmHWM; elsewhere than Linux, ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    scale = 1024.0 if sys.platform != "darwin" else 1024.0 * 1024.0  # KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


STREAMED = ("onnxruntime-", "openvino-")  # engines with throughput settings


def load(build_dir: Path, engine: str, threads: Optional[int], mode: str = "latency"):
    """Load one engine of the build by its benchmark name (the family is imported for eager only)."""
    if engine == "eager" or engine.startswith("eager-"):
        family = get_family(family_of(read_manifest(build_dir)))
        compiled = engine.endswith(COMPILED)
        base = engine[: -len(COMPILED)] if compiled else engine
        variant = next((v for v in family.variants if family.eager_label(v) == base), None)
        return load_engine(build_dir, "eager", variant=variant, threads=threads, compile=compiled)
    if engine.startswith(STREAMED):
        backend, precision = split_label(engine)
        return load_engine(build_dir, backend, precision, **engine_kwargs(backend, threads, mode))
    if engine == "tensorrt":
        return load_engine(build_dir, "tensorrt")
    raise ValueError(f"unknown engine {engine!r}")


def time_batches(engine, batch_sizes: List[int], warmup: int, iters: int) -> Dict[str, Dict]:
    """p50/p95/mean latency and images/s per batch size, on random images."""
    rng = np.random.default_rng(0)
    rows: Dict[str, Dict] = {}
    for b in batch_sizes:
        x = (rng.random(engine.inputs[0].concrete(b)) * 255).astype(np.float32)
        ms = time_runs(engine, x, warmup=warmup, runs=iters) * 1e3
        rows[str(b)] = {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                        "mean_ms": float(ms.mean()), "images_per_s": float(b / (ms.mean() / 1e3)), "iters": iters}
        print(f"  {engine.name} batch {b}: p50 {rows[str(b)]['p50_ms']:.1f} ms", file=sys.stderr, flush=True)
    return rows


def choice_references(engine, images: np.ndarray, batch: int) -> Dict[str, np.ndarray]:
    """An eager engine's outputs for the choices other engines could make, per precision the family gates."""
    gates = {}
    for precision in dict.fromkeys(gate_precision(p) for p in RUNTIME_PRECISIONS):
        with contextlib.suppress(FamilyError):  # a precision the family has no gates for
            gates[precision] = engine.family.parity.tolerances(precision)
    found = engine.family.parity.choice_references(engine.model, images, batch, list(gates.values()))
    return {f"choices/{p}/{k}": v for p, arrays in zip(gates, found) for k, v in arrays.items()}


def time_streams(engine, batch_sizes: List[int], warmup: int, iters: int) -> Dict[str, Dict]:
    """Images/s per batch size with `engine.streams` batches running at once (one thread each), `iters` batches
    per stream after `warmup`."""
    rng = np.random.default_rng(0)
    n = engine.streams
    rows: Dict[str, Dict] = {}
    with ThreadPoolExecutor(n) as pool:
        for b in batch_sizes:
            x = (rng.random(engine.inputs[0].concrete(b)) * 255).astype(np.float32)
            list(pool.map(lambda _: engine.infer(x), range(warmup * n)))
            t = time.perf_counter()
            list(pool.map(lambda _: engine.infer(x), range(iters * n)))
            wall = time.perf_counter() - t
            rows[str(b)] = {"images_per_s": float(iters * n * b / wall), "streams": n, "batches": iters * n,
                            "settings": engine.settings()}
            print(f"  {engine.name} batch {b}, {n} streams: {rows[str(b)]['images_per_s']:.2f} images/s",
                  file=sys.stderr, flush=True)
    return rows


def measure(args) -> Dict:
    """Load, time, run the parity images; the result dict (latency.py's report of one engine)."""
    base = rss_peak_mib()
    engine = load(args.build, args.engine, args.threads).activate()
    result: Dict = {"engine": args.engine, "base_mib": base, "loaded_mib": rss_peak_mib()}
    result["batches"] = time_batches(engine, args.batch_sizes, args.warmup, args.iters)
    if args.parity is not None:
        images, batch = np.load(args.parity), max(1, min(max(args.batch_sizes), 8))
        out = run_batched(engine, images, batch)
        if args.choices:
            out.update(choice_references(engine, images, batch))
        np.savez(args.result.with_suffix(".npz"), **out)
    result["settings"] = engine.settings()
    engine.deactivate()
    result["peak_mib"] = rss_peak_mib()
    result["threads"] = getattr(engine, "threads", None)
    if args.throughput and args.engine.startswith(STREAMED):
        engine = load(args.build, args.engine, args.threads, "throughput").activate()
        result["throughput"] = time_streams(engine, args.batch_sizes, args.warmup, args.iters)
        engine.deactivate()
        result["peak_mib_throughput"] = rss_peak_mib()
    result["torch_imported"] = "torch" in sys.modules
    return result


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/worker.py", description=__doc__.splitlines()[0])
    p.add_argument("engine")
    p.add_argument("--build", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--batch-sizes", type=lambda t: [int(b) for b in t.split(",")], required=True)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--parity", type=Path, default=None, help="parity images (.npy) to run and save outputs of")
    p.add_argument("--choices", action="store_true",
                   help="eager: also save the outputs for other discrete choices (the parity reference)")
    p.add_argument("--throughput", action="store_true", help="also time the engine with throughput settings")
    args = p.parse_args(argv)
    args.result.write_text(json.dumps(measure(args)))
    return 0


def main(argv=None) -> int:
    """`error: <one line>` and exit 2 for a bad build or engine (the parent reports the line)."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
