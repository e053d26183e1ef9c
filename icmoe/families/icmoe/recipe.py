"""IC-MoE's training: its recipes, the step (CE + Dice + SgCL, PPAV load balancing), flips, and the
`TrainingSpec` the generic trainer reads (docs/icmoe.md, "Training")."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from icmoe.data.dataset import build_dataset
from icmoe.data.readers import DATASETS
from icmoe.data.synthetic import has_synthetic_dataset, make_synthetic_dataset
from icmoe.evaluation.binary import Choice, binary_evaluation
from icmoe.families.contracts import TrainingSpec
from icmoe.families.icmoe.losses import LossWeights, SgCL, total_loss
from icmoe.sam.build import freeze_unused_heads
from icmoe.training.recipe import Augment, Recipe

RECIPES: Dict[str, Recipe] = {
    # IC-MoE's paper: RMSprop, 1e-5 / 5e-6 / 1e-6 at 50% / 75% of 100 epochs, batch 8, seed 0.
    "paper": Recipe(),
    # A randomly initialised tiny model on the synthetic set: no pretrained SAM to
    # fine-tune, so a much higher rate (AdamW), flips, and a few epochs on a CPU.
    "demo": Recipe(optimizer="adamw", lr=1e-3, lr_factors=(0.5, 0.1), epochs=4, batch_size=8, hflip=True),
}


# Synthetic data written when `--dataset synthetic` finds an empty data root.
SYNTHETIC_DEFAULTS = {"n_train": 96, "n_val": 32}


def pick_recipe(name: str, dataset: str, config: str) -> str:
    """IC-MoE's `--recipe auto`: demo for the synthetic set with the tiny configuration, else paper."""
    if name != "auto":
        return name
    return "demo" if dataset == "synthetic" and config == "tiny" else "paper"


class TrainStep(nn.Module):
    """IC-MoE's step: model + SgCL heads as one module, so DDP all-reduces the heads' gradients too.

    forward(images (B, 3, S, S), target (B, 1, S, S) {0, 1}) -> dict of loss parts ("loss", "ce", "dice", "sgcl").
    """

    def __init__(self, *, model: nn.Module, sgcl: SgCL, weights: LossWeights, balance: bool) -> None:
        super().__init__()
        self.model = model
        self.sgcl = sgcl
        self.weights = weights
        self.balance = balance

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = self.model(images, target, balance=self.balance)  # TrainOutput, logits (B, 1, S, S)
        sg = None
        if self.weights.sgcl:
            # SgCL's foreground and background inputs go through the experts without gradient.
            with torch.no_grad():
                _, fg = self.model.experts(images * target)  # 3 x (B, C, h, w)
                _, bg = self.model.experts(images * (1 - target))
            sg = self.sgcl(out.features, fg, bg)
        return total_loss(out.logits, target, sg, self.weights)


def icmoe_train_step(model: nn.Module, recipe: Recipe) -> TrainStep:
    """IC-MoE's training step for `model` (in train mode): IoU heads frozen, SgCL heads added."""
    # Prompt-free single-mask decoding never uses the IoU heads: frozen, so every trainable
    # parameter gets a gradient (no unused-parameter search under DDP).
    freeze_unused_heads(model)
    step = TrainStep(model=model, sgcl=SgCL(channels=model.config.out_chans),
                     weights=LossWeights(ce=recipe.ce, dice=recipe.dice, sgcl=recipe.sgcl), balance=recipe.balance)
    if not recipe.sgcl:
        step.sgcl.requires_grad_(False)  # no SgCL term: its heads get no gradient
    return step


def _epoch_flips(seed: int, epoch: int, n: int) -> torch.Tensor:
    """(n,) bool: which images epoch `epoch` flips, drawn from a generator of (seed, epoch) only,
    so they are the same after a resume and whatever the number of DDP processes."""
    aug = torch.Generator().manual_seed(seed * 100003 + epoch * 7919)
    return torch.rand(n, generator=aug) < 0.5


def flip_augmentation(recipe: Recipe, epoch: int, n: int) -> Optional[Augment]:
    """IC-MoE's augmentation: horizontal flips of half the images (when `recipe.hflip`), in place."""
    if not recipe.hflip:
        return None
    flips = _epoch_flips(recipe.seed, epoch, n)

    def apply(images: torch.Tensor, masks: torch.Tensor, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        flip = flips[index].to(images.device)
        images[flip] = images[flip].flip(-1)  # (B, 3, S, S)
        masks[flip] = masks[flip].flip(-1)  # (B, 1, S, S)
        return images, masks

    return apply


class ICMoETraining(TrainingSpec):
    """2-D binary datasets (ISIC, BUSI, GlaS, synthetic), the step above, flips, pooled-DSC evaluation."""

    def recipes(self) -> Dict[str, Recipe]:
        return dict(RECIPES)

    def pick_recipe(self, dataset: str, config: str) -> str:
        return pick_recipe("auto", dataset, config)

    def datasets(self) -> Dict[str, Dict[str, Any]]:
        return {name: {} for name in DATASETS}  # binary masks: nothing in the configuration depends on them

    def make_synthetic(self, dataset: str, root: Any, *, image_size: int) -> bool:
        if dataset != "synthetic" or has_synthetic_dataset(root):
            return False
        make_synthetic_dataset(root, size=image_size, seed=0, **SYNTHETIC_DEFAULTS)
        return True

    def load_split(self, dataset: str, root: Any, split: str, *, image_size: int, skip_bad: bool = False,
                   progress: bool = True) -> Any:
        return build_dataset(dataset, root, split, image_size=image_size, skip_bad=skip_bad, progress=progress)

    def train_step(self, model: nn.Module, recipe: Recipe) -> nn.Module:
        return icmoe_train_step(model, recipe)

    def augmentation(self, recipe: Recipe, epoch: int, n: int) -> Optional[Augment]:
        return flip_augmentation(recipe, epoch, n)

    def evaluate(self, model: nn.Module, data: Any, *, batch_size: int = 8, device: Any = "cpu", rank: int = 0,
                 world: int = 1, progress: bool = True, full: bool = True, overlays: Any = None,
                 n_overlays: int = 8) -> Any:
        return binary_evaluation(model, data, segment=_segment, choice=CHOICE, batch_size=batch_size,
                                 device=torch.device(device), rank=rank, world=world, progress=progress,
                                 overlays=overlays, n_overlays=n_overlays)


# The chosen candidate of each image, counted in the evaluation report under "experts".
CHOICE = Choice("experts", ("basic", "semantic", "fused"), "chosen candidate")


def _segment(model: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    vote = model(images)  # inference: no target, PPAV balancing off
    return vote.mask, vote.expert
