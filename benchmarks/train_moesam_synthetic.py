"""The MoE-SAM learning demonstration: tiny MoE-SAM on synthetic3d on a CPU, scored per held-out volume.

Details: docs/moesam.md.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import torch  # noqa: E402

from icmoe.core import cli  # noqa: E402
from icmoe.core.io import atomic_write_json  # noqa: E402
from icmoe.evaluation import run_evaluation  # noqa: E402
from icmoe.training import train  # noqa: E402


def _load() -> Optional[tuple]:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def run(
    *,
    out: Path,
    data_root: Path,
    target: float = 0.80,
    time_limit: float = 600.0,
    image_size: Optional[int] = None,
    fresh: bool = True,
    progress: bool = True,
) -> dict:
    """Train, evaluate on the test volumes, and report. Returns the result dict (see the module docstring)."""
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    load_start, cpu0, t0 = _load(), time.process_time(), time.perf_counter()
    summary = train(model="moesam", dataset="synthetic3d", data_root=data_root, out=out, config="tiny",
                    image_size=image_size, progress=progress)
    train_s = time.perf_counter() - t0
    test = run_evaluation(out / "best", dataset="synthetic3d", data_root=data_root, split="test",
                          progress=False, overlays=out / "overlays", n_overlays=2)
    total_s = time.perf_counter() - t0
    rep = test.report
    return {
        "target_dice": target,
        "time_limit_s": time_limit,
        "passed": bool(rep["mean_dice"] >= target and total_s <= time_limit),
        "test_mean_dice": rep["mean_dice"],
        "test_dice_per_class": {c: p["dice"] for c, p in rep["per_class"].items()},
        "test_mean_hd95": rep["mean_hd95"],
        "test_hd95_per_class": {c: p["hd95"] for c, p in rep["per_class"].items()},
        "hd95_unit": rep["unit"],
        "val_best_mean_dice": summary["best_score"],
        "seconds_total": round(total_s, 1),
        "seconds_train": round(train_s, 1),
        "cpu_seconds": round(time.process_time() - cpu0, 1),
        "recipe": summary["recipe"],
        "epochs": summary["epochs"],
        "test": {k: rep[k] for k in ("per_class", "mean_dice", "mean_hd95", "unit", "n_volumes", "n_slices",
                                     "volumes")},
        "table": test.table,
        "overlays": test.overlays,
        "machine": {"cpus": os.cpu_count(), "loadavg_at_start": load_start, "loadavg_at_end": _load(),
                    "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "checkpoint": str(out / "best"),
    }


def _print(res: dict, target: float, time_limit: float, results: Path) -> None:
    print(f"held-out test volumes of synthetic3d ({res['test']['n_volumes']} volumes, "
          f"{res['test']['n_slices']} slices), HD95 in {res['hd95_unit']}:")
    print(res["table"])
    m = res["machine"]
    print(f"validation best mean Dice {res['val_best_mean_dice']:.4f}; total {res['seconds_total']:.0f}s "
          f"(training {res['seconds_train']:.0f}s, {res['cpu_seconds']:.0f}s of CPU) on {m['cpus']} CPUs, "
          f"load average {m['loadavg_at_start']} at the start, {m['loadavg_at_end']} at the end")
    print(f"{'PASS' if res['passed'] else 'FAIL'}: test mean Dice {res['test_mean_dice']:.4f} (target {target}) "
          f"in {res['seconds_total']:.0f}s (limit {time_limit:.0f}s)")
    print(f"result: {results}")


def _main(argv=None) -> int:
    p = cli.parser("benchmarks/train_moesam_synthetic.py",
                   "Learning demonstration: tiny MoE-SAM on synthetic3d, on a CPU, scored per test volume.")
    p.add_argument("--out", type=Path, default=Path("runs/moesam-synthetic3d-demo"))
    p.add_argument("--data-root", type=Path, default=Path("data/synthetic3d"))
    p.add_argument("--image-size", type=int, default=None, help="override tiny's input size (128)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's); 1 on a machine shared with other jobs, where a second "
                        "thread mostly waits for a core")
    p.add_argument("--target", type=float, default=0.80)
    p.add_argument("--time-limit", type=float, default=600.0)
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/train_moesam_synthetic.json"))
    cli.add_json(p, "the result")
    cli.add_progress(p)
    a = p.parse_args(argv)
    cli.setup_logging(a.verbosity)
    if a.threads is not None:
        if a.threads < 1:
            raise cli.UsageError(f"need --threads >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    res = run(out=a.out, data_root=a.data_root, target=a.target, time_limit=a.time_limit,
              image_size=a.image_size, progress=not a.no_progress)
    atomic_write_json(a.results, res)
    cli.write_json(res, a.json)
    if a.json != "-":
        _print(res, a.target, a.time_limit, a.results)
    return cli.EXIT_OK if res["passed"] else cli.EXIT_CHECK_FAILED


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
