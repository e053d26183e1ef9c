"""Masks at full size both ways: the logits resized bilinearly then thresholded or arg-maxed (predict's
default) against the model-size mask resized by nearest neighbour, on a held-out synthetic set whose ground
truth is drawn at full size (the family's `synthetic_validation` at the full size, never seen in training).

Reports Dice per label (pooled over the set) for both ways, and how smooth the edges are: boundary pixels per
ground-truth boundary pixel (a staircase has more) and the share of boundary pixels that lie on the ground
truth's boundary.

    python benchmarks/fullsize.py build/icmoe-tiny --size 512

Details: docs/predict.md ("Masks at the picture's size").
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from engines.predict.pipeline import UPSAMPLING, predict  # noqa: E402
from engines.select import choose  # noqa: E402
from icmoe.core import cli  # noqa: E402
from icmoe.core.manifest import family_of, read_manifest  # noqa: E402
from icmoe.core.parity import dice_per_class  # noqa: E402
from icmoe.families import get_family  # noqa: E402

HELDOUT_SEED = 20261  # apart from the training (0), parity and verify held-out seeds


def boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of each label region with a 4-neighbour of another label (bool, the mask's shape)."""
    m = np.asarray(mask)
    edge = np.zeros(m.shape, dtype=bool)
    edge[:-1] |= m[:-1] != m[1:]
    edge[1:] |= m[1:] != m[:-1]
    edge[:, :-1] |= m[:, :-1] != m[:, 1:]
    edge[:, 1:] |= m[:, 1:] != m[:, :-1]
    return edge


def edge_figures(masks: List[np.ndarray], truths: List[np.ndarray]) -> Dict[str, float]:
    """Boundary pixels per ground-truth boundary pixel, and the share of boundary pixels within one pixel of
    the ground truth's boundary (a staircase wanders off it), over the set."""
    have = want = near = 0
    for m, t in zip(masks, truths):
        b, bt = boundary(m), boundary(t)
        have, want = have + int(b.sum()), want + int(bt.sum())
        near += int((b & ndimage.binary_dilation(bt, iterations=1)).sum())
    return {"boundary_ratio": have / max(want, 1), "on_true_boundary": near / max(have, 1)}


def compare(engine: Any, images: np.ndarray, truth: np.ndarray, labels: int) -> Dict[str, Any]:
    """Both ways on the same engine and images: Dice per label against the full-size truth, edge figures."""
    pictures = [np.clip(np.rint(im.transpose(1, 2, 0)), 0, 255).astype(np.uint8) for im in images]
    truths = [t[0] for t in truth]
    out: Dict[str, Any] = {}
    for way in UPSAMPLING:
        masks = [p.mask for p in predict(engine, pictures, upsample=way)]
        dice = dice_per_class(np.stack(truths)[:, None], np.stack(masks)[:, None], labels)
        out[way] = {"dice": {str(k): (1.0 if v is None else float(v)) for k, v in dice.items()},
                    **edge_figures(masks, truths)}
        out[way]["mean_dice"] = float(np.mean(list(out[way]["dice"].values())))
    return out


def run(build: Path, size: int, n: int, backend: str = "auto", precision: Optional[str] = None,
        seed: int = HELDOUT_SEED) -> Dict[str, Any]:
    manifest = read_manifest(build)
    family = get_family(family_of(manifest))
    data = family.parity.synthetic_validation(n, size, seed)
    if data is None:
        raise cli.UsageError(f"{family.title} has no labelled synthetic set to draw at full size")
    engine, choice = choose(build, backend, precision)
    labels = len(engine.class_names or ()) or 2
    with engine:
        figures = compare(engine, data[0], data[1], labels)
    return {"build": str(build), "model": manifest["model"]["name"], "image_size": manifest["image_size"],
            "full_size": size, "images": n, "seed": seed, "engine": engine.name, "choice": choice.to_dict(),
            "mask_rule": manifest["model"].get("mask_rule"), **figures}


def markdown(r: Dict[str, Any]) -> str:
    rows = [f"{r['images']} held-out images drawn at {r['full_size']}x{r['full_size']} (ground truth at that size), "
            f"model at {r['image_size']}, engine {r['engine']}", "",
            "| masks at full size | Dice per label | mean Dice | boundary px / true boundary px | "
            "on the true boundary |", "|---|---|---|---|---|"]
    for way, label in (("logits", "logits resized bilinearly, then the rule"), ("nearest", "mask resized (nearest)")):
        f = r[way]
        dice = ", ".join(f"{k}: {v:.4f}" for k, v in f["dice"].items())
        rows.append(f"| {label} | {dice} | {f['mean_dice']:.4f} | {f['boundary_ratio']:.3f} | "
                    f"{f['on_true_boundary']:.1%} |")
    return "\n".join(rows) + "\n"


def _main(argv=None) -> int:
    p = cli.parser("python benchmarks/fullsize.py", __doc__.splitlines()[0])
    p.add_argument("build", type=Path, help="build directory")
    p.add_argument("--size", type=int, default=512, help="full size the held-out images are drawn at (default 512)")
    p.add_argument("--images", type=int, default=32, help="held-out images (default 32)")
    p.add_argument("--seed", type=int, default=HELDOUT_SEED)
    p.add_argument("--backend", default="auto", help="engine backend (default: the fastest that passed its gates)")
    p.add_argument("--precision", default=None, help="engine precision (default: any)")
    cli.add_json(p)
    args = p.parse_args(argv)
    cli.setup_logging(args.verbosity)
    if args.size < 32 or args.images < 1:
        raise cli.UsageError(f"need --size >= 32 and --images >= 1, got {args.size} and {args.images}")
    report = run(args.build, args.size, args.images, args.backend, args.precision, args.seed)
    cli.write_json(report, args.json)
    print(markdown(report))
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
