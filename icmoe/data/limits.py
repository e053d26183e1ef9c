"""Limits on what reading one input file may cost, checked from its header before its pixel data is read.

A damaged or hostile file is refused in one line (`DataError`), never by a crash or by exhausting memory:
a PNG header claiming 65535 x 65535 pixels, a NIfTI header claiming 30000^3 voxels in a file of a few
hundred bytes, a DICOM element whose length runs past the end of the file, a PNG chunk with a bad CRC.
`icmoe.data.images` calls these checks; the C++ programs apply the same limits, read from the same
environment variables (engines/cpp/common/decode_limits.h). Details: docs/predict.md#limits.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence, Tuple

from icmoe.core.cli import UsageError
from icmoe.core.errors import DataError

MAX_IMAGE_PIXELS_ENV = "ICMOE_MAX_IMAGE_PIXELS"
MAX_DECODED_BYTES_ENV = "ICMOE_MAX_DECODED_BYTES"
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default, set explicitly: about 1/4 GiB of RGBA pixels
DEFAULT_MAX_DECODED_BYTES = 2 << 30
# Deflate never expands data by more than about 1032:1 (zlib's technical notes), so a gzip file of n bytes
# holds at most 1032 * n bytes: a .nii.gz header claiming more is lying.
DEFLATE_MAX_RATIO = 1032
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DICOM_DEFER_BYTES = 1 << 16  # DICOM values longer than this are read only when used (after the checks here)


@dataclass(frozen=True)
class ReadLimits:
    """The most pixels one picture (image, frame, page, slice) may have, and the most bytes the arrays
    decoded from one file may take."""

    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_bytes: int = DEFAULT_MAX_DECODED_BYTES


def _env_count(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"{name} must be a whole number > 0, got {text!r}")
    return int(text)


def read_limits() -> ReadLimits:
    """The limits in force: the defaults, or $ICMOE_MAX_IMAGE_PIXELS and $ICMOE_MAX_DECODED_BYTES.

    Raises:
      UsageError: a variable that is not a whole number > 0 (a setting, not a bad file: never skipped).
    """
    return ReadLimits(_env_count(MAX_IMAGE_PIXELS_ENV, DEFAULT_MAX_IMAGE_PIXELS),
                      _env_count(MAX_DECODED_BYTES_ENV, DEFAULT_MAX_DECODED_BYTES))


def human_bytes(n: int) -> str:
    """1536 -> "1.5 KiB"."""
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"  # pragma: no cover (the loop always returns)


def check_picture_size(path: Path, height: int, width: int, limits: ReadLimits) -> None:
    """One picture of height x width pixels: at least one pixel, at most `limits.max_pixels`."""
    if height < 1 or width < 1:
        raise DataError(f"{path}: image has no pixels ({width}x{height})")
    if height * width > limits.max_pixels:
        raise DataError(f"{path}: image of {width}x{height} pixels is above the limit of {limits.max_pixels} "
                        f"pixels ({MAX_IMAGE_PIXELS_ENV})")


def check_decoded_bytes(path: Path, what: str, nbytes: int, limits: ReadLimits) -> None:
    """Decoding `what` takes `nbytes`: at most `limits.max_bytes`."""
    if nbytes > limits.max_bytes:
        raise DataError(f"{path}: {what} needs {human_bytes(nbytes)} decoded, above the limit of "
                        f"{human_bytes(limits.max_bytes)} ({MAX_DECODED_BYTES_ENV})")


def check_file_size(path: Path, limits: ReadLimits) -> int:
    """The file's size, refused above `limits.max_bytes` before anything reads it whole."""
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise DataError(f"{path}: file of {human_bytes(size)} is above the limit of {human_bytes(limits.max_bytes)} "
                        f"({MAX_DECODED_BYTES_ENV})")
    return size


# ----------------------------------------------------------------------------- PNG


def _chunk_name(kind: bytes) -> str:
    return kind.decode("ascii") if kind.isalpha() else "0x" + kind.hex()


