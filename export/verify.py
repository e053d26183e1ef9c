"""Parity of a build's engines with eager FP32 PyTorch: `python -m export.verify BUILD_DIR`.

Details: docs/export.md.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from engines import EngineError, load_engine
from engines.base import run_batched, time_runs
from engines.eager import EagerEngine
from engines.openvino import bf16_unavailable
from engines.openvino import unavailable_reason as openvino_unavailable
from engines.select import LATENCY_RUNS, cpu_name
from icmoe.core import cli
from icmoe.core.errors import CheckFailed, FamilyError
from icmoe.core.manifest import (
    BF16_VARIANTS,
    ONNX_GRAPHS,
    OPENVINO_GRAPHS,
    class_names,
    family_of,
    gate_precision,
    model_label,
    read_manifest,
)
from icmoe.core.parity import dice_per_class
from icmoe.families import Family, Tolerances, get_family

log = logging.getLogger(__name__)
GPU_BACKENDS = ("tensorrt", "torch-tensorrt")
BATCH_CHECK_IMAGES = 8  # images also run alone for the batch-consistency figures
HELDOUT_SEED = 7919  # offset of the held-out set's seed: apart from the training set's (0) and the parity set's


def parity_inputs(family: Family, n: int, image_size: int, seed: int = 0) -> np.ndarray:
    """The fixed parity set: ceil(n/2) structured synthetic images, then uniform random ones (float32 0..255)."""
    n_syn = (n + 1) // 2
    syn = family.parity.synthetic_inputs(n_syn, image_size, seed)
    rng = np.random.default_rng(seed + 1)
    rnd = (rng.random((n - n_syn, *syn.shape[1:])) * 255).astype(np.float32)
    return np.concatenate([syn.astype(np.float32), rnd], axis=0)


def engine_candidates(manifest: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    """(label, backend, precision) of every engine the build's artifacts make."""
    found = []
    for precision, name in ONNX_GRAPHS.items():
        if name in manifest["artifacts"]:
            found.append((f"onnxruntime-{precision}", "onnxruntime", precision))
    for precision, name in OPENVINO_GRAPHS.items():
        if name in manifest["artifacts"]:
            found.append((f"openvino-{precision}", "openvino", precision))
    for precision, graph in BF16_VARIANTS.items():  # the same graphs with BF16 for the floating-point operations
        if OPENVINO_GRAPHS[graph] in manifest["artifacts"]:
            found.append((f"openvino-{precision}", "openvino", precision))
    for name, info in manifest["artifacts"].items():
        backend = {"tensorrt": "tensorrt", "torch_tensorrt": "torch-tensorrt"}.get(info.get("kind"))
        if backend:
            prec = info.get("precision", manifest["precision"])
            found.append((f"{backend}-{prec}", backend, prec))
    return found


