"""DICOM Segmentation (SEG) objects of a predicted series, made with highdicom (the `dicom` extra).

One SEG per series: BINARY (or FRACTIONAL: probabilities from the `logits` output), one segment per
foreground label, labels from the build's class names, coded concepts from its manifest (or a
`--seg-codes` file), algorithm type AUTOMATIC with the model's identification, frames referencing their
source instances at the source's plane positions, empty frames left out, in the source's study and
frame of reference. docs/clinical.md.
"""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from icmoe.core.codes import Concept, SegmentCode, segment_label
from icmoe.core.errors import DataError, first_line
from icmoe.core.extras import require
from icmoe.core.io import atomic_path
from icmoe.data.dicom_series import DicomSeries

SEG_TYPES = ("binary", "fractional")
# What every SEG says of itself (SeriesDescription is at most 64 characters).
RESEARCH_ONLY = "RESEARCH USE ONLY - not for diagnosis"
SERIES_NUMBER_OFFSET = 1000  # a SEG's series number: its source's plus this


@dataclass(frozen=True)
class SegSpec:
    """What a SEG says of the model, the same for every series of a run.

    Attributes:
      seg_type: "binary" or "fractional".
      labels: (label value, class name) of each foreground label; binary models: [(1, "foreground")].
      binary: the model's mask is 0/1 (segments are then named by their code's type).
      codes: one coded entry per label (`icmoe.core.codes`).
      model: the algorithm identification: family, config, precision, engine, build_sha256.
    """

    seg_type: str
    labels: Tuple[Tuple[int, str], ...]
    binary: bool
    codes: Tuple[SegmentCode, ...]
    model: Dict[str, str]

    @property
    def version(self) -> str:
        try:
            return md.version("icmoe")
        except md.PackageNotFoundError:
            return "unknown"


def highdicom() -> Any:
    """highdicom, or a one-line MissingExtra naming the dicom extra."""
    return require("highdicom", "dicom", "writing DICOM SEG")


def _coded(c: Concept) -> Any:
    return highdicom().sr.CodedConcept(value=c["value"], scheme_designator=c["scheme"], meaning=c["meaning"])


def segment_descriptions(spec: SegSpec) -> List[Any]:
    """One highdicom SegmentDescription per foreground label (AUTOMATIC, with the algorithm identification)."""
    hd = highdicom()
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"icmoe {spec.model['family']}/{spec.model['config']}"[:64], version=spec.version[:64],
        family=codes.cid7162.ArtificialIntelligence, source="icmoe",
        parameters={k: str(v)[:64] for k, v in spec.model.items()})
    out = []
    for (value, name), code in zip(spec.labels, spec.codes):
        desc = hd.seg.SegmentDescription(
            segment_number=int(value), segment_label=segment_label(code, None if spec.binary else name)[:64],
            segmented_property_category=_coded(code["category"]), segmented_property_type=_coded(code["type"]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        if "modifier" in code:  # e.g. laterality: right kidney = kidney + "Right"
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                _coded(code["modifier"])]
        out.append(desc)
    return out


def _source_order(series: DicomSeries) -> Tuple[List[Any], np.ndarray]:
    """(source images as highdicom takes them, index of the volume slice for each source frame).

    Single-frame instances: one per slice, in volume order. One multi-frame instance: its frames in
    stored order (highdicom matches SEG frames to source frames by index)."""
    multi = [r for r in series.slices if r.frame is not None]
    if not multi:
        return [series.instances[r.instance] for r in series.slices], np.arange(len(series.slices))
    if len(series.instances) != 1:
        raise DataError(f"{series.label}: a SEG of a series of several multi-frame instances is not supported")
    order = np.empty(len(series.slices), dtype=np.int64)
    for z, r in enumerate(series.slices):
        order[r.frame] = z
    return [series.instances[0]], order


def make_seg(series: DicomSeries, masks: np.ndarray, spec: SegSpec,
             probabilities: Optional[np.ndarray] = None) -> Any:
    """The SEG of one predicted series.

    Arguments:
      series: the source series (`icmoe.data.dicom_series`).
      masks: uint8 (Z, H, W) label values, slice z of `series.slices`.
      spec: labels, codes, type and model identification.
      probabilities: float32 (Z, H, W, K) in 0..1 per foreground label, for "fractional".

    Returns:
      a highdicom Segmentation (a pydicom Dataset).

    Raises:
      DataError: a series highdicom cannot describe (one line naming it).
    """
    hd = highdicom()
    sources, order = _source_order(series)
    if spec.seg_type == "fractional":
        if probabilities is None:
            raise DataError(f"{series.label}: a FRACTIONAL SEG needs the model's probabilities")
        pixels = np.ascontiguousarray(probabilities[order], dtype=np.float32)
        seg_type = hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        pixels, seg_type = np.ascontiguousarray(masks[order], dtype=np.uint8), hd.seg.SegmentationTypeValues.BINARY
    first = series.instances[0]
    try:
        return hd.seg.Segmentation(
            source_images=sources, pixel_array=pixels, segmentation_type=seg_type,
            segment_descriptions=segment_descriptions(spec), series_instance_uid=hd.UID(),
            series_number=int(first.get("SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="icmoe", manufacturer_model_name=_model_name(spec),
            software_versions=spec.version[:64], device_serial_number=spec.model.get("build_sha256", "")[:16] or "none",
            series_description=f"{RESEARCH_ONLY}"[:64], content_label="ICMOE",
            content_description=f"{spec.model['family']}/{spec.model['config']} {RESEARCH_ONLY}"[:64],
            omit_empty_frames=True)
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # highdicom's checks of the source
        raise DataError(f"{series.label}: cannot make a SEG ({type(e).__name__}: {first_line(e)})") from None


def _model_name(spec: SegSpec) -> str:
    return f"{spec.model['family']}/{spec.model['config']} {spec.model.get('precision', '')}".strip()[:64]


def write_seg(path: Path, seg: Any) -> Path:
    """Write a SEG atomically (a temporary file renamed into place)."""
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp), enforce_file_format=True)
    return Path(path)
