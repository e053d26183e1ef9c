"""Reading image files of any common kind into 2-D pictures, and the resizes between a picture and a model.

Every reader checks a file's header against the limits of `icmoe.data.limits` before its pixel data is
read. Details: docs/predict.md.
"""

from __future__ import annotations

import gzip
import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from PIL import Image, ImageOps, UnidentifiedImageError

from icmoe.core.errors import DataError, first_line
from icmoe.core.extras import require
from icmoe.core.io import PathLike, atomic_write_bytes
from icmoe.data.limits import (
    DICOM_DEFER_BYTES,
    MAX_IMAGE_PIXELS_ENV,
    PNG_SIGNATURE,
    ReadLimits,
    check_decoded_bytes,
    check_dicom_header,
    check_file_size,
    check_nifti_header,
    check_palette,
    check_picture_size,
    check_png,
    read_limits,
)

# Files a folder is searched for (a file named on its own is read whatever its name).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
EXIF_ORIENTATION = 0x0112

# What Pillow, its plugins and zlib raise on a damaged, truncated or foreign file.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, KeyError, IndexError, TypeError, struct.error,
               zlib.error, Image.DecompressionBombError)
# What nibabel, gzip and zlib raise on a damaged, truncated or foreign file.
_NIFTI_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError, HeaderDataError)
# Pillow modes holding more than 8 bits of gray: mapped to 0..255 by their range.
_WIDE_GRAY_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")
_GRAY_MODES = ("1", "L", "LA", "La")


@dataclass
class Picture:
    """One 2-D image, at its own size.

    Attributes:
      pixels: uint8 (H, W) gray or (H, W, 3) RGB; or float32 (H, W) gray in 0..255 (DICOM, NIfTI).
      source: the file it came from (or a label such as "<array 0>" for an image given in memory).
      frame: its index in a multi-frame file (DICOM frame, TIFF page, NIfTI slice along the last axis),
        None for a single-image file.
      info: how it was read (format, mode, intensity mapping), JSON-able.
    """

    pixels: np.ndarray
    source: str
    frame: Optional[int] = None
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> Tuple[int, int]:
        """(H, W)."""
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


@dataclass
class ImageFile:
    """The pictures of one file.

    Attributes:
      path: the file.
      format: "png", "jpeg", "bmp", "tiff" (or another Pillow format, lower case), "dicom" or "nifti".
      pictures: one per image, frame or slice, in order.
      nifti: the nibabel image of a NIfTI file (affine and header, for `write_nifti_labels`), else None.
    """

    path: Path
    format: str
    pictures: List[Picture]
    nifti: Optional[Any] = None

    @property
    def multi(self) -> bool:
        """True for files that hold frames or slices (their pictures have a `frame` index)."""
        return self.pictures[0].frame is not None


# ----------------------------------------------------------------------------- intensities


def scale_to_0_255(image: np.ndarray, window: Optional[Tuple[float, float]] = None) -> np.ndarray:
    """Map an (H, W) or (Z, H, W) float32 array to 0..255 in place: `window` (low, high) linearly with
    clipping, or each (H, W) plane's own min..max (a constant plane becomes all 0).

    Returns:
      the same array.
    """
    if window is not None:
        lo, hi = (np.float32(v) for v in window)
        np.clip(image, lo, hi, out=image)
        image -= lo
        image /= hi - lo  # divide first: the window's top maps to exactly 1, then exactly 255
        image *= np.float32(255)
        return image
    lo = image.min(axis=(-2, -1), keepdims=True)
    span = image.max(axis=(-2, -1), keepdims=True) - lo
    image -= lo  # a constant plane is now all 0 and stays 0: it is not divided (span 0)
    np.divide(image, span, out=image, where=span > 0)
    image *= np.float32(255)
    return image


