"""A synthetic lesion dataset: the built-in default that needs no download.

Details: docs/training.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageFilter

from icmoe.core.io import PathLike, atomic_path, atomic_write_json

BUSI_DIR = "Dataset_BUSI_with_GT"
SPLIT_NAME = "split.json"
CLASSES = ("benign", "malignant")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1], (size, size) float32: bicubic upsampling of a coarse grid."""
    coarse = rng.random((cells, cells), dtype=np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC)
    field = np.asarray(img, dtype=np.float32)
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) / max(hi - lo, 1e-6)


def _blob_mask(rng: np.random.Generator, size: int, malignant: bool) -> np.ndarray:
    """Lesion mask (size, size) bool: an ellipse with a radially perturbed, irregular border."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cx, cy = rng.uniform(0.3, 0.7, size=2) * size
    r = rng.uniform(0.14, 0.26) * size  # mean radius: lesions cover roughly 5%..25% of the image
    aspect = rng.uniform(0.65, 1.0)
    theta0 = rng.uniform(0, np.pi)
    dx, dy = xx - cx, yy - cy
    # Rotate into the ellipse frame.
    u = dx * np.cos(theta0) + dy * np.sin(theta0)
    v = (-dx * np.sin(theta0) + dy * np.cos(theta0)) / aspect
    rho = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    # Border: a few low harmonics (lobulated), plus higher ones for malignant (spiculated).
    harmonics = [(k, rng.uniform(0.03, 0.12) / k ** 0.5, rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4, 5)]
    if malignant:
        harmonics += [(k, rng.uniform(0.02, 0.06), rng.uniform(0, 2 * np.pi)) for k in (7, 9, 11)]
    radius = r * (1 + sum(a * np.cos(k * phi + p) for k, a, p in harmonics))
    return rho <= radius


def _one_image(seed: int, index: int, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Image (size, size, 3) uint8 and mask (size, size) uint8 {0, 1} of synthetic sample `index`."""
    rng = np.random.default_rng([seed, index])
    malignant = bool(index % 2)
    mask = _blob_mask(rng, size, malignant)
    # Background: a skin/tissue tone modulated by smooth texture.
    base = rng.uniform([170, 120, 100], [235, 185, 160]).astype(np.float32)  # RGB
    tex = _smooth_noise(rng, size, int(rng.integers(4, 9)))[..., None]  # (S, S, 1)
    fine = _smooth_noise(rng, size, max(size // 6, 8))[..., None]
    bg = base * (0.82 + 0.25 * tex) + 18 * (fine - 0.5)
    # Lesion: darker brownish, its own texture; contrast varies between images.
    darken = rng.uniform(0.45, 0.72)
    tint = rng.uniform([0.75, 0.65, 0.6], [1.0, 0.85, 0.8]).astype(np.float32)
    ltex = _smooth_noise(rng, size, int(rng.integers(6, 14)))[..., None]
    lesion = base * darken * tint * (0.8 + 0.35 * ltex)
    # Soft border: blur the mask into an alpha matte.
    alpha_img = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(radius=size / 128))
    alpha = np.asarray(alpha_img, dtype=np.float32)[..., None] / 255.0
    img = bg * (1 - alpha) + lesion * alpha
    # A few small distractor spots (hair follicles, speckle) outside the lesion.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(0, 4))):
        sx, sy = rng.uniform(0, size, size=2)
        sr = rng.uniform(0.01, 0.025) * size
        spot = ((xx - sx) ** 2 + (yy - sy) ** 2) <= sr * sr
        img[spot & ~mask] *= rng.uniform(0.75, 0.9)
    img = img + rng.normal(0.0, 6.0, size=img.shape).astype(np.float32)  # sensor noise
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return img, mask.astype(np.uint8)


def synthetic_images(n: int, size: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """In-memory synthetic lesion images (e.g. parity inputs for exported engines).

    Arguments:
      n (int): number of images.
      size (int): square side in pixels.
      seed (int): generator seed; image i depends only on (seed, i, size).

    Returns:
      images: float32 (n, 3, size, size), RGB, integer values in 0..255.
      masks: uint8 (n, 1, size, size), 1 inside the lesion.
    """
    if n < 0 or size < 8:
        raise ValueError(f"need n >= 0 and size >= 8, got n={n}, size={size}")
    images = np.zeros((n, 3, size, size), dtype=np.float32)
    masks = np.zeros((n, 1, size, size), dtype=np.uint8)
    for i in range(n):
        img, mask = _one_image(seed, i, size)
        images[i] = img.transpose(2, 0, 1)
        masks[i, 0] = mask
    return images, masks


def make_synthetic_dataset(
    root: PathLike, n_train: int = 192, n_val: int = 48, size: int = 128, seed: int = 0
) -> Dict[str, List[str]]:
    """Write a synthetic dataset in the BUSI layout under `root`.

    Files: `root/Dataset_BUSI_with_GT/{benign,malignant}/<class> (N).png` (RGB)
    and `<class> (N)_mask.png` (grayscale 0/255), plus `root/split.json`
    ({"train": [...], "val": [...]}, paths relative to `root`), which the BUSI
    reader follows instead of its seeded split. Even indices are benign, odd
    malignant. Each file is written atomically; `split.json` last, so a folder
    with a split file is complete.

    Arguments:
      root: destination folder (created).
      n_train, n_val: number of training and validation images.
      size: image side in pixels.
      seed: generator seed.

    Returns:
      dict: the split, as written to split.json.
    """
    root = Path(root)
    names: List[str] = []
    counters = {c: 0 for c in CLASSES}
    for i in range(n_train + n_val):
        img, mask = _one_image(seed, i, size)
        cls = CLASSES[i % 2]
        counters[cls] += 1
        stem = f"{cls} ({counters[cls]})"
        folder = root / BUSI_DIR / cls
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / f"{stem}.png") as tmp:
            Image.fromarray(img, mode="RGB").save(tmp, format="PNG")
        with atomic_path(folder / f"{stem}_mask.png") as tmp:
            Image.fromarray(mask * 255, mode="L").save(tmp, format="PNG")
        names.append(f"{BUSI_DIR}/{cls}/{stem}.png")
    split = {"train": names[:n_train], "val": names[n_train:]}
    meta = {"generator": "icmoe.data.synthetic", "seed": seed, "size": size}
    atomic_write_json(root / SPLIT_NAME, {**split, "meta": meta})
    return split


def has_synthetic_dataset(root: PathLike) -> bool:
    """True if `root` holds a complete dataset written by `make_synthetic_dataset`."""
    path = Path(root) / SPLIT_NAME
    if not path.is_file():
        return False
    try:
        meta = json.loads(path.read_text()).get("meta", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    return meta.get("generator") == "icmoe.data.synthetic"
