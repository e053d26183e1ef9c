"""icmoe_aoti on image files of any kind and size: PNG (8-bit RGB, gray, 16-bit gray and colour, RGBA, palette,
1-bit), JPEG (baseline, progressive, gray, EXIF-rotated), BMP (24-bit, 32-bit, palette); masks written as PNG at the
image's size; the command line; files replaced atomically.

The reference is the same AOTInductor package run in Python (torch._inductor.aoti_load_package) on the image as
the Python side prepares it (icmoe.data.images: read_image, model_input; the mask at the image's size by
mask_from_logits, the logits resized bilinearly and arg-maxed, as the package's mask rule says). The C++
decoders (libpng, libjpeg-turbo with Pillow's settings, the BMP reader) and resize reproduce Pillow's pixels
exactly (Pillow 13's resize), so the masks are equal, JPEG included. The package is the multi-class toy of
test_cpp_labels.py (session fixtures, conftest.py): its mask holds the raw label values 0..2.
"""

from __future__ import annotations

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from engines.cpp import read_mask, run_program
from icmoe.data.images import mask_from_logits, model_input, read_image
from tests.engines.test_cpp_aoti import _expect_error, edit_package_metadata, parse_stdout
from tests.icmoe.data.hostile import png_bytes
from tests.icmoe.families.toy import LABELS
from tests.skips import cpp_toolchain_missing

NO_TOOLCHAIN = cpp_toolchain_missing()
pytestmark = pytest.mark.skipif(NO_TOOLCHAIN is not None, reason=NO_TOOLCHAIN or "")

SIZE = 64  # the toy's input size
# Pillow 12 and older order the two resize passes differently in some cases (common/resize.h): a level of
# difference in a few input pixels, so masks then only nearly agree.
EXACT_RESIZE = int(PIL.__version__.split(".")[0]) >= 13
NEAR_AGREEMENT = 0.99  # with an older Pillow


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


def _rgb16_png(path, x) -> None:
    """16-bit RGB (Pillow writes none): high bytes the picture, low bytes noise, which Pillow drops."""
    h, w, _ = x.shape
    wide = x.astype(np.uint16) * 256 + np.random.default_rng(0).integers(0, 256, x.shape).astype(np.uint16)
    path.write_bytes(png_bytes(w, h, 16, 2, b"".join(b"\0" + row.astype(">u2").tobytes() for row in wide)))


# name -> (writer of the file from (H, W, 3) uint8 pixels, (H, W))
KINDS = {
    "rgb8.png": (lambda p, x: Image.fromarray(x).save(p), (70, 90)),
    "model_size.png": (lambda p, x: Image.fromarray(x).save(p), (SIZE, SIZE)),
    "gray8.png": (lambda p, x: Image.fromarray(x[..., 0]).save(p), (50, 80)),
    "gray16.png": (lambda p, x: Image.fromarray(x[..., 0].astype(np.uint16) * 40 + 1000).save(p), (70, 90)),
    "rgb16.png": (_rgb16_png, (41, 57)),
    "rgba.png": (lambda p, x: Image.fromarray(np.dstack([x, x[..., :1]])).save(p), (45, 100)),
    "palette.png": (lambda p, x: Image.fromarray(x).convert("P", palette=Image.ADAPTIVE, colors=12).save(p), (52, 61)),
    "bilevel.png": (lambda p, x: Image.fromarray(x[..., 0]).convert("1").save(p), (48, 50)),
    "rotated.png": (lambda p, x: Image.fromarray(x).save(p, exif=_exif(8)), (40, 70)),
    "rgb.bmp": (lambda p, x: Image.fromarray(x).save(p), (33, 47)),
    "rgba.bmp": (lambda p, x: Image.fromarray(np.dstack([x, x[..., :1]])).save(p), (31, 45)),
    "palette.bmp": (lambda p, x: Image.fromarray(x).convert("P", palette=Image.ADAPTIVE, colors=16).save(p), (30, 44)),
    "rgb.jpg": (lambda p, x: Image.fromarray(x).save(p, quality=90), (70, 90)),
    "gray.jpg": (lambda p, x: Image.fromarray(x[..., 1]).save(p, quality=85), (66, 50)),
    "progressive.jpg": (lambda p, x: Image.fromarray(x).save(p, quality=80, progressive=True), (59, 77)),
    "rotated.jpg": (lambda p, x: Image.fromarray(x).save(p, quality=90, exif=_exif(6)), (60, 100)),
}


@pytest.mark.parametrize("name", list(KINDS))
def test_mask_at_image_size_matches_python(program, labels_package, labels_family, reference, tmp_path, name):
    write, (height, width) = KINDS[name]
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
    if EXACT_RESIZE or name == "model_size.png":
        np.testing.assert_array_equal(mask, expected)
    else:
        assert agreement >= NEAR_AGREEMENT


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
    ("truncated_png", "damaged PNG (truncated file)"),
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
