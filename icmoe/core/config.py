"""What every model configuration dataclass shares: copy with changes, and a JSON round trip.

Configurations are frozen dataclasses stored in checkpoints and build manifests as plain
JSON dicts; tuples become lists there and come back as tuples here.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, Type, TypeVar

C = TypeVar("C", bound="ConfigDict")


class ConfigDict:
    """Mixin for frozen configuration dataclasses: `replace`, `to_dict`, `from_dict`."""

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls: Type[C], d: Dict[str, Any]) -> C:
        """The configuration of `d` (as `to_dict` wrote it); unknown fields are an error."""
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown model config fields: {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        d = {k: tuple(v) if isinstance(v, list) and _is_tuple(hints.get(k)) else v for k, v in d.items()}
        return cls(**d)


def _is_tuple(hint: Any) -> bool:
    return hint is tuple or typing.get_origin(hint) is tuple
