"""C++ embedding: CMake projects in this folder and the Python helpers that feed and build them.

Details: docs/cpp.md.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

import numpy as np

from engines.base import BuildInfo, EngineError
from icmoe.core.io import PathLike, atomic_path
from icmoe.core.manifest import CLASS_NAME_SEPARATOR

log = logging.getLogger(__name__)
SOURCE_DIR = Path(__file__).resolve().parent


class CMakeError(EngineError):
    """CMake could not configure or build the C++ programs (one line; the full log is in the build folder)."""


def build_programs(build_dir: PathLike, *, targets: Sequence[str] = ("icmoe_aoti",), jobs: int = 2,
                   extra_args: Sequence[str] = (), source_dir: PathLike = SOURCE_DIR) -> Path:
    """Configure and build the C++ programs with CMake.

    Arguments:
      build_dir: CMake build folder (created).
      targets: targets to build (`icmoe_aoti`; `icmoe_trt` only exists where TensorRT was found);
        empty: configure only.
      jobs: parallel compile jobs.
      extra_args: more `cmake -D...` arguments.
      source_dir: the CMake project (this folder, wherever the package is installed).

    Progress lines go to this module's logger (INFO).

    Returns:
      The build folder; programs are at `<build_dir>/<subdir>/<target>` (see `program_path`).

    Raises:
      CMakeError: configuring or building failed (one line; the full log is in the build folder).
    """
    import torch.utils

    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    configure = ["cmake", "-S", str(source_dir), "-B", str(build_dir),
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", *extra_args]
    build = ["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *targets]
    steps = [("configure", configure)] + ([("build", build)] if targets else [])
    for step, cmd in steps:
        log.info(f"cmake {step}: {' '.join(cmd)}")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        (build_dir / f"icmoe-{step}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            text = proc.stdout + proc.stderr
            errors = [line for line in text.splitlines() if "error" in line.lower()] or ["(no error line)"]
            raise CMakeError(f"cmake {step} failed: {errors[0].strip()} (log: {build_dir / f'icmoe-{step}.log'})")
    return build_dir


def program_path(build_dir: PathLike, target: str = "icmoe_aoti") -> Path:
    sub = {"icmoe_aoti": "aoti", "icmoe_trt": "tensorrt"}[target]
    return Path(build_dir) / sub / target


def write_ppm(path: PathLike, image) -> Path:
    """Write one (3, H, W) RGB image in 0..255 (float or uint8) as a binary PPM (the programs read PNG, JPEG
    and BMP as well).

    Float values are rounded to the nearest integer: the program then sees exactly `read_ppm(path)`.
    """
    x = np.asarray(image)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"write_ppm takes one (3, H, W) RGB image, got shape {x.shape}")
    pixels = np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(1, 2, 0)  # (H, W, 3)
    header = f"P6\n{x.shape[2]} {x.shape[1]}\n255\n".encode()
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(header + pixels.tobytes())
    return Path(path)


def read_mask(path: PathLike) -> np.ndarray:
    """Read a mask the programs wrote, PNG or PGM (by content) -> (H, W) uint8 as stored (0/255 or labels)."""
    data = Path(path).read_bytes()
    if data[:2] == b"P5":
        return read_pgm(path)
    from PIL import Image

    with Image.open(path) as im:
        if im.mode != "L":
            raise ValueError(f"{path}: a mask PNG is 8-bit gray, got mode {im.mode}")
        return np.asarray(im, dtype=np.uint8).copy()


def read_pgm(path: PathLike) -> np.ndarray:
    """Read a binary PGM (P5, 8-bit, as the programs write masks) -> (H, W) uint8."""
    data = Path(path).read_bytes()
    fields, pos = [], 2
    if data[:2] != b"P5":
        raise ValueError(f"{path}: not a binary PGM")
    while len(fields) < 3:
        while data[pos:pos + 1].isspace():
            pos += 1
        start = pos
        while not data[pos:pos + 1].isspace():
            pos += 1
        fields.append(int(data[start:pos]))
    w, h, _ = fields
    pixels = np.frombuffer(data[pos + 1:pos + 1 + w * h], np.uint8)
    if pixels.size != w * h:
        raise ValueError(f"{path}: truncated PGM")
    return pixels.reshape(h, w)


def class_arguments(build_dir: PathLike) -> List[str]:
    """icmoe_trt's flags for a build's mask: `["--classes", "background,liver,..."]` for a multi-class
    build (its manifest's label names), and `["--mask-rule", RULE]` where the build records how the mask
    follows from the logits; `[]` for a binary build without a rule.

    Raises:
      EngineError: no readable manifest in `build_dir`.
    """
    info = BuildInfo(build_dir)
    flags = [] if info.class_names is None else ["--classes", CLASS_NAME_SEPARATOR.join(info.class_names)]
    return flags + ([] if info.mask_rule is None else ["--mask-rule", info.mask_rule])


def run_program(program: PathLike, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the programs; returns the completed process (stdout, stderr, returncode)."""
    return subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, timeout=timeout)


__all__ = ["SOURCE_DIR", "CMakeError", "build_programs", "class_arguments", "program_path", "write_ppm", "read_mask",
           "read_pgm", "run_program"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit("package a model with python -m export.aoti; build the programs with cmake (engines/cpp/CMakeLists.txt)")
