"""Writes a predict run's outputs: masks (PNG, NIfTI label volumes, DICOM SEG) and overlays, atomically."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np

from engines.predict.inputs import output_stem
from engines.predict.pipeline import Contract, Prediction
from engines.predict.series import InputItem, png_name, seg_path, stack_masks
from icmoe.core import cli
from icmoe.data.dicom_series import DicomSeries
from icmoe.data.images import ImageFile, Picture, display_pixels, write_nifti_labels, write_png
from icmoe.evaluation.overlays import class_overlay, overlay, pick_slices

OVERLAY_SLICES = 3  # overlays of a volume: this many slices with foreground


@dataclass
class Writer:
    """Writes masks and overlays of finished files under `out` (atomically; never the same path twice).

    Attributes:
      out: the mask folder.
      overlays: the overlay folder, or None for none.
      contract: the model's labels (binary masks are written 0/255, label masks as they are).
      fmt: "auto" (SEG for DICOM series, NIfTI for NIfTI, PNG for pictures), "png" or "seg".
      seg: what SEGs say of the model (`engines.predict.seg.SegSpec`), needed where a SEG is written.
      series: one report entry per SEG written (its UIDs, frames, bytes).
    """

    out: Path
    overlays: Optional[Path]
    contract: Contract
    fmt: str = "auto"
    seg: Optional[Any] = None
    written: Set[Path] = field(default_factory=set)
    series: List[Dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)  # jobs are written from a thread pool
    local: threading.local = field(default_factory=threading.local)  # the paths the current job claimed

    def _claim(self, path: Path, source: Path) -> Path:
        with self.lock:
            if path in self.written:
                raise cli.UsageError(f"{source}: its output {path} was already written for another input")
            self.written.add(path)
        getattr(self.local, "claimed", []).append(path)
        return path

    def write_job(self, item: InputItem, data: Any, preds: List[Prediction]
                  ) -> Tuple[List[Dict[str, Any]], List[Path]]:
        """`write_item` in any thread: (the report entries, the output paths this job wrote)."""
        self.local.claimed = []
        try:
            return self.write_item(item, data, preds), self.local.claimed
        finally:
            self.local.claimed = []

    def write_item(self, item: InputItem, data: Any, preds: List[Prediction]) -> List[Dict[str, Any]]:
        """Write one job's outputs (a file's, or a DICOM series'); returns the report entry of each picture."""
        if isinstance(data, DicomSeries):
            if self.fmt == "png":
                return self._write_series_pngs(item, data, preds)
            return self._write_seg(item, data, preds)
        return self.write(data, item.rel, preds)

    def write(self, file: ImageFile, rel: Path, preds: List[Prediction]) -> List[Dict[str, Any]]:
        """Write one file's outputs; returns the report entry of each of its pictures."""
        stem = output_stem(rel)
        if file.nifti is not None and self.fmt != "png":
            return self._write_volume(file, stem, preds)
        entries = []
        for pic, pred in zip(file.pictures, preds):
            name = f"{stem.name}_f{pic.frame:03d}" if file.multi else stem.name
            mask_path = self._claim(self.out / stem.parent / f"{name}.png", file.path)
            write_png(mask_path, pred.mask * 255 if self.contract.binary else pred.mask)
            entry = {**pred.to_dict(), "mask": str(mask_path)}
            if self.overlays is not None:
                target = self.overlays / stem.parent / f"{name}.png"
                entry["overlay"] = str(self._overlay(pic, pred.mask, target, file.path))
            entries.append(entry)
        return entries

    def _write_series_pngs(self, item: InputItem, series: DicomSeries, preds: List[Prediction]) -> List[Dict[str, Any]]:
        entries = []
        for z, (pic, pred) in enumerate(zip(series.pictures, preds)):
            rel = png_name(item, series, z)
            path = self._claim(self.out / rel, item.path)
            write_png(path, pred.mask * 255 if self.contract.binary else pred.mask)
            entry = {**pred.to_dict(), "series": series.uid, "slice": z, "mask": str(path)}
            if self.overlays is not None:
                entry["overlay"] = str(self._overlay(pic, pred.mask, self.overlays / rel, item.path))
            entries.append(entry)
        return entries

    def _write_seg(self, item: InputItem, series: DicomSeries, preds: List[Prediction]) -> List[Dict[str, Any]]:
        from engines.predict.seg import make_seg, write_seg  # highdicom: the dicom extra

        masks, probabilities = stack_masks(preds)
        seg = make_seg(series, masks, self.seg, probabilities)
        path = write_seg(self._claim(self.out / seg_path(item), item.path), seg)
        with self.lock:
            self.series.append(seg_entry(series, seg, str(path), path.stat().st_size))
        entries = [{**p.to_dict(), "series": series.uid, "slice": z, "mask": str(path)} for z, p in enumerate(preds)]
        if self.overlays is not None:
            for z in pick_slices(None, masks, OVERLAY_SLICES):
                rel = png_name(item, series, z)
                entries[z]["overlay"] = str(self._overlay(series.pictures[z], masks[z], self.overlays / rel, item.path))
        return entries

    def _write_volume(self, file: ImageFile, stem: Path, preds: List[Prediction]) -> List[Dict[str, Any]]:
        labels = np.stack([p.mask for p in preds])  # (Z, X, Y), binary 0/1: a label volume
        path = write_nifti_labels(self._claim(self.out / stem.parent / f"{stem.name}_mask.nii.gz", file.path),
                                  labels, file)
        entries = [{**p.to_dict(), "mask": str(path)} for p in preds]
        if self.overlays is not None:
            for z in pick_slices(None, labels, OVERLAY_SLICES):
                target = self.overlays / stem.parent / f"{stem.name}_z{z:03d}.png"
                entries[z]["overlay"] = str(self._overlay(file.pictures[z], labels[z], target, file.path))
        return entries

    def _overlay(self, pic: Picture, mask: np.ndarray, path: Path, source: Path) -> Path:
        image = display_pixels(pic)
        caption = f"{Path(pic.source).name}" + (f" [{pic.frame}]" if pic.frame is not None else "")
        if self.contract.binary:
            drawn = overlay(image, None, mask, caption=caption)
        else:
            drawn = class_overlay(image, None, mask, [n for _, n in self.contract.labels], caption=caption)
        return write_png(self._claim(path, source), drawn)


def seg_entry(series: DicomSeries, seg: Any, where: str, size: int) -> Dict[str, Any]:
    """The report entry of one SEG: its source series, its own UIDs, frames, segments and size."""
    return {"source_series": series.uid, "study_instance_uid": str(seg.StudyInstanceUID),
            "series_instance_uid": str(seg.SeriesInstanceUID), "sop_instance_uid": str(seg.SOPInstanceUID),
            "frames": int(seg.get("NumberOfFrames", 0) or 0), "slices": len(series.slices),
            "segments": len(seg.SegmentSequence), "bytes": int(size), "path": where}
