"""Multi-class segmentation scored per volume: every slice predicted at the model's size, the label map
resized back to the volume's (H, W), Dice and HD95 per class in mm (`icmoe.evaluation.volume_metrics`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from icmoe.core.errors import DataError
from icmoe.data.images import resize_label
from icmoe.evaluation.overlays import class_overlay, pick_slices
from icmoe.evaluation.report import Evaluation, safe_name, save_png
from icmoe.evaluation.volume_metrics import format_summary, score_volume, summarize

SLICES_PER_VOLUME = 3


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
        written.append(save_png(pic, folder / f"{safe_name(volume.name)}_z{z:03d}.png"))
    return written
