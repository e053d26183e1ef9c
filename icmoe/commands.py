"""The `icmoe` command: one front over the toolkit's commands, for installs without a checkout.

README.md has the commands.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from icmoe.core import cli

# command -> (module whose main(argv) runs it, or a path relative to the source tree; one-line summary)
COMMANDS: Dict[str, Tuple[str, str]] = {
    "train": ("icmoe.train", "train a model (checkpoints in runs/)"),
    "evaluate": ("icmoe.evaluate", "score a checkpoint on a dataset"),
    "build": ("export.build", "export, convert and verify a build directory"),
    "verify": ("export.verify", "check a build's parity with eager PyTorch"),
    "predict": ("engines.predict", "segment image files and DICOM series with a build or a checkpoint"),
    "bundle": ("export.bundle", "write a MONAI Bundle of a build"),
    "triton": ("engines.triton.__main__", "write a Triton model repository for a build"),
    "serve": ("engines.triton.server", "serve a Triton model repository"),
    "bench": ("benchmarks/latency.py", "latency, memory and parity of every engine (source checkout)"),
}
PROG = "icmoe"


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [ARGS...]", "",
             "Train, export, verify, benchmark and deploy SAM-based MoE segmentation models.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", f"`{PROG} COMMAND --help` shows a command's own flags."]
    return "\n".join(lines) + "\n"


def _script_main(relative: str) -> Callable[[Optional[Sequence[str]]], int]:
    """main() of a script of the source tree (benchmarks/...), found next to the installed packages."""
    path = Path(__file__).resolve().parents[1] / relative
    if not path.is_file():
        raise cli.UsageError(f"{relative} is part of the source tree, not of the installed package: run it from "
                             f"a checkout (git clone ...; pip install -e .)")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.main


def command_main(name: str) -> Callable[[Optional[Sequence[str]]], int]:
    """The `main(argv)` of a command, imported now.

    Raises:
      cli.UsageError: an unknown command, a module this installation lacks, or a package it needs (one line).
    """
    if name not in COMMANDS:
        raise cli.UsageError(f"unknown command {name!r} (choose from {', '.join(COMMANDS)}; see {PROG} --help)")
    target = COMMANDS[name][0]
    if target.endswith(".py"):
        return _script_main(target)
    try:
        return importlib.import_module(target).main
    except ImportError as e:
        if e.name and (target == e.name or target.startswith(e.name + ".")):
            raise cli.UsageError(f"{PROG} {name}: this installation has no {target}") from None
        raise cli.UsageError(f"{PROG} {name} needs {e.name or 'a package that is missing'}: {e}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `icmoe` console script."""
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    if not args:
        sys.stderr.write(f"error: no command given (choose from {', '.join(COMMANDS)}; see {PROG} --help)\n")
        return cli.EXIT_USAGE
    if args[0] in ("-h", "--help", "help"):
        sys.stdout.write(_usage())
        return cli.EXIT_OK
    if args[0] == "--version":
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"{PROG} {version('icmoe')}")
        except PackageNotFoundError:
            print(f"{PROG} (not installed: running from a source tree)")
        return cli.EXIT_OK
    try:
        run = command_main(args[0])
    except cli.UsageError as e:
        sys.stderr.write(f"error: {e}\n")
        return cli.EXIT_USAGE
    with cli.program_name(f"{PROG} {args[0]}"):
        return int(run(args[1:]) or cli.EXIT_OK)


if __name__ == "__main__":
    sys.exit(main())
