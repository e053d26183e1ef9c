"""Turn IC-MoE weights into verified deployment artifacts: `python -m export.build`.

    python -m export.build                          # newest run under runs/, FP32
    python -m export.build --precision fp16         # + strongly typed FP16 graph
    python -m export.build --random-init --config vit_b --out build/latency

Stages (each shown in the progress bar and in build.log): load the weights, export the
FP32 ONNX graph, convert to FP16 (--precision fp16), build the TensorRT engine (GPU
hosts), verify parity with eager FP32, and (--triton) write a Triton model repository.

The build is assembled in a staging folder next to `--out` and swapped in only when
complete, so an interrupted or failed build never leaves a half-written directory, and
an existing build of a different model is replaced only with `--force`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

import icmoe
from export.manifest import (
    ManifestError,
    add_artifact,
    new_manifest,
    read_manifest,
    write_manifest,
)
from export.onnx_export import DEFAULT_OPSET, ExportError, export_onnx, initializer_stats
from export.precision import PrecisionError, convert_fp16
from export.rewrite import REWRITES

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch-tensorrt")
LOG_NAME = "build.log"


class BuildError(RuntimeError):
    """A build that cannot proceed; one-line message."""


def newest_run_checkpoint(runs: Path = Path("runs")) -> Optional[Path]:
    """The newest `runs/*/best` checkpoint (fallback `runs/*/last`), by modification time."""
    found = []
    for run in runs.glob("*") if runs.is_dir() else []:
        for sub in ("best", "last"):
            cfg = run / sub / "config.json"
            if cfg.is_file():
                found.append((cfg.stat().st_mtime, run / sub))
                break
    return max(found)[1] if found else None


def parse_batch(text: str) -> Tuple[int, int, int]:
    """"MIN,OPT,MAX" -> (min, opt, max) with 1 <= min <= opt <= max."""
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise BuildError(f"--batch must be MIN,OPT,MAX integers, got {text!r}") from None
    if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2]:
        raise BuildError(f"--batch must be MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got {text!r}")
    return parts  # type: ignore[return-value]


def resolve_backend(backend: str, log: Callable[[str], None]) -> str:
    """`auto` -> tensorrt where TensorRT imports and a CUDA GPU exists, else onnxruntime (says which)."""
    if backend != "auto":
        return backend
    from export.tensorrt import unavailable_reason  # light: TensorRT itself is imported inside

    why = unavailable_reason()
    chosen = "onnxruntime" if why else "tensorrt"
    log(f"backend auto: using {chosen}" + (f" ({why})" if why else ""))
    return chosen


def _check_target(out: Path, config: dict, force: bool) -> None:
    """Refuse to replace a build of another model (or a non-build folder) without --force."""
    if not out.exists():
        return
    if not out.is_dir():
        raise BuildError(f"{out}: exists and is not a directory")
    if not any(out.iterdir()):
        return
    try:
        old = read_manifest(out)
    except ManifestError as e:
        if force:
            return
        raise BuildError(f"{out}: not an IC-MoE build directory ({e}); pass --force to replace it") from None
    if old["model"]["config"] != config and not force:
        raise BuildError(
            f"{out}: holds a build of model {old['model']['name']!r} with another configuration; "
            f"pass --force to replace it or choose --out"
        )


def _swap_in(staging: Path, out: Path) -> None:
    """Replace `out` by the completed `staging` folder (old build removed only after the rename)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build(
    checkpoint: Optional[Path] = None,
    *,
    random_init: bool = False,
    config: str = "vit_b",
    precision: str = "fp32",
    out: Optional[Path] = None,
    batch: Tuple[int, int, int] = (1, 1, 8),
    backend: str = "auto",
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    rewrite: bool = True,
    verify: bool = True,
    verify_images: int = 64,
    triton: Optional[Path] = None,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Build (and verify) the deployment artifacts of an IC-MoE model.

    Arguments:
      checkpoint: checkpoint folder; None: the newest run under runs/ (unless random_init).
      random_init: export the untrained architecture `config` (seeded); its weights are kept in
        `<out>/checkpoint/` so the build can be verified.
      config: model configuration for random_init (ignored with a checkpoint).
      precision: "fp32" (model.onnx) or "fp16" (model.onnx + model.fp16.onnx).
      out: build directory; default build/<model-name>-<precision>.
      batch: (min, opt, max) dynamic batch range.
      backend: auto | onnxruntime | tensorrt | torch-tensorrt.
      opset: ONNX opset.
      force: replace an existing build of a different model.
      rewrite: apply the export-time rewrites of `export.rewrite` (same function, less work).
      verify: run the parity check (export.verify) at the end.
      verify_images: size of the parity set.
      triton: also write a Triton model repository there.
      seed: seed of the random initialisation.
      progress: show the stage progress bar.
      log: where progress lines go (they are also written to build.log).

    Returns:
      Path: the build directory.

    Raises:
      BuildError, ManifestError, ExportError, PrecisionError, icmoe.CheckpointError: one line each.
    """
    from tqdm import tqdm

    if precision not in ("fp32", "fp16"):
        raise BuildError(f"--precision must be fp32 or fp16, got {precision!r}")
    if backend not in BACKENDS:
        raise BuildError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    lines: List[str] = []

    def say(msg: str) -> None:
        stamp = _dt.datetime.now().strftime("%H:%M:%S")
        lines.append(f"{stamp} {msg}")
        log(msg)

    # Stage 0: which weights.
    if checkpoint is None and not random_init:
        checkpoint = newest_run_checkpoint()
        if checkpoint is None:
            raise BuildError(
                "no checkpoint: train one (python -m icmoe.train --dataset synthetic --config tiny --epochs 2), "
                "pass --checkpoint DIR, or use --random-init to export the untrained architecture"
            )
        say(f"checkpoint: newest run {checkpoint}")
    if checkpoint is not None and random_init:
        raise BuildError("give either --checkpoint or --random-init, not both")
    if checkpoint is not None:
        meta = icmoe.checkpoint.read_meta(checkpoint)
        cfg = meta["config"]
    else:
        cfg = icmoe.get_config(config)
    out = Path(out) if out is not None else Path("build") / f"{cfg.name}-{precision}"
    _check_target(out, cfg.to_dict(), force)
    backend = resolve_backend(backend, say)
    if batch[2] < 1 or not batch[0] <= batch[1] <= batch[2]:
        raise BuildError(f"batch range must satisfy 1 <= min <= opt <= max, got {batch}")

    stages = ["load", "onnx"] + (["fp16"] if precision == "fp16" else []) + (
        [backend] if backend in ("tensorrt", "torch-tensorrt") else []) + (["verify"] if verify else []) + (
        ["triton"] if triton else [])
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    bar = tqdm(total=len(stages), desc="build", unit="stage", disable=not progress,
               bar_format="{desc}: {n_fmt}/{total_fmt} stages |{bar}| {elapsed}")
    t_all = time.time()
    try:
        # Stage 1: weights.
        bar.set_description_str("build [load]")
        t = time.time()
        if checkpoint is not None:
            model = icmoe.load(checkpoint)
            ck = {"path": str(Path(checkpoint).resolve()), "sha256": meta["weights_sha256"], "random_init": False}
        else:
            torch.manual_seed(seed)
            model = icmoe.build_icmoe(cfg)
            icmoe.save_checkpoint(model, staging / "checkpoint", extra={"random_init": True, "seed": seed})
            ck = {"path": "checkpoint", "sha256": icmoe.checkpoint.read_meta(staging / "checkpoint")["weights_sha256"],
                  "random_init": True, "seed": seed}
        manifest = new_manifest(config=cfg.to_dict(), precision=precision, opset=opset, batch=batch, checkpoint=ck)
        manifest["backend"] = backend
        manifest["rewrites"] = list(REWRITES) if rewrite else []
        write_manifest(staging, manifest)
        say(f"load: model {cfg.name} ({'random init, seed %d' % seed if random_init else checkpoint}) "
            f"in {time.time() - t:.1f}s")
        bar.update()

        # Stage 2: FP32 ONNX graph.
        bar.set_description_str("build [onnx export]")
        t = time.time()
        export_onnx(model, staging / "model.onnx", batch=batch, opset=opset, rewrite=rewrite, log=say)
        stats = initializer_stats(staging / "model.onnx")
        add_artifact(staging, "model.onnx", kind="onnx", precision="fp32", initializers=stats)
        say(f"onnx: model.onnx ({stats['bytes'] / 2**20:.1f} MiB of initializers, {stats['count']} tensors) "
            f"in {time.time() - t:.1f}s")
        bar.update()

        # Stage 3: FP16 graph.
        if precision == "fp16":
            bar.set_description_str("build [fp16 autocast]")
            t = time.time()
            convert_fp16(staging / "model.onnx", staging / "model.fp16.onnx", log=say)
            add_artifact(staging, "model.fp16.onnx", kind="onnx", precision="fp16", tool="modelopt.onnx.autocast")
            say(f"fp16: model.fp16.onnx in {time.time() - t:.1f}s")
            bar.update()

        # Stage 4: GPU backends (H5's modules, imported only here).
        onnx_name = "model.fp16.onnx" if precision == "fp16" else "model.onnx"
        if backend == "tensorrt":
            bar.set_description_str("build [tensorrt]")
            t = time.time()
            try:
                from export.tensorrt import build_engine
            except ImportError as e:
                raise BuildError(f"--backend tensorrt is unavailable here: {e}") from None
            build_engine(staging, onnx_name=onnx_name, batch=batch, log=say)
            say(f"tensorrt: model.plan in {time.time() - t:.1f}s")
            bar.update()
        elif backend == "torch-tensorrt":
            bar.set_description_str("build [torch-tensorrt]")
            t = time.time()
            try:
                from export.torch_tensorrt import compile_and_save
            except ImportError as e:
                raise BuildError(f"--backend torch-tensorrt is unavailable here: {e}") from None
            compile_and_save(staging, model=model, batch=batch, precision=precision, log=say)
            say(f"torch-tensorrt: done in {time.time() - t:.1f}s")
            bar.update()

        # Stage 5: parity with eager FP32.
        report = None
        if verify:
            bar.set_description_str("build [verify]")
            from export.verify import verify_build

            report = verify_build(staging, n=verify_images, log=say, progress=progress)
            manifest = read_manifest(staging)
            manifest["verify"] = {k: v for k, v in report.items() if k != "build_dir"}
            write_manifest(staging, manifest)
            bar.update()

        say(f"build: {out} complete in {time.time() - t_all:.1f}s")
        _write_log(staging, lines)
        _swap_in(staging, out)
        if triton:
            bar.set_description_str("build [triton]")
            try:
                from engines.triton import make_repository
            except ImportError as e:
                raise BuildError(f"--triton is unavailable here: {e}") from None
            make_repository(out, triton, log=say)
            _write_log(out, lines)
            bar.update()
        if report is not None and not report["passed"]:
            failed = [k for k, r in report["engines"].items() if not r["passed"]]
            raise BuildError(f"{out}: built, but parity with eager FP32 failed for {', '.join(failed)} (see {LOG_NAME})")
        return out
    finally:
        bar.close()
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _write_log(build_dir: Path, lines: Sequence[str]) -> None:
    from icmoe.io import atomic_write_bytes

    atomic_write_bytes(build_dir / LOG_NAME, ("\n".join(lines) + "\n").encode())


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.build", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, default=None,
                     help="checkpoint folder (default: the newest runs/*/best)")
    src.add_argument("--random-init", action="store_true", help="export the untrained architecture (latency work)")
    p.add_argument("--config", default="vit_b", help="configuration for --random-init: vit_b or tiny (default vit_b)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--out", type=Path, default=None, help="build directory (default build/<model>-<precision>)")
    p.add_argument("--batch", default="1,1,8", help="dynamic batch range MIN,OPT,MAX (default 1,1,8)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: TensorRT where it and a GPU exist, else ONNX Runtime")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--force", action="store_true", help="replace an existing build of a different model")
    p.add_argument("--no-rewrite", action="store_true",
                   help="export SAM's windowed attention as is, padded projections included (export.rewrite)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check")
    p.add_argument("--verify-images", type=int, default=64, help="parity images (default 64)")
    p.add_argument("--triton", type=Path, default=None, metavar="DIR", help="also write a Triton model repository")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init")
    args = p.parse_args(argv)
    try:
        out = build(
            args.checkpoint, random_init=args.random_init, config=args.config, precision=args.precision,
            out=args.out, batch=parse_batch(args.batch), backend=args.backend, opset=args.opset, force=args.force,
            rewrite=not args.no_rewrite, verify=not args.no_verify, verify_images=args.verify_images,
            triton=args.triton, seed=args.seed,
        )
    except (BuildError, ManifestError, ExportError, PrecisionError, icmoe.CheckpointError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:  # engines' errors (EngineError, InputError) during verify
        from engines import EngineError, InputError

        if isinstance(e, (EngineError, InputError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    print(f"build: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
