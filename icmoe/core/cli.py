"""One command-line convention for every command of the toolkit.

README.md has the commands.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from icmoe.core.errors import CheckFailed, IcmoeError, first_line  # noqa: F401 (CheckFailed re-exported)
from icmoe.core.io import atomic_write_json

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(IcmoeError):
    """Arguments that parse but cannot be used together or with this model; exit 2."""
LOGGERS = ("icmoe", "export", "engines", "benchmarks")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


_prog_override: Optional[str] = None  # set by `program_name` (the `icmoe` front end names its commands)


@contextlib.contextmanager
def program_name(name: str) -> Iterator[None]:
    """Within the block, parsers made by `parser` call themselves `name` (e.g. "icmoe build")."""
    global _prog_override
    saved, _prog_override = _prog_override, name
    try:
        yield
    finally:
        _prog_override = saved


def parser(prog: str, description: str, **kw: Any) -> ArgumentParser:
    """A parser with the common `-q/-v` flags already added."""
    p = ArgumentParser(prog=_prog_override or prog, description=description, **kw)
    group = p.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity", default=0,
                       help="print warnings and errors only")
    group.add_argument("-v", "--verbose", action="store_const", const=1, dest="verbosity",
                       help="also print debug lines")
    return p


def add_json(p: argparse.ArgumentParser, what: str = "the report") -> None:
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help=f"write {what} as JSON to FILE ('-' or no value: stdout)")


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def setup_logging(verbosity: int = 0) -> None:
    """Send the toolkit's log lines to stderr, message only; -1 warnings, 0 info, 1 debug."""
    level = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[max(-1, min(1, verbosity))]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


def write_json(obj: Any, target: Optional[str]) -> None:
    """Write `obj` as JSON to a file (atomically) or, for "-", to stdout."""
    if target is None:
        return
    if target == "-":
        sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    else:
        atomic_write_json(Path(target), json.loads(json.dumps(obj, default=str)))


def run(fn: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Run a command's body with the convention's error handling; returns the exit code."""
    try:
        return int(fn(argv) or EXIT_OK)
    except CheckFailed as e:
        sys.stderr.write(f"error: {first_line(e)}\n")
        return EXIT_CHECK_FAILED
    except (IcmoeError, OSError) as e:
        sys.stderr.write(f"error: {first_line(e)}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