def range_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Any numeric (H, W) or (H, W, C) array mapped by its own min..max to uint8 0..255 (rounded)."""
    a = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(a).all():
        raise DataError("image has NaN or infinite values")
    flat = scale_to_0_255(a.reshape(1, -1).copy())  # one range over every pixel and channel
    return np.rint(flat).astype(np.uint8).reshape(a.shape)


# ----------------------------------------------------------------------------- Pillow images


def exif_oriented(im: Image.Image) -> Tuple[Image.Image, int]:
    """`im` turned as its EXIF orientation tag says (a viewer's orientation), and that tag (1: as stored)."""
    try:
        orientation = int(im.getexif().get(EXIF_ORIENTATION, 1))
    except _PIL_ERRORS:  # a damaged EXIF block: the pixels may still be fine
        return im, 1
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(im), orientation
    return im, 1


def _pil_pixels(im: Image.Image) -> Tuple[np.ndarray, Dict[str, Any]]:
    """uint8 (H, W) gray or (H, W, 3) RGB pixels of a loaded Pillow image, and how they were made."""
    info: Dict[str, Any] = {"mode": im.mode}
    if im.mode == "P":  # Pillow pads a short palette with black; an index beyond it is damage
        check_palette(int(im.getextrema()[1]), len(im.getpalette() or []) // 3)
    if im.mode in _WIDE_GRAY_MODES:
        arr = np.asarray(im)
        info["intensity"] = f"min-max {float(arr.min()):g}..{float(arr.max()):g} -> 0..255"
        return range_to_uint8(arr), info
    if im.mode in _GRAY_MODES:
        return np.asarray(im.convert("L"), dtype=np.uint8), info
    # RGB as is; palette, RGBA, CMYK, YCbCr, ... as Pillow converts them (alpha dropped, not composited)
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8), info


def picture_from_pil(im: Image.Image, source: str = "<image>", frame: Optional[int] = None) -> Picture:
    """A Picture of a Pillow image (EXIF orientation applied; modes as in the module docstring).

    Raises:
      DataError: "<source>: <why>" for pixels that cannot be used (a palette index beyond the palette, NaN).
    """
    im.load()
    im, orientation = exif_oriented(im)
    try:
        pixels, info = _pil_pixels(im)
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    if orientation != 1:
        info["exif_orientation"] = orientation
    return Picture(pixels, source, frame, info)


def _open_pil(path: Path, limits: ReadLimits) -> Image.Image:
    """Pillow's image of a file, header only, within the pixel limit (Pillow's own decompression-bomb
    limit is set to it, and its warning between the limit and twice the limit made an error); a PNG's
    file is checked whole first (`check_png`: CRCs, the rows its image data holds)."""
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    with open(path, "rb") as f:
        head = f.read(len(PNG_SIGNATURE))
    source: Any = path
    if head == PNG_SIGNATURE:
        check_file_size(path, limits)
        data = path.read_bytes()
        check_png(path, data, limits)
        source = io.BytesIO(data)
    with warnings.catch_warnings():  # a local filter: Python restores the previous ones on leaving
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(source)


def _pil_pictures(im: Image.Image, path: Path, fmt: str, first_only: bool, limits: ReadLimits) -> List[Picture]:
    """Every page (TIFF) or the first frame, each checked against the limits before it is decoded."""
    n = getattr(im, "n_frames", 1) if fmt == "tiff" and not first_only else 1
    pictures, decoded = [], 0
    for k in range(n):
        im.seek(k)
        check_picture_size(path, im.height, im.width, limits)
        decoded += im.height * im.width * 3
        check_decoded_bytes(path, f"{k + 1} page(s)", decoded, limits)
        pictures.append(picture_from_pil(im, str(path), k if n > 1 else None))
    return pictures


def _read_pil(path: Path, first_only: bool, limits: ReadLimits) -> ImageFile:
    try:
        with _open_pil(path, limits) as im:
            fmt = (im.format or "image").lower()
            fmt = "jpeg" if fmt == "mpo" else fmt  # camera JPEGs with a preview frame
            pictures = _pil_pictures(im, path, fmt, first_only, limits)
    except UnidentifiedImageError:
        raise DataError(f"{path}: unreadable image (not a format Pillow knows, or a damaged header)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: image above the limit of {limits.max_pixels} pixels ({MAX_IMAGE_PIXELS_ENV}): "
                        f"{first_line(e)}") from None
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"{path}: not enough memory to decode the image") from None
    except _PIL_ERRORS as e:
        raise DataError(f"{path}: unreadable image ({type(e).__name__}: {first_line(e)})") from None
    for p in pictures:
        p.info["format"] = fmt
    return ImageFile(path, fmt, pictures)


# ----------------------------------------------------------------------------- DICOM


