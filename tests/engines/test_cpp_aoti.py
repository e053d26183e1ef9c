"""The CPU C++ program: an AOTInductor package of the tiny model run by icmoe_aoti (libtorch from the torch wheel).

The module fixture compiles the package (fast-compile settings) and builds the program with CMake once,
side by side; that takes a couple of minutes on 2 cores. The program's mask, expert and logits are compared with eager
PyTorch on the very same pixels (the PPM it reads is the rounded image, so eager gets the rounded image too), and the
outputs it lists are the ones the package's metadata names. The program takes its outputs from the metadata, not from
IC-MoE: a toy package with other outputs (multi-class logits, no expert, another order) and copies of the tiny package
with edited metadata (older packages without output names, inconsistent names) check that.
"""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from engines.cpp import (
    CMakeError,
    build_programs,
    read_mask,
    read_pgm,
    run_program,
    write_ppm,
)
from export.aoti import package_aoti
from icmoe.data.images import mask_from_logits, resize_label
from tests.skips import cpp_toolchain_missing

NO_TOOLCHAIN = cpp_toolchain_missing()
pytestmark = pytest.mark.skipif(NO_TOOLCHAIN is not None, reason=NO_TOOLCHAIN or "")

LOGIT_ATOL = 1e-3
N_IMAGES = 2


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tmp_path_factory, aoti_program_future):
    """(package, program): the session's CMake build (tests/engines/conftest.py) runs in a thread while
    Inductor compiles (2 cores, both mostly serial)."""
    package = package_aoti(tiny_checkpoint, tmp_path_factory.mktemp("aoti") / "tiny.pt2", fast_compile=True)
    return package, aoti_program_future.result()


@pytest.fixture(scope="module")
def package(built):
    return built[0]


@pytest.fixture(scope="module")
def program(built):
    return built[1]


def read_package_metadata(package) -> dict:
    """The metadata AOTInductor stored in the package (a zip): what the program reads with get_metadata()."""
    with zipfile.ZipFile(package) as z:
        name = next(n for n in z.namelist() if n.endswith("wrapper_metadata.json"))
        return json.loads(z.read(name))


def edit_package_metadata(package, out, change):
    """A copy of the package whose metadata `change(dict)` edited in place."""
    with zipfile.ZipFile(package) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("_metadata.json"):
                meta = json.loads(data)
                change(meta)
                data = json.dumps(meta).encode()
            zout.writestr(info, data)
    return out


def expected_outputs_line(metadata) -> str:
    """The program's `outputs` line for the package's output specs at batch 1: name:dtype[dims] ..."""
    specs = {s["name"]: s for s in json.loads(metadata["icmoe.outputs"])}
    items = []
    for name in metadata["icmoe.output_names"].split(","):
        dims = [1 if d == "batch" else int(d) for d in specs[name]["shape"]]
        items.append(f"{name}:{specs[name]['dtype']}[{','.join(map(str, dims))}]")
    return " ".join(items)


def parse_stdout(stdout: str) -> dict:
    return dict(line.split(" ", 1) for line in stdout.strip().splitlines())


@pytest.fixture(scope="module")
def cases(tiny_checkpoint, tmp_path_factory):
    """PPM files of synthetic lesion images and eager outputs on their exact pixels."""
    import icmoe
    from icmoe.data.synthetic import synthetic_images

    folder = tmp_path_factory.mktemp("images")
    x, _ = synthetic_images(N_IMAGES, 128, 3)
    x = np.clip(np.rint(x), 0, 255).astype(np.float32)  # what the PPM stores
    model = icmoe.load(tiny_checkpoint)
    with torch.no_grad():
        vote = model(torch.from_numpy(x))
    return [(write_ppm(folder / f"img{i}.ppm", x[i]), vote.logits[i, 0].numpy(), vote.mask[i, 0].numpy(),
             int(vote.expert[i])) for i in range(N_IMAGES)]


def test_program_matches_eager(program, package, cases, tmp_path):
    metadata = read_package_metadata(package)
    assert metadata["icmoe.output_names"] == "logits,mask,expert"
    assert (metadata["icmoe.mask_kind"], metadata["icmoe.class_names"]) == ("binary", "")
    outputs_line = expected_outputs_line(metadata)
    assert outputs_line == "logits:float32[1,1,128,128] mask:uint8[1,1,128,128] expert:int32[1]"
    worst = 0.0
    for i, (image, ref_logits, ref_mask, ref_expert) in enumerate(cases):
        mask_path, logits_path = tmp_path / f"mask{i}.pgm", tmp_path / f"logits{i}.f32"
        proc = run_program(program, package, image, mask_path, "--logits", logits_path)
        assert proc.returncode == 0, proc.stderr
        lines = parse_stdout(proc.stdout)
        assert lines["outputs"] == outputs_line, "the program must list the outputs the package's metadata names"
        assert int(lines["expert"]) == ref_expert
        mask = read_pgm(mask_path)
        assert mask.shape == (128, 128) and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask > 0, ref_mask > 0)
        logits = np.fromfile(logits_path, np.float32).reshape(128, 128)
        diff = float(np.abs(logits - ref_logits).max())
        assert diff <= LOGIT_ATOL
        worst = max(worst, diff)
        assert int(lines["foreground"].split()[0]) == int((ref_mask > 0).sum())
    print(f"\nicmoe_aoti vs eager on {N_IMAGES} images: masks equal, experts equal, max |logit diff| {worst:.3g}")


