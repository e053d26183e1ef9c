"""The engines' errors (below every engine module, so any of them can raise these)."""

from __future__ import annotations

from icmoe.core.errors import IcmoeError


class EngineError(IcmoeError, RuntimeError):
    """An engine or build artifact that cannot be used (missing, damaged, mismatched)."""


class InputError(IcmoeError, ValueError):
    """Images an engine cannot take (shape, dtype, channels, batch, NaN)."""
