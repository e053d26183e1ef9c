"""The C++ sources ship in the wheel, and an installed copy of them configures with CMake (engines.cpp.build_programs).

The wheel is built from a copy of the project in a temporary folder (setuptools writes build/ and *.egg-info
next to pyproject.toml; the checkout stays untouched), without build isolation (no download), in a few seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from engines.cpp import SOURCE_DIR, build_programs
from tests.helpers import REPO_ROOT
from tests.skips import cpp_toolchain_missing

ROOT = REPO_ROOT

NO_TOOLCHAIN = cpp_toolchain_missing()
pytestmark = pytest.mark.skipif(NO_TOOLCHAIN is not None, reason=NO_TOOLCHAIN or "")


def _sources() -> set:
    """The files a build needs, relative to the project root: CMake files, C++ sources and headers (the image
    libraries, libpng and libjpeg, come from the system)."""
    names = {"CMakeLists.txt"}
    found = {p for p in SOURCE_DIR.rglob("*") if p.is_file() and (p.name in names or p.suffix in (".h", ".cpp"))}
    return {p.relative_to(ROOT).as_posix() for p in found if "build" not in p.relative_to(SOURCE_DIR).parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("project")
    for name in ("icmoe", "export", "engines"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__", "build"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(project), "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(out.glob("icmoe-*.whl"))


def test_wheel_holds_the_cpp_sources(wheel):
    sources = _sources()
    assert {"engines/cpp/CMakeLists.txt", "engines/cpp/common/args.h", "engines/cpp/aoti/icmoe_aoti.cpp",
            "engines/cpp/common/png_io.h", "engines/cpp/common/jpeg_io.h"} <= sources
    with zipfile.ZipFile(wheel) as z:
        missing = sources - set(z.namelist())
    assert not missing, f"not in the wheel: {sorted(missing)}"


def test_installed_sources_configure(wheel, tmp_path):
    """The sources as an installation holds them (the wheel unpacked) configure with build_programs."""
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site-packages")
    source = tmp_path / "site-packages" / "engines" / "cpp"
    build = build_programs(tmp_path / "build", targets=(), source_dir=source)
    log = (build / "icmoe-configure.log").read_text()
    assert str(source) in (build / "CMakeCache.txt").read_text() and "icmoe_aoti: libtorch" in log
