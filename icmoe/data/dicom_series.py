"""DICOM series as volumes: instances grouped by SeriesInstanceUID, slices ordered by their position along
the slice normal, checked for a consistent geometry, and turned into pictures as `images.py` turns a
single DICOM file (rescale, window, MONOCHROME1). Enhanced multi-frame objects give one slice per frame.

Details: docs/predict.md ("DICOM series").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from icmoe.core.errors import DataError, first_line
from icmoe.data.images import Picture, dicom_gray, dicom_rescale, dicom_window, is_dicom, pydicom_module
from icmoe.data.limits import DICOM_DEFER_BYTES, check_dicom_header, read_limits

log = logging.getLogger("icmoe.data")

# Objects that hold no image to segment (a segmentation, a report, a presentation state, RT objects).
NON_IMAGE_MODALITIES = ("SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "REG", "DOC", "PLAN")
# Gaps between neighbouring slices may differ from their median by this share of it; the same share of the
# median gap bounds how far a slice may sit beside the stack (a tilted gantry shifts them sideways).
SPACING_TOLERANCE = 0.01
ORIENTATION_TOLERANCE = 1e-4  # direction cosines of two slices that count as the same orientation
GRAY = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class FrameGeometry:
    """Where one frame of an instance lies, and how its values are mapped (from the instance's tags, or
    from the per-frame and shared functional groups of an enhanced multi-frame object)."""

    position: Optional[np.ndarray]  # (3,) ImagePositionPatient, mm
    orientation: Optional[np.ndarray]  # (6,) ImageOrientationPatient: row then column direction cosines
    spacing: Optional[Tuple[float, float]]  # PixelSpacing (between rows, between columns), mm
    rescale: Tuple[float, float]
    window: Optional[Tuple[float, float]]


@dataclass(frozen=True)
class SliceRef:
    """One slice of a series: frame `frame` of instance `instance` (None: a single-frame instance)."""

    instance: int
    frame: Optional[int]
    position: np.ndarray
    distance: float  # position projected on the slice normal, mm


@dataclass
class DicomSeries:
    """One series read as a volume.

    Attributes:
      uid, study_uid, frame_of_reference_uid, modality, description: from the instances.
      instances: the pydicom datasets (with pixel data), in the order their first slice appears.
      sources: where each instance came from (a file path, or a label for one retrieved over the network).
      slices: the volume's slices, ordered by their distance along the normal (never by file name or
        InstanceNumber).
      orientation: (6,) the series' ImageOrientationPatient; pixel_spacing (row, column) mm or None;
        slice_spacing: the median gap between slices, mm (None for one slice).
      pictures: one per slice, in volume order: float32 (H, W) 0..255.
    """

    uid: str
    study_uid: str
    frame_of_reference_uid: Optional[str]
    modality: str
    description: str
    instances: List[Any]
    sources: List[str]
    slices: List[SliceRef]
    orientation: np.ndarray
    pixel_spacing: Optional[Tuple[float, float]]
    slice_spacing: Optional[float]
    pictures: List[Picture] = field(default_factory=list)

    @property
    def label(self) -> str:
        """How messages name the series."""
        return series_label(self.uid, self.description)

    @property
    def normal(self) -> np.ndarray:
        return slice_normal(self.orientation)


def series_label(uid: str, description: str = "") -> str:
    return f"series {uid}" + (f" ({description})" if description else "")


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    """The unit normal of slices with this ImageOrientationPatient (row x column direction)."""
    n = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    return n / np.linalg.norm(n)


def _floats(value: Any, n: int) -> Optional[np.ndarray]:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.isfinite(arr).all() else None


def _item(ds: Any, keyword: str) -> Optional[Any]:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _group_value(per_frame: Any, shared: Any, sequence: str) -> Optional[Any]:
    """The first item of a functional group macro, from the frame's own groups or else the shared ones."""
    for groups in (per_frame, shared):
        item = _item(groups, sequence) if groups is not None else None
        if item is not None:
            return item
    return None


