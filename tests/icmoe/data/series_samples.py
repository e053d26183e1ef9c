"""Generated DICOM series with the tags a scanner writes, for the series, SEG and DICOMweb tests.

One study holds a CT-like series (signed pixels, rescale -1024, a window), the same CT stack in
reversed slice order (InstanceNumber rising while the position falls), an oblique MR-like series
(unsigned, no window, MONOCHROME1) and an enhanced multi-frame MR made from it (highdicom's legacy
conversion). Files get random names, so name order says nothing about slice order. `bad_*` write
the broken inputs the readers must refuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# an oblique plane: rows turned 30 degrees about the z axis, columns tilted 20 degrees out of the axial plane
_c, _s, _t = np.cos(np.radians(30)), np.sin(np.radians(30)), np.radians(20)
OBLIQUE = (_c, _s, 0.0, -_s * np.cos(_t), _c * np.cos(_t), np.sin(_t))


@dataclass
class SeriesSpec:
    """What a generated series is: its UID and datasets in true slice order (first = lowest along the normal)."""

    uid: str
    description: str
    datasets: List  # pydicom Datasets, sorted along the normal
    files: List[Path]


def _uid() -> str:
    from pydicom.uid import generate_uid

    return generate_uid()


def study_tags(study_uid: str) -> Dict[str, object]:
    return {"StudyInstanceUID": study_uid, "PatientName": "Test^Phantom", "PatientID": "ICMOE-0001",
            "PatientBirthDate": "19700101", "PatientSex": "O", "StudyDate": "20261130", "StudyTime": "101500",
            "AccessionNumber": "A0001", "ReferringPhysicianName": "", "StudyID": "1",
            "StudyDescription": "icmoe phantom study"}


def phantom(rows: int, cols: int, n: int, seed: int) -> np.ndarray:
    """(n, rows, cols) float: a body ellipse with a brighter sphere in it, some noise."""
    z, y, x = np.mgrid[:n, :rows, :cols]
    body = ((y - rows / 2) / (rows * 0.42)) ** 2 + ((x - cols / 2) / (cols * 0.45)) ** 2 < 1
    ball = ((z - n / 2) / max(n * 0.4, 1)) ** 2 + ((y - rows * 0.45) / (rows * 0.2)) ** 2 \
        + ((x - cols * 0.55) / (cols * 0.2)) ** 2 < 1
    return body * 1.0 + ball * 1.5 + np.random.default_rng(seed).normal(0, 0.05, (n, rows, cols))


def make_series(study_uid: str, frame_uid: str, *, modality: str, number: int, description: str, rows: int,
                cols: int, n: int, spacing: float, orientation: Sequence[float] = AXIAL, origin=(-20.0, -25.0, 10.0),
                reverse_numbers: bool = False, seed: int = 0, photometric: str = "MONOCHROME2") -> List:
    """Classic single-frame CT or MR instances of one series, in slice order along the normal."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

    ct = modality == "CT"
    values = phantom(rows, cols, n, seed)
    stored = (values * 60 - 1000 + 1024).astype(np.int16) if ct else (values * 400 + 50).astype(np.uint16)
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    series_uid = _uid()
    out = []
    for k in range(n):
        ds = Dataset()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage if ct else MRImageStorage
        meta.MediaStorageSOPInstanceUID = _uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        for key, value in study_tags(study_uid).items():
            setattr(ds, key, value)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, series_uid, number
        ds.SeriesDescription, ds.Manufacturer, ds.BodyPartExamined = description, "icmoe-tests", "ABDOMEN"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.InstanceNumber = (n - k) if reverse_numbers else k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ContentDate, ds.ContentTime = "20261130", "101500"
        ds.ImageOrientationPatient = [float(f"{v:.6f}") for v in orientation]
        ds.ImagePositionPatient = [float(f"{v:.4f}") for v in np.asarray(origin) + k * spacing * normal]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.7], spacing
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        if ct:
            ds.PixelRepresentation, ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 1, -1024, "HU"
            ds.WindowCenter, ds.WindowWidth, ds.KVP = 40, 400, 120
        else:
            ds.PixelRepresentation, ds.ScanningSequence, ds.SequenceVariant = 0, "SE", "NONE"
            ds.ScanOptions, ds.MRAcquisitionType, ds.MagneticFieldStrength = "", "2D", 1.5
            ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = 12, 500, 1
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        out.append(ds)
    return out