def batch_consistency(engine, images: np.ndarray, batched: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """The first images run alone vs inside the batched run: largest float difference, flipped pixels."""
    k = min(BATCH_CHECK_IMAGES, len(images))
    alone = run_batched(engine, images[:k], 1)
    report: Dict[str, Any] = {"images": k}
    for name, value in alone.items():
        other = batched[name][:k]
        if np.issubdtype(value.dtype, np.floating):
            report[f"{name}_max_abs"] = float(np.abs(value.astype(np.float64) - other).max())
        else:
            report[f"{name}_differing"] = int((value != other).sum())
    report["identical"] = all(np.array_equal(alone[n], batched[n][:k]) for n in alone)
    return report


def batch1_latency(engine, image: np.ndarray, runs: int = LATENCY_RUNS) -> Dict[str, Any]:
    """Median milliseconds of `runs` batch-1 runs after one warm-up, with the engine's settings: what
    `engines.select` ranks the engines that passed by."""
    lo = engine.batch_range[0] if engine.batch_range else 1
    image = np.repeat(image[:1], lo, axis=0)  # the smallest batch the engine takes (1 for every build so far)
    times = time_runs(engine, image, warmup=1, runs=runs)
    return {"latency_ms": float(np.median(times) * 1e3), "batch": lo, "runs": runs, **engine.settings()}


def _why_not(family: Family, backend: str, precision: str) -> Optional[str]:
    """Why an engine the build's artifacts make cannot be verified here, or None."""
    why = openvino_unavailable() if backend == "openvino" else None
    if not why and backend == "openvino" and precision in BF16_VARIANTS:
        why = bf16_unavailable()
    if not why:
        try:
            family.parity.tolerances(gate_precision(precision))
        except FamilyError as e:
            why = f"no parity gates for {gate_precision(precision)}: {e}"
    return why


def _load_candidates(build_dir: Path, manifest: Dict, skipped: Dict[str, str]) -> List[Tuple[str, str, Any]]:
    """Load (and so check) every engine before the long eager run: a damaged build fails at once."""
    engines = []
    family = get_family(family_of(manifest))
    for label, backend, precision in engine_candidates(manifest):
        why = _why_not(family, backend, precision)
        if why:  # an optional CPU runtime or CPU feature: every build could run on it, this host cannot
            skipped[label] = why
            log.warning(f"verify: {label}: skipped ({why})")
            continue
        try:
            engines.append((label, precision, load_engine(build_dir, backend, precision)))
        except EngineError as e:
            if backend not in GPU_BACKENDS:
                raise
            skipped[label] = str(e)  # an artifact built on a GPU host; checked there
            log.warning(f"verify: {label}: skipped ({e})")
    return engines


def _summary_line(label: str, r: Dict[str, Any], n: int) -> str:
    parts = [f"verify: {label}:"]
    if r.get("max_abs_logit") is not None:
        gated = (r.get("tolerances") or {}).get("gate_logits", True)
        ratio = f"{r['logits_worst_ratio']:.2f} of tolerance" if gated else "not gated"
        parts.append(f"max|dlogit| {r['max_abs_logit']:.3g} ({ratio}),")
    if "flipped" in r:
        parts.append(f"flipped pixels {100 * r['flipped']:.4f}%,")
    if "min_dice" in r:
        parts.append(f"Dice min {r['min_dice']:.4f},")
    if r.get("min_class_dice") is not None:
        parts.append(f"class Dice min {r['min_class_dice']:.4f},")
    if r.get("agreement") is not None:
        parts.append(f"agreement {100 * r['agreement']:.1f}%,")
    if r.get("choice_flips"):
        parts.append(f"{r['choice_flips']} choice(s) differ ({r['tie_flips']} within the reference's tie margin, "
                     f"{r['clear_flips']} clear),")
    if r.get("heldout", {}).get("max_change") is not None:
        parts.append(f"held-out Dice change {r['heldout']['max_change']:.4f},")
    if r.get("timing"):
        parts.append(f"batch 1 {r['timing']['latency_ms']:.1f} ms,")
    verdict = "PASS" if r["passed"] else "FAIL" if r.get("required", True) else "FAIL (optional: never chosen)"
    parts.append(f"{n} images: {verdict}")
    return " ".join(parts)


def heldout_dice(masks: np.ndarray, targets: np.ndarray, labels: int) -> Dict[str, float]:
    """Dice of each foreground label of `masks` against the ground truth, pooled over the set (absent from
    both: 1.0); label value -> Dice."""
    return {str(k): 1.0 if v is None else float(v) for k, v in dice_per_class(targets, masks, labels).items()}


def heldout_check(reference: Dict[str, float], dice: Dict[str, float], limit: float, n: int) -> Dict[str, Any]:
    """The held-out gate: every label's Dice within `limit` of eager FP32's."""
    change = max(abs(dice[k] - reference[k]) for k in reference)
    return {"images": n, "dice_fp32": reference, "dice": dice, "max_change": change, "max_dice_change": limit,
            "passed": bool(change <= limit)}


def _heldout_set(family: Family, manifest: Dict, n: int, seed: int) -> Tuple[Optional[np.ndarray], Any]:
    """The labelled held-out images (or None) and the ground truth (or why there is none)."""
    data = family.parity.synthetic_validation(n, int(manifest["image_size"]), seed + HELDOUT_SEED)
    if data is None:
        return None, f"{family.name} has no labelled synthetic validation set"
    return data[0].astype(np.float32), data[1]


def eager_choices(family: Family, eager: EagerEngine, images: np.ndarray, batch: int,
                  gates: Sequence[Tolerances]) -> Dict[Tolerances, Dict[str, np.ndarray]]:
    """Eager's outputs for the discrete choices an engine could make instead (the family's
    `ParitySpec.choice_references`), once per distinct gate; added to the reference `compare` receives."""
    distinct = list(dict.fromkeys(gates))
    if not distinct:
        return {}
    return dict(zip(distinct, family.parity.choice_references(eager.model, images, batch, distinct)))


def gate_check(family: Family, reference, candidate, precision: str, *, n: int = 16, seed: int = 0) -> Dict[str, Any]:
    """The family's gates of `precision` for `candidate` against `reference` (two engines of one build, e.g.
    an INT8 graph just made against the FP32 graph) on the first `n` images of the parity set, and, where the
    gates bound the held-out Dice, on `n` labelled held-out images: `compare`'s report with `passed`."""
    size = candidate.image_size
    tolerances = family.parity.tolerances(gate_precision(precision))
    images = parity_inputs(family, n, size, seed)
    batch = max(1, min(8, (candidate.batch_range or (1, 8))[1]))
    report = family.parity.compare(run_batched(reference, images, batch), run_batched(candidate, images, batch),
                                   tolerances)
    if tolerances.max_dice_change is not None:
        data = family.parity.synthetic_validation(n, size, seed + HELDOUT_SEED)
        if data is not None:
            held, truth = data[0].astype(np.float32), data[1]
            labels = len(reference.class_names or ()) or 2
            ref = heldout_dice(run_batched(reference, held, batch)["mask"], truth, labels)
            report["heldout"] = heldout_check(ref, heldout_dice(run_batched(candidate, held, batch)["mask"], truth,
                                                                labels), tolerances.max_dice_change, n)
            report["passed"] = bool(report["passed"] and report["heldout"]["passed"])
    return report


def verify_build(build_dir, *, n: int = 64, seed: int = 0, batch: Optional[int] = None,
                 overrides: Optional[Dict[str, float]] = None, progress: bool = True) -> Dict[str, Any]:
    """Compare every engine of a build with eager FP32 on the fixed parity set.

    Arguments:
      build_dir: a build directory.
      n: number of parity images.
      seed: seed of the parity set.
      batch: batch size for the runs (default: the build's max batch, at most 8).
      overrides: tolerance fields (atol, rtol, max_flipped) replacing the family's, for every precision.
      progress: show a bar over the engines.

    Returns:
      dict: {"build_dir", "model", "n", "engines": {label: figures}, "skipped": {label: reason}, "passed"}.
    """
    from tqdm import tqdm

    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    family = get_family(family_of(manifest))
    batch = batch or max(1, min(8, int(manifest["batch"]["max"])))
    images = parity_inputs(family, n, int(manifest["image_size"]), seed)
    report: Dict[str, Any] = {"build_dir": str(build_dir), "model": model_label(manifest), "n": n, "seed": seed,
                              "batch": batch, "cpu": cpu_name(), "engines": {}, "skipped": {}}
    engines = _load_candidates(build_dir, manifest, report["skipped"])
    gates: Dict[str, Tolerances] = {label: family.parity.tolerances(gate_precision(precision)).replace(**(overrides or {}))
                                    for label, precision, _ in engines}
    held, truth = None, None
    if any(t.max_dice_change is not None for t in gates.values()):
        held, truth = _heldout_set(family, manifest, (n + 1) // 2, seed)
    labels = len(class_names(manifest) or ()) or 2  # a binary mask: background and one class
    bar = tqdm(total=len(engines) + 1, desc="verify", unit="engine", disable=not progress, leave=False)
    with EagerEngine.from_build(build_dir) as eager:
        reference = run_batched(eager, images, batch)
        choices = eager_choices(family, eager, images, batch, list(gates.values()))
        held_ref = None if held is None else heldout_dice(run_batched(eager, held, batch)["mask"], truth, labels)
        report["eager_timing"] = batch1_latency(eager, images[:1])
    bar.update()
    for label, precision, engine in engines:
        bar.set_postfix_str(label)
        tolerances = gates[label]
        with engine:
            out = run_batched(engine, images, batch)
            r = family.parity.compare({**reference, **choices[tolerances]}, out, tolerances)
            r["batch_consistency"] = batch_consistency(engine, images, out)
            r["timing"] = batch1_latency(engine, images[:1])
            if tolerances.max_dice_change is not None:
                r["heldout"] = ({"skipped": truth} if held is None else heldout_check(
                    held_ref, heldout_dice(run_batched(engine, held, batch)["mask"], truth, labels),
                    tolerances.max_dice_change, len(held)))
                r["passed"] = bool(r["passed"] and r["heldout"].get("passed", True))
        # The BF16 variants are what this CPU offers, not graphs the build was asked for: one that fails its
        # gates is recorded (and so never chosen by engines.select) without failing the build.
        r["required"] = precision not in BF16_VARIANTS
        report["engines"][label] = r
        log.info(_summary_line(label, r, n))
        bar.update()
    bar.close()
    report["passed"] = bool(report["engines"]) and all(r["passed"] for r in report["engines"].values()
                                                       if r["required"])
    return report


def add_tolerance_args(p) -> None:
    """verify's tolerance flags (shared with export.build)."""
    p.add_argument("--atol", type=float, default=None, help="absolute logit tolerance (default: the family's per precision)")
    p.add_argument("--rtol", type=float, default=None, help="relative logit tolerance (default: the family's per precision)")
    p.add_argument("--max-flipped", type=float, default=None,
                   help="largest fraction of mask pixels that may differ (default: the family's per precision)")


def tolerance_overrides(args) -> Dict[str, float]:
    return {k: v for k, v in (("atol", args.atol), ("rtol", args.rtol), ("max_flipped", args.max_flipped))
            if v is not None}


def _main(argv: Optional[Sequence[str]] = None) -> int:
    p = cli.parser("python -m export.verify", __doc__.splitlines()[0])
    p.add_argument("build_dir", type=Path, help="build directory written by `python -m export.build`")
    p.add_argument("-n", "--images", type=int, default=64, help="parity images (half synthetic, half random)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=None, help="batch size of the runs (default: build max, <= 8)")
    add_tolerance_args(p)
    cli.add_json(p)
    cli.add_progress(p)
    args = p.parse_args(argv)
    cli.setup_logging(args.verbosity)
    report = verify_build(args.build_dir, n=args.images, seed=args.seed, batch=args.batch,
                          overrides=tolerance_overrides(args), progress=not args.no_progress)
    cli.write_json(report, args.json)
    if not report["passed"]:
        failed = [k for k, r in report["engines"].items() if not r["passed"] and r["required"]] or ["no engine ran"]
        raise CheckFailed(f"{args.build_dir}: parity with eager FP32 failed for {', '.join(failed)}")
    print(f"verify: all engines within bounds ({', '.join(report['engines'])})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
