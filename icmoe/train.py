"""Train IC-MoE: the paper's recipe, checkpoints, resume after a kill, DistributedDataParallel.

    python -m icmoe.train --dataset synthetic --data-root data/synthetic --config tiny --out runs/demo
    python -m icmoe.train --dataset busi --data-root data/BUSI --config vit_b \\
        --sam-checkpoint sam_vit_b_01ec64.pth --out runs/busi
    torchrun --nproc_per_node 2 -m icmoe.train ...        # DDP: gloo on CPUs, NCCL on GPUs

Per epoch: one pass over the training split (loss = a*CE + b*Dice + g*SgCL on
the fused logits, the foreground and background SgCL passes through the
experts without gradient, PPAV load balancing on), validation with the five
metrics pooled and per image, a line in `OUT/metrics.jsonl`, the checkpoint
`OUT/last/` and, when validation DSC (pooled) improves, `OUT/best/`.

Resume: after every epoch `OUT/last/trainer_state.pt` is replaced atomically.
It holds the trainable weights, the SgCL heads, the optimizer state, the epoch
(the learning-rate schedule is a function of the epoch), the best score and
the RNG states; the data order of epoch e depends only on (seed, e). So a run
killed at any moment and restarted with `--resume` loses at most the epoch in
progress and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from icmoe.checkpoint import CheckpointError, load, save_checkpoint
from icmoe.config import get_config
from icmoe.data.dataset import SegmentationDataset, build_dataset
from icmoe.data.readers import DATASETS, DataError
from icmoe.data.synthetic import has_synthetic_dataset, make_synthetic_dataset
from icmoe.io import atomic_path
from icmoe.losses import LossWeights, SgCL, total_loss
from icmoe.evaluate import evaluate_model
from icmoe.metrics import format_metrics
from icmoe.model import build_icmoe

STATE_NAME = "trainer_state.pt"
LOG_NAME = "metrics.jsonl"


@dataclass(frozen=True)
class Recipe:
    optimizer: str = "rmsprop"  # "rmsprop" (paper) or "adamw"
    lr: float = 1e-5  # initial learning rate
    lr_milestones: Tuple[float, ...] = (0.5, 0.75)  # fractions of the epochs where the rate drops
    lr_factors: Tuple[float, ...] = (0.5, 0.1)  # rate = lr * factor after each milestone (1e-5, 5e-6, 1e-6)
    weight_decay: float = 0.0  # decoupled (adamw) or L2 (rmsprop) weight decay
    epochs: int = 100  # passes over the training split
    batch_size: int = 8  # global batch (split over DDP ranks)
    ce: float = 1.0  # a: weight of binary cross-entropy
    dice: float = 1.0  # b: weight of soft Dice
    sgcl: float = 0.1  # g: weight of SgCL; 0 skips its two extra passes
    balance: bool = True  # PPAV load balancing in training
    hflip: bool = False  # random horizontal flips (the paper: resize and normalise only)
    seed: int = 0  # seeds model init, data order and augmentation

    def lr_at(self, epoch: int) -> float:
        """Learning rate of (0-based) `epoch`: the step schedule is a pure function of the epoch."""
        lr = self.lr
        for frac, factor in zip(self.lr_milestones, self.lr_factors):
            if epoch >= int(frac * self.epochs):  # epochs 1-50 / 51-75 / 76-100 of 100
                lr = self.lr * factor
        return lr


RECIPES: Dict[str, Recipe] = {
    # The paper: RMSprop, 1e-5 / 5e-6 / 1e-6 at 50% / 75% of 100 epochs, batch 8, seed 0.
    "paper": Recipe(),
    # A randomly initialised tiny model on the synthetic set: no pretrained SAM to
    # fine-tune, so a much higher rate (AdamW), flips, and a few epochs on a CPU.
    "demo": Recipe(optimizer="adamw", lr=1e-3, lr_factors=(0.5, 0.1), epochs=4, batch_size=8, hflip=True),
}

# Synthetic data written when `--dataset synthetic` finds an empty data root.
SYNTHETIC_DEFAULTS = {"n_train": 96, "n_val": 32}


def pick_recipe(name: str, dataset: str, config: str) -> str:
    if name != "auto":
        return name
    return "demo" if dataset == "synthetic" and config == "tiny" else "paper"


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


# ----------------------------------------------------------------------------- the training step


class TrainStep(nn.Module):
    """Model + SgCL heads as one module, so DDP all-reduces the heads' gradients too.

    forward(images, target) -> dict of loss parts ("loss", "ce", "dice", "sgcl").
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