def _geometry(position: Any, orientation: Any, measures: Any, transform: Any, voi: Any) -> FrameGeometry:
    spacing = _floats(measures.get("PixelSpacing", []), 2) if measures is not None else None
    return FrameGeometry(
        position=_floats(position.get("ImagePositionPatient", []), 3) if position is not None else None,
        orientation=_floats(orientation.get("ImageOrientationPatient", []), 6) if orientation is not None else None,
        spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        rescale=dicom_rescale(transform) if transform is not None else (1.0, 0.0),
        window=dicom_window(voi) if voi is not None else None)


def frame_geometries(ds: Any) -> List[FrameGeometry]:
    """The geometry of every frame of an instance: the top-level tags of a classic image, the functional
    groups (per-frame over shared) of an enhanced multi-frame one."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame:
        shared = _item(ds, "SharedFunctionalGroupsSequence")
        return [_geometry(*(_group_value(f, shared, s) for s in (
            "PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence",
            "PixelValueTransformationSequence", "FrameVOILUTSequence"))) for f in per_frame]
    n = int(ds.get("NumberOfFrames", 1) or 1)
    g = _geometry(ds, ds, ds, ds, ds)
    # a classic multi-frame object has one position for all frames: they cannot be placed
    return [g] if n == 1 else [FrameGeometry(None, None, g.spacing, g.rescale, g.window)] * n


def has_geometry(ds: Any) -> bool:
    """True where any frame of the instance has a position and an orientation."""
    return any(g.position is not None and g.orientation is not None for g in frame_geometries(ds))


def is_image(ds: Any) -> bool:
    """False for objects that hold no image to segment (SEG, SR, presentation states, RT objects)."""
    return str(ds.get("Modality", "")).upper() not in NON_IMAGE_MODALITIES


# ----------------------------------------------------------------------------- reading and grouping


def read_dicom(path: Path, *, headers_only: bool = False) -> Any:
    """A DICOM file's dataset (pixel data left out with `headers_only`).

    Raises:
      DataError: "<file>: <why>"; MissingExtra without pydicom.
    """
    pydicom = pydicom_module(path)
    try:  # large values (the pixel data) are read only once the header passed the checks
        ds = pydicom.dcmread(str(path), stop_before_pixels=headers_only, force=True, defer_size=DICOM_DEFER_BYTES)
    except Exception as e:  # pydicom raises many kinds on damaged files
        raise DataError(f"{path}: unreadable DICOM file ({type(e).__name__}: {first_line(e)})") from None
    if not headers_only and ("PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds):
        check_dicom_header(path, ds, read_limits())
    return ds


@dataclass
class SeriesGroup:
    """The instances of one series, not read yet: uid, description, and (source, header dataset) pairs."""

    uid: str
    description: str
    members: List[Tuple[str, Any]]

    @property
    def label(self) -> str:
        return series_label(self.uid, self.description)


def group_series(headers: Iterable[Tuple[str, Any]]) -> Tuple[List[SeriesGroup], List[str], List[str]]:
    """Sort DICOM instances into series to read as volumes and files to read alone.

    Arguments:
      headers: (source, dataset) pairs, e.g. from `read_dicom(path, headers_only=True)`.

    Returns:
      (series groups in order of first appearance, sources to read one by one as before (no
      SeriesInstanceUID, or no instance of the series has a position), non-image objects left out).
    """
    groups: Dict[str, SeriesGroup] = {}
    singles: List[str] = []
    others: List[str] = []
    for source, ds in headers:
        if not is_image(ds):
            others.append(source)
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            singles.append(source)
            continue
        group = groups.setdefault(uid, SeriesGroup(uid, str(ds.get("SeriesDescription", "") or ""), []))
        group.members.append((source, ds))
    series = []
    for group in groups.values():
        if any(has_geometry(ds) for _, ds in group.members):
            series.append(group)
        else:  # e.g. secondary captures: pictures without a place in space
            singles += [source for source, _ in group.members]
    return series, singles, others


# ----------------------------------------------------------------------------- one series


def _frame_pixels(ds: Any, source: str, where: str) -> np.ndarray:
    """The stored frames (N, H, W) of a gray instance."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DataError(f"{where}: {source}: DICOM file has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if int(ds.get("SamplesPerPixel", 1)) != 1 or photometric not in GRAY:
        raise DataError(f"{where}: {source}: only gray images make a volume (photometric {photometric!r})")
    try:
        arr = np.asarray(ds.pixel_array)
    except Exception as e:  # pydicom and its decoders raise many kinds
        raise DataError(f"{where}: {source}: unreadable pixel data ({type(e).__name__}: {first_line(e)})") from None
    return arr[None] if arr.ndim == 2 else arr


