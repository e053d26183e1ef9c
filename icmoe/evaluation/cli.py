"""`python -m icmoe.evaluate CHECKPOINT --dataset NAME`: score a checkpoint on a split (docs/evaluation.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from icmoe.core import cli
from icmoe.evaluation.run import run_evaluation


def _parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m icmoe.evaluate", "Evaluate a checkpoint: binary metrics pooled and per image, or multi-class metrics per volume; overlays.")
    p.add_argument("checkpoint_path", nargs="?", type=Path, default=None, metavar="CHECKPOINT",
                   help="checkpoint folder, e.g. runs/NAME/best (it names its model); or --checkpoint")
    p.add_argument("--checkpoint", type=Path, default=None, help="the checkpoint folder (same as CHECKPOINT)")
    p.add_argument("--dataset", required=True, help="a dataset the checkpoint's family evaluates on")
    p.add_argument("--data-root", type=Path, default=None, help="dataset folder (default data/<dataset>)")
    p.add_argument("--split", choices=["train", "val", "test"], default="val",
                   help="test: 3-D datasets' published test split")
    p.add_argument("--batch-size", type=int, default=8)
    cli.add_json(p, "the result")
    p.add_argument("--overlays", type=Path, default=None, help="folder for PNG overlays")
    p.add_argument("--n-overlays", type=int, default=8,
                   help="number of overlays: the first images of the split (3-D: volumes, a few slices each)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images/masks with a warning")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    cli.add_progress(p)
    return p


def _print_report(res: Dict[str, Any], table: str, overlays: Optional[Path]) -> None:
    if "n_volumes" in res:
        print(f"{res['checkpoint']} on {res['dataset']}/{res['split']}: {res['n_volumes']} volumes "
              f"({res['n_slices']} slices at {res['image_size']}px, predictions resized to each volume's size); "
              f"HD95 in {res['unit']}")
    else:
        print(f"{res['checkpoint']} on {res['dataset']}/{res['split']}: {res['n_images']} images at "
              f"{res['image_size']}px (threshold 0.5)")
    print(table)
    if res["skipped"]:
        print(f"skipped {len(res['skipped'])} unreadable item(s)")
    if res["overlays"]:
        print(f"{len(res['overlays'])} overlays in {overlays}")


def _main(argv: Optional[Sequence[str]]) -> int:
    a = _parser().parse_args(argv)
    cli.setup_logging(a.verbosity)
    if (a.checkpoint_path is None) == (a.checkpoint is None):
        raise cli.UsageError("give the checkpoint once: as CHECKPOINT or as --checkpoint")
    if a.batch_size < 1 or a.n_overlays < 0:
        raise cli.UsageError(f"need --batch-size >= 1 and --n-overlays >= 0, got {a.batch_size} and {a.n_overlays}")
    ev = run_evaluation(a.checkpoint_path or a.checkpoint, dataset=a.dataset, data_root=a.data_root,
                        split=a.split, batch_size=a.batch_size, overlays=a.overlays, n_overlays=a.n_overlays,
                        skip_bad=a.skip_bad, device=a.device, progress=not a.no_progress)
    cli.write_json(ev.report, a.json)
    if a.json != "-":  # the table is the result on stdout unless the JSON is
        _print_report(ev.report, ev.table, a.overlays)
    return cli.EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_main, argv)
