"""Evaluate a checkpoint: five metrics pooled and per image, and contour overlays.

    python -m icmoe.evaluate --checkpoint runs/demo/best --dataset synthetic --data-root data/synthetic
    python -m icmoe.evaluate --checkpoint runs/busi/best --dataset busi --data-root data/BUSI \\
        --json busi.json --overlays overlays/     # --json alone (or -): JSON on stdout

The checkpoint names its own model (family and configuration), so no --model or
--config is needed.

Inference as deployed: no target, PPAV balancing off (an image's mask never
depends on its batch), threshold 0.5 on the fused probability (logits > 0).
Metrics are described in `icmoe.metrics`. Overlays are PNGs of the first
`--n-overlays` images of the split with the ground-truth contour in green and
the predicted contour in red.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from icmoe.checkpoint import load
from icmoe.core import cli
from icmoe.core.io import atomic_path
from icmoe.data.dataset import SegmentationDataset, build_dataset
from icmoe.data.readers import DATASETS
from icmoe.metrics import MetricAccumulator, format_metrics

GT_COLOUR = (0, 230, 0)
PRED_COLOUR = (255, 40, 40)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    dataset: SegmentationDataset,
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
      dataset: images and masks.
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


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` (H, W) bool with a 4-neighbour outside it."""
    m = np.pad(mask, 1, mode="constant")
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def _thicken(edge: np.ndarray, k: int) -> np.ndarray:
    out = edge.copy()
    for _ in range(k):
        p = np.pad(out, 1)
        out = out | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return out


def overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, *, caption: str = "", min_side: int = 384) -> Image.Image:
    """RGB overlay: ground-truth contour green, predicted contour red, with a caption.

    Arguments:
      image: (3, S, S) or (S, S, 3) RGB 0..255.
      truth, pred: (S, S) masks (foreground > 0.5).
      caption: text drawn on a strip under the image.
      min_side: the overlay is enlarged (nearest) to at least this side.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.shape[0] == 3 and img.ndim == 3:
        img = img.transpose(1, 2, 0)
    scale = max(1, -(-min_side // img.shape[0]))
    big = np.clip(img, 0, 255).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
    width = max(1, scale // 2)
    for mask, colour in ((truth, GT_COLOUR), (pred, PRED_COLOUR)):
        m = (np.asarray(mask) > 0.5).repeat(scale, 0).repeat(scale, 1)
        big[_thicken(_boundary(m), width)] = colour
    canvas = Image.new("RGB", (big.shape[1], big.shape[0] + 22), (0, 0, 0))
    canvas.paste(Image.fromarray(big), (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, big.shape[0] + 5), "ground truth", fill=GT_COLOUR)
    draw.text((90, big.shape[0] + 5), "prediction", fill=PRED_COLOUR)
    if caption:
        draw.text((170, big.shape[0] + 5), caption, fill=(230, 230, 230))
    return canvas


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("_") or "image"


def evaluate(
    checkpoint: Path,
    *,
    dataset: str,
    data_root: Path,
    split: str = "val",
    batch_size: int = 8,
    overlays: Optional[Path] = None,
    n_overlays: int = 8,
    skip_bad: bool = False,
    device: Optional[str] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Evaluate a checkpoint on one split of a dataset.

    Arguments:
      checkpoint: checkpoint folder (e.g. runs/NAME/best).
      dataset, data_root, split: what to evaluate on (images resized to the checkpoint's input size).
      batch_size: images per forward pass.
      overlays: folder for PNG overlays of the first `n_overlays` images, or None.
      skip_bad: skip unreadable files with a warning.
      device: cpu or cuda (default: cuda if available).
      progress: show progress bars.

    Returns:
      dict: checkpoint, dataset, split, n_images, pooled, per_image, experts, overlays (paths).
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load(checkpoint, map_location=dev)
    size = model.config.image_size
    ds = build_dataset(dataset, data_root, split, image_size=size, skip_bad=skip_bad, progress=progress)
    res = evaluate_model(model, ds, batch_size=batch_size, device=dev, progress=progress,
                         keep=n_overlays if overlays else 0)
    written = []
    if overlays is not None:
        overlays.mkdir(parents=True, exist_ok=True)
        for i, pred, dsc in res.pop("kept"):
            name = f"{i:03d}_{_safe_name(ds.items[i].name)}.png"
            pic = overlay(ds.images[i].numpy(), ds.masks[i, 0].numpy(), pred, caption=f"DSC {dsc:.3f}")
            with atomic_path(overlays / name) as tmp:
                pic.save(tmp, format="PNG")
            written.append(str(overlays / name))
    return {
        "checkpoint": str(checkpoint),
        "dataset": dataset,
        "split": split,
        "image_size": size,
        **res,
        "skipped": [item.name for item, _ in ds.skipped],
        "overlays": written,
    }


def _parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m icmoe.evaluate", __doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="checkpoint folder, e.g. runs/NAME/best (it names its model)")
    p.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--split", choices=["train", "val"], default="val")
    p.add_argument("--batch-size", type=int, default=8)
    cli.add_json(p, "the result")
    p.add_argument("--overlays", type=Path, default=None, help="folder for PNG contour overlays")
    p.add_argument("--n-overlays", type=int, default=8, help="number of overlays (first images of the split)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images/masks with a warning")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    cli.add_progress(p)
    return p


def _print_report(res: Dict[str, Any], overlays: Optional[Path]) -> None:
    print(f"{res['checkpoint']} on {res['dataset']}/{res['split']}: {res['n_images']} images at "
          f"{res['image_size']}px (threshold 0.5)")
    print(format_metrics(res))
    print("chosen candidate: " + ", ".join(f"{k} {v}" for k, v in res["experts"].items()))
    if res["skipped"]:
        print(f"skipped {len(res['skipped'])} unreadable item(s)")
    if res["overlays"]:
        print(f"{len(res['overlays'])} overlays in {overlays}")


def _main(argv: Optional[Sequence[str]]) -> int:
    a = _parser().parse_args(argv)
    cli.setup_logging(a.verbosity)
    if a.batch_size < 1 or a.n_overlays < 0:
        raise cli.UsageError(f"need --batch-size >= 1 and --n-overlays >= 0, got {a.batch_size} and {a.n_overlays}")
    res = evaluate(a.checkpoint, dataset=a.dataset, data_root=a.data_root, split=a.split,
                   batch_size=a.batch_size, overlays=a.overlays, n_overlays=a.n_overlays,
                   skip_bad=a.skip_bad, device=a.device, progress=not a.no_progress)
    cli.write_json(res, a.json)
    if a.json != "-":  # the table is the result on stdout unless the JSON is
        _print_report(res, a.overlays)
    return cli.EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
