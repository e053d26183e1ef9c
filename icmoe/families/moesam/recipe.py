"""MoE-SAM's training (its `TrainingSpec`): the loss, the augmentations, the recipes, the step.

Details: docs/moesam.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

from icmoe.core.errors import TrainError
from icmoe.data.synthetic_volumes import has_synthetic_volumes, make_synthetic_volumes
from icmoe.data.volumes import VOLUME_DATASETS, build_slice_dataset
from icmoe.evaluation.report import Evaluation
from icmoe.evaluation.volumes import volume_evaluation
from icmoe.families.contracts import TrainingSpec
from icmoe.sam.build import freeze_unused_heads
from icmoe.training.recipe import Augment, Recipe

DICE_SMOOTH = 1e-5
# The augmentation's choice: rotate with P_ROTATE, else crop with P_CROP, else elastic with P_ELASTIC, else none.
P_ROTATE, P_CROP, P_ELASTIC = 0.45, 0.75, 0.9
MAX_DEGREES = 20.0
CROP_SIDE = (0.2, 0.8)  # fraction of the side kept by the crop
ELASTIC_SIGMA = 0.08  # smoothing of the displacement field, fraction of the side
ELASTIC_STD = 0.03  # standard deviation of the displacement, fraction of the side
INTENSITY_SHIFT = 0.1 * 255  # largest additive intensity shift (0..255 images)

RECIPES: Dict[str, Recipe] = {
    # The paper's: AdamW (0.9, 0.999), wd 0.1, lr 5e-4, 250 warmup iterations then poly 0.9,
    # global batch 16, 400 epochs, validation every 5 epochs (best mean Dice kept), seed 100.
    "paper": Recipe(optimizer="adamw", lr=5e-4, betas=(0.9, 0.999), weight_decay=0.1, schedule="poly",
                    warmup=250, power=0.9, epochs=400, batch_size=16, val_every=5, ce=0.2, dice=0.8, sgcl=0.0,
                    balance=False, geometric=True, seed=100),
    # Tiny and randomly initialised on synthetic3d (32 training volumes, 384 slices) on a 2-core CPU: no SAM
    # weights to fine-tune, so a higher rate and a short warmup; batch 4, whose twice as many steps learn
    # faster than batch 8 for the same compute; the paper's augmentation (it generalises better here).
    "demo": Recipe(optimizer="adamw", lr=2e-3, betas=(0.9, 0.999), weight_decay=0.01, schedule="poly",
                   warmup=20, power=0.9, epochs=7, batch_size=4, val_every=1, ce=0.2, dice=0.8, sgcl=0.0,
                   balance=False, geometric=True, seed=100),
}

# The synthetic3d set written on first use: 40 training volumes (32 train / 8 val) and 8 test ones (6 s).
SYNTHETIC3D_DEFAULTS = {"n_train": 40, "n_test": 8, "size": 128, "depth": 12, "seed": 0}


# ----------------------------------------------------------------------------- loss


def dice_loss(logits: torch.Tensor, label: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft multi-class Dice loss over all C+1 channels (background included), averaged over channels.

    Arguments:
      logits: (B, C+1, S, S) float.
      label: (B, S, S) int64 class indices 0..C.
      smooth: added to numerator and denominator.

    Returns:
      0-dim tensor: mean over channels c of 1 - (2 sum(p_c g_c) + smooth) / (sum(p_c^2) + sum(g_c^2) + smooth),
        sums over the batch and the pixels.
    """
    p = logits.float().softmax(1)  # (B, C+1, S, S)
    g = F.one_hot(label, p.shape[1]).permute(0, 3, 1, 2).to(p.dtype)  # (B, C+1, S, S)
    dims = (0, 2, 3)
    inter = (p * g).sum(dims)  # (C+1,)
    denom = (p * p).sum(dims) + (g * g).sum(dims)
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


