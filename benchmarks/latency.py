"""Latency, throughput, peak memory and parity of every engine, measured in one run.

Details: docs/measurements.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks.op_profile import markdown as profile_markdown  # noqa: E402
from benchmarks.op_profile import profile_engine  # noqa: E402
from benchmarks.roofline import CpuPeak, build_rewrites, cpu_peak, gflops_per_image  # noqa: E402
from benchmarks.worker import COMPILED, load  # noqa: E402
from engines import load_engine  # noqa: E402
from engines.base import default_threads  # noqa: E402
from engines.tensorrt import unavailable_reason  # noqa: E402
from export.rewrite import REWRITES  # noqa: E402
from export.verify import parity_inputs  # noqa: E402
from icmoe.checkpoint import read_meta  # noqa: E402
from icmoe.core import cli  # noqa: E402
from icmoe.core.extras import require  # noqa: E402
from icmoe.core.io import atomic_path, atomic_write_bytes, atomic_write_json  # noqa: E402
from icmoe.core.manifest import ONNX_GRAPHS, ManifestError, family_of, read_manifest  # noqa: E402
from icmoe.families import Family, add_model_args, get_family  # noqa: E402

log = logging.getLogger("benchmarks.latency")
GRAPH_ENGINES = ("onnxruntime-fp32", "onnxruntime-fp16", "onnxruntime-int8", "openvino-fp32", "openvino-int8",
                 "tensorrt")


def engine_names(family: Family) -> List[str]:
    """Every engine the benchmark knows for a family: its eager structures, the reference last of them,
    the reference through torch.compile, then the graph engines."""
    eager = [family.eager_label(v) for v in family.variants] + [reference_name(family)]
    return eager + [reference_name(family) + COMPILED] + list(GRAPH_ENGINES)


def precision_of(name: str) -> str:
    """The precision an engine computes in, from its benchmark name (eager and compiled: FP32)."""
    return next((p for p in ("int8", "fp16") if name.endswith("-" + p)), "fp32")


def reference_name(family: Family) -> str:
    return family.eager_label()


def tensorrt_available(build_dir: Path) -> Optional[str]:
    """None if a TensorRT engine can run here, else the reason it cannot."""
    why = unavailable_reason()
    if why:
        return why
    if not any(a.get("kind") == "tensorrt" for a in read_manifest(build_dir)["artifacts"].values()):
        return "the build has no TensorRT plan (build on a GPU host with --backend tensorrt)"
    return None


def _fresh(out: Path, family: str, cfg, sha: Optional[str], bmax: int, precision: str) -> bool:
    """Whether `out` holds a build this benchmark can reuse."""
    try:
        m = read_manifest(out)
    except ManifestError:
        return False
    return (m["model"]["family"] == family and m["model"]["config"] == cfg.to_dict()
            and ONNX_GRAPHS[precision] in m["artifacts"] and m.get("rewrites") == list(REWRITES)
            and m["batch"]["max"] >= bmax
            and (m["checkpoint"]["sha256"] == sha if sha else m["checkpoint"]["random_init"]))


def get_build(args, precision: str = "fp16") -> Path:
    """Reuse `--build`, or make (and cache) a build of `precision`: FP16 (it holds the FP32 graph too), or
    INT8 for the int8 rows (NNCF and ONNX Runtime quantization, calibrated on the family's synthetic set)."""
    if args.build:
        return args.build
    if args.checkpoint:
        meta = read_meta(args.checkpoint)
        family, cfg, sha = meta["family"], meta["config"], meta["weights_sha256"]
    else:
        family, cfg, sha = args.model, get_family(args.model).get_config(args.config), None
    out = args.out / f"build-{family}-{cfg.name}-{'ckpt-' + sha[:8] if sha else 'random'}"
    out = out.with_name(out.name + ("-int8" if precision == "int8" else ""))
    bmax = max(max(args.batch_sizes), 8)
    if _fresh(out, family, cfg, sha, bmax, precision):
        log.info(f"benchmark: reusing build {out}")
        return out
    log.info(f"benchmark: building {out} (export, {precision.upper()}; verified separately by the parity columns)")
    # In a child process: Linux keeps a process's peak RSS across fork and exec, so a build made in
    # this process (gigabytes for vit_b) would show up as every worker's peak memory.
    source = ["--checkpoint", str(args.checkpoint)] if args.checkpoint else ["--random-init", "--model", family,
                                                                            "--config", cfg.name]
    cmd = [sys.executable, "-m", "export.build", *source, "--precision", precision, "--out", str(out),
           "--dynamic-batch", f"1,1,{bmax}", "--backend", "onnxruntime", "--force", "--no-verify"]
    proc = subprocess.run(cmd + (["--no-progress"] if args.no_progress else []), stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise cli.UsageError(f"the build for the benchmark failed (exit {proc.returncode}); see the lines above")
    return out


def _measure(args, build_dir: Path, name: str, threads: int, tmp: Path,
             reference: bool = False) -> Tuple[Optional[Dict], Optional[str]]:
    """Run one engine's worker subprocess; returns (result, None) or (None, why it was skipped). The
    parity reference also saves eager's outputs for the choices the other engines could make."""
    if name == "tensorrt":
        why = tensorrt_available(build_dir)
        if why:
            return None, why
    res = tmp / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve().with_name("worker.py")), name, "--build", str(build_dir),
           "--result", str(res), "--batch-sizes", ",".join(map(str, args.batch_sizes)), "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--threads", str(threads)]
    if args.parity_images:
        cmd += ["--parity", str(tmp / "parity.npy")] + (["--choices"] if reference else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not res.is_file():
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return None, f"failed: {lines[-1] if lines else proc.returncode}"
    return json.loads(res.read_text()), None


def _ratios(report: Dict, outputs: Dict[str, Dict[str, np.ndarray]], family: Family) -> None:
    """Speedups over every eager engine and parity against the reference, all from this run."""
    eager = [n for n in report["engines"] if n.split("-")[0] == "eager"]
    reference = reference_name(family)
    for name, r in report["engines"].items():
        for b, row in r["batches"].items():
            for ref in eager:
                base = report["engines"][ref]["batches"].get(b)
                row[f"speedup_vs_{ref}"] = row["images_per_s"] / base["images_per_s"] if base else None
        if reference in outputs and name in outputs:
            precision = precision_of(name)
            prefix = f"choices/{precision}/"
            ref = {k.removeprefix(prefix): v for k, v in outputs[reference].items()
                   if not k.startswith("choices/") or k.startswith(prefix)}
            c = family.parity.compare(ref, outputs[name], family.parity.tolerances(precision))
            keys = ("max_abs_logit", "flipped", "passed", *(key for _, key, _ in family.parity.columns()))
            r["parity"] = {k: c.get(k) for k in keys}


def run(args) -> Dict:
    """Measure every engine (one subprocess each) and assemble the report."""
    from tqdm import tqdm

    build_dir = get_build(args)
    manifest = read_manifest(build_dir)
    family = get_family(family_of(manifest))
    names = args.engines or [n for n in engine_names(family) if args.compiled or not n.endswith(COMPILED)]
    int8_dir = get_build(args, "int8") if any(precision_of(n) == "int8" for n in names) else build_dir
    threads = args.threads or default_threads()
    peak = cpu_peak(threads, clock_ghz=args.clock_ghz, fma_units=args.fma_units)  # before the workers run
    report: Dict = {"build": str(build_dir), "family": family.name, "model": manifest["model"]["name"],
                    "image_size": manifest["image_size"], "checkpoint": manifest["checkpoint"], "threads": threads,
                    "batches": args.batch_sizes, "warmup": args.warmup, "iters": args.iters,
                    "parity_images": args.parity_images, "cpu": peak.model, "cores": os.cpu_count(),
                    "load_avg_before": os.getloadavg()[0], "engines": {}, "skipped": {},
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    outputs = {}
    with tempfile.TemporaryDirectory(prefix="icmoe-bench-") as tmp:
        if args.parity_images:
            np.save(Path(tmp) / "parity.npy", parity_inputs(family, args.parity_images, int(manifest["image_size"]), seed=0))
        for name in tqdm(names, desc="benchmark", unit="engine", disable=args.no_progress):
            result, why = _measure(args, int8_dir if precision_of(name) == "int8" else build_dir, name, threads,
                                   Path(tmp), reference=name == reference_name(family))
            if why:
                report["skipped"][name] = why
                continue
            report["engines"][name] = result
            npz = Path(tmp) / f"{name}.npz"
            if npz.is_file():
                outputs[name] = dict(np.load(npz))
    _ratios(report, outputs, family)
    report["load_avg_after"] = os.getloadavg()[0]
    report["cpu_peak"] = peak.to_dict()
    _roofline(report, build_dir, family, peak)
    if args.profile and report["engines"]:
        _profile_best(report, lambda name: int8_dir if precision_of(name) == "int8" else build_dir, threads)
    return report


def _engine_gflops(build_dir: Path, family: Family, names: List[str]) -> Dict[str, float]:
    """GFLOPs of one image of the function each engine runs (see benchmarks/roofline.py): eager
    structures as written (compiled eager as its structure), the graph engines with the build's rewrites.
    Run after the workers: the models loaded here would otherwise count in their peak RSS."""
    rewrites, size = build_rewrites(build_dir), int(read_manifest(build_dir)["image_size"])
    base = {n: n[: -len(COMPILED)] if n.endswith(COMPILED) else n for n in names}
    out: Dict[str, float] = {}
    for v in [*family.variants, None]:  # None: the reference structure, which the graphs were exported from
        label = family.eager_label(v)
        if v is not None and label not in base.values():
            continue
        with load_engine(build_dir, "eager", variant=v) as engine:
            model = engine.model
            out[label] = gflops_per_image(model, size, patches=family.graph.export_patches(model))
            if v is None:
                graph = gflops_per_image(model, size, rewrites=rewrites, patches=family.graph.export_patches(model))
    return {n: out.get(base[n], graph) for n in names}


def _roofline(report: Dict, build_dir: Path, family: Family, peak: CpuPeak) -> None:
    """Per engine GFLOPs per image; per row the achieved GFLOP/s (GOP/s for INT8) and its share of the peak."""
    flops = _engine_gflops(build_dir, family, list(report["engines"]))
    for name, r in report["engines"].items():
        r["gflops_per_image"] = flops[name]
        for row in r["batches"].values():
            row["achieved_gflops"] = flops[name] * row["images_per_s"]
            row["peak_fraction"] = row["achieved_gflops"] / peak.peak(precision_of(name))


def _profile_best(report: Dict, build_of, threads: int) -> None:
    """Operator-type profile of the fastest engine at the smallest batch (benchmarks/op_profile.py);
    `build_of(name)` is the build directory an engine runs from."""
    b = str(min(report["batches"]))
    name = max(report["engines"], key=lambda n: report["engines"][n]["batches"][b]["images_per_s"])
    engine = load(Path(build_of(name)), name, threads)
    images = (np.random.default_rng(0).random(engine.inputs[0].concrete(1)) * 255).astype(np.float32)
    try:
        with engine:
            rows = profile_engine(engine, images)
    except (ValueError, ImportError) as e:
        report["profile"] = {"engine": name, "skipped": str(e)}
        return
    report["profile"] = {"engine": name, "batch": 1, "ops": [{"op": op, "ms": ms, "share": sh} for op, ms, sh in rows]}


def markdown(report: Dict) -> str:
    """The report as a Markdown table (one row per engine and batch size)."""
    family = get_family(report["family"])
    peak = CpuPeak(**{k: v for k, v in report["cpu_peak"].items() if k in CpuPeak.__dataclass_fields__})
    head = (f"{family.title} `{report['model']}` at {report['image_size']}x{report['image_size']}, "
            f"{'random init' if report['checkpoint'].get('random_init') else 'checkpoint'}, "
            f"{report['threads']} threads, {report['iters']} timed runs after "
            f"{report['warmup']} warm-up, load average {report['load_avg_before']:.1f} -> {report['load_avg_after']:.1f}\n"
            f"CPU: {peak.describe()}\n\n")
    eager = [n for n in report["engines"] if n.split("-")[0] == "eager"]
    columns = [("max abs dlogit", "max_abs_logit", ".2e"), ("flipped px", "flipped", ".3%"), *family.parity.columns()]
    rows = ["| engine | batch | p50 ms | p95 ms | img/s | peak MiB | " + " | ".join(f"x {e}" for e in eager)
            + " | GFLOP/img | GFLOP/s | of peak | " + " | ".join(head for head, _, _ in columns) + " |",
            "|---" * (9 + len(eager) + len(columns)) + "|"]

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    for name, r in report["engines"].items():
        p = r.get("parity", {})
        parity = " | ".join(f(p.get(key), spec) for _, key, spec in columns)
        for b, row in r["batches"].items():
            ratios = " | ".join(f(row.get(f"speedup_vs_{e}"), ".2f") for e in eager)
            roof = (f"{f(r.get('gflops_per_image'), '.3g')} | {f(row.get('achieved_gflops'), '.1f')} | "
                    f"{f(row.get('peak_fraction'), '.1%')}")
            rows.append(
                f"| {name} | {b} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {row['images_per_s']:.2f} | "
                f"{r['peak_mib']:.0f} | {ratios} | {roof} | {parity} |")
    for name, why in report["skipped"].items():
        rows.append(f"| {name} | - | skipped: {why} |" + " |" * (6 + len(eager) + len(columns)))
    table = head + "\n".join(rows) + "\n"
    prof = report.get("profile") or {}
    if prof.get("ops"):
        table += "\n" + profile_markdown(prof["engine"], [(o["op"], o["ms"], o["share"]) for o in prof["ops"]])
    return table


PLOT_NEEDS = ("matplotlib", "bench", "the benchmark's plot (or pass --no-plot)")  # module, extra, purpose


def plot(report: Dict, path: Path) -> None:
    matplotlib = require(*PLOT_NEEDS)
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", *PLOT_NEEDS[1:])

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in report["engines"].items():
        bs = [int(b) for b in r["batches"]]
        ax.plot(bs, [r["batches"][str(b)]["images_per_s"] for b in bs], marker="o", label=name)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.set_title(f"{get_family(report['family']).title} {report['model']} {report['image_size']}px, "
                 f"{report['threads']} CPU threads")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _sizes(text: str) -> List[int]:
    try:
        out = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"--batch-sizes must be >= 1, got {text!r}")
    return out


def _parser():
    p = cli.parser("python benchmarks/latency.py", __doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: random init)")
    add_model_args(p, config_help="size variant without a checkpoint")
    p.add_argument("--build", type=Path, default=None, help="use this build directory instead of building")
    p.add_argument("--batch-sizes", type=_sizes, default=[1, 4, 8], help="batch sizes to time (default 1,4,8)")
    p.add_argument("--iters", type=int, default=10, help="timed runs per batch size (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per batch size (default 2)")
    p.add_argument("--engines", default=None, help="comma-separated subset (default: every engine of the family)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per engine (default: usable cores)")
    p.add_argument("--parity-images", type=int, default=8, help="images for the parity columns (0: none)")
    p.add_argument("--clock-ghz", type=float, default=None,
                   help="CPU clock for the peak rate (default: measured with a C loop, else /proc/cpuinfo's)")
    p.add_argument("--no-compiled", dest="compiled", action="store_false",
                   help="leave out the torch.compile row (it compiles for minutes per batch size)")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the operator-type profile of the fastest engine")
    p.add_argument("--fma-units", type=int, default=2, help="FMA units per core for the peak rate (default 2)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    cli.add_json(p)
    cli.add_progress(p)
    p.add_argument("--no-plot", action="store_true")
    return p


def _main(argv=None) -> int:
    args = _parser().parse_args(argv)
    cli.setup_logging(args.verbosity)
    if args.engines is not None:
        args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        known = engine_names(get_family(args.model))
        bad = [e for e in args.engines if e not in known]
        if bad:
            raise cli.UsageError(f"unknown engine(s) {', '.join(bad)}; choose from {', '.join(known)}")
    if not args.no_plot:
        require(*PLOT_NEEDS)  # say so now, not after minutes of measuring
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(args)
    stem = f"latency-{report['family']}-{report['model']}-{report['image_size']}"
    atomic_write_json(args.out / f"{stem}.json", report)
    table = markdown(report)
    atomic_write_bytes(args.out / f"{stem}.md", table.encode())
    if not args.no_plot and report["engines"]:
        plot(report, args.out / f"{stem}.png")
    cli.write_json(report, args.json)
    print(table)
    print(f"results: {args.out / stem}.{{json,md{'' if args.no_plot else ',png'}}}")
    if not report["engines"]:
        raise cli.CheckFailed("no engine could be measured")
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
