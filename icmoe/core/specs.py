"""Tensor specs: the name, element type and shape of a model's inputs and outputs.

A family declares its graph's I/O once as `TensorSpec`s; the build writes them into the
manifest, and every engine, the Triton repository writer and the C++ programs read them
from there. The dynamic batch axis is the string "batch".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np

BATCH = "batch"
Dim = Union[int, str]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output.

    Attributes:
      name: the tensor's name in the ONNX graph, the engines' dicts and Triton.
      dtype: NumPy dtype name ("float32", "uint8", "int32", ...).
      shape: dims; "batch" marks the dynamic batch axis, ints are fixed.
      doc: what the tensor holds, for reports and the README.
    """

    name: str
    dtype: str
    shape: Tuple[Dim, ...]
    doc: str = ""

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.doc:
            out["doc"] = self.doc
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TensorSpec":
        return cls(name=str(d["name"]), dtype=str(d["dtype"]), shape=tuple(d["shape"]), doc=str(d.get("doc", "")))

    def concrete(self, batch: int) -> Tuple[int, ...]:
        """The shape with the batch axis set to `batch`."""
        return tuple(batch if d == BATCH else int(d) for d in self.shape)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)


def specs_to_dicts(specs: Sequence[TensorSpec]) -> List[Dict[str, Any]]:
    return [s.to_dict() for s in specs]


def specs_from_dicts(items: Sequence[Dict[str, Any]]) -> List[TensorSpec]:
    return [TensorSpec.from_dict(d) for d in items]
