"""Parity of a build's engines with eager FP32 PyTorch: `python -m export.verify BUILD_DIR`.

The fixed input set (default 64 images, seed 0) is half synthetic lesion images
(`icmoe.data.synthetic.synthetic_images`) and half uniform random images in 0..255.
Every engine of the build (ONNX Runtime FP32, FP16 when built, TensorRT when its
plan and library are present) runs the same set; each is compared with the eager
FP32 model the build was exported from:

- max and mean absolute logit difference,
- per-image mask Dice against eager (min and mean; two empty masks count as 1),
- the share of images whose chosen expert agrees.

Element-wise logit tolerances are checked with Polygraphy's `SimpleCompareFunc`.
Bounds (issue 4): FP32 max |diff| <= 1e-3 and every expert equal; FP16 (and
TensorRT FP16) min Dice >= 0.995 and expert agreement >= 99%.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

# precision -> bounds the engine must meet
BOUNDS = {
    "fp32": {"max_abs_logit": 1e-3, "expert_agreement": 1.0, "min_dice": 0.995},
    "fp16": {"max_abs_logit": None, "expert_agreement": 0.99, "min_dice": 0.995},
}


def parity_inputs(n: int, image_size: int, seed: int = 0) -> np.ndarray:
    """The fixed parity set: ceil(n/2) synthetic lesion images then random images, float32 (n,3,S,S) 0..255."""
    from icmoe.data.synthetic import synthetic_images

    n_syn = (n + 1) // 2
    syn, _ = synthetic_images(n_syn, image_size, seed)
    rng = np.random.default_rng(seed + 1)
    rnd = (rng.random((n - n_syn, 3, image_size, image_size)) * 255).astype(np.float32)
    return np.concatenate([np.asarray(syn, dtype=np.float32), rnd], axis=0)


def run_batched(engine, images: np.ndarray, batch: int) -> Dict[str, np.ndarray]:
    """Run `engine` over `images` in chunks of `batch`; concatenates the outputs."""
    outs: Dict[str, List[np.ndarray]] = {}
    for i in range(0, len(images), batch):
        for k, v in engine.infer(images[i : i + batch]).items():
            outs.setdefault(k, []).append(v)
    return {k: np.concatenate(v, axis=0) for k, v in outs.items()}


def dice_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dice of two binary mask batches (B,1,H,W) per image; both empty -> 1."""
    a = a.reshape(len(a), -1).astype(bool)
    b = b.reshape(len(b), -1).astype(bool)
    inter = (a & b).sum(1)
    total = a.sum(1) + b.sum(1)
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def compare(reference: Dict[str, np.ndarray], candidate: Dict[str, np.ndarray], *, precision: str) -> Dict:
    """Parity figures of `candidate` against `reference` (eager FP32) and whether the bounds hold."""
    from polygraphy.comparator import IterationResult, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    diff = np.abs(candidate["logits"].astype(np.float64) - reference["logits"].astype(np.float64))
    dice = dice_per_image(reference["mask"], candidate["mask"])
    agree = float((reference["expert"] == candidate["expert"]).mean())
    bounds = BOUNDS[precision]
    # Polygraphy's element-wise check of the logits (absolute tolerance only).
    tol = bounds["max_abs_logit"]
    polygraphy_ok = None
    if tol is not None:
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL), contextlib.redirect_stdout(io.StringIO()):
            res = SimpleCompareFunc(atol={"logits": tol}, rtol={"logits": 0.0}, check_shapes=True)(
                IterationResult({"logits": reference["logits"]}, runner_name="eager-fp32"),
                IterationResult({"logits": candidate["logits"]}, runner_name="candidate"),
            )
        polygraphy_ok = bool(res["logits"])
    report = {
        "images": int(len(dice)),
        "max_abs_logit": float(diff.max()),
        "mean_abs_logit": float(diff.mean()),
        "min_dice": float(dice.min()),
        "mean_dice": float(dice.mean()),
        "expert_agreement": agree,
        "polygraphy_logits_within_tol": polygraphy_ok,
        "bounds": bounds,
    }
    ok = dice.min() >= bounds["min_dice"] and agree >= bounds["expert_agreement"]
    if tol is not None:
        ok = ok and diff.max() <= tol and bool(polygraphy_ok)
    report["passed"] = bool(ok)
    return report


