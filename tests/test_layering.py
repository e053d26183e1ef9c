"""The layers import one way, and nothing imports in a circle.

Inside `icmoe/`, lowest first: `core`; `sam` and `data`; the family registry and contracts
(`icmoe.families`, `.base`, `.contracts`) and `checkpoint`; `evaluation`; `training`; then each
family's folder (`icmoe/families/<name>/`), which may import every generic layer but no other
family. No generic module imports a family folder. Above `icmoe`: `engines`, then `export` (which
runs the engines to verify; `engines` never imports `export`), then `benchmarks`; `export` and
`engines` name no family.
Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("icmoe", "export", "engines", "benchmarks")
# Every package under icmoe/families/ is a family's folder (found, so that a new family is covered).
FAMILY_FOLDERS = tuple(sorted(f"icmoe.families.{p.name}" for p in (ROOT / "icmoe" / "families").iterdir()
                              if (p / "__init__.py").is_file()))
REGISTRY = ("=icmoe.families", "=icmoe.families.base", "=icmoe.families.contracts")
# What each generic layer of icmoe may import (prefixes; the registry modules listed by name).
GENERIC_LAYERS: Dict[str, Tuple[str, ...]] = {
    "icmoe.core": ("icmoe.core",),
    "icmoe.sam": ("icmoe.core", "icmoe.sam"),
    "icmoe.data": ("icmoe.core", "icmoe.data"),
    "icmoe.families": ("icmoe.core",) + REGISTRY,
    "icmoe.checkpoint": ("icmoe.core",) + REGISTRY,
    "icmoe.evaluation": ("icmoe.core", "icmoe.data", "icmoe.checkpoint", "icmoe.evaluation") + REGISTRY,
    "icmoe.training": ("icmoe.core", "icmoe.data", "icmoe.checkpoint", "icmoe.evaluation", "icmoe.training")
    + REGISTRY,
}
FAMILY_MAY_IMPORT = ("icmoe.core", "icmoe.sam", "icmoe.data", "icmoe.checkpoint", "icmoe.evaluation",
                     "icmoe.training") + REGISTRY


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def repository() -> Dict[str, str]:
    """Module name -> source of every module of the repository's packages."""
    return {module_name(p): p.read_text() for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(source: str, known: Set[str]) -> Iterator[Tuple[int, str]]:
    """(line, module) for every import of a module, inside functions too; `from pkg import sub` names the
    submodule where `pkg.sub` is a module of the repository."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
            yield from ((node.lineno, s) for s in subs) if subs else [(node.lineno, node.module)]


def within(module: str, prefixes: Tuple[str, ...]) -> bool:
    """`module` is one of `prefixes` or below one; a prefix "=name" matches `name` alone (the registry
    modules: `icmoe.families` itself, not the family folders below it)."""
    return any(module == p.lstrip("=") or (not p.startswith("=") and module.startswith(p + ".")) for p in prefixes)


def family_folder(module: str) -> str:
    return next((f for f in FAMILY_FOLDERS if within(module, (f,))), "")


def layer_of(module: str) -> str:
    """The generic layer a module of icmoe belongs to ("" for a family folder or the top-level commands)."""
    if family_folder(module):
        return ""
    if within(module, REGISTRY):
        return "icmoe.families"
    return next((layer for layer in GENERIC_LAYERS if within(module, (layer,))), "")


def violations(modules: Dict[str, str]) -> List[str]:
    """Imports that run against the layers of icmoe (see the module docstring)."""
    known, out = set(modules), []
    for name, source in modules.items():
        if not within(name, ("icmoe",)):
            continue
        own_family, layer = family_folder(name), layer_of(name)
        for line, imported in imports(source, known):
            if not within(imported, ("icmoe", "export", "engines", "benchmarks")):
                continue  # third-party
            if own_family:
                ok = within(imported, FAMILY_MAY_IMPORT + (own_family,))
            elif layer:
                ok = within(imported, GENERIC_LAYERS[layer])
            else:  # the package itself and its commands: anything in icmoe but a family folder
                ok = within(imported, ("icmoe",)) and not family_folder(imported)
            if not ok:
                out.append(f"{name}:{line} imports {imported}")
    return out


def cycles(modules: Dict[str, str]) -> List[List[str]]:
    """Import cycles among the repository's modules (each found once, as a list of module names)."""
    known = set(modules)
    graph = {name: sorted({m for _, m in imports(src, known) if m in known and m != name})
             for name, src in modules.items()}
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_both_families_are_found():
    assert {"icmoe.families.icmoe", "icmoe.families.moesam"} <= set(FAMILY_FOLDERS)


def test_icmoe_layers_import_downwards_only():
    assert violations(repository()) == []


def test_no_import_cycles_anywhere():
    assert cycles(repository()) == []


def test_a_generic_module_that_imports_a_family_is_caught():
    planted = {**repository(), "icmoe.training.planted": "from icmoe.families.icmoe.model import build_icmoe\n",
               "icmoe.families.moesam.planted": "import icmoe.families.icmoe.voting\n"}
    assert violations(planted) == ["icmoe.training.planted:1 imports icmoe.families.icmoe.model",
                                   "icmoe.families.moesam.planted:1 imports icmoe.families.icmoe.voting"]


def test_a_planted_cycle_is_caught():
    planted = {**repository(), "icmoe.core.planted": "import icmoe.core.planted_back\n",
               "icmoe.core.planted_back": "from icmoe.core import planted\n"}
    assert ["icmoe.core.planted", "icmoe.core.planted_back", "icmoe.core.planted"] in cycles(planted)


def offenders(package: str, banned: Tuple[str, ...]) -> List[str]:
    modules = repository()
    return [f"{name}:{line} imports {m}" for name, src in modules.items() if within(name, (package,))
            for line, m in imports(src, set(modules)) if within(m, banned)]


def test_engines_never_import_export():
    assert offenders("engines", ("export",)) == []


def test_models_do_not_import_export_or_engines():
    assert offenders("icmoe", ("export", "engines", "benchmarks")) == []


def code_words(path: Path) -> Iterator[str]:
    """Names, attributes and string constants of a module, docstrings left out (examples there are prose)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.id
        elif isinstance(node, ast.Attribute):
            yield node.attr
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.value


@pytest.mark.parametrize("folder", ["export", "engines"])
def test_export_and_engines_name_no_family(folder):
    assert offenders(folder, FAMILY_FOLDERS) == []
    words = ("IC-MoE", "ICMoE", "MoE-SAM", "MoESAM", "ppav", "voting", "expert", "naive")
    found = sorted({f"{p.relative_to(ROOT)}: {w!r} in {text[:60]!r}" for p in sorted((ROOT / folder).rglob("*.py"))
                    for text in code_words(p) for w in words if w in text})
    assert found == []