Placed = List[Tuple[SliceRef, FrameGeometry]]


def _placed_slices(items: Sequence[Tuple[str, Any]], where: str) -> Tuple[Placed, np.ndarray]:
    """Every frame of every instance with its geometry, checked: all placed, one size, one orientation."""
    refs: Placed = []
    sizes: Dict[Tuple[int, int], int] = {}
    orientation: Optional[np.ndarray] = None
    for i, (source, ds) in enumerate(items):
        size = (int(ds.get("Rows", 0)), int(ds.get("Columns", 0)))
        sizes[size] = sizes.get(size, 0) + 1
        geoms = frame_geometries(ds)
        multi = len(geoms) > 1 or ds.get("PerFrameFunctionalGroupsSequence") is not None
        for k, g in enumerate(geoms):
            if g.position is None or g.orientation is None:
                what = f"frame {k} of {source}" if multi else source
                raise DataError(f"{where}: {what} has no ImagePositionPatient/ImageOrientationPatient")
            if orientation is None:
                orientation = g.orientation
            elif not np.allclose(g.orientation, orientation, atol=ORIENTATION_TOLERANCE):
                raise DataError(f"{where}: mixed orientations ({_fmt(orientation)} and {_fmt(g.orientation)} "
                                f"in {source})")
            refs.append((SliceRef(i, k if multi else None, g.position, 0.0), g))
    if len(sizes) > 1:
        common_first = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))
        listed = " and ".join(f"{r}x{c} ({n} instance{'s' * (n > 1)})" for (r, c), n in common_first)
        raise DataError(f"{where}: mixed image sizes: {listed}")
    assert orientation is not None
    return refs, orientation


def _fmt(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in np.round(values, 4)) + "]"


def _check_stack(refs: List[SliceRef], normal: np.ndarray, sources: Sequence[str], where: str) -> Optional[float]:
    """Slices (sorted by distance) at distinct, evenly spaced positions along the normal; returns the spacing."""
    if len(refs) < 2:
        return None
    d = np.array([r.distance for r in refs])
    gaps = np.diff(d)
    median = float(np.median(gaps))
    for k, gap in enumerate(gaps):
        if gap <= max(1e-3, SPACING_TOLERANCE * median):
            a, b = refs[k], refs[k + 1]
            raise DataError(f"{where}: two slices at the same position ({d[k]:.3f} mm along the normal: "
                            f"{_where(a, sources)} and {_where(b, sources)})")
    if float(np.abs(gaps - median).max()) > SPACING_TOLERANCE * median:
        raise DataError(f"{where}: uneven slice spacing ({gaps.min():.4g} to {gaps.max():.4g} mm, median "
                        f"{median:.4g} mm; tolerance {SPACING_TOLERANCE:.0%})")
    sideways = np.array([r.position - r.distance * normal for r in refs])
    if float(np.abs(sideways - sideways[0]).max()) > SPACING_TOLERANCE * median:
        raise DataError(f"{where}: slices are not stacked along their normal (shifted sideways, e.g. a tilted "
                        "gantry)")
    return median


def _where(ref: SliceRef, sources: Sequence[str]) -> str:
    return sources[ref.instance] + ("" if ref.frame is None else f" frame {ref.frame}")