def write_files(datasets: Sequence, folder: Path, rng: np.random.Generator, *, suffix: str = ".dcm") -> List[Path]:
    """Write instances under random names (name order is no slice order); returns paths in dataset order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / (f"{rng.integers(16 ** 10):010x}{suffix}")
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def enhanced_mr(datasets: Sequence):
    """An enhanced (legacy converted) MR multi-frame object made of classic MR instances (highdicom)."""
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    return LegacyConvertedEnhancedMRImage(list(datasets), series_instance_uid=_uid(), series_number=20,
                                          sop_instance_uid=_uid(), instance_number=1)


def write_study(folder: Path, *, seed: int = 0, rows: int = 36, cols: int = 44, n: int = 5,
                enhanced: bool = True) -> Dict[str, SeriesSpec]:
    """One study with several series in `folder` (all files in one folder, random names).

    Returns name -> SeriesSpec for "ct", "ct_reversed", "mr_oblique" and (with `enhanced`) "mr_enhanced".
    """
    rng = np.random.default_rng(seed)
    study, frame = _uid(), _uid()
    specs: Dict[str, SeriesSpec] = {}
    made = {
        "ct": make_series(study, frame, modality="CT", number=2, description="CT abdomen", rows=rows, cols=cols,
                          n=n, spacing=2.5, seed=seed),
        "ct_reversed": make_series(study, frame, modality="CT", number=3, description="CT reversed", rows=rows,
                                   cols=cols, n=n + 1, spacing=3.0, reverse_numbers=True, seed=seed + 1),
        "mr_oblique": make_series(study, frame, modality="MR", number=4, description="MR oblique", rows=cols,
                                  cols=rows, n=n, spacing=4.0, orientation=OBLIQUE, seed=seed + 2,
                                  photometric="MONOCHROME1"),
    }
    for name, datasets in made.items():
        files = write_files(datasets, folder, rng, suffix="" if name == "mr_oblique" else ".dcm")
        specs[name] = SeriesSpec(datasets[0].SeriesInstanceUID, datasets[0].SeriesDescription, datasets, files)
    if enhanced:
        classic = make_series(study, frame, modality="MR", number=5, description="MR source", rows=rows, cols=cols,
                              n=n, spacing=3.5, seed=seed + 3)
        mf = enhanced_mr(classic)
        path = folder / f"{rng.integers(16 ** 10):010x}.dcm"
        mf.save_as(str(path), enforce_file_format=True)
        specs["mr_enhanced"] = SeriesSpec(mf.SeriesInstanceUID, str(mf.get("SeriesDescription", "")), [mf], [path])
    return specs


def bad_mixed_sizes(folder: Path, seed: int = 5) -> SeriesSpec:
    """A series whose last slice is another size."""
    study, frame = _uid(), _uid()
    a = make_series(study, frame, modality="CT", number=7, description="mixed sizes", rows=32, cols=32, n=4,
                    spacing=2.0, seed=seed)
    b = make_series(study, frame, modality="CT", number=7, description="mixed sizes", rows=24, cols=32, n=5,
                    spacing=2.0, seed=seed)[-1]
    b.SeriesInstanceUID = a[0].SeriesInstanceUID
    files = write_files(a + [b], folder, np.random.default_rng(seed))
    return SeriesSpec(a[0].SeriesInstanceUID, "mixed sizes", a + [b], files)


def bad_no_pixels(folder: Path, seed: int = 6) -> SeriesSpec:
    """A series one of whose files has no pixel data."""
    study, frame = _uid(), _uid()
    ds = make_series(study, frame, modality="CT", number=8, description="no pixels", rows=32, cols=32, n=3,
                     spacing=2.0, seed=seed)
    del ds[1].PixelData
    files = write_files(ds, folder, np.random.default_rng(seed))
    return SeriesSpec(ds[0].SeriesInstanceUID, "no pixels", ds, files)


def shifted(datasets: Sequence, k: int, along_normal_mm: float, *, copy_position_of: Optional[int] = None) -> None:
    """Move slice k along the normal (uneven spacing), or onto slice `copy_position_of`'s position (duplicate)."""
    ds = datasets[k]
    if copy_position_of is not None:
        ds.ImagePositionPatient = list(datasets[copy_position_of].ImagePositionPatient)
        return
    o = np.asarray(ds.ImageOrientationPatient, float)
    normal = np.cross(o[:3], o[3:])
    ds.ImagePositionPatient = [float(f"{v:.4f}") for v in np.asarray(ds.ImagePositionPatient, float)
                               + along_normal_mm * normal]