def moesam_loss(logits: torch.Tensor, label: torch.Tensor, *, ce: float = 0.2, dice: float = 0.8) -> Dict[str, torch.Tensor]:
    """ce * CE + dice * Dice (the paper: 0.2 and 0.8) on full-resolution logits.

    Arguments:
      logits: (B, C+1, S, S); label: (B, S, S) int64.

    Returns:
      dict: "loss", "ce", "dice" (0-dim tensors).
    """
    if logits.dim() != 4 or label.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"expected logits (B, C+1, S, S) and labels (B, S, S), got {tuple(logits.shape)} and "
                         f"{tuple(label.shape)}")
    parts = {"ce": F.cross_entropy(logits, label), "dice": dice_loss(logits, label)}
    parts["loss"] = ce * parts["ce"] + dice * parts["dice"]
    return parts


class MoESAMStep(nn.Module):
    """forward(images (B, 3, S, S) RGB 0..255, label (B, S, S) int64) -> {"loss", "ce", "dice"}."""

    def __init__(self, model: nn.Module, *, ce: float, dice: float) -> None:
        super().__init__()
        self.model = model
        self.ce, self.dice = ce, dice

    def forward(self, images: torch.Tensor, label: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.model(images)  # (B, C+1, S, S): router noise and expert dropout on in train mode
        return moesam_loss(logits, label, ce=self.ce, dice=self.dice)


# ----------------------------------------------------------------------------- augmentation


def _warp(image: torch.Tensor, label: torch.Tensor, grid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample image (3, S, S) bilinearly and label (S, S) by nearest neighbour at `grid` (1, S, S, 2), zeros outside."""
    img = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    lbl = F.grid_sample(label[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return img, lbl[0, 0].round().to(label.dtype)


def _affine_grid(theta: np.ndarray, image: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(theta, dtype=image.dtype, device=image.device)[None]  # (1, 2, 3)
    return F.affine_grid(t, [1, *image.shape], align_corners=False)  # (1, S, S, 2), normalised (x, y)


def rotate(image: torch.Tensor, label: torch.Tensor, degrees: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate a square sample about its centre by `degrees`."""
    a = math.radians(degrees)
    theta = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
    return _warp(image, label, _affine_grid(theta, image))


def crop_resize(image: torch.Tensor, label: torch.Tensor, frac: float, y0: float, x0: float
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The square of side `frac` x S whose top-left corner is at (y0, x0) (fractions of the side), resized back."""
    cx, cy = 2 * (x0 + frac / 2) - 1, 2 * (y0 + frac / 2) - 1  # the box centre, normalised
    theta = np.array([[frac, 0.0, cx], [0.0, frac, cy]])
    return _warp(image, label, _affine_grid(theta, image))


def elastic(image: torch.Tensor, label: torch.Tensor, rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """A smooth random displacement field (Gaussian-filtered noise, std ELASTIC_STD of the side)."""
    s = image.shape[-1]
    fields = []
    for _ in range(2):  # x, then y
        f = gaussian_filter(rng.standard_normal((s, s)), sigma=max(ELASTIC_SIGMA * s, 1.0))
        fields.append(f / max(float(f.std()), 1e-12) * (2 * ELASTIC_STD))  # normalised units span 2
    disp = torch.as_tensor(np.stack(fields, -1), dtype=image.dtype, device=image.device)  # (S, S, 2)
    grid = _affine_grid(np.array([[1.0, 0, 0], [0, 1.0, 0]]), image) + disp[None]
    return _warp(image, label, grid)


def augment_sample(image: torch.Tensor, label: torch.Tensor, rng: np.random.Generator, recipe: Recipe
                   ) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """One sample's augmentation (module docstring).

    Arguments:
      image: (3, S, S) float RGB 0..255; label: (S, S) int64.
      rng: the sample's generator; every draw is made whatever the options, so the choice for a
        sample does not depend on which options are on.
      recipe: `geometric`, `hflip`, `intensity` say which parts run.

    Returns:
      (image, label, kind): kind is "rotate", "crop", "elastic" or "none" (the geometric choice).
    """
    u = rng.random(3)
    degrees = rng.uniform(-MAX_DEGREES, MAX_DEGREES)
    frac = rng.uniform(*CROP_SIDE)
    y0, x0 = rng.uniform(0, 1 - frac, size=2)
    flip, shift = rng.random() < 0.5, rng.uniform(-INTENSITY_SHIFT, INTENSITY_SHIFT)
    kind = "rotate" if u[0] < P_ROTATE else "crop" if u[1] < P_CROP else "elastic" if u[2] < P_ELASTIC else "none"
    if recipe.geometric and kind == "rotate":
        image, label = rotate(image, label, degrees)
    elif recipe.geometric and kind == "crop":
        image, label = crop_resize(image, label, frac, y0, x0)
    elif recipe.geometric and kind == "elastic":
        image, label = elastic(image, label, rng)
    if recipe.hflip and flip:
        image, label = image.flip(-1), label.flip(-1)
    if recipe.intensity:
        image = (image + shift).clamp(0, 255)
    return image, label, kind if recipe.geometric else "none"


def epoch_augmentation(recipe: Recipe, epoch: int, n: int) -> Optional[Augment]:
    """The batch augmentation of (0-based) `epoch`: each sample from `default_rng([seed, epoch, index])`."""
    if not (recipe.geometric or recipe.hflip or recipe.intensity):
        return None

    def apply(images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out_i, out_l = [], []
        for j, i in enumerate(index.tolist()):
            rng = np.random.default_rng([recipe.seed, epoch, int(i)])
            img, lbl, _ = augment_sample(images[j], labels[j], rng, recipe)
            out_i.append(img)
            out_l.append(lbl)
        return torch.stack(out_i), torch.stack(out_l)  # (B, 3, S, S), (B, S, S)

    return apply


# ----------------------------------------------------------------------------- the TrainingSpec


class MoESAMTraining(TrainingSpec):
    """3-D datasets read slice by slice, the step above, per-volume Dice and HD95."""

    def recipes(self) -> Dict[str, Recipe]:
        return dict(RECIPES)

    def pick_recipe(self, dataset: str, config: str) -> str:
        """`--recipe auto`: demo for synthetic3d with the tiny configuration, else paper."""
        return "demo" if dataset == "synthetic3d" and config == "tiny" else "paper"

    def datasets(self) -> Dict[str, Dict[str, Any]]:
        """Every 3-D dataset, with the configuration fields its classes decide."""
        return {name: {"num_classes": len(spec.classes), "class_names": tuple(spec.classes)}
                for name, spec in VOLUME_DATASETS.items()}

    def make_synthetic(self, dataset: str, root: Any, *, image_size: int) -> bool:
        """Write synthetic3d (SYNTHETIC3D_DEFAULTS, native 128 px: slices are resized to `image_size` when read)."""
        if dataset != "synthetic3d" or has_synthetic_volumes(root):
            return False
        make_synthetic_volumes(Path(root), **SYNTHETIC3D_DEFAULTS)
        return True

    def load_split(self, dataset: str, root: Any, split: str, *, image_size: int, skip_bad: bool = False,
                   progress: bool = True) -> Any:
        """A `SliceDataset`: (image (3, S, S), label (S, S) int64, index), with `volumes` and `slices`."""
        return build_slice_dataset(dataset, root, split, image_size=image_size, skip_bad=skip_bad, progress=progress)

    def train_step(self, model: nn.Module, recipe: Recipe) -> MoESAMStep:
        """MoE-SAM's step for `model` (train mode); the decoder's IoU head (its output is unused) is frozen."""
        if recipe.sgcl or recipe.balance:
            raise TrainError("MoE-SAM has no SgCL or PPAV balancing: use sgcl 0 and balancing off "
                             f"(got sgcl {recipe.sgcl:g}, balance {recipe.balance})")
        freeze_unused_heads(model)  # so every trainable parameter gets a gradient (DDP needs no unused search)
        return MoESAMStep(model, ce=recipe.ce, dice=recipe.dice)

    def augmentation(self, recipe: Recipe, epoch: int, n: int) -> Optional[Augment]:
        return epoch_augmentation(recipe, epoch, n)

    def evaluate(self, model: nn.Module, data: Any, *, batch_size: int = 8, device: Any = "cpu", rank: int = 0,
                 world: int = 1, progress: bool = True, full: bool = True, overlays: Optional[Any] = None,
                 n_overlays: int = 8) -> Evaluation:
        """Per-volume Dice (and HD95 when `full`) of every foreground class; score = mean foreground Dice."""
        return volume_evaluation(model, data, model.config.labels[1:], batch_size=batch_size,
                                 device=torch.device(device), rank=rank, world=world, progress=progress,
                                 distances=full, overlays=overlays, n_overlays=n_overlays)
