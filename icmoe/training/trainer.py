"""The generic trainer: one run of any family, as a short driver (`train`) over named steps.

`setup`, `load_trainer_state`, `prepare_data`, `build_trainer`, `make_loader`, `open_log`, then
per epoch `train_epoch`, `validate`, `save_epoch`. What differs between families (recipes,
datasets, the step, augmentation, evaluation) comes from the family's `TrainingSpec`.
Checkpoints, resume after a kill and DDP are the trainer's: docs/training.md.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from icmoe.checkpoint import load, save_checkpoint
from icmoe.core.errors import CheckpointError, DataError, FamilyError, TrainError
from icmoe.core.io import atomic_path
from icmoe.core.manifest import LEGACY_FAMILY
from icmoe.evaluation.report import Evaluation
from icmoe.families import Family, get_family
from icmoe.training.distributed import Dist, init_distributed, mean_over_ranks
from icmoe.training.options import TrainOptions
from icmoe.training.recipe import OPTIMIZERS, Recipe, check_recipe
from icmoe.training.state import (
    STATE_NAME,
    load_state,
    rng_state,
    save_state,
    seed_everything,
    set_rng_state,
    trainable_state,
    weights_digest,
)

log = logging.getLogger("icmoe.train")  # not __name__: that is "__main__" under python -m


LOG_NAME = "metrics.jsonl"


def make_optimizer(params: Sequence[nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, betas=tuple(recipe.betas), weight_decay=recipe.weight_decay)
    raise TrainError(f"unknown optimizer {recipe.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")


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


def resolve_recipe(options: TrainOptions, family: Family) -> Tuple[str, Recipe]:
    """The recipe's name and the family's recipe with the options' overrides applied."""
    try:
        recipes = family.training.recipes()
    except FamilyError as e:  # the default TrainingSpec: the family declares no training
        raise FamilyError(f"{family.title} {e}") from None
    name = family.training.pick_recipe(options.dataset, options.config) if options.recipe == "auto" else options.recipe
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
    datasets = family.training.datasets()
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
      CheckpointError: as above, an unreadable state file, or one of the older pickled format.
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
    state = load_state(path)  # tensors and plain values only: never unpickles objects
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
    if run.dist.main and fam.training.make_synthetic(opts.dataset, root, image_size=size):
        log.info(f"no {opts.dataset} data in {root}: generated the synthetic set at {size}x{size}")
    if dist.is_initialized():
        dist.barrier()  # the other ranks read what rank 0 wrote
    train_ds, val_ds = (fam.training.load_split(opts.dataset, root, split, image_size=size, skip_bad=opts.skip_bad,
                                       progress=run.show) for split in ("train", "val"))
    skipped = len(getattr(train_ds, "skipped", ())) + len(getattr(val_ds, "skipped", ()))
    if skipped and run.dist.main:
        log.warning(f"skipped {skipped} unreadable item(s) of {opts.dataset} in {root} (--skip-bad)")
    return train_ds, val_ds


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
    step = run.family.training.train_step(model, recipe).to(run.device)
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
    set_rng_state(state["rng"])


def make_loader(run: Run, train_ds: Dataset) -> DataLoader:
    """Batches of `run.local_batch` items; the order of epoch e depends only on (seed, e), DDP-sharded."""
    sampler = DistributedSampler(train_ds, num_replicas=run.dist.world, rank=run.dist.rank, shuffle=True,
                                 seed=run.recipe.seed, drop_last=True)
    loader = DataLoader(train_ds, batch_size=run.local_batch, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise DataError(f"{run.options.data_root}: {len(train_ds)} training items are fewer than one batch "
                        f"of {run.recipe.batch_size}")
    return loader


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


def train_epoch(run: Run, trainer: Trainer, loader: DataLoader, epoch: int) -> Dict[str, float]:
    """One pass over the training split for (0-based) `epoch`, the rate set per iteration (`Recipe.lr_at`).

    Returns:
      dict: the mean of each loss part (the family's, with "loss") over the epoch's batches, and
        "lr", the rate of its last iteration.
    """
    rec, dev, optimizer = run.recipe, run.device, trainer.optimizer
    loader.sampler.set_epoch(epoch)
    augment = run.family.training.augmentation(rec, epoch, len(loader.dataset))
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
    return {**mean_over_ranks(run.dist.world, run.device, {k: v / per_epoch for k, v in sums.items()}), "lr": lr}


def validate(run: Run, trainer: Trainer, val_ds: Dataset) -> Evaluation:
    """The family's evaluation of the model on the validation split (DDP: sharded, each item counted once;
    only what the score needs, e.g. no HD95)."""
    return run.family.training.evaluate(trainer.model, val_ds, batch_size=max(run.local_batch, 1), device=run.device,
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
        "trainable": trainable_state(trainer.step),
        "optimizer": trainer.optimizer.state_dict(),
        "rng": rng_state(),
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
        save_state(run.state_path, _trainer_state(run, trainer, done))
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
    seed_everything(run.recipe.seed)
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
