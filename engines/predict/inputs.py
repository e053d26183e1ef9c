"""The files a predict run reads: files, folders (recursive) and glob patterns, each with the relative
path its outputs mirror under `--out`."""

from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from icmoe.core import cli
from icmoe.core.errors import DataError
from icmoe.data.images import IMAGE_SUFFIXES, NIFTI_SUFFIXES, is_dicom

log = logging.getLogger("engines.predict")

def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _visible(rel: Path) -> bool:
    return not any(part.startswith(".") for part in rel.parts)


def _inside(path: Path, folder: Optional[Path]) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def _is_image(path: Path) -> bool:
    """An image suffix, or a DICOM file by its tag (PACS exports often name files IM0001 or by UID)."""
    if path.name.lower().endswith(IMAGE_SUFFIXES):
        return True
    try:
        return is_dicom(path)
    except DataError:  # unreadable: not taken from a folder
        return False


def _image_files(folder: Path, skip: Optional[Path]) -> List[Path]:
    """Image files under `folder` (by suffix, or DICOM by content), hidden entries and the `skip` folder
    left out, sorted."""
    found = [p for p in folder.rglob("*") if p.is_file() and _visible(p.relative_to(folder))
             and not _inside(p, skip) and _is_image(p)]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def expand_inputs(inputs: Sequence[str], *, skip: Optional[Path] = None) -> List[Tuple[Path, Path]]:
    """The files named by files, folders and glob patterns, each with its output path relative to `--out`.

    Arguments:
      inputs: files (any name), folders (searched recursively), glob patterns (`**` recurses).
      skip: a folder left out of the search (the output folder).

    Returns:
      [(file, relative path)] in the inputs' order, each folder's files sorted, every file once.

    Raises:
      UsageError: an input that names nothing, or no image file at all.
    """
    skip = skip.resolve() if skip is not None else None
    found: List[Tuple[Path, Path]] = []
    for text in inputs:
        path = Path(text)
        if path.is_file():
            found.append((path, Path(path.name)))
        elif path.is_dir():
            files = _image_files(path, skip)
            if not files:
                log.warning(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
            found += [(f, f.relative_to(path)) for f in files]
        elif _has_magic(text):
            found += _glob(text, skip)
        else:
            raise cli.UsageError(f"{text}: no such file or folder")
    seen: Set[Path] = set()
    unique = []
    for f, rel in found:  # a file named twice (or matched by two inputs) is read once, as first named
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append((f, rel))
    if not unique:
        raise cli.UsageError("no image files in the inputs")
    return unique


def _glob(pattern: str, skip: Optional[Path]) -> List[Tuple[Path, Path]]:
    """Files matching a pattern, relative to its leading folders without wildcards (folders searched)."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if _has_magic(part))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    out: List[Tuple[Path, Path]] = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        m = Path(match)
        if m.is_dir():
            out += [(f, f.relative_to(base)) for f in _image_files(m, skip)]
        elif m.is_file() and not _inside(m, skip) and _visible(m.relative_to(base)):
            out.append((m, m.relative_to(base)))
    if not out:
        raise cli.UsageError(f"{pattern}: no file matches")
    return out


def output_stem(rel: Path) -> Path:
    """The relative output path without suffix: `sub/a.png` -> `sub/a`, `ct.nii.gz` -> `ct`."""
    name = rel.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return rel.with_name(name[: -len(suffix)])
    return rel.with_name(rel.stem)


def check_output_names(files: Sequence[Tuple[Path, Path]]) -> None:
    """Two inputs must not write the same outputs (e.g. `a.png` and `a.jpg` in one folder)."""
    by_stem: Dict[Path, Path] = {}
    for f, rel in files:
        stem = output_stem(rel)
        if stem in by_stem:
            raise cli.UsageError(f"{by_stem[stem]} and {f} would both write {stem}.*; "
                                 "rename one or predict them into separate --out folders")
        by_stem[stem] = f
