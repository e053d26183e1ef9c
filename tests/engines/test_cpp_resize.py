"""engines/cpp/common/resize.h's float resize and mask rules against the Python side, bit for bit.

A small program (compiled here with the system's C++ compiler; seconds) reads float logits and writes what
resize_float and mask_from_logits (common/outputs.h) give; Python's `resize_logits` and `mask_from_logits`
(icmoe.data.images, Pillow's float BILINEAR) must give the same bytes, upsampling and shrinking, in both
pass orders, for one channel (threshold) and several (argmax).
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from engines.cpp import SOURCE_DIR
from icmoe.data.images import mask_from_logits, resize_logits

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler on PATH")

HARNESS = r"""
#include <cstdio>
#include <vector>
#include "outputs.h"
// stdin: int32 channels, height, width, out_h, out_w, rule (0 threshold, 1 argmax); then channels*h*w float32.
// stdout: the first channel resized (out_h*out_w float32), then the mask (out_h*out_w uint8).
int main() {
  int v[6];
  if (std::fread(v, 4, 6, stdin) != 6) return 1;
  const int c = v[0], h = v[1], w = v[2], oh = v[3], ow = v[4];
  std::vector<float> x(static_cast<size_t>(c) * h * w);
  if (std::fread(x.data(), 4, x.size(), stdin) != x.size()) return 1;
  icmoe::MaskKind kind;
  if (v[5] == 1) {
    kind.labels = true;
    for (int i = 0; i < c; ++i) kind.class_names.push_back("c" + std::to_string(i));
    kind.rule = "argmax";
  } else {
    kind.rule = "threshold";
  }
  const icmoe::Output logits{"logits", "float32", {1, c, h, w}, x.data()};
  const std::vector<float> first = icmoe::resize_float(x.data(), w, h, ow, oh);
  const std::vector<uint8_t> mask = icmoe::mask_from_logits(logits, kind, h, w, ow, oh);
  std::fwrite(first.data(), 4, first.size(), stdout);
  std::fwrite(mask.data(), 1, mask.size(), stdout);
  return 0;
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resize")
    (folder / "harness.cpp").write_text(HARNESS)
    exe = folder / "harness"
    proc = subprocess.run(["c++", "-std=c++17", "-O1", f"-I{SOURCE_DIR / 'common'}",
                           f"-I{SOURCE_DIR / 'third_party' / 'stb'}", str(folder / "harness.cpp"),
                           "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return exe


def _run(exe, logits: np.ndarray, size, rule: str):
    c, h, w = logits.shape
    head = np.array([c, h, w, size[0], size[1], 1 if rule == "argmax" else 0], dtype=np.int32).tobytes()
    out = subprocess.run([str(exe)], input=head + logits.astype(np.float32).tobytes(), capture_output=True,
                         timeout=60, check=True).stdout
    n = size[0] * size[1]
    return np.frombuffer(out[:4 * n], np.float32).reshape(size), np.frombuffer(out[4 * n:], np.uint8).reshape(size)


@pytest.mark.parametrize("shape, size", [
    ((1, 32, 32), (240, 300)),   # upsampling, the usual case (a 128-px model on a larger picture)
    ((1, 64, 64), (64, 200)),    # wider only
    ((1, 64, 64), (30, 200)),    # the height shrinks by more than twice the width's change: vertical pass first
    ((1, 50, 70), (13, 300)),
    ((3, 40, 40), (97, 123)),    # label logits
    ((4, 64, 64), (50, 40)),     # label logits, shrinking (antialiased)
])
def test_cpp_resize_and_mask_rules_equal_python(harness, shape, size):
    logits = np.random.default_rng(sum(shape) + sum(size)).standard_normal(shape).astype(np.float32)
    rule = "threshold" if shape[0] == 1 else "argmax"
    first, mask = _run(harness, logits, size, rule)
    np.testing.assert_array_equal(first, resize_logits(logits[0], size))
    np.testing.assert_array_equal(mask, mask_from_logits(logits, size, rule))