def pydicom_module(path: Any) -> Any:
    """pydicom, or a `MissingExtra` naming the file and the extra (an install problem: never skipped as a bad file)."""
    return require("pydicom", "dicom", f"{path}: reading DICOM")


def _first(value: Any) -> float:
    """The first of a DICOM multi-value (WindowCenter may hold several), as float."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def dicom_window(item: Any) -> Optional[Tuple[float, float]]:
    """(low, high) of the first WindowCenter/WindowWidth pair of a dataset (or a functional group item,
    DICOM's linear VOI function), or None where there is none or it is unusable (width <= 1)."""
    if "WindowCenter" not in item or "WindowWidth" not in item:
        return None
    try:
        c, w = _first(item.WindowCenter), _first(item.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return None
    if not (np.isfinite(c) and np.isfinite(w)) or w <= 1:
        return None
    # PS3.3 C.11.2.1.2: x <= c - 0.5 - (w - 1) / 2 -> 0, x > c - 0.5 + (w - 1) / 2 -> 255, linear between
    return c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2


def dicom_rescale(item: Any) -> Tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of a dataset or functional group item; (1, 0) where absent."""
    return float(item.get("RescaleSlope", 1) or 1), float(item.get("RescaleIntercept", 0) or 0)


def dicom_gray(frames: np.ndarray, rescale: Tuple[float, float], window: Optional[Tuple[float, float]],
               photometric: str, where: Any) -> np.ndarray:
    """Stored gray values (N, H, W) -> float32 0..255: rescale slope/intercept, then `window` (low, high)
    linearly (else each frame's own min..max), then MONOCHROME1 inverted (PS3.3: after the VOI function).

    Raises:
      DataError: values that are not finite after rescaling (naming `where`).
    """
    slope, intercept = rescale
    values = frames.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if not np.isfinite(values).all():
        raise DataError(f"{where}: DICOM pixel values are not finite after rescaling")
    scale_to_0_255(values, window)
    if photometric == "MONOCHROME1":  # low values are white
        values = np.float32(255) - values
    return values


def _dicom_pixels(ds: Any, path: Path) -> Tuple[np.ndarray, bool]:
    """(frames, rgb): float32 (N, H, W) (or uint8-valued (N, H, W, 3) for colour) and whether it is RGB."""
    arr = np.asarray(ds.pixel_array)
    rgb = int(ds.get("SamplesPerPixel", 1)) == 3
    if arr.ndim == (3 if rgb else 2):  # a single frame
        arr = arr[None]
    if arr.ndim != (4 if rgb else 3):
        raise DataError(f"{path}: DICOM pixel data of shape {arr.shape} is not {'RGB ' if rgb else ''}frames")
    return arr, rgb


def _read_dicom(path: Path, first_only: bool, limits: ReadLimits) -> ImageFile:
    pydicom = pydicom_module(path)
    try:  # large values (the pixel data) are read only once the header passed the checks
        ds = pydicom.dcmread(str(path), force=path.suffix.lower() in DICOM_SUFFIXES, defer_size=DICOM_DEFER_BYTES)
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise DataError(f"{path}: DICOM file has no pixel data")
        check_dicom_header(path, ds, limits)
        arr, rgb = _dicom_pixels(ds, path)
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"{path}: not enough memory to decode the DICOM pixel data") from None
    except Exception as e:  # pydicom and its decoders raise many kinds (missing handler, bad lengths, ...)
        raise DataError(f"{path}: unreadable DICOM file ({type(e).__name__}: {first_line(e)})") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if first_only:
        arr = arr[:1]
    if rgb:
        pixels = [p.astype(np.uint8) if p.dtype == np.uint8 else range_to_uint8(p) for p in arr]
        info: Dict[str, Any] = {"format": "dicom", "photometric": photometric}
    else:
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise DataError(f"{path}: DICOM photometric interpretation {photometric!r} is not supported")
        pixels, info = _dicom_gray(ds, arr, photometric, path)
    multi = len(pixels) > 1 or int(ds.get("NumberOfFrames", 1) or 1) > 1
    pictures = [Picture(p, str(path), k if multi else None, dict(info)) for k, p in enumerate(pixels)]
    return ImageFile(path, "dicom", pictures)


def _dicom_gray(ds: Any, arr: np.ndarray, photometric: str, path: Path) -> Tuple[List[np.ndarray], Dict[str, Any]]:
    """Gray frames (N, H, W) -> float32 0..255 each: rescale, window (or min..max), MONOCHROME1 inverted."""
    rescale, window = dicom_rescale(ds), dicom_window(ds)
    values = dicom_gray(arr, rescale, window, photometric, path)
    info = {"format": "dicom", "photometric": photometric, "rescale": list(rescale),
            "intensity": "window {:g}..{:g} -> 0..255".format(*window) if window else "min-max per frame"}
    return list(values), info


# ----------------------------------------------------------------------------- NIfTI


def to_nifti_order(arr: np.ndarray) -> np.ndarray:
    """(Z, H, W) slices first -> (X, Y, Z) as stored in the source NIfTI file (a view).

    A prediction `p` of a NIfTI case saves as `nib.Nifti1Image(to_nifti_order(p), volume.affine)`.
    """
    if np.ndim(arr) != 3:
        raise DataError(f"to_nifti_order: expected a (Z, H, W) array, got shape {np.shape(arr)}")
    return np.moveaxis(arr, 0, -1)


def from_nifti_order(arr: np.ndarray) -> np.ndarray:
    """(X, Y, Z) -> (Z, X, Y), contiguous so that each slice is one block of memory."""
    return np.ascontiguousarray(np.moveaxis(arr, -1, 0))


def load_nifti(path: Path, what: str, label: bool) -> Tuple[np.ndarray, Any]:
    """The data of a NIfTI file, trailing length-1 axes dropped ((X, Y, Z, 1) files exist), and the
    nibabel image: float32 with the header's scaling applied, or a label's stored values."""
    if not path.is_file():
        raise DataError(f"{path}: {what} file is missing")
    try:  # nib.load reads the header only: the data is read once the header passed the checks
        img = nib.load(str(path))
        if not isinstance(img, nib.Nifti1Image):  # Nifti2Image derives from it
            raise DataError(f"{path}: not a NIfTI file ({type(img).__name__})")
        check_nifti_header(path, img, read_limits())
        arr = np.asanyarray(img.dataobj) if label else img.get_fdata(dtype=np.float32)
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"{path}: not enough memory to read the NIfTI {what}") from None
    except _NIFTI_ERRORS as e:
        raise DataError(f"{path}: unreadable NIfTI {what} ({type(e).__name__}: {first_line(e)})") from None
    arr = np.asarray(arr)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr, img


def _read_nifti(path: Path, first_only: bool, window: Optional[Tuple[float, float]]) -> ImageFile:
    arr, img = load_nifti(path, "image", label=False)
    if arr.ndim == 2:  # one slice
        arr = arr[..., None]
    if arr.ndim != 3:
        raise DataError(f"{path}: expected a 2-D or 3-D volume, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: image has NaN or infinite values")
    slices = scale_to_0_255(from_nifti_order(arr), window)  # (Z, X, Y)
    info = {"format": "nifti", "shape": list(arr.shape),
            "intensity": "window {:g}..{:g} -> 0..255".format(*window) if window else "min-max per slice"}
    n = 1 if first_only else slices.shape[0]
    pictures = [Picture(slices[z], str(path), z, dict(info)) for z in range(n)]
    return ImageFile(path, "nifti", pictures, nifti=img)


# ----------------------------------------------------------------------------- any file


def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    return path.name.lower().endswith(tuple(suffixes))


def is_dicom(path: Path) -> bool:
    """A DICOM suffix, or the "DICM" tag after the 128-byte preamble."""
    if _has_suffix(path, DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as e:
        raise DataError(f"{path}: unreadable file ({type(e).__name__}: {first_line(e)})") from None
    return head[128:132] == b"DICM"


def read_images(path: PathLike, *, window: Optional[Tuple[float, float]] = None, first_only: bool = False) -> ImageFile:
    """Read one file into its pictures (module docstring: formats and intensity rules).

    Arguments:
      path: an image, DICOM or NIfTI file (the kind is found from its suffix and content).
      window: (low, high) raw intensities mapped to 0..255 for NIfTI volumes (e.g. a CT window); None:
        each slice's own min..max.
      first_only: only the first picture (frame, page or slice).

    Returns:
      ImageFile with at least one picture.

    Raises:
      DataError: "<file>: <why>" for a missing, empty, unreadable, damaged, truncated or unsupported file,
        or one whose header asks for more than the limits of `icmoe.data.limits` (checked before the
        pixel data is read).
      UsageError: a limit set in the environment that is not a whole number > 0.
      MissingExtra: a DICOM file without pydicom installed (naming the file and `pip install 'icmoe[dicom]'`).
    """
    path = Path(path)
    limits = read_limits()
    if not path.is_file():
        raise DataError(f"{path}: image file is missing" if not path.exists() else f"{path}: not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    if _has_suffix(path, NIFTI_SUFFIXES):
        return _read_nifti(path, first_only, window)
    if is_dicom(path):
        return _read_dicom(path, first_only, limits)
    return _read_pil(path, first_only, limits)


def read_image(path: PathLike) -> Picture:
    """The first picture of a file (`read_images`); what the 2-D training datasets read."""
    return read_images(path, first_only=True).pictures[0]


def picture_from_array(arr: Any, source: str = "<array>") -> Picture:
    """A Picture of an in-memory image.

    Arguments:
      arr: uint8 or uint16 (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA (alpha dropped); uint16
        is mapped to 0..255 by its own range, as a 16-bit file.

    Raises:
      DataError: another dtype or shape.
    """
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    ok_shape = a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))
    if a.dtype not in (np.uint8, np.uint16) or not ok_shape or 0 in a.shape:
        raise DataError(f"{source}: images in memory must be uint8 or uint16 arrays of shape (H, W), (H, W, 3) "
                        f"or (H, W, 4), got {a.dtype} {a.shape}")
    if a.ndim == 3:
        a = a[..., :3]
    info: Dict[str, Any] = {"format": "array", "dtype": str(a.dtype)}
    if a.dtype == np.uint16:
        info["intensity"] = f"min-max {int(a.min())}..{int(a.max())} -> 0..255"
        a = range_to_uint8(a)
    return Picture(np.ascontiguousarray(a), source, None, info)


# ----------------------------------------------------------------------------- resizing


def resize_rgb(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 gray (H, W) or RGB (H, W, 3) -> RGB uint8 (size, size, 3), Pillow bilinear (antialiased when
    shrinking): the 2-D training datasets' resize, so training and prediction see the same pixels."""
    rgb = pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=-1)
    im = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB")
    if im.size != (size, size):
        im = im.resize((int(size), int(size)), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """Resize one slice bilinearly (PIL, antialiased when shrinking, as the 2-D readers do).

    Arguments:
      img: (H, W) array, converted to float32.
      size: output side.

    Returns:
      float32 (size, size).
    """
    arr = np.ascontiguousarray(img, dtype=np.float32)
    if arr.ndim != 2:
        raise DataError(f"resize_image: expected an (H, W) slice, got shape {arr.shape}")
    if int(size) < 1:
        raise DataError(f"resize_image: size must be >= 1, got {size}")
    if arr.shape == (size, size):
        return arr.copy()
    out = Image.fromarray(arr).resize((int(size), int(size)), Image.BILINEAR)  # mode "F": no rounding
    return np.asarray(out, dtype=np.float32)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel: the pixel under its centre (as PIL NEAREST, torch nearest-exact)."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def resize_label(lbl: np.ndarray, size: Union[int, Tuple[int, int]]) -> np.ndarray:
    """Resize one label slice by nearest neighbour, so only values already present appear.

    Arguments:
      lbl: (H, W) integer labels (any dtype; kept).
      size: output side, or (h, w) (e.g. back to a volume's own slice size).

    Returns:
      (size, size) or (h, w), the dtype of `lbl`.
    """
    arr = np.asarray(lbl)
    if arr.ndim != 2:
        raise DataError(f"resize_label: expected an (H, W) slice, got shape {arr.shape}")
    h, w = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))  # type: ignore[index]
    if h < 1 or w < 1:
        raise DataError(f"resize_label: size must be >= 1, got {size}")
    return arr[_nearest_index(arr.shape[0], h)[:, None], _nearest_index(arr.shape[1], w)[None, :]]


def resize_logits(logits: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize (K, h, w) logits to (K, H, W) bilinearly, channel by channel: Pillow's float (mode "F")
    BILINEAR resize, which upsamples as SAM's post-processing does (half-pixel centres, edges clamped) and
    antialiases when shrinking; engines/cpp/common/resize.h computes the same.

    Arguments:
      logits: float (K, h, w) (or (h, w): one channel).
      size: (H, W).

    Returns:
      float32 (K, H, W) (or (H, W)).
    """
    arr = np.asarray(logits, dtype=np.float32)
    if arr.ndim == 2:
        return resize_logits(arr[None], size)[0]
    if arr.ndim != 3:
        raise DataError(f"resize_logits: expected (K, h, w) logits, got shape {arr.shape}")
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise DataError(f"resize_logits: size must be >= 1, got {size}")
    if arr.shape[1:] == (h, w):
        return arr.copy()
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(c)).resize((w, h), Image.BILINEAR),
                                dtype=np.float32) for c in arr])


def mask_from_logits(logits: np.ndarray, size: Tuple[int, int], rule: str) -> np.ndarray:
    """A mask at (H, W) from the model's (K, h, w) logits resized bilinearly (`resize_logits`): "threshold"
    (K = 1: logits > 0, as 0/1) or "argmax" (the channel of the largest logit, ties to the lowest).

    Returns:
      uint8 (H, W).
    """
    return apply_mask_rule(resize_logits(logits, size), rule)


def apply_mask_rule(up: np.ndarray, rule: str) -> np.ndarray:
    """A mask from (K, H, W) logits already at the picture's size (`mask_from_logits`' second step)."""
    if rule == "threshold":
        return (up.reshape(up.shape[-2:]) > 0).astype(np.uint8)
    if rule == "argmax":
        return np.argmax(up, axis=0).astype(np.uint8)
    raise DataError(f"mask_from_logits: unknown rule {rule!r} (threshold, argmax)")


def model_input(picture: Picture, size: int) -> np.ndarray:
    """A picture as the model's input: float32 (3, size, size) RGB 0..255.

    uint8 pictures go through `resize_rgb` (the 2-D datasets' path, values stay whole numbers),
    float32 ones through `resize_image` with the gray repeated to RGB (the 3-D datasets' path).
    """
    px = picture.pixels
    if px.dtype == np.uint8:
        return resize_rgb(px, size).transpose(2, 0, 1).astype(np.float32)
    return np.repeat(resize_image(px, size)[None], 3, axis=0)


def display_pixels(picture: Picture) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) pixels of a picture for pictures drawn over it (float ones rounded)."""
    px = picture.pixels
    return px if px.dtype == np.uint8 else np.rint(np.clip(px, 0, 255)).astype(np.uint8)


# ----------------------------------------------------------------------------- writing

NIFTI_GZIP_LEVEL = 1  # nibabel's default compression level for .nii.gz


def write_png(path: PathLike, pixels: np.ndarray) -> Path:
    """Write uint8 (H, W) gray or (H, W, 3) RGB pixels (or a Pillow image) as PNG, atomically."""
    im = pixels if isinstance(pixels, Image.Image) else Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def write_nifti_labels(path: PathLike, labels: np.ndarray, like: ImageFile) -> Path:
    """Write a label volume with the affine and header of the NIfTI file it was predicted from, atomically.

    Arguments:
      path: `.nii.gz` (gzip) or `.nii`.
      labels: uint8 (Z, H, W), slice z of the source's pictures (the source's order, `to_nifti_order`).
      like: the source NIfTI file (`read_images`).
    """
    if like.nifti is None:
        raise DataError(f"{like.path}: not a NIfTI file; a label volume needs its affine")
    src = like.nifti
    header = src.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)  # labels are stored values, never scaled
    header.set_intent("label")
    header["cal_min"], header["cal_max"] = 0, int(labels.max()) if labels.size else 0
    out = type(src)(to_nifti_order(np.asarray(labels, dtype=np.uint8)), src.affine, header)
    data = out.to_bytes()
    if str(path).endswith(".gz"):
        # nibabel's own level: label volumes shrink almost as much as at 9, which takes seconds per volume
        data = gzip.compress(data, compresslevel=NIFTI_GZIP_LEVEL, mtime=0)
    atomic_write_bytes(path, data)
    return Path(path)
