"""Latency, throughput, peak memory and parity of every engine, measured in one run.

Each engine is timed at batch 1 (latency) and at every batch size, and the graph engines also with their
throughput settings (OpenVINO's THROUGHPUT hint, ONNX Runtime requests in parallel); the report names the
best batch-1 engine, the best throughput with the settings that gave it, and their ratio.

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
from benchmarks.report import write_results  # noqa: E402
from benchmarks.roofline import CpuPeak, build_rewrites, cpu_peak, gflops_per_image  # noqa: E402
from benchmarks.worker import COMPILED, load  # noqa: E402
from engines import load_engine  # noqa: E402
from engines.base import default_threads  # noqa: E402
from engines.openvino import bf16_unavailable  # noqa: E402
from engines.openvino import unavailable_reason as openvino_unavailable  # noqa: E402
from engines.tensorrt import unavailable_reason  # noqa: E402
from export.rewrite import REWRITES  # noqa: E402
from export.verify import parity_inputs  # noqa: E402
from icmoe.checkpoint import read_meta  # noqa: E402
from icmoe.core import cli  # noqa: E402
from icmoe.core.errors import FamilyError  # noqa: E402
from icmoe.core.extras import require  # noqa: E402
from icmoe.core.io import atomic_path  # noqa: E402
from icmoe.core.manifest import (  # noqa: E402
    ONNX_GRAPHS,
    ManifestError,
    family_of,
    gate_precision,
    graph_precision,
    read_manifest,
)
from icmoe.families import Family, add_model_args, get_family  # noqa: E402

log = logging.getLogger("benchmarks.latency")
GRAPH_ENGINES = ("onnxruntime-fp32", "onnxruntime-fp16", "onnxruntime-int8", "openvino-fp32", "openvino-bf16",
                 "openvino-int8", "openvino-int8-bf16", "tensorrt")
# Why a graph engine may have nothing to run: the graph it needs (file name) and the flag that makes it.
NEEDS_GRAPH = {"fp16": ("model.fp16.onnx", "fp16"), "int8": ("model.int8.onnx", "int8")}


def engine_names(family: Family) -> List[str]:
    """Every engine the benchmark knows for a family: its eager structures, the reference last of them,
    the reference through torch.compile, then the graph engines."""
    eager = [family.eager_label(v) for v in family.variants] + [reference_name(family)]
    return eager + [reference_name(family) + COMPILED] + list(GRAPH_ENGINES)


def precision_of(name: str) -> str:
    """The precision an engine computes in, from its benchmark name (eager and compiled: FP32)."""
    return next((p for p in ("int8-bf16", "int8", "bf16", "fp16") if name.endswith("-" + p)), "fp32")


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


def _fresh(out: Path, family: str, cfg, sha: Optional[str], bmax: int, precision: str, attention: str) -> bool:
    """Whether `out` holds a build this benchmark can reuse."""
    try:
        m = read_manifest(out)
    except ManifestError:
        return False
    return (m["model"]["family"] == family and m["model"]["config"] == cfg.to_dict()
            and all(ONNX_GRAPHS[p] in m["artifacts"] for p in precision.split(","))
            and m.get("rewrites") == list(REWRITES)
            and m["batch"]["max"] >= bmax
            and ("int8" not in precision or (m.get("quantization") or {}).get("attention_mode", "auto") == attention)
            and (m["checkpoint"]["sha256"] == sha if sha else m["checkpoint"]["random_init"]))


def get_build(args, precision: str = "fp16") -> Path:
    """Reuse `--build`, or make (and cache) a build of `precision` beside FP32: "fp16", or "fp16,int8" for the
    int8 rows (NNCF and ONNX Runtime quantization, calibrated on `--calibration` or the family's synthetic set)."""
    if args.build:
        return args.build
    if args.checkpoint:
        meta = read_meta(args.checkpoint)
        family, cfg, sha = meta["family"], meta["config"], meta["weights_sha256"]
    else:
        family, cfg, sha = args.model, get_family(args.model).get_config(args.config), None
    out = args.out / f"build-{family}-{cfg.name}-{'ckpt-' + sha[:8] if sha else 'random'}"
    attention = getattr(args, "int8_attention", "auto")
    out = out.with_name(out.name + ("-int8" if "int8" in precision else "")
                        + (f"-attention-{attention}" if "int8" in precision and attention != "auto" else ""))
    bmax = max(max(args.batch_sizes), 8)
    if _fresh(out, family, cfg, sha, bmax, precision, attention):
        log.info(f"benchmark: reusing build {out}")
        return out
    log.info(f"benchmark: building {out} (export, {precision.upper()}; verified separately by the parity columns)")
    # In a child process: Linux keeps a process's peak RSS across fork and exec, so a build made in
    # this process (gigabytes for vit_b) would show up as every worker's peak memory.
    source = ["--checkpoint", str(args.checkpoint)] if args.checkpoint else ["--random-init", "--model", family,
                                                                            "--config", cfg.name]
    cmd = [sys.executable, "-m", "export.build", *source, "--precision", precision, "--out", str(out),
           "--dynamic-batch", f"1,1,{bmax}", "--backend", "onnxruntime", "--force", "--no-verify"]
    if "int8" in precision and args.calibration:
        cmd += ["--calibration", str(args.calibration)]
    if "int8" in precision:
        cmd += ["--int8-attention", attention]
    proc = subprocess.run(cmd + (["--no-progress"] if args.no_progress else []), stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise cli.UsageError(f"the build for the benchmark failed (exit {proc.returncode}); see the lines above")
    return out


def why_not_here(name: str, build_dir: Path) -> Optional[str]:
    """Why an engine cannot run on this host or from this build, in words; None if it can."""
    if name == "tensorrt":
        return tensorrt_available(build_dir)
    precision = precision_of(name)
    graph = NEEDS_GRAPH.get(graph_precision(precision)) if not name.startswith("eager") else None
    if graph and graph[0] not in read_manifest(build_dir)["artifacts"]:
        return f"the build holds no {graph[1].upper()} graph (build it with --precision fp16,{graph[1]})"
    if name.startswith("openvino-"):
        why = openvino_unavailable() or (bf16_unavailable() if precision.endswith("bf16") else None)
        if why:
            return why
    return None


def _measure(args, build_dir: Path, name: str, threads: int, tmp: Path,
             reference: bool = False) -> Tuple[Optional[Dict], Optional[str]]:
    """Run one engine's worker subprocess; returns (result, None) or (None, why it was not measured). The
    parity reference also saves eager's outputs for the choices the other engines could make."""
    why = why_not_here(name, build_dir)
    if why:
        return None, f"not run: {why}"
    res = tmp / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve().with_name("worker.py")), name, "--build", str(build_dir),
           "--result", str(res), "--batch-sizes", ",".join(map(str, args.batch_sizes)), "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--threads", str(threads)]
    if args.parity_images:
        cmd += ["--parity", str(tmp / "parity.npy")] + (["--choices"] if reference else [])
    if args.throughput:
        cmd += ["--throughput"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not res.is_file():
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1].removeprefix("error: ") if lines else f"exit status {proc.returncode}"
        return None, f"failed while running: {last}"
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
            try:
                precision = gate_precision(precision_of(name))
                tolerances = family.parity.tolerances(precision)
            except FamilyError:  # a family without gates for this precision: figures, no verdict
                precision, tolerances = "fp32", family.parity.tolerances("fp32")
            prefix = f"choices/{precision}/"
            ref = {k.removeprefix(prefix): v for k, v in outputs[reference].items()
                   if not k.startswith("choices/") or k.startswith(prefix)}
            c = family.parity.compare(ref, outputs[name], tolerances)
            keys = ("max_abs_logit", "flipped", "passed", *(key for _, key, _ in family.parity.columns()))
            r["parity"] = {k: c.get(k) for k in keys}
    report["summary"] = summary(report)


