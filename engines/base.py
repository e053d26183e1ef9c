"""One interface for every backend (after Polygraphy's runners): activate, infer, deactivate.

Every engine takes images as float32 RGB in 0..255, shape (B, 3, S, S), and
returns a dict of NumPy arrays:
    logits  (B, 1, S, S) float32   fused logits z_final
    mask    (B, 1, S, S) uint8     z_final > 0
    expert  (B,)         int32     chosen candidate (0 basic, 1 semantic, 2 fused)
"""

from __future__ import annotations

import abc
from typing import Dict, Optional, Tuple

import numpy as np

OUTPUT_NAMES = ("logits", "mask", "expert")
INPUT_NAME = "image"


class EngineError(RuntimeError):
    """An engine or build artifact that cannot be used (missing, damaged, mismatched)."""


class InputError(ValueError):
    """Images an engine cannot take (shape, dtype, channels, batch, NaN)."""


def to_numpy(images) -> np.ndarray:
    if hasattr(images, "detach"):  # torch.Tensor without importing torch here
        images = images.detach().cpu().numpy()
    return np.asarray(images)


def check_images(images, image_size: int, batch_range: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Validate a batch of images and return it as a float32 array.

    Raises:
      InputError: one line naming what is wrong.
    """
    x = to_numpy(images)
    if x.dtype != np.float32:
        raise InputError(f"images must be float32 RGB in 0..255, got dtype {x.dtype}")
    if x.ndim != 4:
        raise InputError(f"images must be (B, 3, {image_size}, {image_size}), got {x.ndim}-D shape {x.shape}")
    if x.shape[1] != 3:
        raise InputError(f"images must have 3 (RGB) channels on axis 1, got {x.shape[1]} in shape {x.shape}")
    if x.shape[2:] != (image_size, image_size):
        raise InputError(f"images must be {image_size}x{image_size}, got {x.shape[2]}x{x.shape[3]}")
    if batch_range is not None and not batch_range[0] <= x.shape[0] <= batch_range[1]:
        raise InputError(f"batch {x.shape[0]} outside this engine's range {batch_range[0]}..{batch_range[1]}")
    if not np.isfinite(x).all():
        raise InputError("images contain NaN or infinite values")
    return np.ascontiguousarray(x)


class Engine(abc.ABC):
    """Base class of all engines. Use as a context manager or call activate()/deactivate()."""

    name: str = "engine"

    def __init__(self, *, image_size: int, batch_range: Optional[Tuple[int, int]] = None) -> None:
        self.image_size = image_size
        self.batch_range = batch_range
        self.is_active = False

    def activate(self) -> "Engine":
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self) -> "Engine":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def infer(self, images) -> Dict[str, np.ndarray]:
        """Run the model on (B, 3, S, S) float32 RGB 0..255 images; returns logits, mask, expert."""
        if not self.is_active:
            self.activate()
        x = check_images(images, self.image_size, self.batch_range)
        return self._infer(x)

    @abc.abstractmethod
    def _activate(self) -> None: ...

    def _deactivate(self) -> None:
        pass

    @abc.abstractmethod
    def _infer(self, images: np.ndarray) -> Dict[str, np.ndarray]: ...
