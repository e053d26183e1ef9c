"""Train a model of any family: recipes, checkpoints, resume after a kill, DistributedDataParallel.

    python -m icmoe.train --dataset synthetic --data-root data/synthetic --config tiny --out runs/demo
    python -m icmoe.train --dataset busi --data-root data/BUSI --config vit_b \\
        --sam-checkpoint sam_vit_b_01ec64.pth --out runs/busi
    python -m icmoe.train --model moesam --dataset synthetic3d --config tiny     # 3-D volumes, slice by slice
    torchrun --nproc_per_node 2 -m icmoe.train ...        # DDP: gloo on CPUs, NCCL on GPUs

    from icmoe.train import TrainOptions, train
    summary = train(TrainOptions(dataset="synthetic", config="tiny", epochs=2))

The trainer is generic; what differs between model families comes from the family's
training hooks (`icmoe.families.base.Family`, "training and evaluation"): its recipes
and which one `--recipe auto` picks, the datasets it trains on and the configuration
fields they decide (e.g. MoE-SAM's classes), the synthetic set written on first use,
the training step (a module whose forward(images, target) returns the loss parts),
the per-epoch augmentation, and the evaluation (a report and the one score the
trainer keeps the best of). IC-MoE's pieces (recipes, the step with SgCL, flips) are
in this module too; MoE-SAM's in `icmoe.moesam.training`.

Per epoch: one pass over the training split with the learning rate set per iteration
(`Recipe.lr_at`: IC-MoE's step schedule or MoE-SAM's warmup + poly), validation every
`val_every` epochs and after the last, a line in `OUT/metrics.jsonl`, the checkpoint
`OUT/last/` and, when the validation score improves, `OUT/best/`. The default run folder
is `runs/<family>-<dataset>-<config>`.

Resume: after every epoch `OUT/last/trainer_state.pt` is replaced atomically. It holds
the trainable weights (with any training-only heads of the step), the optimizer state,
the epoch (the rate is a function of the iteration, epoch x batches per epoch), the best
score, the RNG states and what the run is (family, configuration, dataset); the data
order and augmentation of epoch e depend only on (seed, e). So a run killed at any
moment and restarted with `--resume` loses at most the epoch in progress and ends with
the same weights as an uninterrupted run.

`train` is a short driver over the steps below (`setup`, `load_trainer_state`,
`prepare_data`, `build_trainer`, `make_loader`, `open_log`, then per epoch
`train_epoch`, `validate`, `save_epoch`); progress lines go to the `icmoe.train`
logger.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from icmoe.checkpoint import CheckpointError, load, save_checkpoint
from icmoe.core import cli
from icmoe.core.errors import IcmoeError
from icmoe.core.io import atomic_path
from icmoe.core.manifest import LEGACY_FAMILY
from icmoe.data.readers import DataError
from icmoe.evaluate import Evaluation
from icmoe.families import (
    DEFAULT_CONFIG,
    DEFAULT_FAMILY,
    Family,
    FamilyError,
    add_model_args,
    family_names,
    get_family,
)
from icmoe.losses import LossWeights, SgCL, total_loss
from icmoe.model import freeze_unused_heads

log = logging.getLogger("icmoe.train")  # not __name__: that is "__main__" under python -m

STATE_NAME = "trainer_state.pt"
LOG_NAME = "metrics.jsonl"
OPTIMIZERS = ("rmsprop", "adamw")
SCHEDULES = ("step", "poly")

# A batch augmentation: (images (B, 3, S, S), target, dataset indices (B,)) -> (images, target).
Augment = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


class TrainError(IcmoeError, ValueError):
    """Training options that cannot be used together (recipe, batch size, input size); one line."""


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


def default_run_dir(model: str, dataset: str, config: str) -> Path:
    """The run folder used when none is given: `runs/<family>-<dataset>-<config>`."""
    return Path("runs") / f"{model}-{dataset}-{config}"


# ----------------------------------------------------------------------------- IC-MoE's recipes, step and flips

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


# ----------------------------------------------------------------------------- options


@dataclass
class TrainOptions:
    """What one training run is asked to do; `train(**fields)` builds one.

    Attributes:
      dataset: a dataset the family trains on (IC-MoE: isic, busi, glas, synthetic; MoE-SAM:
        acdc, btcv, mmwhs, synapse, synthetic3d); synthetic sets are generated in `data_root` if absent.
      data_root: dataset folder (None: data/<dataset>).
      out: run folder with best/, last/, metrics.jsonl (None: `default_run_dir`).
      model: model family, a name of the `icmoe.families` registry.
      config: size variant of the family (tiny, vit_b).
      sam_checkpoint: SAM ViT-B weights to start from (None: random init).
      recipe: a recipe of the family, or "auto" (the family's pick for dataset and config).
      epochs, batch_size, lr, sgcl_weight, balance, seed, val_every: override the recipe (None: keep its value).
      image_size: override the configuration's input size (e.g. 512 for GlaS).
      resume: continue from `out/last/trainer_state.pt` if present.
      skip_bad: skip unreadable dataset files with a warning.
      device: "cpu", "cuda", ... (None: CUDA if available).
      progress: show progress bars.
    """

    dataset: str
    data_root: Optional[os.PathLike] = None
    out: Optional[os.PathLike] = None
    model: str = DEFAULT_FAMILY
    config: str = DEFAULT_CONFIG
    sam_checkpoint: Optional[os.PathLike] = None
    recipe: str = "auto"
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    sgcl_weight: Optional[float] = None
    balance: Optional[bool] = None
    seed: Optional[int] = None
    val_every: Optional[int] = None
    image_size: Optional[int] = None
    resume: bool = False
    skip_bad: bool = False
    device: Optional[str] = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.data_root = Path(self.data_root) if self.data_root is not None else Path("data") / self.dataset
        self.out = Path(self.out) if self.out is not None else default_run_dir(self.model, self.dataset, self.config)
        if self.sam_checkpoint is not None:
            self.sam_checkpoint = Path(self.sam_checkpoint)


# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


# ----------------------------------------------------------------------------- optimizer, weights, RNG


def make_optimizer(params: Sequence[nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, betas=tuple(recipe.betas), weight_decay=recipe.weight_decay)
    raise TrainError(f"unknown optimizer {recipe.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")


def _trainable_state(step: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in step.named_parameters() if v.requires_grad}


def weights_digest(module: nn.Module) -> str:
    """sha256 of the trainable parameters' bytes, in a fixed order (compares DDP replicas)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- run setup


@dataclass
class Run:
    """What a run's options resolved to; shared by the steps of `train`.

    Attributes:
      options: the options as given (paths filled in).
      family, config: the model family and its configuration object (with the dataset's fields).
      recipe_name, recipe: the recipe (with overrides; on resume, the saved one).
      device, dist: where this process trains and its place in the DDP group.
      state: the trainer state being resumed from, or None.
    """

    options: TrainOptions
    family: Family
    config: Any
    recipe_name: str
    recipe: Recipe
    device: torch.device
    dist: Dist
    state: Optional[Dict[str, Any]] = None

    @property
    def out(self) -> Path:
        return Path(self.options.out)

    @property
    def state_path(self) -> Path:
        return self.out / "last" / STATE_NAME

    @property
    def log_path(self) -> Path:
        return self.out / LOG_NAME

    @property
    def local_batch(self) -> int:
        return self.recipe.batch_size // self.dist.world

    @property
    def show(self) -> bool:
        return self.options.progress and self.dist.main


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


def resolve_recipe(options: TrainOptions, family: Family) -> Tuple[str, Recipe]:
    """The recipe's name and the family's recipe with the options' overrides applied."""
    recipes = family.recipes()
    name = family.pick_recipe(options.dataset, options.config) if options.recipe == "auto" else options.recipe
    if name not in recipes:
        raise TrainError(f"unknown {family.name} recipe {name!r}; choose from auto, {', '.join(recipes)}")
    changes = {"epochs": options.epochs, "batch_size": options.batch_size, "lr": options.lr,
               "sgcl": options.sgcl_weight, "balance": options.balance, "seed": options.seed,
               "val_every": options.val_every}
    recipe = replace(recipes[name], **{k: v for k, v in changes.items() if v is not None})
    check_recipe(recipe)
    return name, recipe


def resolve_config(options: TrainOptions, family: Family) -> Any:
    """The family's configuration with the image-size override and the fields the dataset decides.

    Raises:
      DataError: a dataset the family does not train on.
      TrainError: values the configuration rejects.
    """
    datasets = family.datasets()
    if options.dataset not in datasets:
        raise DataError(f"unknown dataset {options.dataset!r} for {family.name}; choose from {', '.join(datasets)}")
    overrides = {"image_size": options.image_size} if options.image_size else {}
    overrides.update(datasets[options.dataset])
    try:
        return family.get_config(options.config, **overrides)
    except ValueError as e:  # the configuration's own checks (e.g. a size the patches do not tile)
        raise TrainError(f"{family.name}/{options.config}: {e}") from None


def setup(options: TrainOptions) -> Run:
    """Pick the device, join the DDP group (under torchrun), look up the family, configuration and recipe.

    Raises:
      FamilyError: unknown family or configuration, or a family without training hooks.
      DataError: a dataset the family does not train on.
      TrainError: an unknown recipe, a bad batch size, an input size the configuration rejects.
    """
    dev = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dinfo = init_distributed(dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", dinfo.local_rank)
        torch.cuda.set_device(dev)
    family = get_family(options.model)
    name, recipe = resolve_recipe(options, family)  # first: a family that cannot train says so
    config = resolve_config(options, family)
    return Run(options=options, family=family, config=config, recipe_name=name, recipe=recipe, device=dev, dist=dinfo)


def load_trainer_state(run: Run) -> None:
    """Read the trainer state to resume from (sets `run.state`, and `run.recipe` to the saved recipe).

    Without `resume` a run folder that already holds a run is refused (no silent
    overwrite); with it, a state of another family, configuration or dataset is.
    The saved recipe wins over the options, except for the number of epochs.

    Raises:
      CheckpointError: as above, or an unreadable state file.
    """
    path, out = run.state_path, run.out
    if not run.options.resume:
        if path.is_file():
            raise CheckpointError(f"{out}: holds a run already; pass --resume to continue it or choose another --out")
        return
    if not path.is_file():
        if run.dist.main:
            log.info(f"nothing to resume in {out} (no {STATE_NAME}); starting from epoch 1")
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a damaged state file: say which, never guess
        raise CheckpointError(f"{path}: unreadable trainer state ({type(e).__name__}: {e})") from None
    if (state.get("family", LEGACY_FAMILY) != run.family.name or state.get("config") != run.config.to_dict()
            or state.get("dataset") != run.options.dataset):
        raise CheckpointError(f"{path}: the run was for another model or dataset; use another --out")
    try:
        run.recipe = replace(Recipe.from_dict(state["recipe"]), epochs=run.recipe.epochs)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: bad recipe in the trainer state ({e})") from None
    run.state = state


def _check_batch(run: Run) -> None:
    if run.recipe.batch_size % run.dist.world:
        raise TrainError(f"batch size {run.recipe.batch_size} is not divisible by the {run.dist.world} DDP processes")


def prepare_data(run: Run) -> Tuple[Dataset, Dataset]:
    """The training and validation splits, read into memory by the family (a synthetic set is written first
    when its data root holds none; by DDP rank 0, the other ranks wait).

    Returns:
      (train, val): datasets of (image float32 (3, S, S) RGB 0..255, target, index).
    """
    opts, fam, size = run.options, run.family, run.config.image_size
    root = Path(opts.data_root)
    if run.dist.main and fam.make_synthetic(opts.dataset, root, image_size=size):
        log.info(f"no {opts.dataset} data in {root}: generated the synthetic set at {size}x{size}")
    if dist.is_initialized():
        dist.barrier()  # the other ranks read what rank 0 wrote
    train_ds, val_ds = (fam.load_split(opts.dataset, root, split, image_size=size, skip_bad=opts.skip_bad,
                                       progress=run.show) for split in ("train", "val"))
    skipped = len(getattr(train_ds, "skipped", ())) + len(getattr(val_ds, "skipped", ()))
    if skipped and run.dist.main:
        log.warning(f"skipped {skipped} unreadable item(s) of {opts.dataset} in {root} (--skip-bad)")
    return train_ds, val_ds


# ----------------------------------------------------------------------------- model and optimizer


@dataclass
class Trainer:
    """The modules and optimizer of a run, and where the run stands.

    Attributes:
      model: the family's model (what the checkpoints hold).
      step: the family's training step around the model (what the optimizer and the trainer state cover).
      net: `step`, or `step` wrapped in DistributedDataParallel (what the loop calls).
      optimizer: over the trainable parameters of `step`.
      start_epoch: epochs already done (0, or the resumed state's).
      best: best validation score so far (-1 before the first validation).
    """

    model: nn.Module
    step: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    start_epoch: int = 0
    best: float = -1.0


def build_trainer(run: Run) -> Trainer:
    """The model (new from its family, or the checkpoint being resumed), the family's training step and
    the optimizer.

    On resume the trainable weights (training-only heads included), the optimizer state
    and the RNG states come from `run.state`. Under DDP the step is wrapped last.
    """
    cfg, recipe = run.config, run.recipe
    if run.state is not None:
        model = load(run.out / "last", expect=cfg)  # frozen weights; trainable ones come from the state below
    else:
        model = run.family.build(cfg, sam_checkpoint=run.options.sam_checkpoint)
    model.train()
    step = run.family.train_step(model, recipe).to(run.device)
    optimizer = make_optimizer([p for p in step.parameters() if p.requires_grad], recipe)
    trainer = Trainer(model=model, step=step, net=step, optimizer=optimizer)
    if run.state is not None:
        _restore(trainer, run.state)
        if run.dist.main:
            log.info(f"resuming {run.out} after epoch {trainer.start_epoch} (best score {trainer.best:.4f})")
    if run.dist.world > 1:
        # A step whose model may leave parameters without gradient (e.g. routing) says so.
        dev = run.device
        trainer.net = nn.parallel.DistributedDataParallel(
            step, device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=bool(getattr(step, "find_unused_parameters", False)),
        )
    return trainer


def _restore(trainer: Trainer, state: Dict[str, Any]) -> None:
    own = dict(trainer.step.named_parameters())
    with torch.no_grad():
        for k, v in state["trainable"].items():
            own[k].copy_(v)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.start_epoch, trainer.best = state["epoch"], state["best"]
    _set_rng_state(state["rng"])


def make_loader(run: Run, train_ds: Dataset) -> DataLoader:
    """Batches of `run.local_batch` items; the order of epoch e depends only on (seed, e), DDP-sharded."""
    sampler = DistributedSampler(train_ds, num_replicas=run.dist.world, rank=run.dist.rank, shuffle=True,
                                 seed=run.recipe.seed, drop_last=True)
    loader = DataLoader(train_ds, batch_size=run.local_batch, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise DataError(f"{run.options.data_root}: {len(train_ds)} training items are fewer than one batch "
                        f"of {run.recipe.batch_size}")
    return loader


# ----------------------------------------------------------------------------- the log


def _read_log(path: Path, upto_epoch: int) -> List[Dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if row.get("epoch", 0) <= upto_epoch:
            rows.append(row)
    return rows


def _write_log(path: Path, rows: List[Dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def open_log(run: Run, start_epoch: int) -> List[Dict[str, Any]]:
    """The metrics.jsonl rows of the epochs done, rewritten without lines of a cut-short epoch (rank 0; others: [])."""
    if not run.dist.main:
        return []
    rows = _read_log(run.log_path, start_epoch)
    run.out.mkdir(parents=True, exist_ok=True)
    _write_log(run.log_path, rows)
    return rows


def _describe(run: Run, train_ds: Dataset, val_ds: Dataset) -> str:
    rec, cfg, world = run.recipe, run.config, run.dist.world
    unit = "slices" if hasattr(train_ds, "volumes") else "images"
    return (f"training {run.family.name}/{cfg.name} on {run.options.dataset} ({len(train_ds)} train / "
            f"{len(val_ds)} val {unit} at {cfg.image_size}px), recipe {run.recipe_name}: {rec.describe()}"
            + (f" ({world} processes x {run.local_batch})" if world > 1 else "") + f", device {run.device}")


# ----------------------------------------------------------------------------- one epoch


def _mean_over_ranks(run: Run, parts: Dict[str, float]) -> Dict[str, float]:
    """The mean of each loss part over all ranks' batches, not rank 0's alone."""
    if run.dist.world <= 1:
        return parts
    keys = sorted(parts)
    t = torch.tensor([parts[k] for k in keys], dtype=torch.float64, device=run.device)
    dist.all_reduce(t)
    return {k: float(v) / run.dist.world for k, v in zip(keys, t.tolist())}


def train_epoch(run: Run, trainer: Trainer, loader: DataLoader, epoch: int) -> Dict[str, float]:
    """One pass over the training split for (0-based) `epoch`, the rate set per iteration (`Recipe.lr_at`).

    Returns:
      dict: the mean of each loss part (the family's, with "loss") over the epoch's batches, and
        "lr", the rate of its last iteration.
    """
    rec, dev, optimizer = run.recipe, run.device, trainer.optimizer
    loader.sampler.set_epoch(epoch)
    augment = run.family.augmentation(rec, epoch, len(loader.dataset))
    per_epoch, sums, lr = len(loader), {}, rec.lr
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{rec.epochs}", leave=False, disable=not run.show)
    for b, (images, target, index) in enumerate(bar):  # (B, 3, S, S) RGB 0..255, the family's target, (B,)
        lr = rec.lr_at(epoch * per_epoch + b, per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, target = images.to(dev), target.to(dev)
        if augment is not None:
            images, target = augment(images, target, index)
        parts = trainer.net(images, target)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        bar.set_postfix(loss=f"{float(parts['loss'].detach()):.3f}")
    bar.close()
    return {**_mean_over_ranks(run, {k: v / per_epoch for k, v in sums.items()}), "lr": lr}


def validate(run: Run, trainer: Trainer, val_ds: Dataset) -> Evaluation:
    """The family's evaluation of the model on the validation split (DDP: sharded, each item counted once;
    only what the score needs, e.g. no HD95)."""
    return run.family.evaluate(trainer.model, val_ds, batch_size=max(run.local_batch, 1), device=run.device,
                               rank=run.dist.rank, world=run.dist.world, progress=run.options.progress, full=False)


def _trainer_state(run: Run, trainer: Trainer, done: int) -> Dict[str, Any]:
    return {
        "epoch": done,
        "best": trainer.best,
        "recipe": asdict(run.recipe),
        "recipe_name": run.recipe_name,
        "family": run.family.name,
        "config": run.config.to_dict(),
        "dataset": run.options.dataset,
        "trainable": _trainable_state(trainer.step),
        "optimizer": trainer.optimizer.state_dict(),
        "rng": _rng_state(),
    }


def _log_row(run: Run, done: int, parts: Dict[str, float], val: Optional[Evaluation], is_best: bool,
             started: float) -> Dict[str, Any]:
    parts = dict(parts)
    row = {"epoch": done, "lr": parts.pop("lr"), "train": parts, "val": val.report if val else None,
           "best": is_best, "seconds": round(time.time() - started, 2)}
    if val is not None:
        row["score"] = val.score
    return row


def save_epoch(run: Run, trainer: Trainer, rows: List[Dict[str, Any]], *, epoch: int,
               train_parts: Dict[str, float], val: Optional[Evaluation], started: float) -> bool:
    """Record (0-based) `epoch`: checkpoints, trainer state, a metrics.jsonl line; rank 0 writes, all ranks call.

    Writes `out/best/` when the validation score improved (`val` None: the epoch was
    not validated), `out/last/`, then replaces `out/last/trainer_state.pt` (what
    --resume reads), then rewrites metrics.jsonl with the epoch's line appended to
    `rows`. Under DDP the line also holds every rank's trainable-weights digest
    (evidence that the replicas stayed identical), and the ranks leave together.

    Returns:
      bool: the epoch was the best so far (rank 0; False elsewhere).
    """
    hashes = None
    if run.dist.world > 1:
        hashes = [None] * run.dist.world
        dist.all_gather_object(hashes, weights_digest(trainer.step))
    is_best = False
    if run.dist.main:
        done = epoch + 1
        is_best = val is not None and val.score > trainer.best
        if val is not None:
            trainer.best = max(trainer.best, val.score)
        meta = {"val": val.report if val else None, "train": train_parts, "recipe": run.recipe_name}
        if is_best:
            save_checkpoint(trainer.model, run.out / "best", dataset=run.options.dataset, epoch=done, metrics=meta)
        save_checkpoint(trainer.model, run.out / "last", dataset=run.options.dataset, epoch=done, metrics=meta)
        with atomic_path(run.state_path) as tmp:
            torch.save(_trainer_state(run, trainer, done), tmp)
        rows.append(_log_row(run, done, train_parts, val, is_best, started))
        if hashes is not None:
            rows[-1]["rank_weights_sha256"] = hashes
        _write_log(run.log_path, rows)
        log.info(f"epoch {done}/{run.recipe.epochs}  loss {train_parts['loss']:.4f}  "
                 + (f"val {val.headline}" if val else "(not validated)")
                 + f"  ({time.time() - started:.0f}s)" + ("  *best*" if is_best else ""))
    if run.dist.world > 1:
        dist.barrier()  # ranks leave the epoch together; only rank 0 wrote
    return is_best


# ----------------------------------------------------------------------------- the driver


def train(options: Optional[TrainOptions] = None, /, **kwargs: Any) -> Dict[str, Any]:
    """Train a model and write checkpoints under the run folder.

    Arguments:
      options: a TrainOptions; or leave it out and give its fields as keyword
        arguments, e.g. `train(dataset="synthetic", config="tiny", epochs=2)`.

    Returns:
      dict: the run summary: out, model (family), dataset, epochs, recipe, best_score (best validation
        score, rank 0; best_dsc: the same, both families' scores being Dice), last (the last
        validation report).
    """
    if options is None:
        options = TrainOptions(**kwargs)
    elif kwargs:
        raise TypeError("train() takes a TrainOptions or its fields as keyword arguments, not both")
    run = setup(options)
    load_trainer_state(run)
    _check_batch(run)
    # Seeded before the data and the model: the model's initialisation is the first use of the RNG.
    _seed_everything(run.recipe.seed)
    train_ds, val_ds = prepare_data(run)
    trainer = build_trainer(run)
    loader = make_loader(run, train_ds)
    rows = open_log(run, trainer.start_epoch)
    if run.dist.main:
        log.info(_describe(run, train_ds, val_ds))
    last: Optional[Evaluation] = None
    for epoch in range(trainer.start_epoch, run.recipe.epochs):
        started = time.time()
        parts = train_epoch(run, trainer, loader, epoch)
        due = (epoch + 1) % run.recipe.val_every == 0 or epoch + 1 == run.recipe.epochs
        val = validate(run, trainer, val_ds) if due else None
        last = val or last
        save_epoch(run, trainer, rows, epoch=epoch, train_parts=parts, val=val, started=started)
    if run.dist.main and last is not None:
        log.info(last.table)
    return {"out": str(run.out), "model": run.family.name, "dataset": options.dataset, "epochs": run.recipe.epochs,
            "recipe": run.recipe_name, "best_score": trainer.best, "best_dsc": trainer.best,
            "last": last.report if last else {}}


# ----------------------------------------------------------------------------- CLI


def _recipe_help() -> str:
    lines = [("recipes (--recipe; 'auto' = the family's pick: demo for its synthetic set with --config tiny, "
              "else paper):")]
    for fam_name in family_names():
        try:
            fam = get_family(fam_name)
            recipes = fam.recipes()
        except FamilyError:  # a family that does not train, or cannot be imported here
            continue
        lines.append(f" {fam_name} (datasets: {', '.join(fam.datasets())}):")
        lines.extend(f"  {name:6s} {r.describe()}" for name, r in recipes.items())
    lines.append(
        "The demo recipes train a randomly initialised tiny model (no SAM weights), which needs a far higher "
        "learning rate than fine-tuning SAM; on the synthetic sets they learn in minutes on a CPU."
    )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m icmoe.train",
                   "Train a model. Distributed: torchrun --nproc_per_node N -m icmoe.train ...",
                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_recipe_help())
    p.add_argument("--dataset", default="synthetic", help="a dataset the --model family trains on (listed below)")
    p.add_argument("--data-root", type=Path, default=None, help="dataset folder (default data/<dataset>)")
    add_model_args(p)
    p.add_argument("--sam-checkpoint", type=Path, default=None, help="SAM ViT-B .pth to start from")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<model>-<dataset>-<config>)")
    p.add_argument("--recipe", default="auto", help="a recipe of the family (listed below) or auto")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch size")
    p.add_argument("--lr", type=float, default=None, help="base learning rate")
    p.add_argument("--sgcl-weight", type=float, default=None, help="IC-MoE: SgCL weight g (0 turns SgCL off)")
    p.add_argument("--no-balance", action="store_true", help="IC-MoE: turn PPAV load balancing off in training")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--val-every", type=int, default=None, help="validate every N epochs (and after the last)")
    p.add_argument("--image-size", type=int, default=None, help="override the config's input size (512 for GlaS)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after an interruption")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images/masks with a warning")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    cli.add_json(p, "the run summary")
    cli.add_progress(p)
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    a = _parser().parse_args(argv)
    cli.setup_logging(a.verbosity)
    options = TrainOptions(
        dataset=a.dataset, data_root=a.data_root, out=a.out, model=a.model, config=a.config,
        sam_checkpoint=a.sam_checkpoint, recipe=a.recipe, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
        sgcl_weight=a.sgcl_weight, balance=False if a.no_balance else None, seed=a.seed, val_every=a.val_every,
        image_size=a.image_size, resume=a.resume, skip_bad=a.skip_bad, device=a.device, progress=not a.no_progress,
    )
    try:
        summary = train(options)
        if not dist.is_initialized() or dist.get_rank() == 0:
            cli.write_json(summary, a.json)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return cli.EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
