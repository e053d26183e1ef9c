"""Per-volume multi-class metrics: Dice and HD95 per class and volume, and their summaries.

Details: docs/evaluation.md.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from medpy.metric.binary import hd95 as medpy_hd95

from icmoe.core.errors import IcmoeError

EMPTY_BOTH = "empty in prediction and reference"
EMPTY_PRED = "empty in prediction"
EMPTY_REF = "empty in reference"
NOT_COMPUTED = "not computed"


class VolumeMetricError(IcmoeError, ValueError):
    """A prediction and reference that cannot be compared (shape, dtype, labels); one line naming the volume."""


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks of one shape; 1.0 when both are empty."""
    p, r = int(pred.sum()), int(ref.sum())
    if p + r == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / (p + r)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Optional[Sequence[float]] = None) -> float:
    """95th-percentile symmetric Hausdorff distance of two non-empty boolean masks (medpy), in the
    units of `spacing` (voxels when None)."""
    return float(medpy_hd95(pred, ref, voxelspacing=None if spacing is None else tuple(float(s) for s in spacing)))


def unit_of(spacing: Optional[Sequence[float]]) -> str:
    return "voxels" if spacing is None else "mm"


def class_scores(pred: np.ndarray, ref: np.ndarray, spacing: Optional[Sequence[float]] = None, *,
                 distances: bool = True) -> Dict[str, Any]:
    """Dice and HD95 of one class (boolean masks of one shape).

    Returns:
      dict: dice, hd95 (float or None), hd95_note (why it is None, else None), pred_voxels, ref_voxels.
    """
    p, r = int(pred.sum()), int(ref.sum())
    out: Dict[str, Any] = {"dice": dice(pred, ref), "hd95": None, "hd95_note": None, "pred_voxels": p,
                           "ref_voxels": r}
    if p == 0 or r == 0:
        out["hd95_note"] = EMPTY_BOTH if p == r == 0 else (EMPTY_PRED if p == 0 else EMPTY_REF)
    elif distances:
        out["hd95"] = hd95(pred, ref, spacing)
    else:
        out["hd95_note"] = NOT_COMPUTED
    return out


def _check(pred: np.ndarray, ref: np.ndarray, num_classes: int, name: str,
           spacing: Optional[Sequence[float]]) -> None:
    if pred.shape != ref.shape or pred.ndim != 3:
        raise VolumeMetricError(f"{name}: prediction {pred.shape} and reference {ref.shape} are not one (Z, H, W) shape")
    for what, arr in (("prediction", pred), ("reference", ref)):
        if arr.dtype.kind not in "biu":
            raise VolumeMetricError(f"{name}: {what} has dtype {arr.dtype}, expected integer class indices")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > num_classes):
            raise VolumeMetricError(f"{name}: {what} has labels outside 0..{num_classes}")
    if spacing is not None and (len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing)):
        raise VolumeMetricError(f"{name}: spacing {tuple(spacing)} is not three positive sizes (Z, H, W)")


def score_volume(pred: np.ndarray, ref: np.ndarray, class_names: Sequence[str], *, name: str = "volume",
                 spacing: Optional[Sequence[float]] = None, distances: bool = True) -> Dict[str, Any]:
    """Per-class Dice and HD95 of one volume.

    Arguments:
      pred, ref: (Z, H, W) integer label maps, 0 = background, 1..C the classes.
      class_names: the C foreground class names (label value = index + 1).
      name: the volume's name (in the report and in errors).
      spacing: mm per voxel along (Z, H, W), or None (HD95 in voxels).
      distances: compute HD95 (False: Dice only, "not computed").

    Returns:
      dict: name, spacing, unit ("mm" or "voxels"), classes {class name: `class_scores`}, mean_dice.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    _check(pred, ref, len(class_names), name, spacing)
    classes = {c: class_scores(pred == k, ref == k, spacing, distances=distances)
               for k, c in enumerate(class_names, start=1)}
    return {"name": name, "spacing": None if spacing is None else [float(s) for s in spacing],
            "unit": unit_of(spacing), "classes": classes,
            "mean_dice": float(np.mean([v["dice"] for v in classes.values()]))}


def _hd95_mean(values: List[Dict[str, Any]]) -> Tuple[Optional[float], int]:
    defined = [v["hd95"] for v in values if v["hd95"] is not None]
    return (float(np.mean(defined)) if defined else None), len(defined)


def summarize(volumes: List[Dict[str, Any]], class_names: Sequence[str]) -> Dict[str, Any]:
    """Per-class means over volumes and the means over classes.

    Arguments:
      volumes: `score_volume` results.
      class_names: the C foreground class names.

    Returns:
      dict: n_volumes, unit, per_class {name: dice (mean over all volumes), hd95 (mean where defined),
        hd95_volumes (how many), empty {note: count}}, mean_dice (over classes: the paper's DSC),
        mean_hd95 (over classes with a defined mean), hd95_note (why HD95 means are missing, or None).
    """
    if not volumes:
        raise VolumeMetricError("no volumes were evaluated")
    units = sorted({v["unit"] for v in volumes})
    mixed = len(units) > 1
    per_class: Dict[str, Any] = {}
    for c in class_names:
        scores = [v["classes"][c] for v in volumes]
        mean, n = (None, 0) if mixed else _hd95_mean(scores)
        notes: Dict[str, int] = {}
        for s in scores:
            if s["hd95_note"]:
                notes[s["hd95_note"]] = notes.get(s["hd95_note"], 0) + 1
        per_class[c] = {"dice": float(np.mean([s["dice"] for s in scores])), "hd95": mean, "hd95_volumes": n,
                        "empty": notes}
    hds = [p["hd95"] for p in per_class.values() if p["hd95"] is not None]
    skipped = all(s["hd95_note"] == NOT_COMPUTED for v in volumes for s in v["classes"].values())
    note = (NOT_COMPUTED if skipped
            else "volumes with and without spacing: HD95 in mm and voxels are not averaged together" if mixed
            else None if hds else "no class has a defined HD95")
    return {"n_volumes": len(volumes), "unit": "mixed" if mixed else units[0], "per_class": per_class,
            "mean_dice": float(np.mean([p["dice"] for p in per_class.values()])),
            "mean_hd95": float(np.mean(hds)) if hds else None, "hd95_note": note}


def _fmt(x: Optional[float], spec: str) -> str:
    return format(x, spec) if x is not None else "-".rjust(len(format(0.0, spec)))


def format_summary(summary: Dict[str, Any]) -> str:
    """A console table: one row per class (Dice, HD95, volumes with HD95), then the means."""
    unit = summary["unit"]
    width = max([len("mean"), *(len(c) for c in summary["per_class"])])
    lines = [f"{'class':<{width}}  {'Dice':>7}  {'HD95 ' + unit:>12}  HD95 defined"]
    for c, p in summary["per_class"].items():
        lines.append(f"{c:<{width}}  {p['dice']:7.4f}  {_fmt(p['hd95'], '12.2f')}  "
                     f"{p['hd95_volumes']}/{summary['n_volumes']}")
    lines.append(f"{'mean':<{width}}  {summary['mean_dice']:7.4f}  {_fmt(summary['mean_hd95'], '12.2f')}")
    if summary.get("hd95_note"):
        lines.append(f"HD95: {summary['hd95_note']}")
    return "\n".join(lines)
