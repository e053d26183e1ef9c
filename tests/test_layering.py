"""The layers import one way: icmoe.core below everything; engines below export; no family named in either."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Modules that make up a model family (IC-MoE's); export/ and engines/ reach a family only through the registry.
FAMILY_MODULES = ("icmoe.model", "icmoe.encoder", "icmoe.adapter", "icmoe.voting", "icmoe.config",
                  "icmoe.families.icmoe", "icmoe.losses", "icmoe.train", "icmoe.evaluate")


def imports(folder: str) -> Iterator[Tuple[Path, int, str]]:
    """(file, line, imported module) for every import in a package, those inside functions included."""
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, node.lineno, alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, node.lineno, node.module


def offenders(folder: str, banned) -> list:
    return [f"{p.relative_to(ROOT)}:{line} imports {m}" for p, line, m in imports(folder)
            if any(m == b or m.startswith(b + ".") for b in banned)]


def test_core_imports_nothing_above_it():
    banned = ("export", "engines", "icmoe.families", "icmoe.checkpoint", "icmoe.data", "icmoe.sam") + FAMILY_MODULES
    assert offenders("icmoe/core", banned) == []


def test_engines_never_import_export():
    assert offenders("engines", ("export",)) == []


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
    assert offenders(folder, FAMILY_MODULES) == []
    words = ("IC-MoE", "ICMoE", "ppav", "voting", "expert", "naive")
    found = sorted({f"{p.relative_to(ROOT)}: {w!r} in {text[:60]!r}" for p in sorted((ROOT / folder).rglob("*.py"))
                    for text in code_words(p) for w in words if w in text})
    assert found == []


def test_models_do_not_import_export_or_engines():
    assert offenders("icmoe", ("export", "engines")) == []
