"""What an evaluation returns (`Evaluation`), and the overlay PNGs evaluations write."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from PIL import Image

from icmoe.core.io import atomic_path


@dataclass
class Evaluation:
    """What a family's evaluation returns.

    Attributes:
      report: the figures, JSON-able (what --json writes and metrics.jsonl's "val" holds).
      score: the one figure training keeps the best of (higher is better): IC-MoE pooled DSC,
        MoE-SAM mean foreground Dice over the volumes.
      headline: one line for logs, e.g. "DSC pooled 0.9123 per-image 0.9050".
      table: the console report.
      overlays: paths of the PNG overlays written.
    """

    report: Dict[str, Any]
    score: float
    headline: str
    table: str
    overlays: List[str] = field(default_factory=list)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("_") or "image"


def save_png(pic: Image.Image, path: Path) -> str:
    with atomic_path(path) as tmp:
        pic.save(tmp, format="PNG")
    return str(path)
