"""A fuzz corpus of hostile and damaged input files, generated here (seeded: the same bytes every run).

`write_corpus(folder)` writes files every reader must refuse in one line (the Python readers of
`icmoe.data.images`, `predict`, and the C++ programs): truncated, bit-flipped, zero-sized and foreign files,
65535x65535 and larger headers, palette and 16-bit oddities, PNGs with bad CRCs, JPEGs with broken Huffman
tables, DICOM files with lying lengths, NIfTI headers with absurd dimensions. `write_mutants(folder)` writes
random mutations of valid files (CRCs fixed, so they reach the decoders' inner loops) that a reader may
decode or refuse, but must never crash on: the C++ programs run them under AddressSanitizer and UBSan.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
from PIL import Image

from tests.icmoe.data.samples import blob_image, write_dicom, write_nifti

# The formats the C++ programs read (the rest of the corpus is foreign to them, and refused as such).
CPP_SUFFIXES = (".png", ".jpg", ".bmp", ".ppm", ".pgm")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, depth: int, colour: int, raw: bytes, extra: bytes = b"",
              interlace: int = 0) -> bytes:
    """A PNG from its parts, every CRC right: IHDR, `extra` chunks, one IDAT of `raw` (filtered rows), IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def interlaced_png(pixels: np.ndarray) -> bytes:
    """A valid Adam7-interlaced 8-bit PNG (Pillow writes none) of uint8 (H, W) gray or (H, W, 3) RGB pixels."""
    h, w = pixels.shape[:2]
    raw = b""
    for x0, y0, dx, dy in ADAM7:
        sub = pixels[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\0" + row.tobytes() for row in sub)
    return png_bytes(w, h, 8, 2 if pixels.ndim == 3 else 0, raw, interlace=1)


def _chunks(data: bytes) -> List[tuple]:
    """(kind, offset, length) of each chunk of a valid PNG."""
    out, pos = [], 8
    while pos < len(data):
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        out.append((data[pos + 4:pos + 8], pos, n))
        pos += 12 + n
    return out


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _flip_bits(data: bytes, rng: np.random.Generator, n: int, start: int) -> bytes:
    """`n` different bits flipped at or after byte `start`."""
    out = bytearray(data)
    for bit in rng.choice((len(data) - start) * 8, size=n, replace=False):
        out[start + bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _bad_crc(data: bytes, kind: bytes) -> bytes:
    out = bytearray(data)
    _, pos, n = next(c for c in _chunks(data) if c[0] == kind)
    out[pos + 8 + n] ^= 0x01
    return bytes(out)


def _rows(width: int, height: int, bytes_per_pixel: float, fill: int = 0) -> bytes:
    return b"".join(b"\0" + bytes([fill]) * int(np.ceil(width * bytes_per_pixel)) for _ in range(height))


def _png_files(rng: np.random.Generator) -> Dict[str, bytes]:
    rgb = Image.fromarray(blob_image(20, 24, 1, 3))
    base = _encoded(rgb, "PNG", pnginfo=_text_info())
    idat = next(c for c in _chunks(base) if c[0] == b"IDAT")
    four_bit = _rows(8, 4, 0.5, 0xF0)  # 4-bit palette indices 15 and 0
    two_colours = _chunk(b"PLTE", bytes([0, 0, 0, 255, 255, 255]))
    files = {
        "png_empty.png": b"",
        "png_text.png": b"this is a text file, not an image\n",
        "png_truncated_in_ihdr.png": base[:20],
        "png_truncated_after_ihdr.png": base[:33],
        "png_truncated_in_idat.png": base[:idat[1] + 8 + idat[2] // 2],
        "png_truncated_in_iend.png": base[:-2],
        "png_crc_ihdr.png": _bad_crc(base, b"IHDR"),
        "png_crc_text.png": _bad_crc(base, b"tEXt"),
        "png_crc_idat.png": _bad_crc(base, b"IDAT"),
        "png_crc_iend.png": _bad_crc(base, b"IEND"),
        "png_65535x65535.png": png_bytes(65535, 65535, 8, 2, _rows(16, 4, 3)),
        "png_1x2147483647.png": png_bytes(1, 2**31 - 1, 8, 0, _rows(1, 4, 1)),
        "png_zero_width.png": png_bytes(0, 4, 8, 0, _rows(1, 4, 1)),
        "png_palette_without_plte.png": png_bytes(8, 4, 4, 3, four_bit),
        "png_palette_index_beyond.png": png_bytes(8, 4, 4, 3, four_bit, two_colours),
        "png_palette_plte_7_bytes.png": png_bytes(8, 4, 4, 3, four_bit, _chunk(b"PLTE", bytes(7))),
        "png_palette_empty_plte.png": png_bytes(8, 4, 4, 3, four_bit, _chunk(b"PLTE", b"")),
        "png_palette_257_colours.png": png_bytes(8, 4, 8, 3, _rows(8, 4, 1), _chunk(b"PLTE", bytes(3 * 257))),
        "png_palette_16_bit.png": png_bytes(8, 4, 16, 3, _rows(8, 4, 2), two_colours),
        "png_16bit_rows_of_8bit.png": png_bytes(8, 4, 16, 0, _rows(8, 4, 1)),
        "png_16bit_rgba_short.png": png_bytes(8, 4, 16, 6, _rows(8, 2, 8)),
        "png_rgb_4bit.png": png_bytes(8, 4, 4, 2, _rows(8, 4, 1.5)),
        "png_bit_depth_5.png": png_bytes(8, 4, 5, 0, _rows(8, 4, 1)),
        "png_colour_type_5.png": png_bytes(8, 4, 8, 5, _rows(8, 4, 2)),
        "png_interlace_2.png": png_bytes(8, 4, 8, 0, _rows(8, 4, 1), interlace=2),
        "png_idat_not_zlib.png": base[:idat[1]] + _chunk(b"IDAT", rng.bytes(idat[2])) + base[idat[1] + 12 + idat[2]:],
        "png_idat_too_few_rows.png": png_bytes(8, 40, 8, 0, _rows(8, 4, 1)),
    }
    for k in range(6):  # CRCs left as they were: every flip is seen
        files[f"png_bitflip_{k}.png"] = _flip_bits(base, rng, 3, start=8)
    return files


def _text_info():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Comment", "an ancillary chunk")
    return info


def _jpeg_segments(data: bytes) -> List[tuple]:
    """(marker, offset, length) of each marker segment before the first SOS."""
    out, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker, n = data[pos + 1], struct.unpack(">H", data[pos + 2:pos + 4])[0]
        out.append((marker, pos, n))
        if marker == 0xDA:
            break
        pos += 2 + n
    return out


def _jpeg_edit(data: bytes, marker: int, offset: int, value: bytes) -> bytes:
    """Bytes at `offset` inside the first `marker` segment's body (after its length) replaced by `value`."""
    _, pos, _ = next(s for s in _jpeg_segments(data) if s[0] == marker)
    at = pos + 4 + offset
    return data[:at] + value + data[at + len(value):]


def _jpeg_files(rng: np.random.Generator) -> Dict[str, bytes]:
    base = _encoded(Image.fromarray(blob_image(24, 32, 2, 3)), "JPEG", quality=90)
    sos = next(s for s in _jpeg_segments(base) if s[0] == 0xDA)
    return {
        "jpeg_empty.jpg": b"",
        "jpeg_text.jpg": b"GIF89a but not really\n",
        "jpeg_truncated_in_header.jpg": base[:60],
        "jpeg_truncated_before_scan.jpg": base[:sos[1]],
        "jpeg_truncated_in_scan.jpg": base[:(sos[1] + len(base)) // 2],
        "jpeg_without_eoi.jpg": base[:-2],
        "jpeg_huffman_counts_over_256.jpg": _jpeg_edit(base, 0xC4, 1, bytes([255] * 16)),
        "jpeg_huffman_bad_table_index.jpg": _jpeg_edit(base, 0xC4, 0, bytes([0x17])),
        "jpeg_65535x65535.jpg": _jpeg_edit(base, 0xC0, 1, struct.pack(">HH", 65535, 65535)),
        "jpeg_zero_height.jpg": _jpeg_edit(base, 0xC0, 1, struct.pack(">H", 0)),
        "jpeg_no_components.jpg": _jpeg_edit(base, 0xC0, 5, bytes([0])),
        "jpeg_no_image.jpg": base[:sos[1]] + b"\xff\xd9",
    }


def _bmp_files() -> Dict[str, bytes]:
    base = _encoded(Image.fromarray(blob_image(15, 20, 3, 3)), "BMP")

    def edit(at: int, value: bytes) -> bytes:
        return base[:at] + value + base[at + len(value):]

    return {
        "bmp_empty.bmp": b"",
        "bmp_truncated_in_header.bmp": base[:30],
        "bmp_truncated_in_pixels.bmp": base[:len(base) // 2],
        "bmp_65535x65535.bmp": edit(18, struct.pack("<ii", 65535, 65535)),
        "bmp_pixels_beyond_the_file.bmp": edit(10, struct.pack("<I", 10**6)),
        "bmp_header_of_1000_bytes.bmp": edit(14, struct.pack("<I", 1000)),
        "ppm_65535x65535.ppm": b"P6\n65535 65535\n255\n" + bytes(300),
        "ppm_truncated.ppm": b"P6\n20 15\n255\n" + bytes(100),
        "pgm_maxval_0.pgm": b"P5\n4 4\n0\n" + bytes(16),
    }


def _dicom_files(folder: Path) -> Dict[str, bytes]:
    base = write_dicom(folder / ".dicom_base.dcm", blob_image(24, 28, 4).astype(np.uint16) * 10).read_bytes()
    (folder / ".dicom_base.dcm").unlink()
    pixel = base.index(b"\xe0\x7f\x10\x00")  # (7FE0,0010) PixelData, explicit VR: tag, VR, 2 reserved, length

    def element(data: bytes, tag: bytes, value: bytes) -> bytes:
        """The value of a short-VR element (tag, VR, 2-byte length, value) replaced."""
        at = data.index(tag) + 6
        n = struct.unpack("<H", data[at:at + 2])[0]
        return data[:at] + struct.pack("<H", len(value)) + value + data[at + 2 + n:]

    rows, cols = b"\x28\x00\x10\x00", b"\x28\x00\x11\x00"  # (0028,0010) Rows, (0028,0011) Columns, US
    return {
        "dicom_empty.dcm": b"",
        "dicom_text.dcm": b"not a DICOM file\n" * 20,
        "dicom_truncated_in_header.dcm": base[:200],
        "dicom_truncated_in_pixels.dcm": base[:pixel + 12 + 100],
        "dicom_pixel_length_lies.dcm": base[:pixel + 8] + struct.pack("<I", 100_000_000) + base[pixel + 12:],
        "dicom_65535x65535.dcm": element(element(base, rows, struct.pack("<H", 65535)), cols, struct.pack("<H", 65535)),
        "dicom_too_little_pixel_data.dcm": element(base, rows, struct.pack("<H", 240)),
        "dicom_a_billion_frames.dcm": _with_frames(base, b"1000000000"),
    }


def _with_frames(data: bytes, value: bytes) -> bytes:
    """(0028,0008) NumberOfFrames (IS) inserted before (0028,0010) Rows."""
    at = data.index(b"\x28\x00\x10\x00")
    value = value + (b" " if len(value) % 2 else b"")
    return data[:at] + b"\x28\x00\x08\x00IS" + struct.pack("<H", len(value)) + value + data[at:]


def _nifti_files(folder: Path) -> Dict[str, bytes]:
    small = write_nifti(folder / ".nifti_base.nii", np.zeros((4, 5, 6), np.float32)).read_bytes()
    (folder / ".nifti_base.nii").unlink()

    def dims(*shape: int) -> bytes:
        d = list(shape) + [1] * (7 - len(shape))
        return small[:40] + struct.pack("<8h", len(shape), *d) + small[56:]

    huge = dims(30000, 30000, 30000)
    return {
        "nifti_empty.nii.gz": b"",
        "nifti_30000_cubed.nii": huge,
        "nifti_30000_cubed_gzip.nii.gz": gzip.compress(huge, mtime=0),
        "nifti_7d_30000.nii.gz": gzip.compress(dims(*[30000] * 7), mtime=0),
        "nifti_negative_dim.nii.gz": gzip.compress(dims(-5, 5, 6), mtime=0),
        "nifti_zero_dim.nii": dims(0, 5, 6),
        "nifti_truncated_data.nii": small[:len(small) - 200],
        "nifti_truncated_gzip.nii.gz": gzip.compress(small, mtime=0)[:60],
        "nifti_garbage_header.nii": bytes(range(256)) * 2,
    }


def write_corpus(folder: Path) -> Dict[str, Path]:
    """Every hostile file under `folder` (created); name -> path. Each must be refused by every reader."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2110)
    files = {**_png_files(rng), **_jpeg_files(rng), **_bmp_files(), **_dicom_files(folder), **_nifti_files(folder)}
    out = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        out[name] = folder / name
    return out


def _fix_png_crcs(data: bytes) -> bytes:
    """Every chunk's CRC recomputed as far as the chunk structure still holds."""
    out, pos = bytearray(data), 8
    while pos + 12 <= len(out):
        n = struct.unpack(">I", out[pos:pos + 4])[0]
        if pos + 12 + n > len(out):
            break
        out[pos + 8 + n:pos + 12 + n] = struct.pack(">I", zlib.crc32(bytes(out[pos + 4:pos + 8 + n])))
        pos += 12 + n
    return bytes(out)


def _mutant_bases() -> Dict[str, tuple]:
    """name -> (valid file, first byte to mutate, repair after mutating)."""
    rgb = Image.fromarray(blob_image(24, 32, 5, 3))
    gray16 = Image.fromarray(blob_image(24, 32, 6).astype(np.uint16) * 200)
    palette = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    keep: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
    return {
        "png_rgb": (_encoded(rgb, "PNG", compress_level=0), 33, _fix_png_crcs),
        "png_gray16": (_encoded(gray16, "PNG"), 33, _fix_png_crcs),
        "png_palette": (_encoded(palette, "PNG"), 33, _fix_png_crcs),
        "jpeg_baseline": (_encoded(rgb, "JPEG", quality=85), 2, keep),
        "jpeg_progressive": (_encoded(rgb, "JPEG", quality=85, progressive=True), 2, keep),
        "bmp_rgb": (_encoded(rgb, "BMP"), 0, keep),
        "bmp_palette": (_encoded(palette, "BMP"), 0, keep),
        "ppm_rgb": (_encoded(rgb, "PPM"), 0, keep),
    }


def write_mutants(folder: Path, per_base: int = 16) -> List[Path]:
    """`per_base` seeded mutations (1 to 8 random bytes replaced) of each valid base file under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2111)
    suffix = {"png": ".png", "jpeg": ".jpg", "bmp": ".bmp", "ppm": ".ppm"}
    out = []
    for name, (data, start, repair) in _mutant_bases().items():
        for k in range(per_base):
            mutated = bytearray(data)
            for at in rng.integers(start, len(data), size=int(rng.integers(1, 9))):
                mutated[at] = int(rng.integers(0, 256))
            path = folder / f"mutant_{name}_{k:02d}{suffix[name.split('_')[0]]}"
            path.write_bytes(repair(bytes(mutated)))
            out.append(path)
    return out
