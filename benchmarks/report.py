"""Writing a benchmark's results: its JSON report and Markdown table in the results folder (atomically), a
copy of the report where --json asks, the table on stdout; and the rule that a run which measured nothing
fails. Shared by benchmarks/latency.py and benchmarks/volume.py (docs/measurements.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from icmoe.core import cli
from icmoe.core.io import atomic_write_bytes, atomic_write_json


def write_results(out: Path, stem: str, report: Dict[str, Any], table: str, json_target: Optional[str],
                  extra: Sequence[str] = ()) -> None:
    """`out/stem.json` and `out/stem.md`, the report to `json_target`, the table and the files' line to stdout
    (`extra`: further suffixes written by the caller, e.g. a plot); CheckFailed when no engine was measured."""
    atomic_write_json(out / f"{stem}.json", report)
    atomic_write_bytes(out / f"{stem}.md", table.encode())
    cli.write_json(report, json_target)
    print(table)
    print(f"results: {out / stem}.{{{','.join(['json', 'md', *extra])}}}")
    if not report["engines"]:
        raise cli.CheckFailed("no engine could be measured")
