"""Evaluate a checkpoint: binary metrics pooled and per image, or multi-class metrics per volume; overlays.

    python -m icmoe.evaluate runs/demo/best --dataset synthetic --data-root data/synthetic
    python -m icmoe.evaluate runs/busi/best --dataset busi --data-root data/BUSI \\
        --json busi.json --overlays overlays/     # --json alone (or -): JSON on stdout
    python -m icmoe.evaluate runs/moesam-synthetic3d-tiny/best --dataset synthetic3d --split test

The checkpoint names its own model (family and configuration), so no --model or
--config is needed; the family reads the dataset and scores the model (its
`evaluate` hook), with one of the two evaluations of this module:

- binary (IC-MoE; `binary_evaluation`): inference as deployed, no target, PPAV
  balancing off (an image's mask never depends on its batch), threshold 0.5 on the
  fused probability (logits > 0); metrics as in `icmoe.metrics`. Overlays: the first
  `--n-overlays` images with the ground-truth contour in green and the predicted
  contour in red.
- per volume (multi-class, MoE-SAM; `volume_evaluation`): every slice of every volume
  of the split is predicted (batched) at the model's input size, the argmax label map
  resized back to the volume's own (H, W) by nearest neighbour, and each volume scored
  per class with Dice and HD95 in mm (`icmoe.volume_metrics`). Overlays: a few slices of
  the first `--n-overlays` volumes, reference and prediction side by side, one colour
  per class with a legend.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from icmoe.checkpoint import load
from icmoe.core import cli
from icmoe.core.io import atomic_path
from icmoe.data.overlays import PALETTE, class_overlay, overlay, pick_slices  # noqa: F401 (PALETTE re-exported)
from icmoe.data.readers import DataError
from icmoe.data.volumes import resize_label
from icmoe.families import get_family
from icmoe.metrics import MetricAccumulator, format_metrics
from icmoe.volume_metrics import format_summary, score_volume, summarize

SLICES_PER_VOLUME = 3


@dataclass
class Evaluation:
    """What a family's evaluation returns.

    Attributes:
      report: the figures, JSON-able (what --json writes and metrics.jsonl's "val" holds).
      score: the one figure training keeps the best of (higher is better): IC-MoE pooled DSC,
        MoE-SAM mean foreground Dice over the volumes.
      headline: one line for logs, e.g. "DSC pooled 0.9123 per-image 0.9050".
      table: the console report.
      overlays: paths of the PNG overlays written.
    """

    report: Dict[str, Any]
    score: float
    headline: str
    table: str
    overlays: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- binary (IC-MoE)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 8,
    device: torch.device = torch.device("cpu"),
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    keep: int = 0,
) -> Dict[str, Any]:
    """Metrics of `model` (inference mode) on `dataset`.

    Arguments:
      model: an ICMoE; `model(images)` must return a Vote.
      dataset: images and masks (a `SegmentationDataset`).
      batch_size: images per forward pass.
      device: where the model lives.
      rank, world: under DDP each rank evaluates every world-th image and the
        confusion counts are gathered, so each image counts exactly once.
      progress: show a progress bar (rank 0 only).
      keep: also return the predictions of the first `keep` images (for overlays).

    Returns:
      dict with "pooled", "per_image" (metric -> value), "n_images",
      "experts" (how often each candidate was chosen), and "kept" (list of
      (index, mask uint8 (S, S), dsc)) when keep > 0.
    """
    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    chosen = torch.zeros(3, dtype=torch.int64)
    kept: List[Any] = []
    idx = list(range(rank, len(dataset), world))
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False)
    for images, masks, index in tqdm(loader, desc="evaluate", leave=False, disable=not (progress and rank == 0)):
        vote = model(images.to(device))
        dsc = acc.update(vote.mask, masks.to(device))
        chosen += torch.bincount(vote.expert.long().cpu(), minlength=3)[:3]
        for j in range(images.shape[0]):
            if int(index[j]) < keep:
                kept.append((int(index[j]), vote.mask[j, 0].cpu().numpy(), float(dsc[j])))
    counts = acc.counts()
    if world > 1:
        gathered: List[Any] = [None] * world
        dist.all_gather_object(gathered, (counts, chosen))
        counts = torch.cat([g[0] for g in gathered])
        chosen = sum(g[1] for g in gathered)
    model.train(was_training)
    result = acc.compute(counts)
    result["experts"] = {name: int(n) for name, n in zip(("basic", "semantic", "fused"), chosen.tolist())}
    if keep:
        result["kept"] = sorted(kept, key=lambda k: k[0])
    return result


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("_") or "image"


def _save_png(pic: Image.Image, path: Path) -> str:
    with atomic_path(path) as tmp:
        pic.save(tmp, format="PNG")
    return str(path)


def binary_evaluation(model: nn.Module, dataset: Any, *, batch_size: int = 8, device: Any = "cpu", rank: int = 0,
                      world: int = 1,
                      progress: bool = True, overlays: Optional[Path] = None, n_overlays: int = 8) -> Evaluation:
    """IC-MoE's evaluation: `evaluate_model`, and contour overlays of the first `n_overlays` images.

    Returns:
      Evaluation: report = pooled, per_image, n_images, experts; score = pooled DSC.
    """
    res = evaluate_model(model, dataset, batch_size=batch_size, device=torch.device(device), rank=rank, world=world,
                         progress=progress, keep=n_overlays if overlays else 0)
    written = []
    for i, pred, dsc in res.pop("kept", []):
        name = f"{i:03d}_{_safe_name(dataset.items[i].name)}.png"
        pic = overlay(dataset.images[i].numpy(), dataset.masks[i, 0].numpy(), pred, caption=f"DSC {dsc:.3f}")
        written.append(_save_png(pic, Path(overlays) / name))
    table = "\n".join([format_metrics(res), "chosen candidate: "
                       + ", ".join(f"{k} {v}" for k, v in res["experts"].items())])
    return Evaluation(report=res, score=res["pooled"]["dsc"], table=table, overlays=written,
                      headline=f"DSC pooled {res['pooled']['dsc']:.4f} per-image {res['per_image']['dsc']:.4f}")


# ----------------------------------------------------------------------------- per volume (multi-class)


@torch.no_grad()
def predict_slices(model: nn.Module, images: torch.Tensor, *, batch_size: int, device: torch.device) -> np.ndarray:
    """Label maps of a stack of slices: argmax over the model's C+1 logits.

    Arguments:
      model: in eval mode; model(images (B, 3, S, S) RGB 0..255) -> logits (B, C+1, S, S).
      images: (Z, 3, S, S) float32.

    Returns:
      uint8 (Z, S, S) class indices.
    """
    out = []
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start:start + batch_size].to(device))  # (b, C+1, S, S)
        out.append(logits.argmax(1).to(torch.uint8).cpu())  # (b, S, S)
    return torch.cat(out).numpy()


def _volume_items(dataset: Any) -> List[List[int]]:
    """Dataset indices of each volume's slices, in z order (from `dataset.slices` = [(volume, z)])."""
    items: List[List[Tuple[int, int]]] = [[] for _ in dataset.volumes]
    for i, (v, z) in enumerate(dataset.slices):
        items[v].append((z, i))
    for v, zs in enumerate(items):
        if [z for z, _ in sorted(zs)] != list(range(dataset.volumes[v].image.shape[0])):
            raise DataError(f"{dataset.volumes[v].source}: the dataset does not hold every slice of "
                             f"{dataset.volumes[v].name}; per-volume evaluation needs them all")
    return [[i for _, i in sorted(zs)] for zs in items]


def predict_volume(model: nn.Module, dataset: Any, v: int, items: List[int], *, batch_size: int,
                   device: torch.device) -> np.ndarray:
    """The label volume (Z, H, W) uint8 at volume `v`'s own (H, W): slices predicted at the model's size,
    resized back by nearest neighbour."""
    images = torch.stack([dataset[i][0] for i in items])  # (Z, 3, S, S)
    small = predict_slices(model, images, batch_size=batch_size, device=device)  # (Z, S, S)
    h, w = dataset.volumes[v].image.shape[1:]
    return np.stack([resize_label(s, (h, w)) for s in small])  # (Z, H, W)


def volume_evaluation(model: nn.Module, dataset: Any, class_names: Sequence[str], *, batch_size: int = 8,
                      device: Any = "cpu", rank: int = 0, world: int = 1,
                      progress: bool = True, distances: bool = True, overlays: Optional[Path] = None,
                      n_overlays: int = 8) -> Evaluation:
    """Multi-class evaluation per volume (module docstring): Dice and HD95 per class and volume.

    Arguments:
      model: logits (B, C+1, S, S) from images (B, 3, S, S); evaluated in eval mode.
      dataset: a slice dataset with `volumes` (native-resolution image and label) and `slices`.
      class_names: the C foreground class names (label value = index + 1).
      rank, world: under DDP rank r scores volumes r, r + world, ...; the per-volume results are gathered.
      distances: compute HD95 (False: Dice only, for training's validation).
      overlays, n_overlays: PNGs of a few slices of each of the first `n_overlays` volumes.

    Returns:
      Evaluation: report = volumes (per volume per class), per_class, mean_dice (the paper's DSC),
        mean_hd95, unit, n_volumes, n_slices; score = mean_dice.
    """
    was_training = model.training
    model.eval()
    items, mine, written, device = _volume_items(dataset), [], [], torch.device(device)
    for v in tqdm(range(rank, len(dataset.volumes), world), desc="evaluate", leave=False,
                  disable=not (progress and rank == 0)):
        vol = dataset.volumes[v]
        pred = predict_volume(model, dataset, v, items[v], batch_size=batch_size, device=device)
        mine.append((v, score_volume(pred, vol.label, class_names, name=vol.name, spacing=vol.spacing,
                                     distances=distances)))
        if overlays is not None and v < n_overlays:
            written += volume_overlays(vol, pred, class_names, Path(overlays), caption=f"Dice {mine[-1][1]['mean_dice']:.3f}")
    model.train(was_training)
    if world > 1:
        gathered: List[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        mine = [x for g in gathered for x in g]
    volumes = [s for _, s in sorted(mine, key=lambda x: x[0])]
    summary = summarize(volumes, class_names)
    report = {**summary, "n_slices": len(dataset.slices), "volumes": volumes}
    hd = f"  HD95 {summary['mean_hd95']:.2f} {summary['unit']}" if summary["mean_hd95"] is not None else ""
    return Evaluation(report=report, score=summary["mean_dice"], table=format_summary(summary), overlays=written,
                      headline=f"mean Dice {summary['mean_dice']:.4f} over {summary['n_volumes']} volumes{hd}")


def volume_overlays(volume: Any, pred: np.ndarray, class_names: Sequence[str], folder: Path, *,
                    caption: str = "", slices: int = SLICES_PER_VOLUME) -> List[str]:
    """PNG overlays of a few slices of one volume (`class_overlay`); returns the paths written."""
    written = []
    for z in pick_slices(volume.label, pred, slices):
        pic = class_overlay(volume.image[z], volume.label[z], pred[z], class_names,
                            caption=f"{volume.name} z={z}  {caption}".strip())
        written.append(_save_png(pic, folder / f"{_safe_name(volume.name)}_z{z:03d}.png"))
    return written


# ----------------------------------------------------------------------------- a checkpoint on a split


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
    ds = family.load_split(dataset, root, split, image_size=size, skip_bad=skip_bad, progress=progress)
    ev = family.evaluate(model, ds, batch_size=batch_size, device=dev, progress=progress, overlays=overlays,
                         n_overlays=n_overlays)
    skipped = [getattr(item, "name", str(item)) for item, _ in getattr(ds, "skipped", [])]
    ev.report = {"checkpoint": str(checkpoint), "dataset": dataset, "split": split, "image_size": size,
                 **ev.report, "skipped": skipped, "overlays": ev.overlays}
    return ev


def evaluate(checkpoint: Path, **kwargs: Any) -> Dict[str, Any]:
    """`run_evaluation(checkpoint, **kwargs).report`: the figures as a dict (what --json writes)."""
    return run_evaluation(checkpoint, **kwargs).report


def _parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m icmoe.evaluate", __doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    sys.exit(main())
