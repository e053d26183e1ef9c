"""PyTorch eager engine: the reference every exported engine is compared with.

`EagerEngine` runs a family's model under `torch.inference_mode` through the family's
export module (the same function the graphs were exported from), with a fixed thread
count so that it competes fairly with ONNX Runtime. `variant` picks another eager
structure of the same weights (IC-MoE: "naive", the paper's three full experts).
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from engines.base import BuildInfo, Engine, EngineError, default_threads
from icmoe.checkpoint import load, read_meta
from icmoe.core.errors import CheckpointError
from icmoe.core.manifest import checkpoint_path
from icmoe.families import FamilyError, get_family


class EagerEngine(Engine):
    """A family's model in PyTorch eager mode.

    Arguments (keyword-only):
      model: a model of a registered family (`model.config` names the family).
      device: "cpu" or "cuda" (on CUDA the family may install fused ops, e.g. IC-MoE's voting kernel).
      threads: intra-op CPU threads (default: the usable cores).
      name: label for reports (default: the family's label of the structure, e.g. "eager-shared").
      variant: which eager structure `model` is (for the label only).
      batch_range: (min, max) batch accepted, or None for any.
      compile: run the module through `torch.compile` (Inductor; what a PyTorch user tries first). The
        first call per batch size compiles (minutes for vit_b on a small CPU); labelled "<name>-compiled".
    """

    def __init__(self, *, model: torch.nn.Module, device: str = "cpu", threads: Optional[int] = None,
                 name: Optional[str] = None, variant: Optional[str] = None, batch_range=None,
                 compile: bool = False) -> None:
        self.family = get_family(type(model.config).family)
        cfg = model.config
        super().__init__(inputs=self.family.graph.inputs(cfg), outputs=self.family.graph.outputs(cfg), batch_range=batch_range,
                         class_names=self.family.graph.class_names(cfg), mask_rule=self.family.graph.mask_rule(cfg))
        self.model = model.eval()
        self.module = self.family.graph.export_module(self.model)
        self.device = torch.device(device)
        self.threads = threads or default_threads()
        self.name = name or self.family.eager_label(variant) + ("-compiled" if compile else "")
        self.compile = compile

    @classmethod
    def from_checkpoint(cls, checkpoint, *, variant: Optional[str] = None, expect=None, **kw) -> "EagerEngine":
        """Load a checkpoint folder (`icmoe.load`), optionally as another eager structure.

        Raises:
          EngineError: the checkpoint is missing, damaged or for another model.
        """
        try:
            model = load(checkpoint, expect=expect, variant=variant)
        except (CheckpointError, FamilyError) as e:
            raise EngineError(str(e)) from None
        return cls(model=model, variant=variant, **kw)

    @classmethod
    def from_build(cls, build_dir, *, precision: Optional[str] = None, variant: Optional[str] = None, expect=None,
                   **kw) -> "EagerEngine":
        """The eager FP32 model a build was exported from (its checkpoint, checked by sha256).

        Arguments:
          build_dir: a build directory; its manifest names the checkpoint (kept in `build_dir/checkpoint/`).
          precision: only "fp32" (or None): eager is the FP32 reference.
          variant: another eager structure of the same weights (IC-MoE: "naive").
          expect: what the build must be for (see `icmoe.families.check_expected`).

        Raises:
          EngineError: no usable checkpoint, or a mismatch with the manifest.
        """
        if precision not in (None, "fp32"):
            raise EngineError(f"the eager engine runs FP32 only, not {precision!r}")
        info = BuildInfo(build_dir, expect=expect)
        path = checkpoint_path(build_dir, info.manifest)
        if path is None:
            raise EngineError(f"{build_dir}: the manifest names no checkpoint, so there is no eager model to load")
        try:
            meta = read_meta(path)
        except CheckpointError as e:
            raise EngineError(str(e)) from None
        sha = (info.manifest.get("checkpoint") or {}).get("sha256")
        if sha and meta.get("weights_sha256") != sha:
            raise EngineError(f"{path}: checkpoint weights differ from the ones {build_dir} was built from (sha256)")
        model = info.manifest["model"]
        return cls.from_checkpoint(path, variant=variant, expect=f"{model['family']}/{model['name']}",
                                   batch_range=None, **kw)

    def _activate(self) -> None:
        torch.set_num_threads(self.threads)
        self.model.to(self.device)
        self.family.precision.prepare_eager(self.model, self.device)
        if self.compile:
            self.module = torch.compile(self.family.graph.export_module(self.model), dynamic=False)

    def _infer(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        with torch.inference_mode():
            outs = self.module(torch.from_numpy(images).to(self.device))
        return {spec.name: out.cpu().numpy().astype(spec.np_dtype, copy=False)
                for spec, out in zip(self.outputs, outs)}
