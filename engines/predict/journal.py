"""The journal of a predict run: what is finished, so that `--resume` carries on where a run stopped.

`<out>/predict-journal.jsonl` holds a header line (what the outputs are made with: the model, the engine,
the options that change them) and then one JSON line per input (a file, or a DICOM series) whose outputs are all written,
appended and flushed to the disk (fsync) after those outputs were renamed into place. A run killed at any
moment therefore leaves every recorded file complete, and at most a torn last line, which a resume drops.
`--resume` skips an input whose record is there, whose size and modification time are unchanged and
whose outputs still exist with the sha256 recorded; it redoes every other input. Details:
docs/predict.md#resuming-a-run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from icmoe.core import cli
from icmoe.core.errors import WriteError
from icmoe.core.io import atomic_write_bytes, sha256_file

log = logging.getLogger("engines.predict")

JOURNAL_NAME = "predict-journal.jsonl"
FORMAT, VERSION = "icmoe-predict-journal", 2  # 2: a record's signature lists every input file
# What atomic_path leaves behind when a process is killed mid-write: ".<name>.<8 random characters>.tmp".
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def model_digest(source: Path) -> str:
    """A digest of the model folder's files (names, sizes, modification times): a rebuilt model differs."""
    h = hashlib.sha256()
    for p in sorted(q for q in Path(source).rglob("*") if q.is_file()):
        st = p.stat()
        h.update(f"{p.relative_to(source).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _signature(inputs: Sequence[Path]) -> List[List[int]]:
    """Size and modification time of each input file of a job (one file, or a DICOM series' files)."""
    return [[st.st_size, st.st_mtime_ns] for st in (Path(p).stat() for p in inputs)]


class Journal:
    """The journal of one run (see the module docstring); `open_journal` makes one."""

    def __init__(self, path: Path, header: Dict[str, Any], records: Dict[str, Dict[str, Any]]) -> None:
        self.path, self.header, self.records = path, header, records
        self._file: Any = None
        self._failed: Optional[WriteError] = None

    def _where(self, output: str) -> Path:
        return self.path.parent / output

    def _stored(self, output: Path) -> str:
        """An output as the journal names it: relative to the journal's folder where it lies inside it."""
        try:
            return output.resolve().relative_to(self.path.parent.resolve()).as_posix()
        except ValueError:
            return str(output.resolve())

    def finished(self, key: str, inputs: Sequence[Path]) -> Optional[Dict[str, Any]]:
        """The record of a job (`key`: a file's resolved path, or a DICOM series' label) finished before,
        whose input files are unchanged since and whose outputs are intact; else None."""
        record = self.records.get(key)
        try:
            if record is None or record["signature"] != _signature(inputs):
                return None
        except OSError:  # an input gone since: redo (its reader names the problem)
            return None
        for output, digest in record["outputs"].items():
            where = self._where(output)
            if not where.is_file() or sha256_file(where) != digest:
                return None
        return record

    def record(self, key: str, inputs: Sequence[Path], outputs: Iterable[Path], entries: List[Dict[str, Any]]) -> None:
        """Append the record of a finished job (its outputs already written) and flush it to the disk.

        The first record (re)writes the journal atomically first: the header and the records kept from an
        earlier run, so a run that finishes no file leaves the journal there as it was. Records are not kept
        in memory afterwards (a long run's would add up; `finished` is asked before the run starts), and
        after a failed write every further record fails the same way.
        """
        if self._failed is not None:
            raise self._failed
        if self._file is None:
            kept = [self.header, *self.records.values()]
            atomic_write_bytes(self.path, "".join(json.dumps(d, sort_keys=True) + "\n" for d in kept).encode())
            self.records = {}
        record = {"input": key, "signature": _signature(inputs),
                  "outputs": {self._stored(o): sha256_file(o) for o in sorted(outputs)}, "entries": entries}
        try:  # a later line of the same input wins over an earlier one
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            self.close()  # what did not reach the disk is dropped: a resume then drops the torn line
            self._failed = WriteError(e.errno, f"{self.path}: cannot write ({e.strerror or e})")
            raise self._failed from None

    def close(self) -> None:
        """Close the journal file; every record is already on the disk (a failed flush is not retried)."""
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


def _read(path: Path) -> Tuple[Dict[str, Any], Dict[str, Dict[str, Any]]]:
    """(header, records by input) of a journal; a torn last line (no newline, or not JSON) is dropped."""
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    docs: List[Dict[str, Any]] = []
    for n, line in enumerate(lines, 1):
        try:
            docs.append(json.loads(line))
        except ValueError:
            if n == len(lines):  # the line being appended when the run stopped
                log.info(f"{path}: dropping the torn last line ({len(line)} bytes)")
                break
            raise cli.UsageError(f"{path}: damaged journal (line {n} is not JSON); delete it to start afresh") from None
    if not docs or docs[0].get("format") != FORMAT or docs[0].get("version") != VERSION:
        raise cli.UsageError(f"{path}: not a predict journal of this version ({FORMAT} {VERSION})")
    return docs[0], {d["input"]: d for d in docs[1:]}


def remove_temporaries(folders: Sequence[Optional[Path]]) -> int:
    """Delete the temporary files a killed run left in `folders` (atomic writes cut short); their count."""
    n = 0
    for folder in folders:
        if folder is None or not folder.is_dir():
            continue
        for p in folder.rglob(".*.tmp"):
            if p.is_file() and _TEMPORARY.match(p.name):
                p.unlink()
                n += 1
    return n


def open_journal(out: Path, header: Dict[str, Any], *, resume: bool) -> Journal:
    """The journal of a run writing to `out`, with `header` (what its outputs are made with).

    resume: keep the records of an earlier run's journal (refused when its header differs: other outputs
      would be mixed in; a torn last line is dropped); without it, or without a journal, start anew.
    Nothing is written until the first finished file (`Journal.record`).

    Raises:
      UsageError: resuming a journal of other settings, or a damaged one.
    """
    path = Path(out) / JOURNAL_NAME
    header = json.loads(json.dumps({"format": FORMAT, "version": VERSION, **header}))  # as read back: lists
    records: Dict[str, Dict[str, Any]] = {}
    if resume and path.is_file():
        old, records = _read(path)
        changed = sorted(k for k in set(old) | set(header) if old.get(k) != header.get(k))
        if changed:
            raise cli.UsageError(f"--resume: {path} was written by a run with other settings ({', '.join(changed)}); "
                                 "use another --out, or run without --resume to start again")
    elif resume:
        log.info(f"--resume: no journal in {out}; starting from the first file")
    return Journal(path, header, records)
