"""Installs that tell the truth: the base requirements cover what the code imports, extras are optional
for real (a missing one is one line naming `pip install 'icmoe[extra]'`), the extras agree with the base
install's versions, and the README's test command is the one CI runs."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")
from packaging.requirements import Requirement
from packaging.version import Version

from icmoe.core.extras import MissingExtra, require
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
BASE = {Requirement(r).name.lower().replace("_", "-"): Requirement(r) for r in PROJECT["dependencies"]}
EXTRAS = {name: [Requirement(r) for r in reqs] for name, reqs in PROJECT["optional-dependencies"].items()}
# Imported at module level but not a requirement of ours: present where the importer can run at all.
PROVIDED = {"triton": "torch's Linux wheels depend on it", "triton_python_backend_utils": "Triton's python backend"}


def _top_level_imports(folder: str):
    """(file, top-level module) of every import at module level (not inside functions) in a package."""
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                yield from ((path, a.name.split(".")[0]) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, node.module.split(".")[0]


def test_base_requirements_cover_module_level_imports():
    dists = md.packages_distributions()
    ours = {"icmoe", "export", "engines", "benchmarks", "tests"}
    missing = []
    for folder in ("icmoe", "engines", "export"):
        for path, module in _top_level_imports(folder):
            if module in ours or module in sys.stdlib_module_names or module in PROVIDED:
                continue
            names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
            if not names & set(BASE):
                missing.append(f"{path.relative_to(ROOT)} imports {module} ({', '.join(sorted(names))})")
    assert missing == [], "module-level imports no base requirement provides"


def test_extras_are_not_in_the_base_install():
    extras_only = {"nvidia-modelopt", "tritonclient", "matplotlib", "pydicom", "highdicom", "dicomweb-client",
                   "monai", "tensorrt", "torch-tensorrt", "polygraphy", "pytest", "mypy"}
    assert not extras_only & set(BASE)
    assert set(EXTRAS) >= {"fp16", "triton", "bench", "dicom", "monai", "tensorrt", "test"}


def test_test_extra_pulls_every_cpu_extra():
    (own,) = [r for r in EXTRAS["test"] if r.name == "icmoe"]
    assert own.extras == {"fp16", "triton", "bench", "dicom", "openvino", "monai"}  # not tensorrt: GPU hosts only


def test_tensorrt_extra_is_pinned_and_agrees_with_torch_tensorrt():
    pins = {r.name: r for r in EXTRAS["tensorrt"]}
    trt = Version(str(pins["tensorrt"].specifier).removeprefix("=="))
    assert str(pins["tensorrt"].specifier).startswith("==") and str(pins["torch-tensorrt"].specifier).startswith("==")
    assert trt >= Version("10.9")  # AOT plugins (icmoe/voting/plugin.py, export/tensorrt.py MIN_TENSORRT)
    torch_trt = Version(str(pins["torch-tensorrt"].specifier).removeprefix("=="))
    assert BASE["torch"].specifier.contains(f"{torch_trt.major}.{torch_trt.minor}.0")  # its torch is allowed


def _upper_bound(req: Requirement):
    """The highest version a requirement allows, as (version, inclusive), or None when unbounded."""
    bounds = [(Version(s.version), s.operator == "<=") for s in req.specifier if s.operator in ("<", "<=", "==")]
    return min(bounds) if bounds else None


def test_base_bounds_are_within_the_triton_clients():
    """What tritonclient[http,grpc] caps among the base install's packages, the base requirements cap at
    least as tightly, so installing the [triton] or [test] extra after the base install never downgrades."""
    try:
        requires = md.requires("tritonclient") or []
    except md.PackageNotFoundError:
        pytest.skip("tritonclient is not installed (the [triton] extra)")
    checked = []
    for req in map(Requirement, requires):
        applies = not req.marker or any(req.marker.evaluate({"extra": e}) for e in ("", "http", "grpc"))
        name = req.name.lower().replace("_", "-")
        theirs = _upper_bound(req)
        if applies and theirs is not None and name in BASE:
            ours = _upper_bound(BASE[name])
            assert ours is not None and ours <= theirs, f"base {BASE[name]} allows more than tritonclient's {req}"
            checked.append(name)
    assert {"protobuf", "ml-dtypes"} <= set(checked), checked


@pytest.fixture
def without(monkeypatch):
    """Make modules unimportable for one test (an entry of None in sys.modules stops the import)."""
    def hide(*names):
        for name in names:
            monkeypatch.setitem(sys.modules, name, None)
    return hide


def test_missing_fp16_extra_is_one_line_before_any_export(without, tmp_path, capsys):
    from export.build import main as build_main
    from export.precision import fp16_unavailable

    without("modelopt")
    assert "pip install 'icmoe[fp16]'" in fp16_unavailable()
    code = build_main(["--random-init", "--config", "tiny", "--precision", "fp16", "--out", str(tmp_path / "b"),
                       "--no-progress", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install 'icmoe[fp16]'" in err[0], err
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())


def test_missing_triton_extra_is_one_line(without, tmp_path):
    from engines.triton.repository import RepositoryError, _model_config_pb2
    from engines.triton.server import ServerError, TritonServer

    without("tritonclient", "tritonclient.grpc", "tritonclient.http")
    with pytest.raises(RepositoryError, match=re.escape("pip install 'icmoe[triton]'")):
        _model_config_pb2()
    with pytest.raises(ServerError, match=re.escape("pip install 'icmoe[triton]'")):
        TritonServer(tmp_path, root=tmp_path).start()


def test_missing_bench_extra_is_one_line(without):
    import importlib.util

    spec = importlib.util.spec_from_file_location("latency_for_test", ROOT / "benchmarks/latency.py")
    latency = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(latency)
    without("matplotlib")
    with pytest.raises(MissingExtra, match=re.escape("pip install 'icmoe[bench]'")) as err:
        require(*latency.PLOT_NEEDS)
    assert "\n" not in str(err.value) and "--no-plot" in str(err.value)


def test_missing_tensorrt_is_named(without):
    from engines.tensorrt import unavailable_reason

    without("tensorrt")
    assert "pip install 'icmoe[tensorrt]'" in unavailable_reason()


def _readme_block(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"## {title}"):]
    return section[section.index("```bash"):].split("```")[1]


def test_ci_runs_the_readme_set_up_commands_in_a_new_virtual_environment():
    """.ci/run makes a new virtual environment (no system site packages), activates it, and only then runs
    the README's two set-up commands, each exactly as written and on a line of its own."""
    block = _readme_block("Quick start")
    commands = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.strip().startswith("pip install")]
    assert len(commands) == 2 and "pytest" in commands[1], block
    ci = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()]
    at = {c: ci.index(c) for c in commands if c in ci}
    assert set(at) == set(commands), f"{set(commands) - set(at)} is not what .ci/run runs"
    venv = [i for i, ln in enumerate(ci) if re.match(r"python3? -m venv ", ln)]
    activate = [i for i, ln in enumerate(ci) if re.match(r"(source|\.) \S+/bin/activate", ln)]
    assert len(venv) == 1 and "--system-site-packages" not in ci[venv[0]], ci
    assert activate and venv[0] < activate[0] < min(i for i, ln in enumerate(ci) if ln.startswith("pip ")), ci
    assert at[commands[0]] < at[commands[1]]


def test_test_only_dependencies_are_bounded():
    """pytest and mypy change behaviour between minor releases: the [test] extra allows the release line the
    suite was run with, not whatever a fresh install resolves to later."""
    for name in ("pytest", "mypy"):
        (req,) = [r for r in EXTRAS["test"] if r.name == name]
        assert _upper_bound(req) is not None and any(s.operator == ">=" for s in req.specifier), req
        try:
            assert req.specifier.contains(md.version(name)), f"the installed {name} {md.version(name)} is outside {req}"
        except md.PackageNotFoundError:
            pass


def test_ci_installs_what_the_quick_start_needs():
    """The README's first command installs the extras the quick start's rows need (FP16, the plot, OpenVINO
    and INT8), and CI installs exactly those before the test command."""
    import re

    block = _readme_block("Quick start")
    first = next(ln for ln in block.splitlines() if "quickstart.py" in ln)
    install = re.search(r"pip install -e '\.\[([a-z0-9,]+)\]'", first)
    assert install, first
    assert {"fp16", "bench", "openvino"} <= set(install.group(1).split(","))
