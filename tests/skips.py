"""Why a GPU/TensorRT or C++ test cannot run on this host: one precise reason, shared by the test files."""

from __future__ import annotations

import functools
import shutil
import subprocess
from typing import Optional

from engines.tensorrt import unavailable_reason


def tensorrt_gpu_missing() -> Optional[str]:
    """The reason TensorRT tests must skip here, or None where TensorRT and a CUDA GPU exist."""
    why = unavailable_reason()
    return f"needs TensorRT and a CUDA GPU: {why}" if why else None


IMAGE_LIBRARIES_PROBE = "#include <cstdio>\n#include <png.h>\n#include <jpeglib.h>\nint main() { return 0; }\n"


@functools.lru_cache(maxsize=None)
def cpp_toolchain_missing(cmake: bool = True) -> Optional[str]:
    """The reason the C++ programs cannot be built here (None where they can): cmake (when `cmake`), a C++
    compiler, and the development files of libpng and libjpeg, which the programs decode images with."""
    if cmake and shutil.which("cmake") is None:
        return "needs cmake on PATH"
    if shutil.which("c++") is None:
        return "needs a C++ compiler on PATH"
    proc = subprocess.run(["c++", "-x", "c++", "-fsyntax-only", "-"], input=IMAGE_LIBRARIES_PROBE,
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        error = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:200])
        return ("needs the libpng and libjpeg development files (Debian: apt-get install libpng-dev libjpeg-dev): "
                f"{error}")
    return None
