"""What one training run is asked to do (`TrainOptions`) and where it writes by default."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from icmoe.families import DEFAULT_CONFIG, DEFAULT_FAMILY


def default_run_dir(model: str, dataset: str, config: str) -> Path:
    """The run folder used when none is given: `runs/<family>-<dataset>-<config>`."""
    return Path("runs") / f"{model}-{dataset}-{config}"


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