def build_engines(build_dir: Path, manifest: Dict) -> List[tuple]:
    """(label, precision, loader) of every engine this build has and this machine can run."""
    from engines import load_engine

    arts = manifest["artifacts"]
    found = []
    if "model.onnx" in arts:
        found.append(("onnxruntime-fp32", "fp32", lambda: load_engine(build_dir, "onnxruntime", "fp32")))
    if "model.fp16.onnx" in arts:
        found.append(("onnxruntime-fp16", "fp16", lambda: load_engine(build_dir, "onnxruntime", "fp16")))
    for name, info in arts.items():
        if info.get("kind") == "tensorrt":
            prec = info.get("precision", manifest["precision"])
            found.append((f"tensorrt-{prec}", prec, lambda prec=prec: load_engine(build_dir, "tensorrt", prec)))
    return found


def verify_build(build_dir, *, n: int = 64, seed: int = 0, batch: Optional[int] = None,
                 log: Callable[[str], None] = print, progress: bool = True) -> Dict:
    """Compare every engine of a build with eager FP32 on the fixed parity set.

    Arguments:
      build_dir: a build directory.
      n: number of parity images (>= 64 for the issue's claims).
      seed: seed of the parity set.
      batch: batch size for the runs (default: the build's max batch, at most 8).
      log: where the result lines go.
      progress: show a tqdm bar per engine.

    Returns:
      dict: {"build_dir", "model", "n", "engines": {label: figures}, "skipped": {label: reason}, "passed"}.
    """
    from tqdm import tqdm

    from engines import EngineError
    from engines.eager import EagerEngine
    from export.manifest import read_manifest

    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    s = int(manifest["image_size"])
    batch = batch or max(1, min(8, int(manifest["batch"]["max"])))
    images = parity_inputs(n, s, seed)
    candidates = build_engines(build_dir, manifest)
    report = {"build_dir": str(build_dir), "model": manifest["model"]["name"], "n": n, "seed": seed,
              "engines": {}, "skipped": {}}
    # Load (and so check) every artifact before the long eager run: a damaged build fails at once.
    engines = []
    for label, precision, loader in candidates:
        try:
            engines.append((label, precision, loader()))
        except EngineError as e:
            if not label.startswith("tensorrt"):
                raise
            report["skipped"][label] = str(e)  # a plan built on a GPU host; checked there
            log(f"verify: {label}: skipped ({e})")
    eager = EagerEngine.from_build(build_dir)
    bar = tqdm(total=len(engines) + 1, desc="verify", unit="engine", disable=not progress, leave=False)
    with eager:
        reference = run_batched(eager, images, batch)
    bar.update()
    for label, precision, engine in engines:
        bar.set_postfix_str(label)
        with engine:
            out = run_batched(engine, images, batch)
        r = compare(reference, out, precision=precision)
        report["engines"][label] = r
        log(f"verify: {label}: max|dlogit| {r['max_abs_logit']:.3g}, mean {r['mean_abs_logit']:.3g}, "
            f"Dice min {r['min_dice']:.4f} mean {r['mean_dice']:.4f}, expert agreement "
            f"{100 * r['expert_agreement']:.1f}% over {n} images: {'PASS' if r['passed'] else 'FAIL'}")
        bar.update()
    bar.close()
    report["passed"] = all(r["passed"] for r in report["engines"].values()) and bool(report["engines"])
    return report


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.verify", description=__doc__.splitlines()[0])
    p.add_argument("build_dir", type=Path, help="build directory written by `python -m export.build`")
    p.add_argument("-n", "--images", type=int, default=64, help="parity images (half synthetic, half random)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=None, help="batch size of the runs (default: build max, <= 8)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    from engines import EngineError, InputError
    from export.manifest import ManifestError

    import icmoe

    try:
        report = verify_build(args.build_dir, n=args.images, seed=args.seed, batch=args.batch)
    except (ManifestError, EngineError, InputError, icmoe.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        from icmoe.io import atomic_write_json

        atomic_write_json(args.json, report)
    print(f"verify: {'all engines within bounds' if report['passed'] else 'PARITY FAILED'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