def summary(report: Dict) -> Dict:
    """The headline figures of one run: the fastest engine at batch 1, the best throughput with its settings,
    their ratio, and per engine its best throughput (batch sizes with latency settings, and with throughput
    settings where the engine has them)."""
    best: Dict[str, Dict] = {}
    for name, r in report["engines"].items():
        options = [{"images_per_s": row["images_per_s"], "batch": int(b), "streams": 1, "settings": r.get("settings")}
                   for b, row in r["batches"].items()]
        options += [{"images_per_s": row["images_per_s"], "batch": int(b), "streams": row["streams"],
                     "settings": row["settings"]} for b, row in (r.get("throughput") or {}).items()]
        best[name] = max(options, key=lambda o: o["images_per_s"])
        r["best_throughput"] = best[name]
    one = {n: r["batches"]["1"]["images_per_s"] for n, r in report["engines"].items() if "1" in r["batches"]}
    if not one:
        return {}
    fastest = max(one, key=one.get)
    top = max(best, key=lambda n: best[n]["images_per_s"])
    return {"batch1_engine": fastest, "batch1_images_per_s": one[fastest], "batch1_ms": 1e3 / one[fastest],
            "throughput_engine": top, "throughput": best[top],
            "throughput_vs_batch1": best[top]["images_per_s"] / one[fastest]}


