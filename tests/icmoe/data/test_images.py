"""`icmoe.data.images`: real files of every kind (written here by Pillow, pydicom, nibabel), read into pictures."""

from __future__ import annotations

import gzip
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from icmoe.core.errors import DataError
from icmoe.core.extras import MissingExtra
from icmoe.data.dataset import load_image
from icmoe.data.images import (
    model_input,
    picture_from_array,
    picture_from_pil,
    read_image,
    read_images,
    resize_image,
    resize_rgb,
    write_nifti_labels,
)
from tests.icmoe.data.samples import AFFINE, write_dicom, write_nifti, write_samples

pytest.importorskip("pydicom", reason="needs pydicom (the dicom extra)")


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return write_samples(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("kind", ["gray8", "gray16", "rgba", "palette", "jpeg", "bmp", "tiff", "dicom_mono1",
                                  "dicom_multi", "nifti"])
def test_every_kind_reads_at_its_own_size(samples, kind):
    s = samples[kind]
    f = read_images(s.path)
    assert [p.size for p in f.pictures] == s.sizes
    assert [p.frame for p in f.pictures] == s.frames
    for p in f.pictures:
        assert p.pixels.dtype in (np.uint8, np.float32) and p.pixels.ndim in (2, 3)
        assert p.pixels.min() >= 0 and p.pixels.max() <= 255 and p.source == str(s.path)
        x = model_input(p, 32)
        assert x.shape == (3, 32, 32) and x.dtype == np.float32
    assert (f.nifti is not None) == (kind == "nifti")


def test_16bit_png_is_mapped_by_its_range_not_saturated(samples):
    s = samples["gray16"]
    with Image.open(s.path) as im:
        assert im.mode.startswith("I") and np.asarray(im.convert("RGB")).mean() > 250  # what training used to see
    px = read_image(s.path).pixels
    raw = s.facts["raw"].astype(np.float64)
    want = np.rint((raw - raw.min()) / (raw.max() - raw.min()) * 255)
    np.testing.assert_array_equal(px, want.astype(np.uint8))
    assert px.min() == 0 and px.max() == 255 and 30 < px.mean() < 200
    assert load_image(s.path, 32).mean() < 200  # the training loader too


def test_jpeg_exif_orientation_is_applied(samples):
    s = samples["jpeg"]
    px = read_image(s.path).pixels  # (64, 48, 3): stored (48, 64) turned 90 degrees clockwise
    turned = np.rot90(s.facts["stored"], k=-1)
    assert px.shape == turned.shape
    assert np.abs(px.astype(int) - turned).mean() < 4  # JPEG loss only
    assert px[:6, -6:].min() > 200  # the stored top-left marker is now top-right
    assert load_image(s.path, 64).shape == (64, 64, 3)


@pytest.mark.parametrize("kind", ["gray8", "rgba", "palette", "bmp", "tiff"])
def test_8bit_training_pixels_are_unchanged(samples, kind):
    """The training loader's pixels for 8-bit files equal the earlier `convert("RGB")` + bilinear resize."""
    path = samples[kind].path
    with Image.open(path) as im:
        before = np.asarray(im.convert("RGB").resize((24, 24), Image.BILINEAR))
    np.testing.assert_array_equal(load_image(path, 24), before)
    np.testing.assert_array_equal(model_input(read_image(path), 24), before.transpose(2, 0, 1).astype(np.float32))


def test_dicom_monochrome1_rescale_and_window(samples):
    s = samples["dicom_mono1"]
    px = read_image(s.path).pixels
    c, w = s.facts["window"]
    lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    v = s.facts["raw"].astype(np.float64) * s.facts["slope"] + s.facts["intercept"]
    want = 255 - (np.clip(v, lo, hi) - lo) / (hi - lo) * 255  # MONOCHROME1: low values white
    np.testing.assert_allclose(px, want, atol=1e-3)
    assert px.dtype == np.float32 and px.min() < 1 and px.max() > 254


def test_dicom_multiframe_each_frame_min_max(samples):
    s = samples["dicom_multi"]
    f = read_images(s.path)
    for k, p in enumerate(f.pictures):
        raw = s.facts["raw"][k].astype(np.float64)
        np.testing.assert_allclose(p.pixels, (raw - raw.min()) / (raw.max() - raw.min()) * 255, atol=1e-3)
    assert len(read_images(s.path, first_only=True).pictures) == 1


def test_nifti_slices_along_the_last_axis_and_labels_written_back(samples, tmp_path):
    s = samples["nifti"]
    f = read_images(s.path, window=(-500.0, 520.0))
    raw = s.facts["raw"]
    for z, p in enumerate(f.pictures):
        np.testing.assert_allclose(p.pixels, (np.clip(raw[..., z], -500, 520) + 500) / 1020 * 255, atol=1e-3)
    labels = np.stack([(p.pixels > 128).astype(np.uint8) * (z % 3) for z, p in enumerate(f.pictures)])  # (Z, X, Y)
    out = write_nifti_labels(tmp_path / "k_mask.nii.gz", labels, f)
    back = nib.load(str(out))
    np.testing.assert_array_equal(back.affine, nib.load(str(s.path)).affine)  # the input's (float32 in the header)
    np.testing.assert_allclose(back.affine, AFFINE, atol=1e-6)
    assert back.shape == raw.shape and back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), np.moveaxis(labels, 0, -1))
    assert back.header.get_intent()[0] == "label"


