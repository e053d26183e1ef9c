"""A synthetic multi-class volume set in the ACDC layout: the 3-D default that needs no download.

Details: docs/datasets-3d.md.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

from icmoe.core.errors import DataError
from icmoe.core.io import PathLike, atomic_write_json
from icmoe.data.volumes import VOLUME_DATASETS, map_to_0_255

DATABASE = "database"
MARKER = "synthetic3d.json"  # inside `database/`: present only in a complete set
GENERATOR = "icmoe.data.synthetic_volumes"
SPACING_MM = (1.5, 1.5, 5.0)  # (X, Y, Z) voxel size written in the NIfTI headers
CLASSES = VOLUME_DATASETS["synthetic3d"].classes  # ("disc", "ring", "bar"): label values 1, 2, 3


# Mean radius (disc, ring) or half length (bar) as a fraction of the side. With the centres 0.22..0.26 of the side
# from the middle and 120 degrees apart (>= 0.38 apart), drift, sway and border bumps never make two organs touch.
_RADIUS = ((0.075, 0.105), (0.085, 0.11), (0.09, 0.12))


@dataclass(frozen=True)
class _Track:
    """One organ's geometry through the volume; lengths in pixels, t in [-0.5, 0.5] from first to last slice."""

    center: np.ndarray  # (2,) row, col at t = 0
    drift: np.ndarray  # (2,) displacement from t = -0.5 to t = 0.5
    wobble: np.ndarray  # (2,) amplitude of a sinusoidal sway
    phase: float  # of the sway and of the size change
    radius: float  # mean radius (disc, ring) or half length (bar)
    aspect: float  # minor / major axis (disc, ring) or width / length (bar)
    angle: float  # orientation at t = 0
    turn: float  # change of orientation from t = -0.5 to 0.5
    harmonics: Tuple[Tuple[int, float, float, float], ...]  # (k, amplitude, phase, phase drift) of the border

    def at(self, t: float) -> Tuple[np.ndarray, float, float]:
        """Centre (2,), size scale and orientation at slice position t."""
        center = self.center + self.drift * t + self.wobble * np.sin(2 * np.pi * t + self.phase)
        scale = 0.8 + 0.2 * np.cos(np.pi * t + 0.3 * np.sin(self.phase))  # the organ is widest mid-volume
        return center, float(scale), self.angle + self.turn * t


def _frame(track: _Track, t: float, size: int) -> Tuple[np.ndarray, np.ndarray, float]:
    """Organ-frame coordinates (u along the major axis, v across) of every pixel, and the size scale."""
    center, scale, angle = track.at(t)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dr, dc = rows - center[0], cols - center[1]
    u = dc * np.cos(angle) + dr * np.sin(angle)
    v = -dc * np.sin(angle) + dr * np.cos(angle)
    return u, v, scale


def _blob(track: _Track, t: float, size: int, radius_factor: float = 1.0) -> np.ndarray:
    """(size, size) bool: an ellipse whose radius is perturbed by a few slowly turning harmonics."""
    u, v, scale = _frame(track, t, size)
    v = v / track.aspect
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    border = 1 + sum(a * np.cos(k * phi + p + dp * t) for k, a, p, dp in track.harmonics)
    return rho <= track.radius * scale * radius_factor * border


