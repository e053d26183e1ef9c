"""Coded concepts of the segments a model outputs: what a DICOM Segmentation (SEG) says each label is.

One entry per foreground label value (1..K): a segmented property category, a type and an optional type
modifier (e.g. laterality), each a coded concept (value, coding scheme, meaning; SNOMED CT: "SCT").
A family declares them (`GraphSpec.segment_codes`), the build writes them into its manifest, predict
reads them from there (or from a `--seg-codes` file). docs/clinical.md has the format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from icmoe.core.errors import DataError

Concept = Dict[str, str]  # {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"}
SegmentCode = Dict[str, Concept]  # {"category": Concept, "type": Concept[, "modifier": Concept]}
CONCEPT_KEYS = ("value", "scheme", "meaning")
CODE_KEYS = ("category", "type", "modifier")


def concept(value: str, scheme: str, meaning: str) -> Concept:
    return {"value": value, "scheme": scheme, "meaning": meaning}


# SNOMED CT "Tissue" as both category and type: what a segment whose meaning nobody declared is called.
GENERIC_CODE: SegmentCode = {"category": concept("85756007", "SCT", "Tissue"),
                             "type": concept("85756007", "SCT", "Tissue")}


def generic_codes(n: int) -> List[SegmentCode]:
    """`n` generic entries (labels 1..n)."""
    return [{k: dict(v) for k, v in GENERIC_CODE.items()} for _ in range(n)]


def _check_concept(c: Any, where: str) -> Concept:
    if not isinstance(c, dict) or set(c) != set(CONCEPT_KEYS):
        raise DataError(f"{where}: a coded concept is {{\"value\", \"scheme\", \"meaning\"}}, got {c!r}")
    if not all(isinstance(c[k], str) and c[k].strip() and "\\" not in c[k] for k in CONCEPT_KEYS):
        raise DataError(f"{where}: coded concept {c!r} needs non-empty strings (no backslash)")
    if len(c["value"]) > 64 or len(c["scheme"]) > 16 or len(c["meaning"]) > 64:
        raise DataError(f"{where}: coded concept {c!r} is longer than DICOM allows (value 64, scheme 16, meaning 64)")
    return {k: c[k] for k in CONCEPT_KEYS}


def check_code(entry: Any, where: str) -> SegmentCode:
    """One label's entry, validated (category and type required, modifier optional)."""
    if not isinstance(entry, dict) or not {"category", "type"} <= set(entry) or set(entry) - set(CODE_KEYS):
        raise DataError(f"{where}: a segment code has keys category, type (and optionally modifier), got {entry!r}")
    return {k: _check_concept(entry[k], f"{where} {k}") for k in CODE_KEYS if k in entry}


def check_codes(entries: Any, n: int, where: Any) -> List[SegmentCode]:
    """A list of `n` entries (labels 1..n), validated.

    Raises:
      DataError: another count, or a malformed entry (one line naming `where`).
    """
    if not isinstance(entries, list) or len(entries) != n:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise DataError(f"{where}: need {n} segment code(s), one per foreground label, got {got}")
    return [check_code(e, f"{where}: label {i}") for i, e in enumerate(entries, start=1)]


def read_codes_file(path: Path, labels: Sequence[Tuple[int, str]], base: List[SegmentCode]) -> List[SegmentCode]:
    """`base` with the entries of a JSON override file replaced (`--seg-codes FILE.json`).

    The file is an object keyed by label value ("1") or segment label (a class name; a binary model's
    single label is "1" or "foreground"), each value an entry as in the manifest. Unnamed labels keep `base`.

    Raises:
      DataError: unreadable JSON, a key naming no label, or a malformed entry.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable segment codes ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: segment codes must be a JSON object keyed by label value or name")
    index: Dict[str, int] = {}
    for k, (value, name) in enumerate(labels):
        index[str(value)] = index[name] = k
    out = [dict(c) for c in base]
    for key, entry in doc.items():
        if key not in index:
            known = ", ".join(f"{v} ({n})" for v, n in labels)
            raise DataError(f"{path}: {key!r} names no label of this model (labels: {known})")
        out[index[key]] = check_code(entry, f"{path}: {key!r}")
    return out


def segment_label(code: SegmentCode, class_name: Optional[str]) -> str:
    """What a segment is called: its class name, or for a binary model (no names) its type's meaning."""
    return class_name if class_name is not None else code["type"]["meaning"]
