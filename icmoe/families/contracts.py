"""The small declarations a model family fills in, one per concern (after optimum, which keeps the
export config, the model patching and the task registry apart).

- `GraphSpec`: what the exported graph is (tensor specs, the module to trace, example inputs,
  label names, patches that make the model trace to the wanted graph);
- `PrecisionSpec`: how lower precisions treat it (FP32 islands, INT8 calibration images, TensorRT
  graph passes, extra build steps, eager GPU kernels);
- `ParitySpec`: how parity against eager FP32 is judged (synthetic inputs, tolerances, eager's output for
  each discrete choice, compare);
- `TrainingSpec`: how it trains and is evaluated (recipes, datasets, step, augmentation, evaluation).

Every default here is what a family without that feature gets; `docs/families.md` walks through
filling them in. Nothing in this module imports a model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from icmoe.core.codes import generic_codes
from icmoe.core.errors import FamilyError
from icmoe.core.specs import TensorSpec


class GraphSpec:
    """What the exported graph is: inputs and outputs (`TensorSpec`s, shapes with "batch"), the module
    traced (the model as a function of the inputs returning the outputs in order), example inputs."""

    def inputs(self, config: Any) -> List[TensorSpec]:
        raise NotImplementedError

    def outputs(self, config: Any) -> List[TensorSpec]:
        raise NotImplementedError

    def export_module(self, model: Any) -> Any:
        """An nn.Module taking the inputs (in order) and returning a tuple of the outputs (in order)."""
        raise NotImplementedError

    def example_inputs(self, config: Any, batch: int, seed: int = 0) -> Tuple[Any, ...]:
        """Torch tensors for tracing, one per input spec (default: uniform 0..255 float32)."""
        import torch  # a family's graph is traced in a process that has torch; its declaration may not need it

        g = torch.Generator().manual_seed(seed)
        return tuple(torch.rand(spec.concrete(batch), generator=g) * 255 for spec in self.inputs(config))

    def class_names(self, config: Any) -> Optional[List[str]]:
        """Names of the `mask` output's label values (index = value, 0 = background) for a multi-class
        family; None where `mask` is binary (0/1)."""
        return None

    def segment_codes(self, config: Any) -> List[Dict[str, Any]]:
        """What each foreground label (1..K) is, as coded concepts for DICOM SEG (`icmoe.core.codes`:
        category, type, optional modifier; SNOMED CT). Default: the generic "Tissue" for every label."""
        names = self.class_names(config)
        return generic_codes(1 if names is None else len(names) - 1)
    def mask_rule(self, config: Any) -> Optional[str]:
        """How the `mask` output follows from the `logits` output: "threshold" (binary, one channel, mask =
        logits > 0) or "argmax" (labels, one channel per label value, ties to the lowest); None (default)
        where it does not. Recorded in the manifest as `model.mask_rule`: with a rule, masks at a picture's
        own size are made from the logits resized bilinearly (SAM's post-processing), not from the mask."""
        return None

    def export_patches(self, model: Any) -> ContextManager[Any]:
        """A context in which `model` traces to the graph the family wants (optimum's patchers), e.g.
        attention over long sequences in query chunks; the model is unchanged afterwards."""
        return contextlib.nullcontext()


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


class PrecisionSpec:
    """How lower precisions and GPU backends treat the graph.

    Attributes:
      fp32_op_types: op types kept FP32 wherever they occur in the FP16 graph (and in floating point
        in the INT8 graphs).
      fp32_aten_ops: aten ops torch-tensorrt's autocast keeps in FP32.
      tensorrt_passes: graph passes before the TensorRT build.
      build_steps: extra build stages, (name, step(staging build dir, model, manifest)), run after the
        graphs are written.
    """

    fp32_op_types: Tuple[str, ...] = ("LayerNormalization", "Softmax")
    fp32_aten_ops: Tuple[str, ...] = ("aten.native_layer_norm.default", "aten._softmax.default")
    tensorrt_passes: Sequence[GraphPass] = ()
    build_steps: Sequence[Tuple[str, Callable[[Any, Any, Dict[str, Any]], None]]] = ()

    def fp32_nodes(self, proto: Any) -> List[str]:
        """Names of nodes of the FP32 graph `proto` that must stay FP32 in the FP16 graph."""
        return []

    def calibration_images(self, source: Any, n: int, image_size: int, seed: int = 0) -> np.ndarray:
        """`n` real images for INT8 calibration, drawn (seeded) from a dataset folder or name the family reads.

        Returns:
          np.ndarray: float32 (n, 3, S, S), RGB 0..255 (fewer where the source has fewer).

        Raises:
          DataError: an empty, unknown or damaged source (one line naming it); FamilyError: no reader.
        """
        raise FamilyError("cannot read calibration images (use the synthetic set)")

    def prepare_eager(self, model: Any, device: Any) -> None:
        """Called when an eager engine moves `model` to `device` (e.g. to install fused CUDA ops)."""


@dataclass(frozen=True)
class Tolerances:
    """Parity gates of one precision against eager FP32 (element-wise, Polygraphy's atol/rtol).

    Attributes:
      atol, rtol: every logit must satisfy
        |candidate - reference| <= atol + scaled_atol * max|reference of its image| + rtol * |reference|.
      scaled_atol: absolute tolerance in units of the image's largest |logit|: where logits cancel to
        near zero, a lower precision's error is absolute, at the scale of the values that cancelled.
      max_flipped: largest fraction of mask pixels (over the whole parity set) that may differ from
        the reference's output for the choices the engine made (see `ParitySpec.choice_references`).
      min_class_dice: multi-class families: smallest Dice of any label against the reference's.
      gate_logits: False where the logits are reported but the gate is on the labels only (a
        lower precision that may route a token differently moves logits non-smoothly).
      max_dice_change: held-out check (export.verify): on the family's labelled synthetic validation
        images, the candidate's Dice against the ground truth (per class) may differ from eager FP32's
        by at most this; None: not checked.
    """

    atol: float
    rtol: float
    max_flipped: float
    scaled_atol: float = 0.0
    min_class_dice: Optional[float] = None
    gate_logits: bool = True
    max_dice_change: Optional[float] = None

    def replace(self, **changes: Any) -> "Tolerances":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


class ParitySpec:
    """How parity of a converted graph against eager FP32 is judged."""

    def synthetic_inputs(self, n: int, image_size: int, seed: int = 0) -> np.ndarray:
        """`n` structured images (float32 (n, 3, S, S), RGB 0..255) like the family's real data."""
        raise NotImplementedError

    def synthetic_validation(self, n: int, image_size: int, seed: int = 0) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """`n` labelled images like `synthetic_inputs`, for held-out Dice: (images float32 (n, 3, S, S) RGB
        0..255, ground truth uint8 (n, 1, S, S) in the `mask` output's values); None where the family has none."""
        return None

    def tolerances(self, precision: str) -> Tolerances:
        raise NotImplementedError

    def choice_references(self, model: Any, images: np.ndarray, batch_size: int,
                          gates: Sequence[Tolerances]) -> List[Dict[str, np.ndarray]]:
        """What eager computes for the discrete choices an engine could make instead of the reference's.

        For a family whose output rests on a discrete choice (a vote, a routing, an argmax): a choice
        may differ from the reference's where the reference's own margin lies within the precision's
        error bound (a tie), and the engine's output is then judged against eager's output for the
        choice it made. `export.verify` calls this once, with the eager model (inference mode, on its
        device) and the parity images, and merges the dict of each engine's gate into the reference
        `compare` receives. Default: none (no discrete choice).

        Returns:
          one dict of arrays (first axis: the images) per entry of `gates`, in order.
        """
        return [{} for _ in gates]

    def columns(self) -> List[Tuple[str, str, str]]:
        """Figures of `compare`'s report that tables show beside max |dlogit| and flipped pixels:
        (column header, report key, format spec; "%" specs print a share as a percentage)."""
        return []

    def compare(self, reference: Dict[str, np.ndarray], candidate: Dict[str, np.ndarray],
                tolerances: Tolerances) -> Dict[str, Any]:
        """Parity figures of `candidate` against eager FP32 `reference` (with what `choice_references`
        added for these tolerances, where it was called), with "passed"."""
        raise NotImplementedError


class TrainingSpec:
    """How a family trains and is evaluated, read by the generic trainer (`icmoe.training`) and
    evaluation (`icmoe.evaluation`). Checkpoints, resume, DDP, logs and run folders stay the trainer's.
    The defaults are those of a family that cannot be trained here."""

    def recipes(self) -> Mapping[str, Any]:
        """Training recipes: name -> `icmoe.training.recipe.Recipe`, in the order `--help` lists them;
        `paper` is the publication's."""
        raise FamilyError("has no training recipes (it cannot be trained here)")

    def pick_recipe(self, dataset: str, config: str) -> str:
        """The recipe `--recipe auto` means for `dataset` and the size variant `config` (default "paper")."""
        return "paper"

    def datasets(self) -> Mapping[str, Dict[str, Any]]:
        """Datasets the family trains and evaluates on: name -> the configuration fields that dataset
        decides (e.g. a multi-class family's `num_classes` and `class_names`; {} where none). The trainer
        refuses other names and builds the configuration with `get_config(name, **datasets()[dataset])`."""
        return {}

    def make_synthetic(self, dataset: str, root: Any, *, image_size: int) -> bool:
        """Write the family's built-in synthetic set into `root` when `dataset` names it and `root` holds
        none (no download); one process (DDP rank 0) calls it before any split is read. True if written."""
        return False

    def load_split(self, dataset: str, root: Any, split: str, *, image_size: int, skip_bad: bool = False,
                   progress: bool = True) -> Any:
        """One split ("train", "val", and "test" where the dataset has one) read into memory.

        Returns:
          a torch Dataset: `ds[i]` -> (image float32 (3, S, S) RGB 0..255, target (the step's and the
            evaluation's format, e.g. a (1, S, S) float mask or an (S, S) int64 label map), i);
            `ds.skipped` lists what `skip_bad` dropped. Raises `DataError` naming the file at fault.
        """
        raise FamilyError("has no datasets")

    def train_step(self, model: Any, recipe: Any) -> Any:
        """The training step of `model` (in train mode) under `recipe`.

        Returns:
          nn.Module containing `model`: forward(images (B, 3, S, S), target (B, ...)) -> dict of 0-dim
            loss tensors with "loss" (the one minimised; the others are logged). Its parameters with
            `requires_grad` are what the optimizer and the trainer state cover (training-only heads
            included); `find_unused_parameters = True` on it where a forward may leave some without
            gradient (e.g. routing), for DDP.
        """
        raise FamilyError("has no training step")

    def augmentation(self, recipe: Any, epoch: int, n: int) -> Optional[Callable[[Any, Any, Any], Tuple[Any, Any]]]:
        """The batch augmentation of (0-based) `epoch` over a split of `n` items, or None.

        Returns:
          fn(images (B, 3, S, S), target (B, ...), index (B,) dataset indices) -> (images, target), a
            function of (recipe.seed, epoch, index) only, so a resumed run and any number of DDP
            processes repeat it.
        """
        return None

    def evaluate(self, model: Any, data: Any, *, batch_size: int = 8, device: Any = "cpu", rank: int = 0,
                 world: int = 1, progress: bool = True, full: bool = True, overlays: Optional[Any] = None,
                 n_overlays: int = 8) -> Any:
        """The model (inference mode, as deployed) scored on a split from `load_split`.

        Arguments:
          rank, world: under DDP each rank evaluates its share and the figures are gathered.
          full: False for training's validation: only what the score needs (e.g. no HD95).
          overlays, n_overlays: a folder for PNG pictures of the first `n_overlays` items, or None.

        Returns:
          `icmoe.evaluation.Evaluation`: report, score (higher is better), headline, table, overlays.
        """
        raise FamilyError("has no evaluation")
