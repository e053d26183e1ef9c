"""Calibration images for post-training quantization (`python -m export.build --precision int8 --calibration`).

The source is a folder or a dataset name (its data root then is `data/<name>`, the trainer's default).
A folder is read with the first of the family's dataset readers that finds its training split there
(2-D: ISIC, BUSI, GlaS, the synthetic set; 3-D: ACDC, BTCV, MM-WHS, Synapse, synthetic3d); a 2-D
family also takes a plain folder of images (any file `icmoe.data.images` reads, in subfolders too).
`n` images are drawn from the training split without replacement by `numpy.random.default_rng(seed)`,
so the same source, count and seed give the same set. Images come back as the model's input
(float32 (n, 3, S, S), RGB 0..255), resized as training resizes them.

An empty folder, a folder no reader understands, or a file that cannot be decoded raises `DataError`
naming it, in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from icmoe.core.errors import DataError


def resolve_source(source: Any, datasets: Sequence[str]) -> Tuple[Path, Optional[str]]:
    """(data root, dataset name or None) of a calibration source: a folder, or a dataset name.

    Raises:
      DataError: neither an existing folder nor one of `datasets` with its folder `data/<name>`.
    """
    path = Path(source)
    if path.is_dir():
        return path, None
    if str(source) in datasets:
        root = Path("data") / str(source)
        if not root.is_dir():
            raise DataError(f"calibration: dataset {source} has no data root {root} (give its folder instead)")
        return root, str(source)
    if path.exists():
        raise DataError(f"calibration: {path} is not a folder")
    raise DataError(f"calibration: {source} is neither a folder nor a dataset ({', '.join(datasets)})")


def pick(count: int, n: int, seed: int) -> np.ndarray:
    """Sorted indices of min(n, count) items drawn without replacement, seeded."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=min(n, count), replace=False))


def _first_readable(root: Path, names: Sequence[str], lister: Callable[[str, Path], List[Any]]) -> Tuple[str, List[Any]]:
    """The first dataset whose reader finds a non-empty training split under `root`, and that split."""
    for name in names:
        try:
            items = lister(name, root)
        except DataError:
            continue
        if items:
            return name, items
    return "", []


def image_files(root: Path) -> List[Path]:
    """Every image file under `root` that `icmoe.data.images` reads, sorted."""
    from icmoe.data.images import IMAGE_SUFFIXES

    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))


def images_2d(source: Any, n: int, *, image_size: int, seed: int = 0) -> np.ndarray:
    """Calibration images of a 2-D dataset (its training split) or of a plain image folder.

    Arguments:
      source: a folder or a 2-D dataset name (isic, busi, glas, synthetic).
      n: how many images (fewer if the source has fewer).
      image_size: the model's input side.
      seed: seed of the draw.

    Returns:
      np.ndarray: float32 (n, 3, S, S), RGB 0..255.

    Raises:
      DataError: no images there, or one that cannot be read.
    """
    from icmoe.data.dataset import load_image
    from icmoe.data.readers import DATASETS, list_split

    root, name = resolve_source(source, tuple(DATASETS))
    names = [name] if name else list(DATASETS)
    _, items = _first_readable(root, names, lambda d, r: list_split(d, r, "train"))
    files = [item.image for item in items] or ([] if name else image_files(root))
    if not files:
        raise DataError(f"calibration: {root}: no images (neither a dataset layout nor image files)")
    chosen = [files[i] for i in pick(len(files), n, seed)]
    return np.stack([load_image(f, image_size).transpose(2, 0, 1) for f in chosen]).astype(np.float32)


def slices_3d(source: Any, n: int, *, image_size: int, seed: int, datasets: Sequence[str],
              load_split: Callable[..., Any]) -> np.ndarray:
    """Calibration slices of a 3-D dataset's training split, read by the family's `load_split`.

    Arguments:
      source: a folder or a dataset name of `datasets`.
      n: how many slices; image_size: the model's input side; seed: seed of the draw.
      datasets: the family's 3-D dataset names.
      load_split: the family's `load_split(dataset, root, split, image_size=, progress=)`.

    Returns:
      np.ndarray: float32 (n, 3, S, S), RGB 0..255 (gray repeated).

    Raises:
      DataError: no dataset layout there, or a volume that cannot be read.
    """
    from icmoe.data.volumes import list_cases

    root, name = resolve_source(source, tuple(datasets))
    name, _ = _first_readable(root, [name] if name else list(datasets), lambda d, r: list_cases(d, r, "train"))
    if not name:
        raise DataError(f"calibration: {root}: no volumes of a known 3-D dataset ({', '.join(datasets)})")
    data = load_split(name, root, "train", image_size=image_size, progress=False)
    return np.stack([np.asarray(data[int(i)][0], dtype=np.float32) for i in pick(len(data), n, seed)])
