"""What a model family declares, in one place, so that every stage after the model stays generic.

A family is one object (a `Family` subclass instance) that the registry in
`icmoe.families` finds by name. The build, the engines, verification, the Triton
repository writer and the benchmark only ever talk to a model through it and through
the tensor specs it writes into the manifest; none of them names a family.

What a family provides (after optimum's per-architecture `OnnxConfig`):

- identity: `name` (registry key, stored in checkpoints and manifests), `title`;
- configurations: `configs` (size variant -> builder), `config_from_dict`;
- models: `build` (random init or from SAM weights), `variants` (other eager
  structures of the same weights, e.g. IC-MoE's three full experts);
- the graph contract: `inputs` / `outputs` (TensorSpecs), `export_module` (the model
  as a function of the inputs returning the outputs in order), `example_inputs`;
- precision: `fp32_op_types` and `fp32_nodes` (what stays FP32 in the FP16 graph);
- GPU: `tensorrt_passes` (graph passes before the TensorRT build), `prepare_eager`
  (e.g. a fused CUDA op for eager GPU inference);
- checks: `synthetic_inputs` (structured parity images), `tolerances` and `compare`
  (the family's parity gates);
- reports: `summarize` / `format_summary`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from icmoe.core.errors import IcmoeError
from icmoe.core.specs import TensorSpec


class FamilyError(IcmoeError, KeyError):
    """An unknown model family or configuration; one line."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Tolerances:
    """Parity gates of one precision against eager FP32 (element-wise, Polygraphy's atol/rtol).

    Attributes:
      atol, rtol: every logit must satisfy
        |candidate - reference| <= atol + scaled_atol * max|reference of its image| + rtol * |reference|.
      scaled_atol: absolute tolerance in units of the image's largest |logit|: where logits cancel to
        near zero, a lower precision's error is absolute, at the scale of the values that cancelled.
      max_flipped: largest fraction of mask pixels (over the whole parity set) that may differ.
      min_agreement: smallest share of images whose discrete choice (e.g. IC-MoE's chosen
        candidate) must agree; None where the family has none.
    """

    atol: float
    rtol: float
    max_flipped: float
    min_agreement: Optional[float] = None
    scaled_atol: float = 0.0

    def replace(self, **changes: Any) -> "Tolerances":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GraphPass:
    """An ONNX graph pass a family applies before the TensorRT build.

    Attributes:
      name: short name (recorded in the manifest).
      output: file name of the rewritten graph in the build directory.
      apply: (source ONNX path, destination path, manifest) -> None; writes the destination.
      prepare: run in the building process before TensorRT parses the graph (e.g. register a plugin).
    """

    name: str
    output: str
    apply: Callable[[Any, Any, Dict[str, Any]], None]
    prepare: Optional[Callable[[], None]] = None


class Family:
    """Base class of a model family; subclasses fill in the attributes and methods below."""

    name: str = ""
    title: str = ""
    configs: Mapping[str, Callable[[], Any]] = {}
    # op types kept in FP32 wherever they occur in the FP16 graph
    fp32_op_types: Tuple[str, ...] = ("LayerNormalization", "Softmax")
    # aten ops torch-tensorrt's autocast keeps in FP32
    fp32_aten_ops: Tuple[str, ...] = ("aten.native_layer_norm.default", "aten._softmax.default")
    # the engine label of the default eager structure, and the other structures of the same weights
    eager_name: str = ""
    variants: Mapping[str, Callable[[Any], Any]] = {}
    tensorrt_passes: Sequence[GraphPass] = ()
    # extra build stages: (name, step(staging build dir, model, manifest)), run after the graphs are written
    build_steps: Sequence[Tuple[str, Callable[[Any, Any, Dict[str, Any]], None]]] = ()

    # ---------------------------------------------------------------- configurations

    def get_config(self, name: str, **overrides: Any) -> Any:
        """A registered configuration (size variant), with fields overridden."""
        if name not in self.configs:
            raise FamilyError(f"unknown {self.name} config {name!r}; choose from {', '.join(sorted(self.configs))}")
        cfg = self.configs[name]()
        return dataclasses.replace(cfg, **overrides) if overrides else cfg

    def config_from_dict(self, d: Dict[str, Any]) -> Any:
        raise NotImplementedError

    # ---------------------------------------------------------------- models

    def build(self, config: Any, *, sam_checkpoint: Optional[Any] = None) -> Any:
        """A model of `config` in eval mode on the CPU (random init, or from SAM weights)."""
        raise NotImplementedError

    def eager_label(self, variant: Optional[str] = None) -> str:
        """Report label of an eager structure: "eager" or "eager-<name>" (IC-MoE: eager-shared, eager-naive)."""
        name = variant or self.eager_name
        return f"eager-{name}" if name else "eager"

    def variant(self, model: Any, name: Optional[str]) -> Any:
        """`model` as the eager structure `name` (None: the model itself)."""
        if name is None or name == self.eager_name:
            return model
        if name not in self.variants:
            raise FamilyError(f"{self.name} has no eager variant {name!r} (has: {', '.join(self.variants) or 'none'})")
        return self.variants[name](model)

    def prepare_eager(self, model: Any, device: Any) -> None:
        """Called when an eager engine moves `model` to `device` (e.g. to install fused CUDA ops)."""

    # ---------------------------------------------------------------- graph contract

    def inputs(self, config: Any) -> List[TensorSpec]:
        raise NotImplementedError

    def outputs(self, config: Any) -> List[TensorSpec]:
        raise NotImplementedError

    def export_module(self, model: Any) -> Any:
        """An nn.Module taking the inputs (in order) and returning a tuple of the outputs (in order)."""
        raise NotImplementedError

    def example_inputs(self, config: Any, batch: int, seed: int = 0) -> Tuple[Any, ...]:
        """Torch tensors for tracing, one per input spec (default: uniform 0..255 float32)."""
        import torch

        g = torch.Generator().manual_seed(seed)
        return tuple(torch.rand(spec.concrete(batch), generator=g) * 255 for spec in self.inputs(config))

    def fp32_nodes(self, proto: Any) -> List[str]:
        """Names of nodes of the FP32 graph `proto` that must stay FP32 in the FP16 graph."""
        return []

    # ---------------------------------------------------------------- checks

    def synthetic_inputs(self, n: int, image_size: int, seed: int = 0) -> np.ndarray:
        """`n` structured images (float32 (n, 3, S, S), RGB 0..255) like the family's real data."""
        raise NotImplementedError

    def tolerances(self, precision: str) -> Tolerances:
        raise NotImplementedError

    def compare(self, reference: Dict[str, np.ndarray], candidate: Dict[str, np.ndarray],
                tolerances: Tolerances) -> Dict[str, Any]:
        """Parity figures of `candidate` against eager FP32 `reference`, with "passed"."""
        raise NotImplementedError

    # ---------------------------------------------------------------- reports

    def summarize(self, config: str, **overrides: Any) -> Dict[str, Any]:
        raise NotImplementedError

    def format_summary(self, summary: Dict[str, Any]) -> str:
        return "\n".join(f"{k}: {v}" for k, v in summary.items())
