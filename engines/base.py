"""One interface for every backend (after Polygraphy's runners): activate, infer, deactivate.

An engine knows nothing of files: `engines.predict` turns pictures into batches for `infer`.

An engine runs one build's graph. What it takes and returns is the build's contract, read
from the manifest's tensor specs, never assumed here: the input is an image batch (for the
families so far float32 RGB in 0..255, shape (B, 3, S, S)) and `infer` returns a dict of
NumPy arrays keyed by the output names (IC-MoE: logits, mask, expert).

What the `mask` output's values mean is the build's too: `Engine.class_names` (and
`BuildInfo.class_names`) is None for a binary mask (0/1) and the label names (index = value,
0 = background) for a multi-class one; `mask_kind` says "binary" or "labels".
"""

from __future__ import annotations

import abc
import functools
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from engines.errors import EngineError, InputError
from icmoe.core.manifest import ManifestError, artifact_path, io_specs, mask_kind_of, read_manifest
from icmoe.core.manifest import class_names as build_class_names
from icmoe.core.manifest import mask_rule as build_mask_rule
from icmoe.core.specs import BATCH, TensorSpec
from icmoe.families import check_expected


def default_threads() -> int:
    """Threads for every CPU engine: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def run_batched(engine: "Engine", images: np.ndarray, batch: int) -> Dict[str, np.ndarray]:
    """Run `engine` over `images` in chunks of `batch`; concatenates the outputs."""
    outs: Dict[str, List[np.ndarray]] = {}
    for i in range(0, len(images), batch):
        for k, v in engine.infer(images[i: i + batch]).items():
            outs.setdefault(k, []).append(v)
    return {k: np.concatenate(v, axis=0) for k, v in outs.items()}


def time_runs(engine: "Engine", images: np.ndarray, *, warmup: int, runs: int) -> np.ndarray:
    """Seconds of each of `runs` calls of `engine.infer(images)` after `warmup` untimed ones."""
    for _ in range(warmup):
        engine.infer(images)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        engine.infer(images)
        times.append(time.perf_counter() - t)
    return np.array(times)


def to_numpy(images) -> np.ndarray:
    if hasattr(images, "detach"):  # torch.Tensor without importing torch here
        images = images.detach().cpu().numpy()
    return np.asarray(images)


def check_input(x, spec: TensorSpec, batch_range: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Validate one input batch against its spec and return it as a contiguous array.

    Raises:
      InputError: one line naming what is wrong (dtype, rank, channels, size, batch, NaN).
    """
    x = to_numpy(x)
    want = tuple("B" if d == BATCH else d for d in spec.shape)
    if x.dtype != spec.np_dtype:
        raise InputError(f"{spec.name} must be {spec.dtype} {'RGB in 0..255 ' if len(want) == 4 else ''}"
                         f"of shape {want}, got dtype {x.dtype}")
    if x.ndim != len(spec.shape):
        raise InputError(f"{spec.name} must have shape {want}, got {x.ndim}-D shape {x.shape}")
    if len(want) == 4 and x.shape[1] != want[1]:
        raise InputError(f"{spec.name} must have {want[1]} {'(RGB) ' if want[1] == 3 else ''}channels on axis 1, "
                         f"got {x.shape[1]} in shape {x.shape}")
    fixed = [(i, d) for i, d in enumerate(spec.shape) if d != BATCH]
    if any(x.shape[i] != d for i, d in fixed):
        if len(want) == 4:
            raise InputError(f"{spec.name} must be {want[2]}x{want[3]}, got {x.shape[2]}x{x.shape[3]}")
        raise InputError(f"{spec.name} must have shape {want}, got {x.shape}")
    if batch_range is not None and not batch_range[0] <= x.shape[0] <= batch_range[1]:
        raise InputError(f"batch {x.shape[0]} outside this engine's range {batch_range[0]}..{batch_range[1]}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise InputError(f"{spec.name} contains NaN or infinite values")
    return np.ascontiguousarray(x)


class Engine(abc.ABC):
    """Base class of all engines. Use as a context manager or call activate()/deactivate().

    Arguments (keyword-only):
      inputs, outputs: the graph's tensor specs (from the build's manifest).
      batch_range: (min, max) batch the engine accepts, or None for any.
      class_names: label names of the `mask` output (index = value, 0 = background), None for a binary
        mask. An engine made by `from_build` takes them from the build's manifest, whatever the backend.
      mask_rule: how `mask` follows from `logits` ("threshold", "argmax"; `icmoe.core.manifest.MASK_RULES`),
        None where it does not; `from_build` takes it from the manifest too.
    """

    name: str = "engine"

    def __init__(self, *, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 batch_range: Optional[Tuple[int, int]] = None, class_names: Optional[Sequence[str]] = None,
                 mask_rule: Optional[str] = None) -> None:
        self.inputs: List[TensorSpec] = list(inputs)
        self.outputs: List[TensorSpec] = list(outputs)
        self.batch_range = batch_range
        self.class_names: Optional[List[str]] = None if class_names is None else list(class_names)
        self.mask_rule = mask_rule
        self.is_active = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every backend's `from_build` reads the manifest through BuildInfo; the label names are set
        # here, once for all of them, so a new backend cannot forget them.
        super().__init_subclass__(**kwargs)
        made = cls.__dict__.get("from_build")
        if isinstance(made, classmethod):
            cls.from_build = classmethod(_with_class_names(made.__func__))  # type: ignore[method-assign]

    @property
    def mask_kind(self) -> str:
        """"binary" (`mask` holds 0/1) or "labels" (`mask` holds label values, named by `class_names`)."""
        return mask_kind_of(self.class_names)

    @property
    def input_name(self) -> str:
        return self.inputs[0].name

    @property
    def output_names(self) -> List[str]:
        return [o.name for o in self.outputs]

    @property
    def image_size(self) -> int:
        """Side of the (square) input images."""
        return int(self.inputs[0].shape[-1])

    @property
    def streams(self) -> int:
        """How many `infer` calls this engine runs at once when called from that many threads (throughput
        settings); 1: one at a time (calls from several threads are still safe)."""
        return 1

    def settings(self) -> Dict[str, Any]:
        """How the engine runs (threads, hint, streams, ...), for reports."""
        return {"threads": getattr(self, "threads", None), "streams": self.streams}

    def activate(self) -> "Engine":
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self) -> "Engine":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def infer(self, images) -> Dict[str, np.ndarray]:
        """Run the model on a batch of the graph's input; returns {output name: array}."""
        if not self.is_active:
            self.activate()
        x = check_input(images, self.inputs[0], self.batch_range)
        return self._infer(x)

    @abc.abstractmethod
    def _activate(self) -> None: ...

    def _deactivate(self) -> None:
        pass

    @abc.abstractmethod
    def _infer(self, images: np.ndarray) -> Dict[str, np.ndarray]: ...