def test_older_package_without_output_names(program, package, cases, tmp_path):
    """Packages written before icmoe.output_names: the IC-MoE outputs are assumed, and the program says so."""
    def make_old(meta):  # neither output names nor the mask kind were recorded then
        for key in ("icmoe.output_names", "icmoe.mask_kind", "icmoe.class_names"):
            meta.pop(key)

    old = edit_package_metadata(package, tmp_path / "old.pt2", make_old)
    image, _, ref_mask, ref_expert = cases[0]
    proc = run_program(program, old, image, tmp_path / "m.pgm")
    assert proc.returncode == 0, proc.stderr
    assert "no icmoe.output_names metadata" in proc.stderr and "logits,mask,expert" in proc.stderr
    lines = parse_stdout(proc.stdout)
    assert lines["outputs"].split()[0].startswith("logits:") and int(lines["expert"]) == ref_expert
    assert not any(key.startswith("label") for key in lines), "a binary mask has no per-label counts"
    np.testing.assert_array_equal(read_pgm(tmp_path / "m.pgm") > 0, ref_mask > 0)


@pytest.mark.parametrize("names, logits, match", [
    ("logits,mask", False, "the package returned 3 outputs, its metadata names 2 (logits, mask)"),
    ("logits,labels,expert", False, "no output named mask (outputs: logits, labels, expert)"),
    ("scores,mask,expert", True, "--logits: the model has no output named logits"),
    ("logits,,expert", False, "bad icmoe.output_names metadata"),
])
def test_inconsistent_output_names_refused(program, package, cases, tmp_path, names, logits, match):
    edited = edit_package_metadata(package, tmp_path / "edited.pt2", lambda m: m.update({"icmoe.output_names": names}))
    extra = ("--logits", tmp_path / "l.f32") if logits else ()
    _expect_error(program, edited, cases[0][0], tmp_path / "m.pgm", *extra, match=match)
    assert not (tmp_path / "m.pgm").exists() and not (tmp_path / "l.f32").exists()


class ToyModel(torch.nn.Module):
    """Another family's kind of outputs, in another order: a mask, 3-class logits and a float score; no expert."""

    def forward(self, image):
        logits = (image - 128.0) / 8.0  # (1, 3, S, S)
        mask = (logits.argmax(1, keepdim=True) > 0).to(torch.uint8)  # (1, 1, S, S)
        score = logits.amax(dim=(1, 2, 3))  # (1,)
        return mask, logits, score


TOY_SIZE = 16


@pytest.fixture(scope="module")
def toy_package(tmp_path_factory):
    """An AOTInductor package of ToyModel with the metadata the program reads (seconds: a handful of kernels)."""
    path = tmp_path_factory.mktemp("toy") / "toy.pt2"
    example = (torch.rand(1, 3, TOY_SIZE, TOY_SIZE) * 255,)
    program = torch.export.export(ToyModel().eval(), example)
    metadata = {"icmoe.family": "toy", "icmoe.image_size": str(TOY_SIZE), "icmoe.output_names": "mask,logits,score"}
    torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs={
        "aot_inductor.metadata": metadata, "aot_inductor.compile_wrapper_opt_level": "O0", "pattern_matcher": False})
    return path