def test_two_dimensional_nifti_is_one_slice(tmp_path):
    p = write_nifti(tmp_path / "flat.nii", np.arange(20, dtype=np.float32).reshape(4, 5))
    f = read_images(p)
    assert [q.size for q in f.pictures] == [(4, 5)] and f.pictures[0].pixels.max() == 255


def _truncated(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the damaged file before failing
@pytest.mark.parametrize("case", ["garbage png", "truncated png", "truncated jpeg", "truncated nifti",
                                  "not dicom", "no pixel data", "missing", "folder"])
def test_bad_files_raise_one_line_naming_the_file(tmp_path, case):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    if case == "garbage png":
        path = tmp_path / "x.png"
        path.write_bytes(b"not an image at all")
    elif case == "truncated png":
        img.save(tmp_path / "x.png")
        path = _truncated(tmp_path / "x.png", 2000)
    elif case == "truncated jpeg":
        img.save(tmp_path / "x.jpg", quality=95)
        path = _truncated(tmp_path / "x.jpg", 1500)
    elif case == "truncated nifti":
        write_nifti(tmp_path / "x.nii.gz", np.random.default_rng(0).random((40, 40, 8), dtype=np.float32))
        path = _truncated(tmp_path / "x.nii.gz", 3000)
    elif case == "not dicom":
        path = tmp_path / "x.dcm"
        path.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 50)
    elif case == "no pixel data":
        path = write_dicom(tmp_path / "x.dcm", np.zeros((4, 4)))
        import pydicom

        ds = pydicom.dcmread(str(path))
        del ds.PixelData
        ds.save_as(str(path))
    elif case == "missing":
        path = tmp_path / "x.png"
    else:
        path = tmp_path / "x.png"
        path.mkdir()
    with pytest.raises(DataError) as err:
        read_images(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg


def test_dicom_without_pydicom_names_the_extra(samples, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(MissingExtra) as err:
        read_images(samples["dicom_mono1"].path)
    msg = str(err.value)
    assert msg.startswith(f"{samples['dicom_mono1'].path}: ") and "pip install 'icmoe[dicom]'" in msg and "\n" not in msg


def test_dicom_found_by_content_without_suffix(samples, tmp_path):
    plain = tmp_path / "IM0001"
    plain.write_bytes(samples["dicom_mono1"].path.read_bytes())
    assert read_images(plain).format == "dicom"


def test_arrays_and_pil_images():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (9, 11, 4), dtype=np.uint8)
    np.testing.assert_array_equal(picture_from_array(rgba).pixels, rgba[..., :3])
    u16 = rng.integers(100, 4000, (7, 5)).astype(np.uint16)
    p = picture_from_array(u16)
    assert p.pixels.dtype == np.uint8 and p.pixels.min() == 0 and p.pixels.max() == 255
    assert picture_from_pil(Image.fromarray(u16)).pixels.tolist() == p.pixels.tolist()  # a 16-bit PIL image: same rule
    for bad in (np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((0, 3), np.uint8)):
        with pytest.raises(DataError, match="uint8 or uint16"):
            picture_from_array(bad)


def test_model_input_follows_the_training_paths():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (30, 50), dtype=np.uint8)
    x = model_input(picture_from_array(gray), 16)
    np.testing.assert_array_equal(x, resize_rgb(gray, 16).transpose(2, 0, 1).astype(np.float32))
    floats = picture_from_array(gray)
    floats.pixels = gray.astype(np.float32) * 0.5  # a DICOM/NIfTI-like float picture
    np.testing.assert_array_equal(model_input(floats, 16)[1], resize_image(floats.pixels, 16))


def test_write_nifti_labels_is_gzip_and_atomic(samples, tmp_path):
    f = read_images(samples["nifti"].path)
    target = tmp_path / "m.nii.gz"
    target.write_bytes(b"old")
    write_nifti_labels(target, np.zeros((4, 30, 26), np.uint8), f)
    assert gzip.decompress(target.read_bytes())[:4] == (348).to_bytes(4, "little")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_multipage_tiff_gives_one_picture_per_page(tmp_path):
    pages = [Image.fromarray(np.full((6, 9), 40 * k, np.uint8)) for k in range(3)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    f = read_images(tmp_path / "stack.tif")
    assert [(p.frame, p.size, int(p.pixels[0, 0])) for p in f.pictures] == [(0, (6, 9), 0), (1, (6, 9), 40),
                                                                             (2, (6, 9), 80)]
    assert f.multi and len(read_images(tmp_path / "stack.tif", first_only=True).pictures) == 1
