"""Optional parts of the toolkit and the pip extra that installs each.

README.md has the commands.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from icmoe.core.errors import IcmoeError


class MissingExtra(IcmoeError):
    """An optional package is not installed; the message names the extra that installs it (one line)."""


def install_hint(extra: str) -> str:
    """The command that installs an extra, e.g. "pip install 'icmoe[fp16]'"."""
    return f"pip install 'icmoe[{extra}]'"


def missing(purpose: str, extra: str, error: BaseException) -> str:
    """One line: what needs the extra, how to install it, and what failed to import."""
    return f"{purpose} needs the [{extra}] extra: {install_hint(extra)} ({type(error).__name__}: {error})"


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module`, or raise MissingExtra naming the extra that installs it.

    Example:
      plt = require("matplotlib.pyplot", "bench", "the benchmark's plot")
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(missing(purpose, extra, e)) from None
