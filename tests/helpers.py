"""Small helpers shared by the test files."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from icmoe.core.io import sha256_file

# The repository's root (the folder holding icmoe/, export/, engines/, benchmarks/, tests/).
REPO_ROOT = Path(__file__).resolve().parents[1]


def tree_digest(root: Path) -> Dict[str, str]:
    """sha256 of every file under root (relative name -> digest), to prove a directory was left intact."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(Path(root).rglob("*")) if p.is_file()}


def flip_middle_byte(path: Path) -> None:
    """Damage a file without changing its size: only its sha256 can tell."""
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))
