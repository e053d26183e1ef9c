"""DICOM series in predict: which inputs are series (read as volumes) and which are files (read alone),
the output format of each (`--format`), and the Python API for series (`predict_series`).

Every family's model is 2-D: a series is one job of the batching pipeline whose pictures are its slices
in volume order, so its masks are those `--format png` writes for the same pixels. docs/predict.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from engines.base import Engine
from engines.predict.pipeline import LocalRunner, Prediction, engine_contract, predict_jobs
from icmoe.core import cli
from icmoe.core.errors import DataError, first_line
from icmoe.data.dicom_series import DicomSeries, SeriesGroup, group_series, read_dicom, read_dicom_series
from icmoe.data.images import NIFTI_SUFFIXES, is_dicom

log = logging.getLogger("engines.predict")

FORMATS = ("auto", "png", "seg")


@dataclass
class InputItem:
    """One job of a run: a file read alone, or a DICOM series (its files' relative paths in `rels`).

    Attributes:
      path: the file (for a series: its first file in input order).
      rel: the output path relative to `--out` (for a series: that of its first file).
      group: the series, or None for a file read alone.
      rels: source file -> its relative path (a series' PNGs mirror each source file).
    """

    path: Path
    rel: Path
    group: Optional[SeriesGroup] = None
    rels: Dict[str, Path] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.group.label if self.group is not None else str(self.path)


def _dicom(path: Path) -> bool:
    try:
        return is_dicom(path)
    except DataError:
        return False  # unreadable: read alone, where the reader names the problem


def plan_inputs(files: Sequence[Tuple[Path, Path]], fmt: str = "auto", *, skip_bad: bool = False
                ) -> Tuple[List[InputItem], List[Dict[str, str]]]:
    """The jobs of a run: DICOM files grouped into series by their headers, the other files alone.

    Arguments:
      files: (file, relative output path) from `expand_inputs`.
      fmt: "auto", "png" or "seg" (`--format`); "seg" refuses inputs that are no DICOM series.
      skip_bad: report a DICOM file whose header cannot be read and go on.

    Returns:
      (items in input order, a series at its first file's place; skipped files with the reason).

    Raises:
      DataError: an unreadable DICOM header (without skip_bad); UsageError: `--format seg` with other inputs.
    """
    rel_of = {str(f): rel for f, rel in files}
    headers, skipped = [], []
    for f, _ in files:
        if not _dicom(f) or f.name.lower().endswith(NIFTI_SUFFIXES):
            continue
        try:
            headers.append((str(f), read_dicom(f, headers_only=True)))
        except DataError as e:
            if not skip_bad:
                raise
            log.error(f"error: {first_line(e)}")
            skipped.append({"path": str(f), "error": first_line(e)})
    groups, _, others = group_series(headers)
    for source in others:
        log.warning(f"{source}: a DICOM object without an image to segment (SEG, SR, ...); left out")
    first_of = {g.members[0][0]: g for g in groups}
    in_series = {source for g in groups for source, _ in g.members}
    left_out = set(others) | {s["path"] for s in skipped}
    items = []
    for f, rel in files:
        key = str(f)
        if key in first_of:
            g = first_of[key]
            items.append(InputItem(f, rel, g, {s: rel_of[s] for s, _ in g.members}))
        elif key not in in_series and key not in left_out:
            items.append(InputItem(f, rel))
    if fmt == "seg":
        alone = [it for it in items if it.group is None]
        if alone:
            raise cli.UsageError(f"--format seg writes DICOM SEG of DICOM series (slices with positions); "
                                 f"{alone[0].path} is none (use --format auto)")
    return items, skipped


def seg_path(item: InputItem) -> Path:
    """Where a series' SEG goes, relative to `--out`: beside its first file, named by the series UID."""
    assert item.group is not None
    return item.rel.parent / f"{item.group.uid}.seg.dcm"


def png_name(item: InputItem, series: DicomSeries, z: int) -> Path:
    """The PNG of slice z relative to `--out`: its source file's path (a multi-frame file: `_fNNN` per frame)."""
    ref = series.slices[z]
    rel = item.rels[series.sources[ref.instance]]
    stem = rel.name[:-len(rel.suffix)] if rel.suffix else rel.name
    return rel.parent / (f"{stem}_f{ref.frame:03d}.png" if ref.frame is not None else f"{stem}.png")


def stack_masks(preds: Sequence[Prediction]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(masks uint8 (Z, H, W), probabilities float32 (Z, H, W, K) or None) of a series' predictions."""
    masks = np.stack([p.mask for p in preds])
    if preds[0].probabilities is None:
        return masks, None
    return masks, np.stack([np.moveaxis(p.probabilities, 0, -1) for p in preds])


def predict_series(engine: Engine, inputs: Any, *, batch_size: Optional[int] = None,
                   window: Optional[Tuple[float, float]] = None, probabilities: bool = False,
                   upsample: str = "logits") -> List[Tuple[DicomSeries, List[Prediction]]]:
    """Segment every DICOM series among files and folders, as volumes.

    Arguments:
      engine: any engine (activated here if it is not).
      inputs: a folder, a file, or a list of them (folders are searched recursively); or DicomSeries.
      batch_size: slices per batch (default: 8 within the engine's batch range).
      window: (low, high) rescaled values mapped to 0..255 (default: each slice's DICOM window, else min..max).
      probabilities: keep each slice's probabilities (the model's `logits`), for a FRACTIONAL SEG.
      upsample: "logits" or "nearest", as `engines.predict.pipeline.predict`'s.

    Returns:
      [(series, one Prediction per slice in volume order)]; `engines.predict.seg.make_seg` makes its SEG.

    Raises:
      DataError: an unreadable file or an inconsistent series (one line naming it).
    """
    items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    series = [x for x in items if isinstance(x, DicomSeries)]
    paths = [x for x in items if not isinstance(x, DicomSeries)]
    if paths:
        series += read_dicom_series(paths, window=window)
    contract = engine_contract(engine)
    jobs = ((s, s.pictures) for s in series)
    runner = LocalRunner(engine.activate())
    try:
        return list(predict_jobs(jobs, runner, contract, batch_size=contract.batch_size(batch_size),
                                 upsampling=upsample, probabilities=probabilities))
    finally:
        runner.close()
