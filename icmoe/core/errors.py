"""One root for every error the toolkit raises on purpose.

Each module keeps its own, more specific class (`ManifestError`, `EngineError`, ...) and
derives it from `IcmoeError`, so a caller (or `icmoe.core.cli.run`) can catch them all
with one `except`. Messages are one line naming the file or value at fault.
"""

from __future__ import annotations


class IcmoeError(Exception):
    """Base class of the toolkit's errors; the message is one line."""


class CheckFailed(IcmoeError):
    """A check ran and its result is outside its bounds (parity, benchmark targets); CLIs exit 1."""


def first_line(e: BaseException, limit: int = 400) -> str:
    """The first non-empty line of an exception's message (or its type name), at most `limit` characters."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:limit]