def _with_class_names(from_build: Callable[..., Engine]) -> Callable[..., Engine]:
    """`from_build` whose engine carries the build's label names (`Engine.class_names`) and mask rule."""

    @functools.wraps(from_build)
    def wrapper(cls, build_dir, *args: Any, **kwargs: Any) -> Engine:
        engine = from_build(cls, build_dir, *args, **kwargs)
        info = BuildInfo(build_dir)
        engine.class_names, engine.mask_rule = info.class_names, info.mask_rule
        return engine

    return wrapper


class BuildInfo:
    """What every engine reads from a build directory's manifest (checked once, one-line errors).

    Attributes:
      build_dir, manifest: the build and its parsed manifest.
      inputs, outputs: the graph's tensor specs.
      batch_range: (min, max) of the build's dynamic batch axis.
      class_names: label names of the `mask` output (index = value, 0 = background), None if binary.
      mask_rule: how `mask` follows from `logits` (the manifest's `model.mask_rule`), or None.
    """

    def __init__(self, build_dir, *, expect=None) -> None:
        try:
            self.manifest = read_manifest(build_dir)
        except ManifestError as e:
            raise EngineError(str(e)) from None
        self.build_dir = build_dir
        model = self.manifest["model"]
        why = check_expected(model["family"], {**model["config"], "name": model["name"]}, expect)
        if why:
            raise EngineError(f"{build_dir}: build is for {why}")
        specs = io_specs(self.manifest)
        self.inputs, self.outputs = specs["inputs"], specs["outputs"]
        b = self.manifest["batch"]
        self.batch_range = (int(b["min"]), int(b["max"]))
        self.class_names = build_class_names(self.manifest)
        self.mask_rule = build_mask_rule(self.manifest)

    @property
    def mask_kind(self) -> str:
        """"binary" or "labels" (see `class_names`)."""
        return mask_kind_of(self.class_names)

    def artifact(self, name: str, *, verify: bool = True):
        """The path of a registered artifact, checked (size, sha256) against the manifest."""
        try:
            return artifact_path(self.build_dir, name, verify=verify)
        except ManifestError as e:
            raise EngineError(str(e)) from None

    def specs(self) -> dict:
        return {"inputs": self.inputs, "outputs": self.outputs, "batch_range": self.batch_range}

    def compiled(self, name: str, *, kind: str, precision: Optional[str], verify: bool = True):
        """A compiled engine artifact (TensorRT plan, torch-tensorrt module): checked path, its manifest
        entry, its precision and the specs with the batch range it was compiled for.

        Raises:
          EngineError: missing or damaged, registered as another kind, or compiled for another precision.
        """
        path = self.artifact(name, verify=verify)
        entry = self.manifest["artifacts"][name]
        if entry.get("kind") != kind:
            raise EngineError(f"{path}: registered as {entry.get('kind')!r}, not {kind!r}")
        have = entry.get("precision", self.manifest["precision"])
        if precision is not None and precision != have:
            raise EngineError(f"{path}: compiled for {have}, not {precision}")
        batch = entry.get("batch") or self.manifest["batch"]
        specs = {**self.specs(), "batch_range": (int(batch["min"]), int(batch["max"]))}
        return path, entry, have, specs
