"""The learning demonstration: train `tiny` on the synthetic set on a CPU, check DSC on held-out images.

Details: docs/icmoe.md.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import torch  # noqa: E402

from icmoe.core import cli  # noqa: E402
from icmoe.core.io import atomic_write_json  # noqa: E402
from icmoe.data import make_synthetic_dataset  # noqa: E402
from icmoe.data.synthetic import has_synthetic_dataset  # noqa: E402
from icmoe.evaluation import evaluate  # noqa: E402
from icmoe.evaluation.metrics import format_metrics  # noqa: E402
from icmoe.training import train  # noqa: E402


def run(
    *,
    out: Path,
    data_root: Path,
    test_root: Path,
    test_seed: int = 1,
    n_test: int = 64,
    target: float = 0.85,
    time_limit: float = 600.0,
    fresh: bool = True,
    progress: bool = True,
) -> dict:
    """Train, evaluate, and report. Returns the result dict (see the module docstring)."""
    if fresh:
        for p in (out, data_root):
            shutil.rmtree(p, ignore_errors=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    summary = train(dataset="synthetic", data_root=data_root, out=out, config="tiny", progress=progress)
    train_s = time.perf_counter() - t0
    val = evaluate(out / "best", dataset="synthetic", data_root=data_root, split="val", progress=False)
    if not has_synthetic_dataset(test_root):
        make_synthetic_dataset(test_root, n_train=0, n_val=n_test, size=128, seed=test_seed)
    test = evaluate(out / "best", dataset="synthetic", data_root=test_root, split="val", progress=False,
                    overlays=out / "overlays", n_overlays=6)
    total_s = time.perf_counter() - t0
    dsc = test["pooled"]["dsc"]
    return {
        "target_dsc": target,
        "time_limit_s": time_limit,
        "passed": bool(dsc >= target and total_s <= time_limit),
        "test_dsc_pooled": dsc,
        "test_dsc_per_image": test["per_image"]["dsc"],
        "val_dsc_pooled": val["pooled"]["dsc"],
        "seconds_total": round(total_s, 1),
        "seconds_train": round(train_s, 1),
        "recipe": summary["recipe"],
        "epochs": summary["epochs"],
        "test": {k: test[k] for k in ("pooled", "per_image", "n_images", "experts")},
        "val": {k: val[k] for k in ("pooled", "per_image", "n_images", "experts")},
        "test_seed": test_seed,
        "overlays": test["overlays"],
        "machine": {"cpus": os.cpu_count(), "loadavg_at_start": load, "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__},
        "checkpoint": str(out / "best"),
    }


def _main(argv=None) -> int:
    p = cli.parser("benchmarks/train_synthetic.py",
                   "Learning demonstration: tiny IC-MoE on the synthetic set, on a CPU.")
    p.add_argument("--out", type=Path, default=Path("runs/synthetic-demo"))
    p.add_argument("--data-root", type=Path, default=Path("data/synthetic-demo"))
    p.add_argument("--test-root", type=Path, default=Path("data/synthetic-test"))
    p.add_argument("--test-seed", type=int, default=1)
    p.add_argument("--target", type=float, default=0.85)
    p.add_argument("--time-limit", type=float, default=600.0)
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/train_synthetic.json"))
    cli.add_json(p, "the result")
    cli.add_progress(p)
    a = p.parse_args(argv)
    cli.setup_logging(a.verbosity)
    res = run(out=a.out, data_root=a.data_root, test_root=a.test_root, test_seed=a.test_seed, target=a.target,
              time_limit=a.time_limit, progress=not a.no_progress)
    atomic_write_json(a.results, res)
    cli.write_json(res, a.json)
    if a.json != "-":
        print(f"held-out test set (seed {res['test_seed']}, {res['test']['n_images']} images):")
        print(format_metrics(res["test"]))
        print(f"validation DSC {res['val_dsc_pooled']:.4f}; total {res['seconds_total']:.0f}s "
              f"(training {res['seconds_train']:.0f}s) on {res['machine']['cpus']} CPUs, load average at start "
              f"{res['machine']['loadavg_at_start']}")
        print(f"{'PASS' if res['passed'] else 'FAIL'}: test DSC {res['test_dsc_pooled']:.4f} "
              f"(target {a.target}) in {res['seconds_total']:.0f}s (limit {a.time_limit:.0f}s)")
        print(f"result: {a.results}")
    return cli.EXIT_OK if res["passed"] else cli.EXIT_CHECK_FAILED


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
