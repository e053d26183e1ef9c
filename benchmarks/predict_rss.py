"""Memory of `python -m engines.predict` over an archive of many files: its RSS sampled while it runs.

Writes `--files` images (PNG and JPEG of varied sizes, in sub-folders), runs the real command on them as a
child process, and samples its resident memory (/proc/PID/status VmRSS) and the files it has finished (the
lines of its journal) every `--interval` seconds. Reports the RSS after the warm-up (the first
`--warmup` share of the files), its largest value afterwards, the growth between them, and the peak
(VmHWM). Fails (exit 1) when the growth exceeds `--max-growth`. Details: docs/reliability.md.

    python benchmarks/predict_rss.py                       # 2,000 files, a random-init tiny FP32 build
    python benchmarks/predict_rss.py --source build/icmoe-tiny-fp16 --files 5000 --json rss.json
    python benchmarks/predict_rss.py --report    # predict writes its JSON report: it keeps each file's entry
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from engines.predict.journal import JOURNAL_NAME
from icmoe.core import cli

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the machine type."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine())


def write_archive(folder: Path, n: int, seed: int = 0, progress: bool = True) -> Path:
    """`n` images (every fifth a JPEG) of 96..320 pixels a side, 100 to a sub-folder: a bright disc on noise."""
    rng = np.random.default_rng(seed)
    for k in tqdm(range(n), desc="archive", unit="file", disable=not progress, leave=False):
        h, w = (int(v) for v in rng.integers(96, 321, 2))
        yy, xx = np.mgrid[:h, :w]
        disc = ((yy - h * rng.uniform(0.3, 0.7)) ** 2 + (xx - w * rng.uniform(0.3, 0.7)) ** 2) < (min(h, w) * 0.25) ** 2
        pixels = np.clip(50 + 140 * disc[..., None] + rng.normal(0, 15, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"batch_{k // 100:03d}" / f"image_{k:05d}.{'jpg' if k % 5 == 4 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    return folder


def default_build(folder: Path) -> Path:
    """A random-init tiny IC-MoE, FP32, ONNX Runtime (not verified: the figures here are memory, not parity)."""
    from export.build import build

    return build(None, random_init=True, model="icmoe", config="tiny", precision="fp32", out=folder / "tiny-fp32",
                 backend="onnxruntime", verify=False, progress=False)


def _status(pid: int) -> Dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB ({} once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in text.splitlines()) if k in ("VmRSS", "VmHWM")}


def _done(journal: Path) -> int:
    try:
        return max(0, journal.read_bytes().count(b"\n") - 1)  # the header line is not a file
    except OSError:
        return 0


def sample_run(cmd: List[str], journal: Path, interval: float) -> Dict[str, Any]:
    """Run `cmd`, sampling its memory and progress until it ends."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    samples, hwm, t0 = [], 0, time.perf_counter()
    while proc.poll() is None:
        status = _status(proc.pid)
        if status:
            samples.append({"t": round(time.perf_counter() - t0, 2), "files": _done(journal),
                            "rss_mib": round(status["VmRSS"] / 1024, 1)})
            hwm = max(hwm, status["VmHWM"])
        time.sleep(interval)
    err = proc.stderr.read()
    proc.stderr.close()
    return {"exit_code": proc.returncode, "stderr_tail": err.strip().splitlines()[-3:], "samples": samples,
            "peak_mib": round(hwm / 1024, 1), "seconds": round(time.perf_counter() - t0, 1)}


def summarize(run: Dict[str, Any], n_files: int, warmup: float) -> Dict[str, Any]:
    """RSS after the warm-up, its maximum afterwards and the growth; RSS at each tenth of the files."""
    samples = [s for s in run["samples"] if 0 < s["files"] < n_files]  # not the start-up, not the exit
    after = [s for s in samples if s["files"] >= warmup * n_files]
    if not after:
        raise cli.CheckFailed("no RSS sample after the warm-up: the run ended too soon (more --files?)")
    base, top = after[0], max(after, key=lambda s: s["rss_mib"])
    tenths = {}  # the first sample of each tenth of the files, and the last one before the process ends
    for s in samples:
        tenths.setdefault(int(10 * s["files"] / n_files), s)
    tenths[10] = samples[-1]
    return {"warmup_files": after[0]["files"], "rss_after_warmup_mib": base["rss_mib"], "max_rss_after_mib":
            top["rss_mib"], "max_at_files": top["files"], "growth": round(top["rss_mib"] / base["rss_mib"] - 1, 4),
            "rss_by_tenth": {("last" if k == 10 else f"{10 * k}%"): {"files": s["files"], "rss_mib": s["rss_mib"]}
                             for k, s in sorted(tenths.items())}}


def _parser():
    p = cli.parser("python benchmarks/predict_rss.py", __doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=2000, help="images in the archive (default 2000)")
    p.add_argument("--source", type=Path, default=None,
                   help="a build or checkpoint (default: a random-init tiny build)")
    p.add_argument("--batch-size", type=int, default=None, help="predict's --batch-size (default: its own)")
    p.add_argument("--threads", type=int, default=2, help="the engine's CPU threads")
    p.add_argument("--interval", type=float, default=0.25, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=0.1, help="share of the files before the baseline (default 0.1)")
    p.add_argument("--max-growth", type=float, default=0.05, help="RSS growth after the warm-up that fails (0.05: 5%%)")
    p.add_argument("--report", action="store_true",
                   help="have predict write its JSON report (it then keeps every file's entry in memory)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the archive and outputs (default: a temporary one)")
    cli.add_json(p)
    cli.add_progress(p)
    return p


def _main(argv=None) -> int:
    args = _parser().parse_args(argv)
    cli.setup_logging(args.verbosity)
    with tempfile.TemporaryDirectory(prefix="icmoe-rss-") as tmp:
        work = args.work or Path(tmp)
        source = args.source or default_build(work)
        inputs, out = write_archive(work / "archive", args.files, progress=not args.no_progress), work / "masks"
        cmd = [sys.executable, "-m", "engines.predict", str(source), str(inputs), "--out", str(out), "--no-progress",
               "--threads", str(args.threads)]
        cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []
        cmd += ["--json", str(work / "report.json")] if args.report else []
        run = sample_run(cmd, out / JOURNAL_NAME, args.interval)
        if run["exit_code"] != 0:
            raise cli.CheckFailed(f"predict exited with {run['exit_code']}: {' '.join(run['stderr_tail'])}")
        report = {"files": args.files, "source": str(source), "command": " ".join(cmd[1:]), "cpu": cpu_model(),
                  "cores": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d"),
                  **summarize(run, args.files, args.warmup), "peak_mib": run["peak_mib"], "seconds": run["seconds"],
                  "samples": run["samples"]}
    print(f"predict over {args.files} files in {report['seconds']} s: RSS {report['rss_after_warmup_mib']} MiB after "
          f"{report['warmup_files']} files, at most {report['max_rss_after_mib']} MiB after "
          f"(at file {report['max_at_files']}): growth {100 * report['growth']:+.1f}%; peak {report['peak_mib']} MiB")
    for tenth, s in report["rss_by_tenth"].items():
        print(f"  {tenth:>4} {s['files']:>6} files  {s['rss_mib']:8.1f} MiB")
    cli.write_json(report, args.json)
    if report["growth"] > args.max_growth:
        raise cli.CheckFailed(f"RSS grew {100 * report['growth']:.1f}% after the warm-up (bound "
                              f"{100 * args.max_growth:.0f}%)")
    return cli.EXIT_OK


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
