"""Checkpoints of every model family: safetensors weights plus a JSON description.

Details: docs/training.md.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from icmoe.core.errors import CheckpointError, FamilyError
from icmoe.core.io import PathLike, atomic_write_json, give_default_mode, read_versioned_json, sha256_file
from icmoe.core.manifest import LEGACY_FAMILY
from icmoe.families import check_expected, get_family

FORMAT = "icmoe-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_NAME = "config.json"


def save_checkpoint(
    model: torch.nn.Module,
    directory: PathLike,
    *,
    dataset: Optional[str] = None,
    epoch: Optional[int] = None,
    metrics: Optional[Dict[str, Any]] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Save `model` to `directory` atomically.

    Arguments:
      model: a model of a registered family; its `config` (whose class names the family) is
        stored with the weights.
      directory: checkpoint folder (created if needed).
      dataset, epoch, metrics, extra: recorded in config.json.

    Returns:
      Path: the checkpoint folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # The weights file is named by its content, so it is only known once written.
    fd, tmp_name = tempfile.mkstemp(prefix=".weights.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(state, tmp_name, metadata={"format": FORMAT, "config": cfg.name})
        give_default_mode(tmp_name)
        sha = sha256_file(tmp_name)
        weights_name = f"weights-{sha[:12]}.safetensors"
        os.replace(tmp_name, directory / weights_name)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "family": type(cfg).family,
        "model": cfg.to_dict(),
        "image_size": cfg.image_size,
        "normalization": cfg.normalization,
        "dataset": dataset,
        "epoch": epoch,
        "metrics": metrics or {},
        "weights": weights_name,
        "weights_sha256": sha,
        "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }
    if extra:
        meta["extra"] = extra
    atomic_write_json(directory / CONFIG_NAME, meta)
    for stale in directory.glob("weights-*.safetensors"):
        if stale.name != weights_name:
            stale.unlink(missing_ok=True)
    return directory


def _checkpoint_dir(path: PathLike) -> Path:
    path = Path(path)
    return path.parent if path.is_file() else path


def read_meta(path: PathLike) -> Dict[str, Any]:
    """Read and validate a checkpoint's config.json (no weights are loaded)."""
    directory = _checkpoint_dir(path)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint folder (no {CONFIG_NAME})")
    meta = read_versioned_json(
        cfg_path, fmt=FORMAT, version=READABLE_VERSIONS, kind="icmoe checkpoint description", label="checkpoint",
        error=CheckpointError,
    )
    meta.setdefault("family", LEGACY_FAMILY)
    try:
        meta["config"] = get_family(meta["family"]).config_from_dict(meta["model"])
    except FamilyError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: bad model config ({e})") from None
    return meta


def load(
    path: PathLike,
    *,
    expect: Optional[Any] = None,
    map_location: Union[str, torch.device] = "cpu",
    variant: Optional[str] = None,
    verify_hash: bool = True,
):
    """Load a ready model (eval mode) of any registered family from a checkpoint folder.

    Arguments:
      path: the checkpoint folder (or a file inside it).
      expect: what the checkpoint must hold, if anything: a config name ("tiny"), "family/config"
        ("icmoe/tiny"), or a config object (then every field must match).
      map_location: device for the weights.
      variant: another eager structure of the same weights (IC-MoE: "naive", three full experts).
      verify_hash: check the weights' sha256 against config.json.

    Returns:
      nn.Module: the family's model.

    Raises:
      CheckpointError: missing or damaged files, a mismatching model.
    """
    directory = _checkpoint_dir(path)
    meta = read_meta(directory)
    cfg = meta["config"]
    family = get_family(meta["family"])
    why = check_expected(family.name, cfg.to_dict(), expect)
    if why:
        raise CheckpointError(f"{directory}: checkpoint is for {why}")
    weights = directory / str(meta.get("weights", ""))
    if not weights.is_file():
        raise CheckpointError(f"{directory}: weights file {meta.get('weights')!r} is missing")
    if verify_hash and sha256_file(weights) != meta.get("weights_sha256"):
        raise CheckpointError(f"{weights}: damaged or truncated (sha256 differs from config.json)")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({e})") from None
    model = family.build(cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        which = f"{len(missing)} missing, e.g. {missing[0]}" if missing else f"{len(unexpected)} unexpected, e.g. {unexpected[0]}"
        raise CheckpointError(f"{weights}: weights do not match model {cfg.name!r} ({which})")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{weights}: {k} has shape {tuple(state[k].shape)}, model {cfg.name!r} needs {tuple(v.shape)}"
            )
    model.load_state_dict(state)
    model = model.to(map_location).eval()
    try:
        return family.variant(model, variant)
    except FamilyError as e:
        raise CheckpointError(f"{directory}: {e}") from None