def _png_chunks(path: Path, data: bytes) -> List[Tuple[bytes, memoryview]]:
    """(type, data) of every chunk up to IEND, each complete and with its CRC right."""
    view, pos, chunks = memoryview(data), len(PNG_SIGNATURE), []
    while True:
        if pos + 12 > len(data):
            raise DataError(f"{path}: damaged PNG (truncated at byte {pos}: no IEND chunk)")
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data):
            raise DataError(f"{path}: damaged PNG (chunk {_chunk_name(kind)} at byte {pos} claims {length} bytes, "
                            "past the end of the file)")
        if zlib.crc32(view[pos + 4:end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            raise DataError(f"{path}: damaged PNG (bad CRC in chunk {_chunk_name(kind)} at byte {pos})")
        chunks.append((kind, view[pos + 8:end - 4]))
        if kind == b"IEND":
            return chunks
        pos = end


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_raw_size(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    """Bytes of the filtered rows (a filter byte each) the image data must inflate to."""
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        w, h = max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy))
        if w and h:
            total += h * (1 + (w * bits_per_pixel + 7) // 8)
    return total


def _inflated_size(path: Path, idat: List[memoryview], stop: int) -> int:
    """Bytes the zlib stream of the IDAT chunks inflates to, counted without keeping them (up to `stop`)."""
    inflate, total = zlib.decompressobj(), 0
    try:
        for part in idat:
            total += len(inflate.decompress(part, 1 << 20))
            while inflate.unconsumed_tail and total < stop:
                total += len(inflate.decompress(inflate.unconsumed_tail, 1 << 20))
            if total >= stop:
                break
    except zlib.error as e:
        raise DataError(f"{path}: damaged PNG (image data: {e})") from None
    return total


def check_png(path: Path, data: bytes, limits: ReadLimits) -> None:
    """A whole PNG file: every chunk complete with its CRC right (Pillow checks the chunks before the image
    data only), the picture within the limits, and the image data inflating to all the rows its header
    promises (Pillow fills missing rows with black). libpng, in the C++ programs, refuses the same files."""
    chunks = _png_chunks(path, data)
    if chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise DataError(f"{path}: damaged PNG (no IHDR chunk first)")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    check_picture_size(path, height, width, limits)
    if colour not in _PNG_CHANNELS:
        return  # Pillow refuses the file
    need = _png_raw_size(width, height, _PNG_CHANNELS[colour] * depth, interlace == 1)
    have = _inflated_size(path, [body for kind, body in chunks if kind == b"IDAT"], need)
    if have < need:
        raise DataError(f"{path}: damaged PNG (image data holds {have} bytes of rows, its header needs {need})")


def check_palette(largest_index: int, colours: int) -> None:
    """A palette image whose pixels name only colours its palette has (the caller names the file)."""
    if largest_index >= colours:
        raise DataError(f"damaged image (palette index {largest_index} beyond the palette's {colours} colours)")


# ----------------------------------------------------------------------------- NIfTI


def check_nifti_header(path: Path, img: Any, limits: ReadLimits) -> None:
    """A NIfTI header (nibabel image, nothing read beyond the header) against the file it came from.

    The voxels it claims must fit in the file (uncompressed: after the data offset; gzip: at most
    DEFLATE_MAX_RATIO times its size), a slice must be within the pixel limit and the decoded volume
    (float32) within the byte limit.
    """
    shape = tuple(int(d) for d in img.header.get_data_shape())
    dims = "x".join(map(str, shape))
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise DataError(f"{path}: NIfTI header has dimensions ({dims}); an image needs at least two, each >= 1")
    dtype = img.header.get_data_dtype()
    voxels = math.prod(shape)
    stored, size = voxels * dtype.itemsize, path.stat().st_size
    gz = path.name.lower().endswith(".gz")
    room = size * DEFLATE_MAX_RATIO if gz else size - int(getattr(img.dataobj, "offset", 0))
    if stored > room:
        raise DataError(f"{path}: NIfTI header claims {dims} voxels of {dtype} ({human_bytes(stored)}), more than "
                        f"a {'gzip ' if gz else ''}file of {human_bytes(size)} can hold")
    check_picture_size(path, shape[1], shape[0], limits)  # a slice is (X, Y)
    check_decoded_bytes(path, f"a volume of {dims} voxels", voxels * max(dtype.itemsize, 4), limits)


# ----------------------------------------------------------------------------- DICOM


def _dicom_int(ds: Any, keyword: str, default: int) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        return default
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0] if len(value) else default
    return int(value)


def _check_dicom_lengths(path: Path, ds: Any, file_size: int) -> None:
    """No value (read or deferred) may claim bytes beyond the end of the file."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)  # a deferred value stays unread
        length, at = getattr(raw, "length", None), getattr(raw, "value_tell", None)
        if length is None or at is None or length == 0xFFFFFFFF:  # converted, or of undefined length
            continue
        if at + length > file_size:
            raise DataError(f"{path}: damaged DICOM (element {tag} claims {length} bytes at byte {at}, past the "
                            f"end of the {file_size}-byte file)")


def check_dicom_header(path: Path, ds: Any, limits: ReadLimits) -> None:
    """A DICOM dataset read with large values deferred (`DICOM_DEFER_BYTES`) against its file, before its
    pixel data is read: no value runs past the end of the file, a frame is within the pixel limit, the
    decoded frames (float32) within the byte limit, and uncompressed pixel data holds what the header says."""
    _check_dicom_lengths(path, ds, path.stat().st_size)
    try:
        rows, cols = _dicom_int(ds, "Rows", 0), _dicom_int(ds, "Columns", 0)
        frames, samples = _dicom_int(ds, "NumberOfFrames", 1), _dicom_int(ds, "SamplesPerPixel", 1)
        bits = _dicom_int(ds, "BitsAllocated", 0)
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"{path}: damaged DICOM header ({type(e).__name__}: {e})") from None
    check_picture_size(path, rows, cols, limits)
    if frames < 1 or samples not in (1, 3) or bits not in (1, 8, 16, 32, 64):
        raise DataError(f"{path}: DICOM header has NumberOfFrames {frames}, SamplesPerPixel {samples}, "
                        f"BitsAllocated {bits}")
    values = rows * cols * frames * samples
    check_decoded_bytes(path, f"{frames} frame(s) of {cols}x{rows}", values * 4, limits)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if "PixelData" not in ds or (syntax is not None and getattr(syntax, "is_compressed", False)):
        return
    need, raw = (values * bits + 7) // 8, ds.get_item("PixelData", keep_deferred=True)
    have = getattr(raw, "length", None)
    if have is not None and have != 0xFFFFFFFF and have < need:
        raise DataError(f"{path}: DICOM pixel data holds {have} bytes, its header needs {need} "
                        f"({frames} frame(s) of {cols}x{rows}, {samples} sample(s) of {bits} bits)")