def _capsule(track: _Track, t: float, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(size, size) bool capsule (a segment thickened by its half width) and the along-axis coordinate."""
    u, v, scale = _frame(track, t, size)
    half_length = track.radius * scale
    half_width = track.radius * track.aspect
    du = np.maximum(np.abs(u) - half_length, 0)
    return np.hypot(du, v) <= half_width, u


def _smooth_field(rng: np.random.Generator, shape: Tuple[int, int, int], cells: Tuple[int, int, int]) -> np.ndarray:
    """A smooth random field in [0, 1] of `shape` (Z, S, S): a coarse random grid, bicubic in-plane, linear in Z."""
    depth, size, _ = shape
    coarse = rng.random(cells, dtype=np.float32)
    # In-plane bicubic with PIL: scipy's 3-D cubic zoom made the whole generation 2.5x slower, for no visible gain.
    planes = np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.BICUBIC)) for c in coarse])
    pos = np.linspace(0, cells[0] - 1, depth)  # where each slice falls between the coarse planes
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, cells[0] - 1)
    w = (pos - lo).astype(np.float32)[:, None, None]
    field = planes[lo] * (1 - w) + planes[hi] * w
    f_lo, f_hi = float(field.min()), float(field.max())
    return ((field - f_lo) / max(f_hi - f_lo, 1e-6)).astype(np.float32)


def _tracks(rng: np.random.Generator, size: int) -> List[_Track]:
    """Geometry of disc, ring and bar (in class order): 120 degrees apart around the centre, shuffled."""
    start = rng.uniform(0, 2 * np.pi)
    slots = rng.permutation(3)
    tracks = []
    for cls in range(3):
        angle = start + slots[cls] * 2 * np.pi / 3
        distance = rng.uniform(0.22, 0.26) * size
        center = size / 2 + distance * np.array([np.sin(angle), np.cos(angle)])
        bar = cls == 2
        tracks.append(_Track(
            center=center,
            drift=rng.uniform(-0.04, 0.04, size=2) * size,
            wobble=rng.uniform(0.0, 0.01, size=2) * size,
            phase=float(rng.uniform(0, 2 * np.pi)),
            radius=float(rng.uniform(*_RADIUS[cls])) * size,
            aspect=float(rng.uniform(0.3, 0.4) if bar else rng.uniform(0.7, 1.0)),
            angle=float(rng.uniform(0, np.pi)),
            turn=float(rng.uniform(-0.6, 0.6)),
            harmonics=tuple((k, float(rng.uniform(0.02, 0.08) / k ** 0.5), float(rng.uniform(0, 2 * np.pi)),
                             float(rng.uniform(-1.5, 1.5))) for k in (2, 3, 4)),
        ))
    return tracks


def _organ_masks(tracks: List[_Track], t: float, size: int, thickness: float) -> Tuple[np.ndarray, ...]:
    """disc, ring, ring's inside and bar masks of one slice, and the bar's along-axis coordinate."""
    disc = _blob(tracks[0], t, size)
    ring_outer = _blob(tracks[1], t, size)
    ring_inside = _blob(tracks[1], t, size, radius_factor=1 - thickness)
    bar, along = _capsule(tracks[2], t, size)
    return disc, ring_outer & ~ring_inside, ring_inside, bar, along


def _slice_labels_and_image(p: Dict[str, float], tracks: List[_Track], fields: Dict[str, np.ndarray],
                            z: int, t: float, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Label (size, size) uint8 and noise-free intensity (size, size) float32 of slice z (appearance `p`)."""
    disc, ring, ring_inside, bar, along = _organ_masks(tracks, t, size, p["thickness"])
    image = p["tissue"] + 0.12 * (fields["tissue"][z] - 0.5)  # textured tissue
    image = np.where(fields["body"][z], image, p["air"])
    for spot in fields["spots"][z]:
        image = np.where(spot, p["spot"], image)
    # Painted back to front (bar, ring's inside, ring, disc), the labels in the same order. The layout keeps the
    # organs apart; were two ever to touch, the later one covers the earlier in image and label alike.
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * along / p["period"] + p["stripe_phase"])
    image = np.where(bar, p["bar"] + 0.2 * (stripes - 0.5), image)
    image = np.where(ring_inside, p["tissue"] + 0.05 * (fields["tissue"][z] - 0.5), image)
    image = np.where(ring, p["ring"] + 0.14 * (fields["speckle"][z] - 0.5), image)
    image = np.where(disc, p["disc"] + 0.10 * (fields["disc"][z] - 0.5), image)
    label = np.zeros((size, size), dtype=np.uint8)
    label[bar] = 3
    label[ring_inside] = 0
    label[ring] = 2
    label[disc] = 1
    return label, image.astype(np.float32)