def series_from_datasets(items: Sequence[Tuple[str, Any]], *, window: Optional[Tuple[float, float]] = None
                         ) -> DicomSeries:
    """One series as a volume from its instances (with pixel data).

    Arguments:
      items: (source, dataset) of every instance of one series (any order).
      window: (low, high) of rescaled values mapped to 0..255 for every slice (e.g. a CT window, as a
        3-D dataset's training used); None: each slice's WindowCenter/Width, else its own min..max.

    Raises:
      DataError: "series <uid> (<description>): <why>": no pixel data, a slice without a position,
        mixed sizes, orientations or pixel spacings, two slices at one position, uneven spacing.
    """
    first = items[0][1]
    uid, description = str(first.get("SeriesInstanceUID", "")), str(first.get("SeriesDescription", "") or "")
    where = series_label(uid, description)
    placed, orientation = _placed_slices(items, where)
    normal = slice_normal(orientation)
    placed = [(SliceRef(r.instance, r.frame, r.position, float(r.position @ normal)), g) for r, g in placed]
    placed.sort(key=lambda rg: rg[0].distance)
    sources = [s for s, _ in items]
    spacing = _check_stack([r for r, _ in placed], normal, sources, where)
    spacings = {g.spacing for _, g in placed}
    if len(spacings) > 1:
        raise DataError(f"{where}: mixed pixel spacings ({', '.join(map(str, sorted(spacings, key=str)))})")
    pictures = _pictures(items, placed, window, where)
    return DicomSeries(uid=uid, study_uid=str(first.get("StudyInstanceUID", "")),
                       frame_of_reference_uid=first.get("FrameOfReferenceUID"), modality=str(first.get("Modality", "")),
                       description=description, instances=[ds for _, ds in items], sources=sources,
                       slices=[r for r, _ in placed], orientation=orientation, pixel_spacing=spacings.pop(),
                       slice_spacing=spacing, pictures=pictures)


def _pictures(items: Sequence[Tuple[str, Any]], placed: Placed,
              window: Optional[Tuple[float, float]], where: str) -> List[Picture]:
    """One float32 0..255 picture per slice, in volume order (each instance decoded once)."""
    frames = [_frame_pixels(ds, source, where) for source, ds in items]
    pictures = []
    for z, (ref, g) in enumerate(placed):
        source, ds = items[ref.instance]
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
        use = window if window is not None else g.window
        raw = frames[ref.instance][ref.frame or 0][None]
        values = dicom_gray(raw, g.rescale, use, photometric, f"{where}: {source}")[0]
        info = {"format": "dicom-series", "series": str(ds.get("SeriesInstanceUID", "")), "slice": z,
                "photometric": photometric, "rescale": list(g.rescale),
                "intensity": "window {:g}..{:g} -> 0..255".format(*use) if use else "min-max per slice"}
        pictures.append(Picture(values, source, ref.frame, info))
    return pictures


def load_series(group: SeriesGroup, *, window: Optional[Tuple[float, float]] = None) -> DicomSeries:
    """Read the files of a series group (pixel data too) and make the volume (`series_from_datasets`)."""
    items = []
    for source, _ in group.members:
        try:
            items.append((source, read_dicom(Path(source))))
        except DataError as e:
            raise DataError(f"{group.label}: {e}") from None
    return series_from_datasets(items, window=window)


def read_dicom_series(paths: Iterable[Any], *, window: Optional[Tuple[float, float]] = None) -> List[DicomSeries]:
    """Every series among DICOM files (folders are searched recursively for files with the DICM tag or a
    DICOM suffix), as volumes; files that are no series of placed slices are left out (logged).

    Raises:
      DataError: the first unreadable file or inconsistent series.
    """
    files: List[Path] = []
    for p in map(Path, paths):
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    headers = [(str(f), read_dicom(f, headers_only=True)) for f in files if _looks_dicom(f)]
    groups, singles, others = group_series(headers)
    if singles or others:
        log.info(f"left out {len(singles) + len(others)} DICOM files that are no series of placed slices")
    return [load_series(g, window=window) for g in groups]


def _looks_dicom(path: Path) -> bool:
    try:
        return is_dicom(path)
    except DataError:
        return False
