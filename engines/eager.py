"""PyTorch eager engine: the reference every exported engine is compared with.

`EagerEngine` runs `ICMoE` (shared backbone) or `NaiveICMoE` (three full experts,
as the paper stores them) under `torch.inference_mode`, with a fixed thread count
so that it competes fairly with ONNX Runtime.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from engines.base import Engine, EngineError


def default_threads() -> int:
    """Threads for every CPU engine: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class EagerEngine(Engine):
    """IC-MoE in PyTorch eager mode.

    Arguments (keyword-only):
      model: an `ICMoE` or `NaiveICMoE`.
      device: "cpu" or "cuda" (on CUDA the voting uses the fused op of `engines.voting_op`).
      threads: intra-op CPU threads (default: the usable cores).
      name: label for reports ("eager-shared", "eager-naive").
    """

    def __init__(self, *, model: torch.nn.Module, device: str = "cpu", threads: Optional[int] = None,
                 name: Optional[str] = None) -> None:
        super().__init__(image_size=model.config.image_size, batch_range=None)
        self.model = model.eval()
        self.device = torch.device(device)
        self.threads = threads or default_threads()
        self.name = name or ("eager-naive" if type(model).__name__ == "NaiveICMoE" else "eager-shared")

    @classmethod
    def from_checkpoint(cls, checkpoint, *, naive: bool = False, expect=None, **kw) -> "EagerEngine":
        """Load a checkpoint folder (`icmoe.load`); `naive` builds the three-full-experts structure.

        Raises:
          EngineError: the checkpoint is missing, damaged or for another model.
        """
        import icmoe

        try:
            model = icmoe.load(checkpoint, expect=expect, naive=naive)
        except icmoe.CheckpointError as e:
            raise EngineError(str(e)) from None
        return cls(model=model, **kw)

    @classmethod
    def from_build(cls, build_dir, *, precision: Optional[str] = None, naive: bool = False, expect=None,
                   **kw) -> "EagerEngine":
        """The eager FP32 model a build was exported from (its checkpoint, checked by sha256).

        Arguments:
          build_dir: a build directory; its manifest names the checkpoint (random-init builds keep
            theirs in `build_dir/checkpoint/`).
          precision: only "fp32" (or None): eager is the FP32 reference.
          naive: three full experts instead of the shared backbone.
          expect: a model name the build must be for.

        Raises:
          EngineError: no usable checkpoint, or a mismatch with the manifest.
        """
        from export.manifest import ManifestError, read_manifest

        import icmoe

        if precision not in (None, "fp32"):
            raise EngineError(f"the eager engine runs FP32 only, not {precision!r}")
        try:
            manifest = read_manifest(build_dir)
        except ManifestError as e:
            raise EngineError(str(e)) from None
        _check_expect(manifest, expect, build_dir)
        ckpt = manifest.get("checkpoint") or {}
        path = ckpt.get("path")
        if not path:
            raise EngineError(f"{build_dir}: the manifest names no checkpoint, so there is no eager model to load")
        path = Path(path)
        if not path.is_absolute():
            path = Path(build_dir) / path
        try:
            meta = icmoe.checkpoint.read_meta(path)
        except icmoe.CheckpointError as e:
            raise EngineError(str(e)) from None
        if ckpt.get("sha256") and meta.get("weights_sha256") != ckpt["sha256"]:
            raise EngineError(f"{path}: checkpoint weights differ from the ones {build_dir} was built from (sha256)")
        return cls.from_checkpoint(path, naive=naive, expect=manifest["model"]["name"], **kw)

    def _activate(self) -> None:
        torch.set_num_threads(self.threads)
        self.model.to(self.device)
        if self.device.type == "cuda":
            from engines.voting_op import install

            install(self.model)

    def _infer(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        with torch.inference_mode():
            x = torch.from_numpy(images).to(self.device)
            vote = self.model(x)
            return {
                "logits": vote.logits.float().cpu().numpy(),
                "mask": vote.mask.cpu().numpy().astype(np.uint8, copy=False),
                "expert": vote.expert.cpu().numpy().astype(np.int32, copy=False),
            }


def _check_expect(manifest: dict, expect, build_dir) -> None:
    if expect is None:
        return
    name = expect if isinstance(expect, str) else expect.name
    have = manifest["model"]["name"]
    if have != name or (not isinstance(expect, str) and expect.to_dict() != manifest["model"]["config"]):
        raise EngineError(f"{build_dir}: build is for model {have!r}, expected {name!r}")
