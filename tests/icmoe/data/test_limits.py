"""icmoe.data.limits through the readers of icmoe.data.images: every file of the fuzz corpus refused with one
line naming it; headers refused before any pixel data is read; the limits exact and set from the
environment; Pillow's own decompression-bomb limit set to ours, without a warning printed.
"""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import icmoe.data.images as images
from icmoe.core.cli import UsageError
from icmoe.core.errors import DataError
from icmoe.data.images import read_images
from icmoe.data.limits import (
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_DECODED_BYTES_ENV,
    MAX_IMAGE_PIXELS_ENV,
    ReadLimits,
    read_limits,
)
from tests.icmoe.data.hostile import interlaced_png, write_corpus
from tests.icmoe.data.samples import blob_image, write_dicom, write_nifti

pytest.importorskip("pydicom", reason="needs pydicom (the dicom extra)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("hostile"))


def test_every_hostile_file_is_refused_in_one_line(corpus):
    reasons = {}
    for name, path in corpus.items():
        with pytest.raises(DataError) as err:
            read_images(path)
        message = str(err.value)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        reasons[name] = message.split(": ", 1)[1]
    assert "more than a gzip file of" in reasons["nifti_30000_cubed_gzip.nii.gz"]
    assert "bad CRC in chunk IDAT" in reasons["png_crc_idat.png"]
    assert "palette index 15 beyond the palette's 2 colours" in reasons["png_palette_index_beyond.png"]
    assert "image data holds" in reasons["png_idat_too_few_rows.png"]  # Pillow alone would fill it with black
    assert "claims 100000000 bytes" in reasons["dicom_pixel_length_lies.dcm"]
    assert MAX_IMAGE_PIXELS_ENV in reasons["png_65535x65535.png"]


@pytest.mark.parametrize("name", ["nifti_30000_cubed.nii", "nifti_30000_cubed_gzip.nii.gz", "nifti_7d_30000.nii.gz"])
def test_nifti_header_refused_before_its_data_is_read(corpus, monkeypatch, name):
    def never(*args, **kw):
        raise AssertionError("the voxels were read")

    monkeypatch.setattr(nib.Nifti1Image, "get_fdata", never)
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", never)
    with pytest.raises(DataError, match="NIfTI header claims .* voxels"):
        read_images(corpus[name])


@pytest.mark.parametrize("name", ["dicom_pixel_length_lies.dcm", "dicom_65535x65535.dcm", "dicom_a_billion_frames.dcm",
                                  "dicom_too_little_pixel_data.dcm", "dicom_truncated_in_pixels.dcm"])
def test_dicom_header_refused_before_its_pixel_data_is_read(corpus, monkeypatch, name):
    monkeypatch.setattr(images, "_dicom_pixels", lambda *a: pytest.fail("the pixel data was decoded"))
    with pytest.raises(DataError):
        read_images(corpus[name])


def test_limits_from_the_environment(monkeypatch):
    monkeypatch.delenv(MAX_IMAGE_PIXELS_ENV, raising=False)
    monkeypatch.delenv(MAX_DECODED_BYTES_ENV, raising=False)
    assert read_limits() == ReadLimits(DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_DECODED_BYTES) == ReadLimits()
    assert DEFAULT_MAX_IMAGE_PIXELS == 89_478_485  # Pillow's default, now explicit
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "1000")
    monkeypatch.setenv(MAX_DECODED_BYTES_ENV, "4096")
    assert read_limits() == ReadLimits(1000, 4096)
    for bad in ("0", "-5", "1e6", "lots", ""):
        monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, bad)
        with pytest.raises(UsageError, match=f"{MAX_IMAGE_PIXELS_ENV} must be a whole number > 0"):
            read_limits()


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_pixel_limit_is_exact_and_prints_no_warning(tmp_path, monkeypatch, suffix):
    """At the limit an image is read; one pixel above (Pillow's own warning zone) it is refused in one line."""
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "1000")
    at, above = tmp_path / f"at{suffix}", tmp_path / f"above{suffix}"
    Image.fromarray(blob_image(25, 40, 1, 3)).save(at)  # 1000 pixels
    Image.fromarray(blob_image(13, 77, 2, 3)).save(above)  # 1001
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning would fail the test
        assert read_images(at).pictures[0].size == (25, 40)
        assert Image.MAX_IMAGE_PIXELS == 1000  # Pillow's limit is ours
        with pytest.raises(DataError, match=f"above the limit of 1000 pixels \\({MAX_IMAGE_PIXELS_ENV}\\)"):
            read_images(above)


def test_byte_limit_refuses_a_volume_before_reading_it(tmp_path, monkeypatch):
    path = write_nifti(tmp_path / "v.nii.gz", np.zeros((20, 20, 10), np.float32))
    assert read_images(path).format == "nifti"
    monkeypatch.setenv(MAX_DECODED_BYTES_ENV, str(20 * 20 * 10 * 4 - 1))
    limit = f"needs 15.6 KiB decoded, above the limit of 15.6 KiB \\({MAX_DECODED_BYTES_ENV}"
    with pytest.raises(DataError, match=limit):
        read_images(path)
    dicom = write_dicom(tmp_path / "d.dcm", np.zeros((10, 20, 20), np.uint16))
    with pytest.raises(DataError, match="10 frame\\(s\\) of 20x20 needs"):
        read_images(dicom)


def test_out_of_memory_is_one_line(tmp_path, monkeypatch):
    path = write_nifti(tmp_path / "v.nii", np.zeros((4, 5, 6), np.float32))

    def exhausted(*args, **kw):
        raise MemoryError

    monkeypatch.setattr(nib.Nifti1Image, "get_fdata", exhausted)
    with pytest.raises(DataError, match="v.nii: not enough memory to read the NIfTI image"):
        read_images(path)


@pytest.mark.parametrize("shape", [(37, 53, 3), (1, 1, 3), (9, 17), (8, 8)])
def test_interlaced_png_is_read_whole(tmp_path, shape):
    """The row count of an Adam7 file (check_png) is right: every pass, including the empty ones of tiny images."""
    pixels = blob_image(shape[0], shape[1], 3, shape[2] if len(shape) == 3 else 0)
    path = tmp_path / "interlaced.png"
    path.write_bytes(interlaced_png(pixels))
    np.testing.assert_array_equal(read_images(path).pictures[0].pixels, pixels)


def test_in_memory_palette_image_names_its_source():
    im = Image.new("P", (4, 4))
    im.putpalette([0, 0, 0, 255, 255, 255])
    im.putpixel((1, 1), 7)
    beyond = r"^<image 3>: damaged image \(palette index 7 beyond the palette's 2 colours\)"
    with pytest.raises(DataError, match=beyond):
        images.picture_from_pil(im, "<image 3>")
