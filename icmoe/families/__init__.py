"""The model-family registry: name -> the `Family` that declares everything about a model.

    from icmoe.families import get_family
    family = get_family("icmoe")
    model = family.build(family.get_config("tiny"))

Adding a family is one folder (`icmoe/families/<name>/`, whose `family.py` makes a `Family`) and
one line in `FAMILIES` (docs/families.md). Families outside this package register without touching it: with
`register_family(name, "package.module:OBJECT")`, with the environment variable
`ICMOE_FAMILIES="name=package.module:OBJECT[,...]"` (seen by subprocesses too, e.g. the
benchmark's workers), or with a Python entry point in the group `icmoe.families`.
Entries are imported on first use, so listing the names imports no model code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
from typing import Any, Dict, List, Optional, Union

from icmoe.core.errors import FamilyError
from icmoe.families.base import Family
from icmoe.families.contracts import GraphPass, GraphSpec, ParitySpec, PrecisionSpec, Tolerances, TrainingSpec

FAMILIES: Dict[str, Union[str, Family]] = {
    "icmoe": "icmoe.families.icmoe.family:FAMILY",
    "moesam": "icmoe.families.moesam.family:FAMILY",
}
DEFAULT_FAMILY = "icmoe"
DEFAULT_CONFIG = "vit_b"  # every command's --config default
ENV_VAR = "ICMOE_FAMILIES"
ENTRY_POINT_GROUP = "icmoe.families"


def register_family(name: str, target: Union[str, Family]) -> None:
    """Register a family by "module:attribute" (imported on first use) or by the object itself."""
    FAMILIES[name] = target


def _discover() -> None:
    for item in filter(None, (p.strip() for p in os.environ.get(ENV_VAR, "").split(","))):
        name, sep, target = item.partition("=")
        if not sep or ":" not in target:
            raise FamilyError(f"{ENV_VAR}: entries are name=module:attribute, got {item!r}")
        FAMILIES.setdefault(name.strip(), target.strip())
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        FAMILIES.setdefault(ep.name, ep.value)


def family_names() -> List[str]:
    _discover()
    return sorted(FAMILIES)


def get_family(name: str) -> Family:
    """The registered family `name`, imported now.

    Raises:
      FamilyError: unknown name, or its module cannot be imported.
    """
    _discover()
    if name not in FAMILIES:
        raise FamilyError(f"unknown model family {name!r}; choose from {', '.join(sorted(FAMILIES))}")
    target = FAMILIES[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        try:
            target = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise FamilyError(f"model family {name!r} ({FAMILIES[name]}) cannot be loaded: {e}") from None
        FAMILIES[name] = target
    return target  # type: ignore[return-value]


def check_expected(family: str, config: Dict[str, Any], expect: Any) -> Optional[str]:
    """Why a model (family name, config dict) is not what `expect` asks for, or None if it is.

    Arguments:
      expect: None (anything), a config name ("tiny"), "family/config" ("icmoe/tiny"), or a
        config object (its class's `family` and every field must match).

    Returns:
      None, or "icmoe/vit_b, expected icmoe/tiny" (for messages: "checkpoint is for ...").
    """
    if expect is None:
        return None
    have = f"{family}/{config.get('name')}"
    if isinstance(expect, str):
        want_family, _, want_name = expect.rpartition("/")
        ok = config.get("name") == want_name and want_family in ("", family)
        want = expect if want_family else f"{family}/{want_name}"
    else:
        want_family = getattr(type(expect), "family", family)
        ok = want_family == family and expect.to_dict() == config
        want = f"{want_family}/{expect.name}" + ("" if ok or have != f"{want_family}/{expect.name}" else
                                                 " with another configuration")
    return None if ok else f"{have}, expected {want}"


def add_model_args(p: argparse.ArgumentParser, *, config_help: str = "size variant") -> None:
    """The common `--model` (family) and `--config` (size variant) flags."""
    p.add_argument("--model", default=DEFAULT_FAMILY, choices=family_names(),
                   help=f"model family (default {DEFAULT_FAMILY})")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"{config_help} of the family, e.g. tiny or vit_b (default {DEFAULT_CONFIG})")


def config_of(args: argparse.Namespace, **overrides) -> object:
    """The configuration the common flags name (raises FamilyError for an unknown one)."""
    return get_family(args.model).get_config(args.config, **overrides)


__all__ = ["DEFAULT_CONFIG", "DEFAULT_FAMILY", "FAMILIES", "Family", "FamilyError", "GraphPass", "GraphSpec",
           "ParitySpec", "PrecisionSpec", "Tolerances", "TrainingSpec", "add_model_args", "check_expected",
           "config_of", "family_names", "get_family", "register_family"]
