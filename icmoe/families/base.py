"""What a model family is to the toolkit: a name, its size variants, a builder, and its declarations.

The build, the engines, verification, the Triton writer, the trainer and the benchmark only ever
talk to a model through a `Family` (found by name in `icmoe.families`) and through the tensor
specs it writes into the manifest; none of them names a family. A family is one folder under
`icmoe/families/` whose `family.py` makes one `Family` from its declarations
(`icmoe.families.contracts`); docs/families.md shows how to add one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional

from icmoe.core.errors import FamilyError
from icmoe.families.contracts import GraphSpec, ParitySpec, PrecisionSpec, TrainingSpec


def lookup_config(configs: Mapping[str, Callable[[], Any]], family: str, name: str, **overrides: Any) -> Any:
    """The configuration `name` of a family's `configs`, with fields overridden.

    Raises:
      FamilyError: an unknown name or field (one line listing the choices).
    """
    if name not in configs:
        raise FamilyError(f"unknown {family} config {name!r}; choose from {', '.join(sorted(configs))}")
    cfg = configs[name]()
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cfg)})
    if unknown:
        raise FamilyError(f"{family} configurations have no field {', '.join(unknown)}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


@dataclass(frozen=True)
class Family:
    """A model family.

    Attributes:
      name: registry key, stored in checkpoints and manifests.
      title: how people write it ("IC-MoE").
      configs: size variant name -> builder of its configuration (a frozen dataclass whose class
        has `family = name` and `from_dict`).
      build: (config, *, sam_checkpoint=None) -> the model in eval mode on the CPU.
      graph, precision, parity, training: the declarations (`icmoe.families.contracts`).
      eager_name: label of the default eager structure ("shared" -> "eager-shared"; "" -> "eager").
      variants: other eager structures of the same weights, name -> fn(model) -> model.
      summarize: config -> parameters and FLOPs of one image; format_summary: that -> text.
    """

    name: str
    title: str
    configs: Mapping[str, Callable[[], Any]]
    build: Callable[..., Any]
    graph: GraphSpec
    precision: PrecisionSpec
    parity: ParitySpec
    training: TrainingSpec = field(default_factory=TrainingSpec)
    eager_name: str = ""
    variants: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)
    summarize: Optional[Callable[[Any], Dict[str, Any]]] = None
    format_summary: Callable[[Dict[str, Any]], str] = lambda s: "\n".join(f"{k}: {v}" for k, v in s.items())

    def get_config(self, name: str, **overrides: Any) -> Any:
        """A registered configuration (size variant), with fields overridden."""
        return lookup_config(self.configs, self.name, name, **overrides)

    def config_from_dict(self, d: Dict[str, Any]) -> Any:
        """The configuration a checkpoint or manifest stored (`to_dict`); its class is the variants'."""
        cls = type(next(iter(self.configs.values()))())
        return cls.from_dict(d)

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

    def summary(self, config: str, **overrides: Any) -> Dict[str, Any]:
        """Parameters and FLOPs of one image of the size variant `config` (random weights)."""
        if self.summarize is None:
            raise FamilyError(f"{self.title} has no summary")
        return self.summarize(self.get_config(config, **overrides))
