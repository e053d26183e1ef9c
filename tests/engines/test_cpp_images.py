"""icmoe_aoti on image files of any kind and size: PNG (8-bit RGB, gray, 16-bit gray, RGBA), JPEG (also EXIF-rotated),
BMP; masks written as PNG at the image's size; the command line; files replaced atomically.

The reference is the same AOTInductor package run in Python (torch._inductor.aoti_load_package) on the image as
the Python side prepares it (icmoe.data.images: read_image, model_input; the mask at the image's size by
mask_from_logits, the logits resized bilinearly and arg-maxed, as the package's mask rule says). The C++
decoder and resize reproduce Pillow's pixels exactly for lossless files (Pillow 13's resize), so those masks are
equal; stb's JPEG decoder differs from libjpeg by a level or two in some pixels, so JPEG masks must agree on 99%
of their pixels. The package is the multi-class toy of test_cpp_labels.py (session fixtures, conftest.py): its mask
holds the raw label values 0..2.
"""

from __future__ import annotations

import shutil

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from engines.cpp import read_mask, run_program
from icmoe.data.images import mask_from_logits, model_input, read_image
from tests.engines.test_cpp_aoti import _expect_error, edit_package_metadata, parse_stdout
from tests.icmoe.families.toy import LABELS

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                                reason="needs cmake and a C++ compiler on PATH")

SIZE = 64  # the toy's input size
# Pillow 12 and older order the two resize passes differently in some cases (common/resize.h): a level of
# difference in a few input pixels, so masks then only nearly agree.
EXACT_RESIZE = int(PIL.__version__.split(".")[0]) >= 13
JPEG_AGREEMENT = 0.99


@pytest.fixture(scope="module")
def program(labels_package, aoti_program):
    return aoti_program


@pytest.fixture(scope="module")
def reference(labels_package):
    """image path -> the mask Python gives: the same package on the same preprocessing, back at the image's size."""
    runner = torch._inductor.aoti_load_package(str(labels_package))

    def mask_for(path) -> np.ndarray:
        picture = read_image(path)
        x = torch.from_numpy(np.ascontiguousarray(model_input(picture, SIZE)))[None]  # the runner takes strides as given
        with torch.inference_mode():
            logits, _ = runner(x)
        return mask_from_logits(logits[0].numpy(), picture.size, "argmax")

    return mask_for


def _content(labels_family, height, width, seed) -> np.ndarray:
    """(height, width, 3) uint8 pictures with the toy's kind of content (a bright disc on noise)."""
    side = max(height, width)
    x = labels_family.parity.synthetic_inputs(1, side, seed=seed)[0].transpose(1, 2, 0)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)[:height, :width]


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


# name -> (writer of the file from (H, W, 3) uint8 pixels, (H, W), lossless)
KINDS = {
    "rgb8.png": (lambda p, x: Image.fromarray(x).save(p), (70, 90), True),
    "model_size.png": (lambda p, x: Image.fromarray(x).save(p), (SIZE, SIZE), True),
    "gray8.png": (lambda p, x: Image.fromarray(x[..., 0]).save(p), (50, 80), True),
    "gray16.png": (lambda p, x: Image.fromarray(x[..., 0].astype(np.uint16) * 40 + 1000).save(p), (70, 90), True),
    "rgba.png": (lambda p, x: Image.fromarray(np.dstack([x, x[..., :1]])).save(p), (45, 100), True),
    "rgb.bmp": (lambda p, x: Image.fromarray(x).save(p), (33, 47), True),
    "rgb.jpg": (lambda p, x: Image.fromarray(x).save(p, quality=90), (70, 90), False),
    "rotated.jpg": (lambda p, x: Image.fromarray(x).save(p, quality=90, exif=_exif(6)), (60, 100), False),
}


@pytest.mark.parametrize("name", list(KINDS))
def test_mask_at_image_size_matches_python(program, labels_package, labels_family, reference, tmp_path, name):
    write, (height, width), lossless = KINDS[name]
    path = tmp_path / name
    write(path, _content(labels_family, height, width, seed=len(name)))
    proc = run_program(program, labels_package, path, tmp_path / "mask.png")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    mask, expected = read_mask(tmp_path / "mask.png"), reference(path)
    assert mask.shape == expected.shape == read_image(path).size  # upright (EXIF) size: rotated.jpg is 100x60
    lines = parse_stdout(proc.stdout)
    assert lines["image"] == f"{mask.shape[1]}x{mask.shape[0]}"
    assert lines["outputs"] == f"logits:float32[1,3,{SIZE},{SIZE}] mask:uint8[1,1,{SIZE},{SIZE}]"
    for value, label in enumerate(LABELS):  # counts of the written mask
        assert lines[f"label{value}"] == f"{int((mask == value).sum())} {label}"
    agreement = float((mask == expected).mean())
    print(f"\n{name}: {mask.shape[1]}x{mask.shape[0]}, labels {sorted(np.unique(mask).tolist())}, "
          f"{agreement:.2%} of pixels as Python's")
    if lossless and (EXACT_RESIZE or name == "model_size.png"):
        np.testing.assert_array_equal(mask, expected)
    else:
        assert agreement >= JPEG_AGREEMENT


def test_pgm_by_extension(program, labels_package, labels_family, tmp_path):
    Image.fromarray(_content(labels_family, 40, 52, seed=1)).save(tmp_path / "in.png")
    for mask in ("m.png", "m.pgm"):
        proc = run_program(program, labels_package, tmp_path / "in.png", tmp_path / mask)
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.pgm").read_bytes().startswith(b"P5\n52 40\n255\n")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.pgm"), read_mask(tmp_path / "m.png"))


