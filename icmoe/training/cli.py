"""`python -m icmoe.train`: the trainer's command line (`icmoe.training.train` does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch.distributed as dist

from icmoe.core import cli
from icmoe.core.errors import FamilyError
from icmoe.families import add_model_args, family_names, get_family
from icmoe.training.options import TrainOptions
from icmoe.training.trainer import train


def _recipe_help() -> str:
    lines = [("recipes (--recipe; 'auto' = the family's pick: demo for its synthetic set with --config tiny, "
              "else paper):")]
    for fam_name in family_names():
        try:
            fam = get_family(fam_name)
            recipes = fam.training.recipes()
        except FamilyError:  # a family that does not train, or cannot be imported here
            continue
        lines.append(f" {fam_name} (datasets: {', '.join(fam.training.datasets())}):")
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
