"""What a run saves to be resumed: the trainer state (trainable weights, optimizer, epoch, best score,
RNG states, what the run is) and the replicas' weight digest."""

from __future__ import annotations

import hashlib
import random
from typing import Any, Dict

import numpy as np
import torch
from torch import nn

STATE_NAME = "trainer_state.pt"


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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