def freeze_unused(model: nn.Module) -> List[str]:
    """Freeze the decoders' IoU heads: prompt-free single-mask decoding never uses their output,
    so they would get no gradient (and DDP would need find_unused_parameters)."""
    names = []
    for name, p in model.named_parameters():
        if ".iou_prediction_head." in f".{name}" and p.requires_grad:
            p.requires_grad_(False)
            names.append(name)
    return names


def make_optimizer(params: Sequence[nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; choose rmsprop or adamw")


def _trainable_state(step: TrainStep) -> Dict[str, torch.Tensor]:
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


# ----------------------------------------------------------------------------- the loop


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


def prepare_data(
    dataset: str, data_root: Path, image_size: int, *, skip_bad: bool, progress: bool, main: bool, log=print
) -> Tuple[SegmentationDataset, SegmentationDataset]:
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if dataset == "synthetic" and not has_synthetic_dataset(data_root):
        if main:
            log(f"no synthetic data in {data_root}: generating {SYNTHETIC_DEFAULTS} at {image_size}x{image_size}")
            make_synthetic_dataset(data_root, size=image_size, seed=0, **SYNTHETIC_DEFAULTS)
        if dist.is_initialized():
            dist.barrier()  # the other ranks read what rank 0 wrote
    train_ds = build_dataset(dataset, data_root, "train", image_size=image_size, skip_bad=skip_bad, progress=progress)
    val_ds = build_dataset(dataset, data_root, "val", image_size=image_size, skip_bad=skip_bad, progress=progress)
    skipped = len(train_ds.skipped) + len(val_ds.skipped)
    if skipped and main:
        log(f"warning: skipped {skipped} unreadable item(s) of {skipped + len(train_ds) + len(val_ds)} (--skip-bad)")
    return train_ds, val_ds


def train(
    *,
    dataset: str,
    data_root: os.PathLike,
    out: os.PathLike,
    config: str = "tiny",
    sam_checkpoint: Optional[os.PathLike] = None,
    recipe: str = "auto",
    epochs: Optional[int] = None,
    batch_size: Optional[int] = None,
    lr: Optional[float] = None,
    sgcl_weight: Optional[float] = None,
    balance: Optional[bool] = None,
    seed: Optional[int] = None,
    image_size: Optional[int] = None,
    resume: bool = False,
    skip_bad: bool = False,
    device: Optional[str] = None,
    progress: bool = True,
    log=print,
) -> Dict[str, Any]:
    """Train IC-MoE and write checkpoints under `out`.

    Arguments:
      dataset: isic, busi, glas or synthetic (generated in `data_root` if absent).
      data_root: dataset folder.
      out: run folder (best/, last/, metrics.jsonl).
      config: model configuration name (tiny, vit_b).
      sam_checkpoint: SAM ViT-B weights to start from (None: random init).
      recipe: "paper", "demo" or "auto" (demo for synthetic + tiny, else paper).
      epochs, batch_size, lr, sgcl_weight, balance, seed: override the recipe.
      image_size: override the configuration's input size (e.g. 512 for GlaS).
      resume: continue from `out/last/trainer_state.pt` if present.
      skip_bad: skip unreadable dataset files with a warning.
      device: "cpu", "cuda", ... (default: CUDA if available).
      progress: show progress bars.

    Returns:
      dict: the run summary (best epoch and metrics, last metrics, paths).
    """
    out = Path(out)
    data_root = Path(data_root)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dinfo = init_distributed(dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", dinfo.local_rank)
        torch.cuda.set_device(dev)
    rname = pick_recipe(recipe, dataset, config)
    if rname not in RECIPES:
        raise ValueError(f"unknown recipe {rname!r}; choose from auto, {', '.join(RECIPES)}")
    rec = RECIPES[rname]
    changes = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "sgcl": sgcl_weight, "balance": balance, "seed": seed}
    rec = replace(rec, **{k: v for k, v in changes.items() if v is not None})
    if rec.batch_size % dinfo.world:
        raise ValueError(f"batch size {rec.batch_size} is not divisible by the {dinfo.world} DDP processes")
    local_batch = rec.batch_size // dinfo.world
    overrides = {"image_size": image_size} if image_size else {}
    cfg = get_config(config, **overrides)
    show = progress and dinfo.main

    state_path = out / "last" / STATE_NAME
    state = None
    if resume and state_path.is_file():
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=False)
        except Exception as e:  # a damaged state file: say which, never guess
            raise CheckpointError(f"{state_path}: unreadable trainer state ({type(e).__name__}: {e})") from None
        if state.get("config") != cfg.to_dict() or state.get("dataset") != dataset:
            raise CheckpointError(f"{state_path}: the run was for another model or dataset; use another --out")
        rec = Recipe(**{**state["recipe"], "lr_milestones": tuple(state["recipe"]["lr_milestones"]),
                        "lr_factors": tuple(state["recipe"]["lr_factors"]), "epochs": rec.epochs})
    elif resume and dinfo.main:
        log(f"nothing to resume in {out} (no {STATE_NAME}); starting from epoch 1")
    elif not resume and state_path.is_file():
        raise CheckpointError(f"{out}: holds a run already; pass --resume to continue it or choose another --out")

    _seed_everything(rec.seed)
    train_ds, val_ds = prepare_data(dataset, data_root, cfg.image_size, skip_bad=skip_bad, progress=show,
                                    main=dinfo.main, log=log)

    if state is not None:
        model = load(out / "last")  # frozen weights; trainable ones come from the state below
        if model.config.to_dict() != cfg.to_dict():
            raise CheckpointError(f"{out / 'last'}: checkpoint does not match {cfg.name!r}")
    else:
        model = build_icmoe(cfg, sam_checkpoint=sam_checkpoint)
    model.train()
    freeze_unused(model)
    step_module = TrainStep(
        model=model,
        sgcl=SgCL(channels=cfg.out_chans),
        weights=LossWeights(ce=rec.ce, dice=rec.dice, sgcl=rec.sgcl),
        balance=rec.balance,
    ).to(dev)
    if not rec.sgcl:
        step_module.sgcl.requires_grad_(False)  # no SgCL term: its heads get no gradient
    params = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, rec)
    start_epoch, best = 0, -1.0
    if state is not None:
        own = dict(step_module.named_parameters())
        with torch.no_grad():
            for k, v in state["trainable"].items():
                own[k].copy_(v)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best = state["epoch"], state["best"]
        _set_rng_state(state["rng"])
        if dinfo.main:
            log(f"resuming {out} after epoch {start_epoch} (best pooled DSC {best:.4f})")

    net: nn.Module = step_module
    if dinfo.world > 1:
        # Every trainable parameter gets a gradient (IoU heads frozen above), so no unused-parameter search.
        net = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=False
        )
    sampler = DistributedSampler(train_ds, num_replicas=dinfo.world, rank=dinfo.rank, shuffle=True,
                                 seed=rec.seed, drop_last=True)
    loader = DataLoader(train_ds, batch_size=local_batch, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise DataError(f"{data_root}: {len(train_ds)} training images are fewer than one batch of {rec.batch_size}")

    log_path = out / LOG_NAME
    rows = _read_log(log_path, start_epoch) if dinfo.main else []
    if dinfo.main:
        out.mkdir(parents=True, exist_ok=True)
        _write_log(log_path, rows)  # drops lines of an epoch that a kill cut short
        log(f"training {cfg.name} on {dataset} ({len(train_ds)} train / {len(val_ds)} val at {cfg.image_size}px), "
            f"recipe {rname}: {rec.optimizer} lr {rec.lr:g}, {rec.epochs} epochs, batch {rec.batch_size}"
            + (f" ({dinfo.world} processes x {local_batch})" if dinfo.world > 1 else "") + f", device {dev}")
    last_metrics: Dict[str, Any] = {}
    for epoch in range(start_epoch, rec.epochs):
        t0 = time.time()
        lr_now = rec.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        sampler.set_epoch(epoch)
        # Flips are drawn per image from a generator of (seed, epoch): the same after a resume and
        # whatever the number of DDP processes.
        aug = torch.Generator().manual_seed(rec.seed * 100003 + epoch * 7919)
        flips = torch.rand(len(train_ds), generator=aug) < 0.5
        sums: Dict[str, float] = {}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{rec.epochs}", leave=False, disable=not show)
        for images, masks, index in bar:
            images, masks = images.to(dev), masks.to(dev)
            if rec.hflip:
                flip = flips[index].to(dev)
                images[flip] = images[flip].flip(-1)
                masks[flip] = masks[flip].flip(-1)
            parts = net(images, masks)
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            optimizer.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{float(parts['loss'].detach()):.3f}")
        bar.close()
        train_parts = {k: v / len(loader) for k, v in sums.items()}
        if dinfo.world > 1:  # the mean over all ranks' batches, not rank 0's alone
            keys = sorted(train_parts)
            t = torch.tensor([train_parts[k] for k in keys], dtype=torch.float64, device=dev)
            dist.all_reduce(t)
            train_parts = {k: float(v) / dinfo.world for k, v in zip(keys, t.tolist())}
        val = evaluate_model(model, val_ds, batch_size=max(local_batch, 1), device=dev, rank=dinfo.rank,
                             world=dinfo.world, progress=progress)
        done = epoch + 1
        last_metrics = val
        rank_hashes = None
        if dinfo.world > 1:
            # Evidence that DDP kept the replicas identical: every rank's trainable weights, hashed.
            rank_hashes = [None] * dinfo.world
            dist.all_gather_object(rank_hashes, weights_digest(step_module))
        if dinfo.main:
            score = val["pooled"]["dsc"]
            is_best = score > best
            best = max(best, score)
            meta = {"val": val, "train": train_parts, "recipe": rname}
            if is_best:
                save_checkpoint(model, out / "best", dataset=dataset, epoch=done, metrics=meta)
            save_checkpoint(model, out / "last", dataset=dataset, epoch=done, metrics=meta)
            trainer_state = {
                "epoch": done,
                "best": best,
                "recipe": asdict(rec),
                "recipe_name": rname,
                "config": cfg.to_dict(),
                "dataset": dataset,
                "trainable": _trainable_state(step_module),
                "optimizer": optimizer.state_dict(),
                "rng": _rng_state(),
            }
            with atomic_path(state_path) as tmp:
                torch.save(trainer_state, tmp)
            rows.append({"epoch": done, "lr": lr_now, "train": train_parts, "val": val,
                         "best": is_best, "seconds": round(time.time() - t0, 2)})
            if rank_hashes is not None:
                rows[-1]["rank_weights_sha256"] = rank_hashes
            _write_log(log_path, rows)
            log(f"epoch {done}/{rec.epochs}  loss {train_parts['loss']:.4f}  val DSC pooled "
                f"{val['pooled']['dsc']:.4f} per-image {val['per_image']['dsc']:.4f}  ({time.time() - t0:.0f}s)"
                + ("  *best*" if is_best else ""))
        if dinfo.world > 1:
            dist.barrier()  # ranks leave the epoch together; only rank 0 wrote
    summary = {"out": str(out), "epochs": rec.epochs, "recipe": rname, "best_dsc": best, "last": last_metrics}
    if dinfo.main and last_metrics:
        log(format_metrics(last_metrics))
    return summary


# ----------------------------------------------------------------------------- CLI


def _recipe_help() -> str:
    lines = ["recipes (--recipe; 'auto' = demo for --dataset synthetic with --config tiny, else paper):"]
    for name, r in RECIPES.items():
        lines.append(
            f"  {name:6s} {r.optimizer} lr {r.lr:g} (x{', x'.join(f'{f:g}' for f in r.lr_factors)} at "
            f"{', '.join(f'{int(m * 100)}%' for m in r.lr_milestones)} of the epochs), {r.epochs} epochs, "
            f"batch {r.batch_size}, CE {r.ce:g} + Dice {r.dice:g} + SgCL {r.sgcl:g}, balancing "
            f"{'on' if r.balance else 'off'}, flips {'on' if r.hflip else 'off'}, seed {r.seed}"
        )
    lines.append(
        "The demo recipe trains a randomly initialised model (no SAM weights), which needs a far higher "
        "learning rate than fine-tuning SAM; on the synthetic set it reaches DSC >= 0.85 in minutes on a CPU."
    )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m icmoe.train",
        description="Train IC-MoE. Distributed: torchrun --nproc_per_node N -m icmoe.train ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_recipe_help(),
    )
    p.add_argument("--dataset", choices=sorted(DATASETS), default="synthetic")
    p.add_argument("--data-root", type=Path, default=None, help="dataset folder (default data/<dataset>)")
    p.add_argument("--config", default="tiny", help="model configuration: tiny or vit_b (default tiny)")
    p.add_argument("--sam-checkpoint", type=Path, default=None, help="SAM ViT-B .pth to start from")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<dataset>-<config>)")
    p.add_argument("--recipe", default="auto", choices=["auto", *RECIPES])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch size")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate")
    p.add_argument("--sgcl-weight", type=float, default=None, help="SgCL weight g (0 turns SgCL off)")
    p.add_argument("--no-balance", action="store_true", help="turn PPAV load balancing off in training")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None, help="override the config's input size (512 for GlaS)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after an interruption")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images/masks with a warning")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    data_root = a.data_root or Path("data") / a.dataset
    out = a.out or Path("runs") / f"{a.dataset}-{a.config}"
    try:
        train(
            dataset=a.dataset, data_root=data_root, out=out, config=a.config, sam_checkpoint=a.sam_checkpoint,
            recipe=a.recipe, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, sgcl_weight=a.sgcl_weight,
            balance=False if a.no_balance else None, seed=a.seed, image_size=a.image_size, resume=a.resume,
            skip_bad=a.skip_bad, device=a.device, progress=not a.no_progress,
        )
    except (DataError, CheckpointError, ValueError, KeyError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
