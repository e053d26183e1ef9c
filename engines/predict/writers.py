"""Writes a predict run's outputs: masks (PNG, NIfTI label volumes) and overlays, atomically."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

import numpy as np

from engines.predict.inputs import output_stem
from engines.predict.pipeline import Contract, Prediction
from icmoe.core import cli
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
    """

    out: Path
    overlays: Optional[Path]
    contract: Contract
    written: Set[Path] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)  # files are written from a thread pool

    def _claim(self, path: Path, source: Path) -> Path:
        with self.lock:
            if path in self.written:
                raise cli.UsageError(f"{source}: its output {path} was already written for another input")
            self.written.add(path)
        return path

    def write(self, file: ImageFile, rel: Path, preds: List[Prediction]) -> List[Dict[str, Any]]:
        """Write one file's outputs; returns the report entry of each of its pictures."""
        stem = output_stem(rel)
        if file.nifti is not None:
            return self._write_volume(file, stem, preds)
        entries = []
        for pic, pred in zip(file.pictures, preds):
            name = f"{stem.name}_f{pic.frame:03d}" if file.multi else stem.name
            mask_path = self._claim(self.out / stem.parent / f"{name}.png", file.path)
            write_png(mask_path, pred.mask * 255 if self.contract.binary else pred.mask)
            entry = {**pred.to_dict(), "mask": str(mask_path)}
            if self.overlays is not None:
                entry["overlay"] = str(self._overlay(pic, pred.mask, self.overlays / stem.parent / f"{name}.png", file))
            entries.append(entry)
        return entries

    def _write_volume(self, file: ImageFile, stem: Path, preds: List[Prediction]) -> List[Dict[str, Any]]:
        labels = np.stack([p.mask for p in preds])  # (Z, X, Y), binary 0/1: a label volume
        path = write_nifti_labels(self._claim(self.out / stem.parent / f"{stem.name}_mask.nii.gz", file.path),
                                  labels, file)
        entries = [{**p.to_dict(), "mask": str(path)} for p in preds]
        if self.overlays is not None:
            for z in pick_slices(None, labels, OVERLAY_SLICES):
                target = self.overlays / stem.parent / f"{stem.name}_z{z:03d}.png"
                entries[z]["overlay"] = str(self._overlay(file.pictures[z], labels[z], target, file))
        return entries

    def _overlay(self, pic: Picture, mask: np.ndarray, path: Path, file: ImageFile) -> Path:
        image = display_pixels(pic)
        caption = f"{Path(pic.source).name}" + (f" [{pic.frame}]" if pic.frame is not None else "")
        if self.contract.binary:
            drawn = overlay(image, None, mask, caption=caption)
        else:
            drawn = class_overlay(image, None, mask, [n for _, n in self.contract.labels], caption=caption)
        return write_png(self._claim(path, file.path), drawn)
