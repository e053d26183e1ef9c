"""icmoe_aoti on a multi-class model: the label map as raw PGM values, the pixels per label, and refusals.

The multi-class toy family (`toy_labels`, micro: 64x64, logits (1, 3, S, S), mask labels 0..2) is packaged
with AOTInductor (fast-compile settings) while the session's CMake build of icmoe_aoti runs
(tests/engines/conftest.py, fixtures shared with test_cpp_images.py). The package's metadata names the mask kind and the labels; the program writes
the label values themselves (not 0/255), so the PGM it writes equals eager PyTorch's mask on the same pixels.
Copies of the package with edited metadata check that the program refuses a mask its metadata contradicts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.cpp import read_pgm, run_program, write_ppm
from tests.engines.label_checks import check_label_mask
from tests.engines.test_cpp_aoti import _expect_error, edit_package_metadata, parse_stdout, read_package_metadata
from tests.icmoe.families.toy import LABELS
from tests.skips import cpp_toolchain_missing

NO_TOOLCHAIN = cpp_toolchain_missing()
pytestmark = pytest.mark.skipif(NO_TOOLCHAIN is not None, reason=NO_TOOLCHAIN or "")

SIZE = 64
N_IMAGES = 2
LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def model(labels_model):
    return labels_model


@pytest.fixture(scope="module")
def package(labels_package):
    """The toy labels package (tests/engines/conftest.py: shared with test_cpp_images.py)."""
    return labels_package


@pytest.fixture(scope="module")
def program(package, aoti_program):
    return aoti_program


@pytest.fixture(scope="module")
def cases(model, labels_family, tmp_path_factory):
    """PPM files and eager (logits (3, S, S), mask (1, S, S)) on their exact (rounded) pixels."""
    folder = tmp_path_factory.mktemp("label_images")
    x = np.clip(np.rint(labels_family.parity.synthetic_inputs(N_IMAGES, SIZE, seed=3)), 0, 255).astype(np.float32)
    with torch.no_grad():
        logits, mask = labels_family.graph.export_module(model)(torch.from_numpy(x))
    return [(write_ppm(folder / f"img{i}.ppm", x[i]), logits[i].numpy(), mask[i].numpy()) for i in range(N_IMAGES)]


def test_package_metadata_names_the_labels(package):
    metadata = read_package_metadata(package)
    assert metadata["icmoe.family"] == "toy_labels" and metadata["icmoe.output_names"] == "logits,mask"
    assert metadata["icmoe.mask_kind"] == "labels"
    assert metadata["icmoe.class_names"] == "background,lesion,rim" == ",".join(LABELS)
    assert metadata["icmoe.mask_rule"] == "argmax"


def test_program_writes_the_label_map(program, package, cases, tmp_path):
    seen = set()
    for i, (image, ref_logits, ref_mask) in enumerate(cases):
        mask_path, logits_path = tmp_path / f"mask{i}.pgm", tmp_path / f"logits{i}.f32"
        proc = run_program(program, package, image, mask_path, "--logits", logits_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""
        lines = parse_stdout(proc.stdout)
        assert lines["outputs"] == f"logits:float32[1,3,{SIZE},{SIZE}] mask:uint8[1,1,{SIZE},{SIZE}]"
        logits = np.fromfile(logits_path, np.float32).reshape(3, SIZE, SIZE)
        assert float(np.abs(logits - ref_logits).max()) <= LOGIT_ATOL
        mask = read_pgm(mask_path)  # the raw label values, not 0/255
        assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 1, 2}
        check_label_mask(mask[None, None], ref_mask[None], ref_logits[None], LOGIT_ATOL)
        for value, name in enumerate(LABELS):  # "label1 812 lesion": pixels per label, then its name
            count, printed = lines[f"label{value}"].split(" ", 1)
            assert printed == name and int(count) == int((mask == value).sum())
        assert int(lines["foreground"].split()[0]) == int((mask > 0).sum())
        seen |= set(np.unique(mask).tolist())
    assert seen == {0, 1, 2}, "the test images should show every label"


def _label2_image(cases):
    """A case whose eager mask holds label 2 (a binary reading of it is then impossible)."""
    return next(image for image, _, mask in cases if (mask == 2).any())


@pytest.mark.parametrize("change, match", [
    (lambda m: [m.pop("icmoe.mask_kind"), m.pop("icmoe.class_names")], "but the mask is binary (0/1)"),
    (lambda m: m.update({"icmoe.class_names": "background,lesion"}), "but the mask is labels (background, lesion)"),
    (lambda m: m.update({"icmoe.class_names": "background,lesion,rim,core"}),
     f"output logits is logits:float32[1,3,{SIZE},{SIZE}], but the mask has 4 classes"),
    (lambda m: m.update({"icmoe.mask_kind": "multi"}), "bad icmoe.mask_kind / icmoe.class_names / icmoe.mask_rule metadata"),
    (lambda m: m.update({"icmoe.mask_rule": "threshold"}), "mask rule 'threshold' does not fit a label mask"),
    (lambda m: m.update({"icmoe.mask_rule": "median"}), "mask rule 'median' is neither threshold nor argmax"),
    (lambda m: m.update({"icmoe.class_names": "background"}), "needs 2..256 class names"),
    (lambda m: m.update({"icmoe.class_names": "background,,rim"}), "empty name in the class name list"),
])
def test_metadata_contradicting_the_mask_refused(program, package, cases, tmp_path, change, match):
    edited = edit_package_metadata(package, tmp_path / "edited.pt2", change)
    _expect_error(program, edited, _label2_image(cases), tmp_path / "m.pgm", "--logits", tmp_path / "l.f32",
                  match=match)
    assert not (tmp_path / "m.pgm").exists() and not (tmp_path / "l.f32").exists()
