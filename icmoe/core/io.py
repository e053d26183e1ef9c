"""Small file helpers shared by every stage: atomic writes and hashing.

Artifacts are written to a temporary name in the destination folder and
renamed into place, so an interrupted write never damages an existing file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple, Type, Union

from icmoe.core.errors import WriteError

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds.

    Example:
      with atomic_path("build/model.onnx") as tmp:
          onnx.save(model, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            give_default_mode(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask would, briefly)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_default_mode(path: PathLike) -> None:
    """mkstemp/mkdtemp make 0600/0700 entries: give `path` the mode a plain `open()` or `mkdir()`
    would (0666 or 0777 minus the umask)."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (flushed to the disk before the rename).

    Raises:
      WriteError: naming `path`, for any failure to write it (a full disk, no permission); the file
        already at `path` is left as it was and no temporary file remains.
    """
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        raise WriteError(e.errno, f"{path}: cannot write ({e.strerror or e})") from None


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_versioned_json(
    path: PathLike, *, fmt: str, version: Union[int, Tuple[int, ...]], kind: str, label: str, error: Type[Exception]
) -> Dict[str, Any]:
    """Read a JSON document tagged with `format` and `version`, raising `error` with one line.

    Arguments:
      path: the JSON file (known to exist).
      fmt: the value its "format" key must hold.
      version: the "version" it must hold, or a tuple of the versions this reader accepts.
      kind: what the document is, for messages ("IC-MoE build manifest").
      label: short name for the version message ("manifest").
      error: the exception class to raise.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: damaged JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise error(f"{path}: not an {kind} (format != {fmt!r})")
    accepted = version if isinstance(version, tuple) else (version,)
    if doc.get("version") not in accepted:
        need = " or ".join(map(str, accepted))
        raise error(f"{path}: {label} version {doc.get('version')!r} is not supported (need {need})")
    return doc
