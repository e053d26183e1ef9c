"""Package attributes imported on first use (PEP 562), so that importing a light submodule of a
package (`icmoe.core.manifest`, `icmoe.data.images`) does not import the package's heavy ones (torch).

    __getattr__, __dir__ = lazy_exports(__name__, {"load": "icmoe.checkpoint", ...})
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Tuple


def lazy_exports(package: str, names: Dict[str, str]) -> Tuple[Callable[[str], object], Callable[[], List[str]]]:
    """`__getattr__` and `__dir__` for a package whose public `names` live in the given modules.

    Arguments:
      package: the package's `__name__` (for error messages).
      names: public name -> module that defines it.
    """

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(names[name]), name)

    def __dir__() -> List[str]:
        return sorted(names)

    return __getattr__, __dir__