def _fields(rng: np.random.Generator, depth: int, size: int) -> Dict[str, np.ndarray]:
    """The per-volume textures (Z, S, S) in [0, 1], the body mask and the distractor spots."""
    shape = (depth, size, size)
    speckle = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(0, 0.8, 0.8))
    speckle = (speckle - speckle.min()) / max(float(np.ptp(speckle)), 1e-6)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    ar, ac = rng.uniform(0.46, 0.49, size=2) * size
    body = ((rows - size / 2) / ar) ** 2 + ((cols - size / 2) / ac) ** 2 <= 1
    spots: List[List[np.ndarray]] = [[] for _ in range(depth)]
    for _ in range(2):
        start, end = rng.uniform(0.15, 0.85, size=(2, 2)) * size
        radius = rng.uniform(0.015, 0.025) * size
        for z in range(depth):
            c = start + (end - start) * (z / max(depth - 1, 1))
            spots[z].append((rows - c[0]) ** 2 + (cols - c[1]) ** 2 <= radius * radius)
    return {
        "tissue": _smooth_field(rng, shape, (max(2, depth // 4), 6, 6)),
        "disc": _smooth_field(rng, shape, (max(2, depth // 3), 10, 10)),
        "speckle": speckle.astype(np.float32),
        "bias": _smooth_field(rng, shape, (2, 3, 3)),
        "body": np.broadcast_to(body, shape),
        "spots": spots,  # type: ignore[dict-item]
    }


def _one_volume(seed: int, index: int, size: int, depth: int) -> Tuple[np.ndarray, np.ndarray]:
    """Image int16 (Z, size, size) and label uint8 (Z, size, size) of synthetic volume `index`."""
    rng = np.random.default_rng([seed, index])
    tracks = _tracks(rng, size)
    fields = _fields(rng, depth, size)
    params = {  # per-volume appearance: each class keeps its own intensity band
        "air": 0.02, "tissue": rng.uniform(0.27, 0.33), "spot": rng.uniform(0.62, 0.7),
        "disc": rng.uniform(0.8, 0.9), "ring": rng.uniform(0.08, 0.14), "bar": rng.uniform(0.5, 0.58),
        "thickness": rng.uniform(0.45, 0.6), "period": rng.uniform(0.05, 0.07) * size,
        "stripe_phase": rng.uniform(0, 2 * np.pi),
    }
    image = np.empty((depth, size, size), dtype=np.float32)
    label = np.empty((depth, size, size), dtype=np.uint8)
    for z in range(depth):
        t = z / (depth - 1) - 0.5 if depth > 1 else 0.0
        label[z], image[z] = _slice_labels_and_image(params, tracks, fields, z, t, size)
    image *= 0.85 + 0.3 * fields["bias"]  # coil sensitivity: a smooth multiplicative field
    image = ndimage.gaussian_filter(image, sigma=(0, 0.6, 0.6))  # partial volume at the borders
    noise = rng.normal(0, 0.025, size=(2,) + image.shape)
    image = np.hypot(image + noise[0], noise[1])  # magnitude images: Rician noise
    gain = rng.uniform(600, 1400)  # scanner scaling; per-slice min-max normalisation removes it
    return np.clip(np.rint(image * gain), 0, 32767).astype(np.int16), label


def synthetic_volume(size: int, depth: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """One synthetic multi-organ volume of any size (as the set's): image int16 (depth, size, size) and its
    labels uint8 (depth, size, size); e.g. a whole volume for benchmarks/volume.py."""
    _check_args(2, 1, size, depth)  # the size and depth checks of a whole set
    return _one_volume(seed, 0, size, depth)


def _affine() -> np.ndarray:
    dx, dy, dz = SPACING_MM
    return np.array([[dx, 0, 0, -96.0], [0, dy, 0, -96.0], [0, 0, dz, -30.0], [0, 0, 0, 1]])


def _save_nifti(array_zhw: np.ndarray, path: Path) -> None:
    """Save a (Z, H, W) array as (X, Y, Z) NIfTI with the set's affine and mm units."""
    img = nib.Nifti1Image(np.ascontiguousarray(np.moveaxis(array_zhw, 0, -1)), _affine())
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(_affine(), code=1)
    img.set_sform(_affine(), code=1)
    nib.save(img, str(path))


def _write_case(pool_dir: Path, number: int, image: np.ndarray, label: np.ndarray) -> None:
    """`patientNNN/` with frame 01, its `_gt` and an ACDC-style `Info.cfg`."""
    patient = f"patient{number:03d}"
    folder = pool_dir / patient
    folder.mkdir(parents=True)
    _save_nifti(image, folder / f"{patient}_frame01.nii.gz")
    _save_nifti(label, folder / f"{patient}_frame01_gt.nii.gz")
    info = {"ED": 1, "ES": 1, "Group": "SYN", "Height": 170.0, "NbFrame": 1, "Weight": 70.0}
    (folder / "Info.cfg").write_text("".join(f"{k}: {v}\n" for k, v in info.items()))


def _is_synthetic(database: Path) -> bool:
    try:
        meta = json.loads((database / MARKER).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("generator") == GENERATOR


def has_synthetic_volumes(root: PathLike) -> bool:
    """True if `root` holds a complete set written by `make_synthetic_volumes` (its marker file is there)."""
    return _is_synthetic(Path(root) / DATABASE)


def _check_args(n_train: int, n_test: int, size: int, depth: int) -> None:
    if n_train < 2 or n_test < 1:
        raise DataError(f"need n_train >= 2 (train and val) and n_test >= 1, got {n_train} and {n_test}")
    if size < 32 or depth < 1:
        raise DataError(f"need size >= 32 and depth >= 1, got size={size}, depth={depth}")
    if n_train + n_test > 999:
        raise DataError(f"at most 999 volumes (patientNNN names), got {n_train + n_test}")


def _swap_into_place(new: Path, dest: Path, trash: Path) -> None:
    """Rename `new` onto `dest`; an earlier synthetic set there is moved into `trash` first."""
    if dest.exists():
        if not _is_synthetic(dest):
            raise DataError(f"{dest}: exists and is not a synthetic3d set; not replacing it")
        dest.rename(trash / "replaced")
    new.rename(dest)


def make_synthetic_volumes(
    root: PathLike, *, n_train: int = 8, n_test: int = 4, size: int = 128, depth: int = 12, seed: int = 0
) -> Path:
    """Write the synthetic3d set under `root` in the ACDC layout (see the module docstring).

    Arguments:
      root: the data root (created); the set is `root/database/`.
      n_train: volumes (patients) in `database/training` (split into train and val by the ACDC rule).
      n_test: volumes in `database/testing` (numbered after the training ones).
      size: in-plane side in pixels.
      depth: slices per volume.
      seed: generator seed; volume i depends only on (seed, i, size, depth).

    Returns:
      Path: `root`, the data root to pass to `list_cases("synthetic3d", root, split)`.
    """
    _check_args(n_train, n_test, size, depth)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if (root / DATABASE).exists() and not has_synthetic_volumes(root):
        raise DataError(f"{root / DATABASE}: exists and is not a synthetic3d set; not replacing it")
    # Hidden, so the readers never list it while it is being written.
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic3d-", suffix=".tmp", dir=root))
    try:
        database = tmp / DATABASE
        for i in range(n_train + n_test):
            pool = "training" if i < n_train else "testing"
            _write_case(database / pool, i + 1, *_one_volume(seed, i, size, depth))
        meta = {"generator": GENERATOR, "seed": seed, "size": size, "depth": depth, "n_train": n_train,
                "n_test": n_test, "classes": list(CLASSES), "spacing_xyz_mm": list(SPACING_MM)}
        atomic_write_json(database / MARKER, meta)
        _swap_into_place(database, root / DATABASE, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def synthetic_slices(n: int, size: int, seed: int = 0, depth: int = 12) -> Tuple[np.ndarray, np.ndarray]:
    """`n` slices of synthetic3d volumes in memory, as the ACDC reader delivers them (no files).

    Structured parity and calibration images for multi-class models: the organs, textures
    and noise of the synthetic set, each slice min-max mapped to 0..255.

    Arguments:
      n: slices; size: side in pixels; seed: generator seed; depth: slices per volume.

    Returns:
      (images float32 (n, 3, size, size) RGB 0..255 (gray repeated), labels uint8 (n, size, size)).
    """
    images, labels = [], []
    index = 0
    while sum(len(v) for v in images) < n:
        image, label = _one_volume(seed, index, size, depth)
        images.append(map_to_0_255(image.astype(np.float32), VOLUME_DATASETS["synthetic3d"]))
        labels.append(label)
        index += 1
    gray = np.concatenate(images)[:n]
    return np.repeat(gray[:, None], 3, axis=1), np.concatenate(labels)[:n]
