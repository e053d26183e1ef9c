"""Binary segmentation scored as deployed: confusion counts pooled and per image, a per-image discrete
choice counted where the family has one, contour overlays (metrics: `icmoe.evaluation.metrics`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from icmoe.evaluation.metrics import MetricAccumulator, format_metrics
from icmoe.evaluation.overlays import overlay
from icmoe.evaluation.report import Evaluation, safe_name, save_png

# model, images (B, 3, S, S) -> (mask (B, 1, S, S) uint8 0/1, per-image choice (B,) int or None)
Segment = Callable[[nn.Module, torch.Tensor], Tuple[torch.Tensor, Optional[torch.Tensor]]]

@dataclass(frozen=True)
class Choice:
    """A per-image discrete output a family counts in its report (IC-MoE: the chosen candidate).

    Attributes:
      key: the report's key ("experts"); names: the name of each value, in value order;
      label: how the table names it ("chosen candidate").
    """

    key: str
    names: Tuple[str, ...]
    label: str


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    dataset: Any,
    *,
    segment: Segment,
    choice: Optional[Choice] = None,
    batch_size: int = 8,
    device: torch.device = torch.device("cpu"),
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    keep: int = 0,
) -> Dict[str, Any]:
    """Metrics of `model` (inference mode) on `dataset`.

    Arguments:
      model, segment: `segment(model, images)` -> (mask (B, 1, S, S) 0/1, choice (B,) or None).
      dataset: images and masks (a `SegmentationDataset`).
      choice: what the per-image choice is, to count it; None: not counted.
      batch_size: images per forward pass; device: where the model lives.
      rank, world: under DDP each rank evaluates every world-th image and the
        confusion counts are gathered, so each image counts exactly once.
      progress: show a progress bar (rank 0 only).
      keep: also return the predictions of the first `keep` images (for overlays).

    Returns:
      dict with "pooled", "per_image" (metric -> value), "n_images", `choice.key` (how often each
      value was chosen) and "kept" (list of (index, mask uint8 (S, S), dsc)) when keep > 0.
    """
    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    n_choices = len(choice.names) if choice else 0
    chosen = torch.zeros(n_choices, dtype=torch.int64)
    kept: List[Any] = []
    idx = list(range(rank, len(dataset), world))
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False)
    for images, masks, index in tqdm(loader, desc="evaluate", leave=False, disable=not (progress and rank == 0)):
        mask, picked = segment(model, images.to(device))
        dsc = acc.update(mask, masks.to(device))
        if choice is not None and picked is not None:
            chosen += torch.bincount(picked.long().cpu(), minlength=n_choices)[:n_choices]
        for j in range(images.shape[0]):
            if int(index[j]) < keep:
                kept.append((int(index[j]), mask[j, 0].cpu().numpy(), float(dsc[j])))
    counts = acc.counts()
    if world > 1:
        gathered: List[Any] = [None] * world
        dist.all_gather_object(gathered, (counts, chosen))
        counts = torch.cat([g[0] for g in gathered])
        chosen = sum(g[1] for g in gathered)
    model.train(was_training)
    result = acc.compute(counts)
    if choice is not None:
        result[choice.key] = {name: int(n) for name, n in zip(choice.names, chosen.tolist())}
    if keep:
        result["kept"] = sorted(kept, key=lambda k: k[0])
    return result


def binary_evaluation(model: nn.Module, dataset: Any, *, segment: Segment, choice: Optional[Choice] = None,
                      batch_size: int = 8, device: Any = "cpu", rank: int = 0, world: int = 1,
                      progress: bool = True, overlays: Optional[Path] = None, n_overlays: int = 8) -> Evaluation:
    """`evaluate_model`, and contour overlays of the first `n_overlays` images.

    Returns:
      Evaluation: report = pooled, per_image, n_images (and the choice counts); score = pooled DSC.
    """
    res = evaluate_model(model, dataset, segment=segment, choice=choice, batch_size=batch_size,
                         device=torch.device(device), rank=rank, world=world, progress=progress,
                         keep=n_overlays if overlays else 0)
    written = []
    for i, pred, dsc in res.pop("kept", []):
        name = f"{i:03d}_{safe_name(dataset.items[i].name)}.png"
        pic = overlay(dataset.images[i].numpy(), dataset.masks[i, 0].numpy(), pred, caption=f"DSC {dsc:.3f}")
        written.append(save_png(pic, Path(overlays) / name))
    lines = [format_metrics(res)]
    if choice is not None:
        lines.append(f"{choice.label}: " + ", ".join(f"{k} {v}" for k, v in res[choice.key].items()))
    return Evaluation(report=res, score=res["pooled"]["dsc"], table="\n".join(lines), overlays=written,
                      headline=f"DSC pooled {res['pooled']['dsc']:.4f} per-image {res['per_image']['dsc']:.4f}")