def run(args) -> Dict:
    """Measure every engine (one subprocess each) and assemble the report."""
    from tqdm import tqdm

    family = get_family(family_of(read_manifest(args.build)) if args.build else
                        read_meta(args.checkpoint)["family"] if args.checkpoint else args.model)
    names = args.engines or [n for n in engine_names(family) if args.compiled or not n.endswith(COMPILED)]
    left_out = {} if args.engines or args.compiled else {
        n: "left out: --no-compiled (torch.compile compiles for minutes per batch size)"
        for n in engine_names(family) if n.endswith(COMPILED)}
    wants_int8 = any(precision_of(n).startswith("int8") for n in names)
    build_dir = get_build(args, "fp16,int8" if wants_int8 else "fp16")  # one build holds every graph
    manifest = read_manifest(build_dir)
    threads = args.threads or default_threads()
    peak = cpu_peak(threads, clock_ghz=args.clock_ghz, fma_units=args.fma_units)  # before the workers run
    report: Dict = {"build": str(build_dir), "family": family.name, "model": manifest["model"]["name"],
                    "image_size": manifest["image_size"], "checkpoint": manifest["checkpoint"], "threads": threads,
                    "batches": args.batch_sizes, "warmup": args.warmup, "iters": args.iters,
                    "parity_images": args.parity_images, "cpu": peak.model, "cores": os.cpu_count(),
                    "load_avg_before": os.getloadavg()[0], "engines": {}, "skipped": dict(left_out),
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    outputs = {}
    with tempfile.TemporaryDirectory(prefix="icmoe-bench-") as tmp:
        if args.parity_images:
            np.save(Path(tmp) / "parity.npy", parity_inputs(family, args.parity_images, int(manifest["image_size"]), seed=0))
        for name in tqdm(names, desc="benchmark", unit="engine", disable=args.no_progress):
            result, why = _measure(args, build_dir, name, threads, Path(tmp),
                                   reference=name == reference_name(family))
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
        _profile_best(report, lambda name: build_dir, threads)
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
        rows.append(f"| {name} | - | {why} |" + " |" * (6 + len(eager) + len(columns)))
    table = head + "\n".join(rows) + "\n" + throughput_markdown(report)
    prof = report.get("profile") or {}
    if prof.get("ops"):
        table += "\n" + profile_markdown(prof["engine"], [(o["op"], o["ms"], o["share"]) for o in prof["ops"]])
    return table


def _settings_text(best: Dict) -> str:
    s = best.get("settings") or {}
    hint = f"{s['hint']} hint, " if s.get("hint") else ""
    streams = s.get("num_streams") or best.get("streams")
    return f"batch {best['batch']}, {hint}{streams} stream{'s' if str(streams) != '1' else ''}"


def throughput_markdown(report: Dict) -> str:
    """The throughput table (per engine: batch-1 images/s, best images/s and its settings) and the headline."""
    summary_ = report.get("summary") or {}
    if not summary_:
        return ""
    rows = ["", "| engine | batch 1 img/s | best img/s | with | x its batch 1 |", "|---|---|---|---|---|"]
    for name, r in report["engines"].items():
        one = r["batches"].get("1", {}).get("images_per_s")
        best = r["best_throughput"]
        ratio = "-" if not one else f"{best['images_per_s'] / one:.2f}"
        rows.append(f"| {name} | {'-' if one is None else format(one, '.2f')} | {best['images_per_s']:.2f} | "
                    f"{_settings_text(best)} | {ratio} |")
    t = summary_["throughput"]
    rows.append(f"\nFastest at batch 1: {summary_['batch1_engine']} ({summary_['batch1_ms']:.1f} ms, "
                f"{summary_['batch1_images_per_s']:.2f} img/s). Best throughput: {summary_['throughput_engine']} "
                f"{t['images_per_s']:.2f} img/s ({_settings_text(t)}), {summary_['throughput_vs_batch1']:.2f}x the "
                f"best batch-1 images/s.")
    return "\n".join(rows) + "\n"


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
    p.add_argument("--no-throughput", dest="throughput", action="store_false",
                   help="skip the graph engines' throughput settings (several streams at once)")
    p.add_argument("--calibration", default=None, metavar="DIR_OR_DATASET",
                   help="INT8 calibration images of the benchmark's own build (default: the family's synthetic set)")
    p.add_argument("--int8-attention", choices=("auto", "quantize", "keep"), default="auto",
                   help="the benchmark's own INT8 build: attention products in INT8 or floating point (export.build's "
                        "flag; a random-init model is not gate-checked, so auto quantizes them)")
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
    plotted = not args.no_plot and bool(report["engines"])
    if plotted:
        plot(report, args.out / f"{stem}.png")
    write_results(args.out, stem, report, markdown(report), args.json, extra=["png"] if plotted else [])
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
