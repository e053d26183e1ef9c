"""What a run saves to be resumed: the trainer state (trainable weights, optimizer, epoch, best score,
RNG states, what the run is) and the replicas' weight digest.

The state file holds tensors and plain values only (numbers, strings, lists, dicts; the RNG states as
tensors), so it is read with `torch.load(..., weights_only=True)`: reading a run folder from
someone else never runs code. docs/training.md ("Resume").
"""

from __future__ import annotations

import hashlib
import pickle
import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from torch import nn

from icmoe.core.errors import CheckpointError
from icmoe.core.io import atomic_path

STATE_NAME = "trainer_state.pt"
STATE_FORMAT = "icmoe-trainer-state/2"  # 2: tensors and plain values only (1: pickled Python and NumPy objects)


def trainable_state(step: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in step.named_parameters() if v.requires_grad}


def weights_digest(module: nn.Module) -> str:
    """sha256 of the trainable parameters' bytes, in a fixed order (compares DDP replicas)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def rng_state() -> Dict[str, Any]:
    """The Python, NumPy, torch (and CUDA) generators' states as tensors and plain numbers."""
    version, words, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(w) for w in py["state"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, state: Dict[str, Any]) -> None:
    """Write a trainer state (tensors and plain values) atomically, marked with `STATE_FORMAT`."""
    with atomic_path(path) as tmp:
        torch.save({"format": STATE_FORMAT, **state}, tmp)


def load_state(path: Path) -> Dict[str, Any]:
    """Read a trainer state without unpickling arbitrary objects (`weights_only=True`).

    Raises:
      CheckpointError: one line: a state of the older pickled format (refused: unpickling a file can
        run code; the line says how to go on), or a damaged file.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # objects other than tensors and plain values: the pickled format
        state = None
    except Exception as e:  # a damaged state file: say which, never guess
        raise CheckpointError(f"{path}: unreadable trainer state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(
            f"{path}: a trainer state in the older pickled format, which is not loaded because unpickling a "
            f"file can run code; start a new run with another --out (the checkpoints in {path.parent} still "
            f"export and evaluate), or resume it with the toolkit version that wrote it")
    return state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
