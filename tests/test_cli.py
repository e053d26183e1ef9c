"""Every command follows one convention: --help exits 0, a bad flag exits 2 with one `error:` line,
and the common flags mean the same thing everywhere."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
# command -> the common flags it must offer
COMMANDS = {
    "icmoe.train": ("--model", "--config", "--no-progress"),
    "icmoe.evaluate": ("--json", "--no-progress"),
    "icmoe.summary": ("--model", "--config", "--json"),
    "export.build": ("--model", "--config", "--dynamic-batch", "--no-progress", "--atol", "--rtol", "--max-flipped",
                     "--opt-level", "--workspace", "--timing-cache", "--version-compatible", "--hardware-compatible"),
    "export.verify": ("--json", "--no-progress", "--atol", "--rtol", "--max-flipped"),
    "export.onnx_export": ("--model", "--config", "--json"),
    "export.aoti": ("--model", "--config"),
    "engines.triton.__main__": (),
    "engines.triton.server": (),
    "icmoe.core.fetch": (),
    "engines.predict": ("--json", "--no-progress"),
    "benchmarks/latency.py": ("--model", "--config", "--batch-sizes", "--json", "--no-progress"),
    "benchmarks/quickstart.py": (),
    "benchmarks/train_synthetic.py": (),
}


def main_of(command: str):
    if command.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(command).stem, ROOT / command)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main
    return importlib.import_module(command).main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_exits_0_and_lists_the_common_flags(command, capsys):
    with pytest.raises(SystemExit) as e:
        main_of(command)(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("-q", "--quiet", "-v", "--verbose") + COMMANDS[command]:
        assert f"{flag} " in out or f"{flag}," in out or f"{flag}\n" in out, (command, flag)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_flag_exits_2_with_one_line(command, capsys):
    with pytest.raises(SystemExit) as e:
        main_of(command)(["--no-such-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err  # the flag, or a missing positional, named
    assert "--no-such-flag" in err[0] or "required" in err[0], err


def test_model_choices_and_config_default_are_shared(capsys):
    helps = {}
    for command, flags in COMMANDS.items():
        if "--config" in flags:
            with pytest.raises(SystemExit):
                main_of(command)(["--help"])
            helps[command] = " ".join(capsys.readouterr().out.split())
    assert len(helps) >= 5
    for command, text in helps.items():
        assert "(default vit_b)" in text and "{icmoe" in text, command
