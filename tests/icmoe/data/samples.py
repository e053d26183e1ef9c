"""Real files of every kind `icmoe.data.images` reads, written here by Pillow, pydicom and nibabel.

`write_samples(folder)` writes one file of each kind, all of different sizes, one of them
corrupt, and returns what the tests check against: name -> `Sample` (the expected pictures'
sizes, frames, and for DICOM/NIfTI the raw values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

AFFINE = np.array([[0.8, 0.0, 0.0, -12.0], [0.0, 0.9, 0.0, 7.5], [0.0, 0.0, 2.5, 30.0], [0.0, 0.0, 0.0, 1.0]])
EXIF_ROTATE_90_CW = 6  # display = stored turned 90 degrees clockwise
CORRUPT = "c_broken.png"


@dataclass
class Sample:
    """One written file: its pictures' (H, W) sizes, frame indices, and extra facts for checks."""

    path: Path
    sizes: List[Tuple[int, int]]
    frames: List[Optional[int]]
    facts: Dict[str, Any] = field(default_factory=dict)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def blob_image(h: int, w: int, seed: int, channels: int = 0) -> np.ndarray:
    """uint8 (h, w) or (h, w, channels): a bright disc on a textured dark background (the model sees structure)."""
    yy, xx = np.mgrid[:h, :w]
    disc = ((yy - h * 0.45) ** 2 + (xx - w * 0.55) ** 2) < (min(h, w) * 0.3) ** 2
    base = 40 + 150 * disc + _rng(seed).normal(0, 12, (h, w))
    img = np.clip(base, 0, 255).astype(np.uint8)
    if channels:  # channel c a little brighter: a colour image whose channels differ
        img = np.stack([np.clip(img.astype(int) + 15 * c, 0, 255).astype(np.uint8) for c in range(channels)], axis=-1)
    return img


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", slope: Optional[float] = None,
                intercept: Optional[float] = None, window: Optional[Tuple[float, float]] = None) -> Path:
    """A DICOM file (Secondary Capture, explicit VR little endian) of uint16 (H, W) or (N, H, W) pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    arr = np.ascontiguousarray(pixels, dtype=np.uint16)
    if arr.ndim == 3:
        ds.NumberOfFrames = arr.shape[0]
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept or 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = arr.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def write_nifti(path: Path, volume: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(volume, affine), str(path))
    return path


def write_samples(folder: Path) -> Dict[str, Sample]:
    """One file of each kind under `folder` (two in a sub-folder), different sizes, one corrupt (CORRUPT)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    s: Dict[str, Sample] = {}

    p = folder / "a_gray8.png"
    Image.fromarray(blob_image(40, 52, 1), "L").save(p)
    s["gray8"] = Sample(p, [(40, 52)], [None])

    p = folder / "b_gray16.png"  # 12-bit data in a 16-bit PNG: convert("RGB") would clip it to white
    g16 = (blob_image(45, 60, 2).astype(np.uint16) * 16 + 200).astype(np.uint16)
    Image.fromarray(g16).save(p)
    s["gray16"] = Sample(p, [(45, 60)], [None], {"raw": g16})

    p = folder / CORRUPT
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    s["corrupt"] = Sample(p, [], [])

    p = folder / "d_rgba.png"
    rgba = np.concatenate([blob_image(41, 37, 3, 3), np.full((41, 37, 1), 128, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(p)
    s["rgba"] = Sample(p, [(41, 37)], [None])

    p = folder / "e_palette.png"
    Image.fromarray(blob_image(30, 34, 4, 3), "RGB").convert("P", palette=Image.ADAPTIVE, colors=16).save(p)
    s["palette"] = Sample(p, [(30, 34)], [None])

    p = folder / "f_photo.jpg"  # stored 64 wide x 48 high, shown turned: 48 wide x 64 high
    stored = blob_image(48, 64, 5, 3)
    stored[:6, :6] = 255  # a white corner marker (top-left as stored)
    exif = Image.Exif()
    exif[0x0112] = EXIF_ROTATE_90_CW
    Image.fromarray(stored, "RGB").save(p, quality=95, exif=exif)
    s["jpeg"] = Sample(p, [(64, 48)], [None], {"stored": stored})

    p = folder / "g_image.bmp"
    Image.fromarray(blob_image(27, 33, 6, 3), "RGB").save(p)
    s["bmp"] = Sample(p, [(27, 33)], [None])

    p = folder / "h_image.tif"
    Image.fromarray(blob_image(38, 45, 7), "L").save(p)
    s["tiff"] = Sample(p, [(38, 45)], [None])

    raw = (blob_image(50, 40, 8).astype(np.uint16) * 10)  # 0..2550 stored values
    p = write_dicom(folder / "i_mono1.dcm", raw, photometric="MONOCHROME1", slope=2.0, intercept=-100.0,
                    window=(1500.0, 2000.0))
    s["dicom_mono1"] = Sample(p, [(50, 40)], [None], {"raw": raw, "slope": 2.0, "intercept": -100.0,
                                                     "window": (1500.0, 2000.0)})

    frames = np.stack([blob_image(24, 28, 9 + k).astype(np.uint16) * (k + 1) * 50 for k in range(3)])
    p = write_dicom(folder / "sub" / "j_multi.dcm", frames)
    s["dicom_multi"] = Sample(p, [(24, 28)] * 3, [0, 1, 2], {"raw": frames})

    vol = np.stack([blob_image(30, 26, 20 + z).astype(np.float32) * 4 - 500 for z in range(4)], axis=-1)  # (X, Y, Z)
    p = write_nifti(folder / "sub" / "k_volume.nii.gz", vol)
    s["nifti"] = Sample(p, [(30, 26)] * 4, [0, 1, 2, 3], {"raw": vol})
    return s
