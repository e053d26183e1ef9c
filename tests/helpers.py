"""Small helpers shared by the test files."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from icmoe.core.io import sha256_file


def tree_digest(root: Path) -> Dict[str, str]:
    """sha256 of every file under root (relative name -> digest), to prove a directory was left intact."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(Path(root).rglob("*")) if p.is_file()}
