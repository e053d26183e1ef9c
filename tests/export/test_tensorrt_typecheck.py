"""mypy over the TensorRT modules, against tensorrt-stubs (TensorRT itself cannot be installed here).

tensorrt-stubs cannot be a normal test dependency: every release pins `tensorrt==<same
version>`, whose libraries come from NVIDIA's own index, so `pip install` fails on a host
without it. The fixture takes the pinned, sha256-checked stubs wheel from `icmoe.core.fetch`
(cached under ~/.cache/icmoe/; the tests skip with the reason where it is neither cached nor
downloadable), unpacks it outside site-packages (so `import tensorrt` keeps failing
honestly) and repairs two generator bugs that make the .pyi unparsable (parameters named
`in`; a parameter without default after defaulted ones). mypy runs with pyproject.toml's
[tool.mypy] section; `ignore_missing_imports` is used only for libraries without type
information, never for `tensorrt`.
"""

from __future__ import annotations

import ast
import keyword
import re
import zipfile
from pathlib import Path

import pytest

from icmoe.core.fetch import FetchError, unpacked
from tests.helpers import REPO_ROOT

REPO = REPO_ROOT
STUBS = "tensorrt-stubs"  # pinned in icmoe.core.fetch.PINS
REPAIR_TAG = "repaired-1"  # names repair_stub's rules: change it when they change, to re-unpack the cache
TENSORRT_MODULES = ["export/tensorrt.py", "engines/tensorrt.py", "icmoe/families/icmoe/voting/plugin.py", "export/torch_tensorrt.py"]
_KEYWORDS = "|".join(k for k in keyword.kwlist if k.islower())


def repair_stub(src: str) -> str:
    """Make pybind11-stubgen output parse: rename keyword parameters, give defaults where Python needs them."""
    src = re.sub(r"(?<=[(,\s])(" + _KEYWORDS + r"):(?= )", r"\1_:", src)
    lines = src.splitlines()
    for _ in range(1000):
        try:
            ast.parse("\n".join(lines))
            return "\n".join(lines) + "\n"
        except SyntaxError as e:
            if "non-default argument follows default" not in str(e.msg) or e.lineno is None:
                raise
            i = e.lineno - 1
            head, sep, rest = lines[i].partition("(")
            params, close, tail = rest.rpartition(") ->")
            parts = [p.strip() for p in params.split(", ")]
            seen_default = False
            for k, p in enumerate(parts):
                if "=" in p:
                    seen_default = True
                elif seen_default and not p.startswith("*"):
                    parts[k] = p + " = ..."
            lines[i] = head + sep + ", ".join(parts) + close + tail
    raise RuntimeError("could not repair the stub")


def _extract_repaired(wheel: Path, dest: Path) -> None:
    """Unpack the stubs wheel into `dest` and make every .pyi parse."""
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(dest)
    for pyi in dest.rglob("*.pyi"):
        pyi.write_text(repair_stub(pyi.read_text()))


@pytest.fixture(scope="module")
def stubs_dir() -> Path:
    try:
        return unpacked(STUBS, _extract_repaired, tag=REPAIR_TAG)
    except FetchError as e:
        pytest.skip(f"needs the {STUBS} wheel: {e}")


def _mypy(stubs: Path, files, monkeypatch):
    from mypy import api

    monkeypatch.setenv("MYPYPATH", str(stubs))
    monkeypatch.chdir(REPO)
    return api.run(["--config-file", str(REPO / "pyproject.toml"), "--no-incremental", "--show-error-codes", *files])


def test_tensorrt_modules_typecheck(stubs_dir, monkeypatch):
    out, err, status = _mypy(stubs_dir, TENSORRT_MODULES, monkeypatch)
    assert status == 0, out + err
    assert f"no issues found in {len(TENSORRT_MODULES)} source files" in out


def test_typecheck_catches_a_wrong_tensorrt_call(stubs_dir, monkeypatch, tmp_path):
    """The stubs are really used: misspelt TensorRT attributes and wrong argument types are errors."""
    bad = tmp_path / "bad_trt.py"
    bad.write_text(
        "import tensorrt as trt\n"
        "def f() -> None:\n"
        "    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(b'')\n"
        "    engine.get_tensor_nme(0)\n"
        "    engine.create_execution_context().execute_async_v3('stream')\n"
    )
    out, err, status = _mypy(stubs_dir, [str(bad)], monkeypatch)
    assert status == 1
    assert "get_tensor_nme" in out and "execute_async_v3" in out
