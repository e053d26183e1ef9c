"""How a model trains: the `Recipe` every family's recipes are made of, and the batch augmentation type.

One dataclass for every family; each family's step and augmentation read the fields they use.
`Recipe.lr_at` is a pure function of the iteration, so a resumed run repeats the schedule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Tuple

import torch

from icmoe.core.errors import TrainError

OPTIMIZERS = ("rmsprop", "adamw")


SCHEDULES = ("step", "poly")


# A batch augmentation: (images (B, 3, S, S), target, dataset indices (B,)) -> (images, target).
Augment = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Recipe:
    """How a model trains: optimizer, learning-rate schedule, loss weights, augmentation, batch, seed.

    One dataclass for every family; each family's step and augmentation read the fields
    they use (IC-MoE: ce, dice, sgcl, balance, hflip; MoE-SAM: ce, dice, hflip, geometric,
    intensity). The defaults are IC-MoE's paper recipe.
    """

    optimizer: str = "rmsprop"  # "rmsprop" (IC-MoE's paper) or "adamw"
    lr: float = 1e-5  # base learning rate
    betas: Tuple[float, float] = (0.9, 0.999)  # adamw's betas
    weight_decay: float = 0.0  # decoupled (adamw) or L2 (rmsprop) weight decay
    schedule: str = "step"  # "step": x factor after milestones; "poly": lr * (1 - t / T) ** power
    lr_milestones: Tuple[float, ...] = (0.5, 0.75)  # step: fractions of the epochs where the rate drops
    lr_factors: Tuple[float, ...] = (0.5, 0.1)  # step: rate = lr * factor after each milestone
    warmup: int = 0  # iterations of linear warmup, lr * (it + 1) / warmup, before the schedule
    power: float = 0.9  # poly: the exponent
    epochs: int = 100  # passes over the training split
    batch_size: int = 8  # global batch (split over DDP ranks)
    val_every: int = 1  # validate every this many epochs (and after the last)
    ce: float = 1.0  # weight of cross-entropy
    dice: float = 1.0  # weight of soft Dice
    sgcl: float = 0.1  # IC-MoE: weight of SgCL; 0 skips its two extra passes
    balance: bool = True  # IC-MoE: PPAV load balancing in training
    hflip: bool = False  # random horizontal flips
    geometric: bool = False  # MoE-SAM: per sample one of rotate / crop-and-resize / elastic, or none
    intensity: bool = False  # MoE-SAM: random intensity shift
    seed: int = 0  # seeds model init, data order and augmentation

    def lr_at(self, it: int, per_epoch: int) -> float:
        """Learning rate of (0-based) iteration `it` with `per_epoch` iterations per epoch.

        A pure function of the iteration, so a resumed run repeats it. Linear warmup over
        `warmup` iterations, then "step" (by epoch: 1e-5 / 5e-6 / 1e-6 at 50% / 75% of 100
        epochs in IC-MoE's paper) or "poly" (lr * (1 - (it - warmup) / max_it) ** power,
        max_it = epochs * per_epoch, as MoE-SAM's code).
        """
        if it < self.warmup:
            return self.lr * (it + 1) / self.warmup
        if self.schedule == "poly":
            total = max(self.epochs * per_epoch, 1)
            return self.lr * max(0.0, 1.0 - (it - self.warmup) / total) ** self.power
        epoch = it // max(per_epoch, 1)
        lr = self.lr
        for frac, factor in zip(self.lr_milestones, self.lr_factors):
            if epoch >= int(frac * self.epochs):  # epochs 1-50 / 51-75 / 76-100 of 100
                lr = self.lr * factor
        return lr

    def describe(self) -> str:
        """One line: optimizer, schedule, epochs, batch, loss weights, augmentation, seed."""
        if self.schedule == "poly":
            sched = f"poly {self.power:g}"
        else:
            sched = (f"x{', x'.join(f'{f:g}' for f in self.lr_factors)} at "
                     f"{', '.join(f'{int(m * 100)}%' for m in self.lr_milestones)} of the epochs")
        warm = f", warmup {self.warmup} it" if self.warmup else ""
        aug = [n for n, on in (("flips", self.hflip), ("rotate/crop/elastic", self.geometric),
                               ("intensity", self.intensity)) if on]
        extra = f" + SgCL {self.sgcl:g}, balancing {'on' if self.balance else 'off'}" if self.sgcl or self.balance else ""
        return (f"{self.optimizer} lr {self.lr:g} wd {self.weight_decay:g} ({sched}{warm}), {self.epochs} epochs, "
                f"batch {self.batch_size}, CE {self.ce:g} + Dice {self.dice:g}{extra}, augmentation "
                f"{', '.join(aug) or 'none'}, validation every {self.val_every}, seed {self.seed}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Recipe":
        """The recipe `asdict` wrote (a trainer state); fields added since take their defaults."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(names[k].default, tuple) else v for k, v in d.items() if k in names})


def check_recipe(recipe: Recipe) -> None:
    """Raise TrainError for values no schedule or optimizer can use."""
    if recipe.batch_size < 1 or recipe.epochs < 0:
        raise TrainError(f"need a batch size >= 1 and epochs >= 0, got {recipe.batch_size} and {recipe.epochs}")
    if recipe.val_every < 1 or recipe.warmup < 0:
        raise TrainError(f"need val_every >= 1 and warmup >= 0, got {recipe.val_every} and {recipe.warmup}")
    if recipe.schedule not in SCHEDULES:
        raise TrainError(f"unknown schedule {recipe.schedule!r}; choose from {', '.join(SCHEDULES)}")
    if recipe.optimizer not in OPTIMIZERS:
        raise TrainError(f"unknown optimizer {recipe.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