@pytest.mark.parametrize("args, match", [
    (("--repeat", "abc"), "--repeat expects a whole number 0..1000000, got 'abc'"),
    (("--repeat", "-1"), "got '-1'"),
    (("--repeat", "1x"), "got '1x'"),
    (("--repeat=",), "got ''"),
    (("--repeat", "99999999"), "got '99999999'"),
    (("--logits",), "--logits needs a value (FILE)"),
    (("--logits", "--repeat", "2"), "--logits needs a value"),
    (("--repeat", "1", "--repeat", "2"), "--repeat given twice"),
    (("--classes", "a,b"), "unknown option --classes"),  # icmoe_trt's, not icmoe_aoti's
    (("-x",), "unknown option -x"),
    (("extra",), "expected 3 arguments (MODEL.pt2 IMAGE MASK), got 4"),
])
def test_bad_arguments(program, tmp_path, args, match):
    """Refused before anything is read (the model path does not even exist): one line, exit code 2."""
    _expect_error(program, tmp_path / "none.pt2", tmp_path / "none.png", tmp_path / "m.png", *args, match=match,
                  code=2)
    assert not (tmp_path / "m.png").exists()


def test_bad_mask_name_and_count(program, tmp_path):
    _expect_error(program, tmp_path / "none.pt2", tmp_path / "none.png", tmp_path / "m.jpg",
                  match="m.jpg: the mask file must end in .png or .pgm", code=2)
    _expect_error(program, tmp_path / "none.pt2", tmp_path / "none.png", match="got 2", code=2)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(program, flag):
    proc = run_program(program, flag)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: icmoe_aoti MODEL.pt2 IMAGE MASK [--logits FILE] [--repeat N]")
    assert "--repeat N" in proc.stdout and "PNG, JPEG, BMP" in proc.stdout


def test_repeat(program, labels_package, labels_family, tmp_path):
    Image.fromarray(_content(labels_family, SIZE, SIZE, seed=2)).save(tmp_path / "in.png")
    proc = run_program(program, labels_package, tmp_path / "in.png", tmp_path / "m.png", "--repeat=2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("latency ") and "(mean of 2)" in proc.stdout


@pytest.mark.parametrize("damage, match", [
    ("missing", "cannot open image"),
    ("text", "not a readable PNG, JPEG, BMP or PPM/PGM image"),
    ("truncated_png", "damaged image"),
    ("empty", "empty file"),
])
def test_bad_image_keeps_the_old_mask(program, labels_package, labels_family, tmp_path, damage, match):
    """A failed run writes nothing and leaves the mask already there as it was, with no temporary files."""
    bad = tmp_path / "bad.png"
    if damage == "text":
        bad.write_text("hello, not an image\n")
    elif damage == "truncated_png":
        Image.fromarray(_content(labels_family, 50, 50, seed=3)).save(bad)
        bad.write_bytes(bad.read_bytes()[:300])
    elif damage == "empty":
        bad.write_bytes(b"")
    old = tmp_path / "m.png"
    old.write_bytes(b"the previous mask")
    _expect_error(program, labels_package, bad, old, match=match)
    assert old.read_bytes() == b"the previous mask"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.png"] + ([] if damage == "missing" else ["bad.png"]))


def test_refused_outputs_keep_the_old_mask(program, labels_package, labels_family, tmp_path):
    """Outputs refused after inference (a mask holding a label the metadata does not name) write nothing either."""
    edited = edit_package_metadata(labels_package, tmp_path / "binary.pt2",
                                   lambda m: [m.pop("icmoe.mask_kind"), m.pop("icmoe.class_names")])
    image = tmp_path / "in.png"
    for seed in range(20):  # an image whose mask holds label 2: impossible for a binary mask
        Image.fromarray(_content(labels_family, SIZE, SIZE, seed=seed)).save(image)
        proc = run_program(program, labels_package, image, tmp_path / "probe.png")
        if parse_stdout(proc.stdout)["label2"].split()[0] != "0":
            break
    else:
        pytest.fail("no test image shows label 2")
    (tmp_path / "probe.png").unlink()
    old = tmp_path / "m.png"
    old.write_bytes(b"the previous mask")
    _expect_error(program, edited, image, old, match="but the mask is binary (0/1)")
    assert old.read_bytes() == b"the previous mask"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binary.pt2", "in.png", "m.png"]


def test_mask_replaced_whole(program, labels_package, labels_family, tmp_path):
    """A successful run replaces the file there (a new inode: renamed over it, never truncated in place)."""
    Image.fromarray(_content(labels_family, 30, 40, seed=4)).save(tmp_path / "in.png")
    old = tmp_path / "m.png"
    old.write_bytes(b"x" * 100000)
    inode = old.stat().st_ino
    proc = run_program(program, labels_package, tmp_path / "in.png", old)
    assert proc.returncode == 0, proc.stderr
    assert read_mask(old).shape == (30, 40) and old.stat().st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "m.png"]


def test_unwritable_mask(program, labels_package, labels_family, tmp_path):
    Image.fromarray(_content(labels_family, 30, 40, seed=5)).save(tmp_path / "in.png")
    _expect_error(program, labels_package, tmp_path / "in.png", tmp_path / "no" / "m.png",
                  match="m.png: cannot write (No such file or directory)")
