"""A checkpoint scored on one split of a dataset, with its family's evaluation (docs/evaluation.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch

from icmoe.checkpoint import load
from icmoe.evaluation.report import Evaluation
from icmoe.families import get_family


def run_evaluation(
    checkpoint: Path,
    *,
    dataset: str,
    data_root: Optional[Path] = None,
    split: str = "val",
    batch_size: int = 8,
    overlays: Optional[Path] = None,
    n_overlays: int = 8,
    skip_bad: bool = False,
    device: Optional[str] = None,
    progress: bool = True,
) -> Evaluation:
    """Evaluate a checkpoint on one split of a dataset, with the evaluation of the checkpoint's family.

    Arguments:
      checkpoint: checkpoint folder (e.g. runs/NAME/best).
      dataset, data_root, split: what to evaluate on (data_root None: data/<dataset>; images
        resized to the checkpoint's input size).
      batch_size: images (slices) per forward pass.
      overlays: folder for PNG overlays (of the first `n_overlays` images or volumes), or None.
      skip_bad: skip unreadable files with a warning.
      device: cpu or cuda (default: cuda if available).
      progress: show progress bars.

    Returns:
      Evaluation whose report holds checkpoint, dataset, split, image_size, the family's figures
        (binary: pooled, per_image, n_images, experts; per volume: volumes, per_class, mean_dice,
        mean_hd95, unit, ...), skipped and overlays (paths).
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load(checkpoint, map_location=dev)
    family = get_family(type(model.config).family)
    size = model.config.image_size
    root = Path(data_root) if data_root is not None else Path("data") / dataset
    ds = family.training.load_split(dataset, root, split, image_size=size, skip_bad=skip_bad, progress=progress)
    ev = family.training.evaluate(model, ds, batch_size=batch_size, device=dev, progress=progress, overlays=overlays,
                         n_overlays=n_overlays)
    skipped = [getattr(item, "name", str(item)) for item, _ in getattr(ds, "skipped", [])]
    ev.report = {"checkpoint": str(checkpoint), "dataset": dataset, "split": split, "image_size": size,
                 **ev.report, "skipped": skipped, "overlays": ev.overlays}
    return ev


def evaluate(checkpoint: Path, **kwargs: Any) -> Dict[str, Any]:
    """`run_evaluation(checkpoint, **kwargs).report`: the figures as a dict (what --json writes)."""
    return run_evaluation(checkpoint, **kwargs).report