def test_other_outputs(program, toy_package, tmp_path):
    """Outputs by name, not position: multi-class logits written whole, a small float output printed, no expert."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, TOY_SIZE, TOY_SIZE)).astype(np.float32)
    image = write_ppm(tmp_path / "toy.ppm", x)
    mask_path, logits_path = tmp_path / "toy.pgm", tmp_path / "toy.f32"
    proc = run_program(program, toy_package, image, mask_path, "--logits", logits_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    with torch.no_grad():
        ref_mask, ref_logits, ref_score = ToyModel()(torch.from_numpy(x)[None])
    lines = parse_stdout(proc.stdout)
    s = TOY_SIZE
    assert lines["outputs"] == f"mask:uint8[1,1,{s},{s}] logits:float32[1,3,{s},{s}] score:float32[1]"
    assert "expert" not in lines
    assert float(lines["score"]) == pytest.approx(float(ref_score[0]), abs=1e-4)
    np.testing.assert_array_equal(read_pgm(mask_path) > 0, ref_mask[0, 0].numpy() > 0)
    logits = np.fromfile(logits_path, np.float32)
    assert logits.size == 3 * TOY_SIZE * TOY_SIZE
    np.testing.assert_allclose(logits.reshape(3, TOY_SIZE, TOY_SIZE), ref_logits[0].numpy(), atol=1e-5)
    assert int(lines["foreground"].split()[0]) == int((ref_mask > 0).sum())


def test_program_latency_line(program, package, cases, tmp_path):
    proc = run_program(program, package, cases[0][0], tmp_path / "m.pgm", "--repeat", "3")
    assert proc.returncode == 0, proc.stderr
    print("\n" + proc.stdout.strip().splitlines()[-1] + " (icmoe_aoti, tiny, 2 shared cores)")
    assert "latency" in proc.stdout


def _expect_error(program, *args, match, code=1):
    """The program fails with one line "error: ..." containing `match`, exit code `code` (2: a command-line
    mistake)."""
    proc = run_program(program, *args)
    assert proc.returncode == code, proc.stdout
    assert proc.stderr.startswith("error: ") and match in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_image_of_another_size_resized(program, package, cases, tmp_path):
    """An image of another size is resized to the model's, and its mask written at the image's size."""
    from PIL import Image

    with Image.open(cases[0][0]) as im:
        pixels = np.asarray(im.convert("RGB"))[::2, ::3]  # 64 rows, 43 columns
    Image.fromarray(np.ascontiguousarray(pixels)).save(tmp_path / "small.png")
    proc = run_program(program, package, tmp_path / "small.png", tmp_path / "m.png", "--logits", tmp_path / "l.f32")
    assert proc.returncode == 0, proc.stderr
    lines = parse_stdout(proc.stdout)
    assert lines["image"] == "43x64" and lines["upsample"] == "logits threshold"
    mask = read_mask(tmp_path / "m.png")
    assert mask.shape == (64, 43) and set(np.unique(mask)) <= {0, 255}
    # The mask is the program's own logits resized as Python resizes them, then > 0 (the package's rule) ...
    logits = np.fromfile(tmp_path / "l.f32", np.float32).reshape(1, 128, 128)
    np.testing.assert_array_equal(mask > 0, mask_from_logits(logits, (64, 43), "threshold") > 0)
    # ... and --upsample nearest gives the model-size mask resized by nearest neighbour.
    proc = run_program(program, package, tmp_path / "small.png", tmp_path / "n.png", "--upsample", "nearest")
    assert proc.returncode == 0 and parse_stdout(proc.stdout)["upsample"] == "nearest", proc.stderr
    np.testing.assert_array_equal(read_mask(tmp_path / "n.png") > 0, resize_label(logits[0] > 0, (64, 43)))
    proc = run_program(program, package, tmp_path / "small.png", tmp_path / "x.png", "--upsample", "cubic")
    assert proc.returncode == 2 and "--upsample must be logits or nearest" in proc.stderr


@pytest.mark.parametrize("damage", ["not_an_image", "truncated", "bad_maxval"])
def test_bad_image_refused(program, package, cases, tmp_path, damage):
    bad = tmp_path / "bad.ppm"
    data = cases[0][0].read_bytes()
    if damage == "not_an_image":
        bad.write_bytes(b"hello, not an image\n")
        match = "not a readable PNG, JPEG, BMP or PPM/PGM image"
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
        match = "truncated image data"
    else:
        bad.write_bytes(b"P6\n128 128\n70000\n" + bytes(128 * 128 * 6))
        match = "bad PNM maxval 70000"
    _expect_error(program, package, bad, tmp_path / "m.pgm", match=match)
    assert not (tmp_path / "m.pgm").exists()


def test_bad_package_refused(program, cases, tmp_path):
    fake = tmp_path / "fake.pt2"
    fake.write_bytes(b"PK\x03\x04 not really a package")
    proc = run_program(program, fake, cases[0][0], tmp_path / "m.pgm")
    assert proc.returncode == 1 and proc.stderr.startswith("error: ")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "m.pgm").exists()


def test_usage(program):
    proc = run_program(program)
    assert proc.returncode == 2 and "usage: icmoe_aoti" in proc.stderr


def test_cmake_failure_is_one_line(tmp_path):
    with pytest.raises(CMakeError, match="cmake configure failed") as info:
        build_programs(tmp_path / "build", targets=(), extra_args=("-DCMAKE_PREFIX_PATH=/nonexistent",))
    assert "\n" not in str(info.value)
