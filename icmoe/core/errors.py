"""One root for every error the toolkit raises on purpose, and the error types several layers share.

Every error derives from `IcmoeError`, so a caller (or `icmoe.core.cli.run`) catches them all
with one `except`; messages are one line naming the file or value at fault. The types raised
by more than one layer (a damaged checkpoint, an unreadable dataset, an unknown family) are
defined here, once; a module with errors of its own (`ManifestError`, `EngineError`) keeps them.
"""

from __future__ import annotations


class IcmoeError(Exception):
    """Base class of the toolkit's errors; the message is one line."""


class CheckFailed(IcmoeError):
    """A check ran and its result is outside its bounds (parity, benchmark targets); CLIs exit 1."""


class CheckpointError(IcmoeError, ValueError):
    """A checkpoint file (a model's, or SAM's weights) that cannot be used; names file and problem."""


class DataError(IcmoeError, ValueError):
    """A dataset or input file that cannot be read; names the file or folder and the problem."""


class FamilyError(IcmoeError, KeyError):
    """An unknown model family or configuration, or one a family cannot serve."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TrainError(IcmoeError, ValueError):
    """Training options that cannot be used together (recipe, batch size, input size, resume state)."""


class WriteError(IcmoeError, OSError):
    """A file could not be written (a full disk, a read-only folder, no permission): `WriteError(errno,
    "<file>: cannot write (<why>)")`. Also an OSError, so callers catching OSError still catch it."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]"
        return str(self.strerror) if self.strerror else super().__str__()


def first_line(e: BaseException, limit: int = 400) -> str:
    """The first non-empty line of an exception's message (or its type name), at most `limit` characters."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:limit]
