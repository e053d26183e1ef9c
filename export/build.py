"""Turn model weights into verified deployment artifacts: `python -m export.build`.

Details: docs/export.md.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from engines.openvino import cache_precisions, write_cache
from engines.openvino import unavailable_reason as openvino_unavailable
from engines.tensorrt import unavailable_reason
from engines.triton import RepositoryOptions, make_repository
from export.onnx_export import DEFAULT_OPSET, export_onnx, initializer_stats
from export.precision import convert_fp16, fp16_unavailable
from export.quantize import ATTENTION_MODES, int8_unavailable, quantize_build
from export.rewrite import REWRITES
from export.tensorrt import EngineSettings, build_engine
from export.torch_tensorrt import compile_and_save
from export.verify import add_tolerance_args, tolerance_overrides, verify_build
from icmoe.checkpoint import load, read_meta, save_checkpoint
from icmoe.core import cli
from icmoe.core.errors import CheckFailed, IcmoeError
from icmoe.core.io import atomic_write_bytes, give_default_mode
from icmoe.core.manifest import (
    CHECKPOINT_DIR,
    LOG_NAME,
    ONNX_GRAPHS,
    PRECISIONS,
    ManifestError,
    add_artifact,
    model_label,
    new_manifest,
    read_manifest,
    write_manifest,
)
from icmoe.families import DEFAULT_CONFIG, DEFAULT_FAMILY, Family, add_model_args, get_family

log = logging.getLogger(__name__)
BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt", "torch-tensorrt")
CALIBRATION_SEED = 0  # the draw of the calibration images (recorded in the manifest)


class BuildError(IcmoeError, RuntimeError):
    """A build that cannot proceed; one-line message."""


class ParityFailed(CheckFailed):
    """The build's engines are outside their parity gates; the previous build is untouched."""


@dataclass
class BuildOptions:
    """Everything `build` needs; the CLI's flags map one to one onto these fields.

    Attributes:
      checkpoint: checkpoint folder; None: the newest run under runs/ (unless random_init).
      random_init: export the untrained architecture `model`/`config` (seeded).
      model, config: family and size variant for random_init (a checkpoint names its own).
      precision: "fp32" (model.onnx), "fp16" (model.onnx + model.fp16.onnx) or "int8" (model.onnx +
        model.int8.onnx, the QDQ graph + model.int8.xml/.bin, NNCF's OpenVINO IR), or several
        comma-separated ("fp16,int8": both beside the FP32 graph; the first is the build's precision, the
        graph TensorRT builds from).
      out: build directory; default build/<family>-<config>-<precisions joined by "+">.
      batch: (min, opt, max) dynamic batch range.
      backend: auto | onnxruntime | openvino (also compiles OpenVINO's caches) | tensorrt | torch-tensorrt.
      opset: ONNX opset.
      force: replace an existing build of a different model.
      rewrite: apply the export-time rewrites of `export.rewrite` (same function, less work).
      variant: export this eager variant of the family instead of its default structure (the same
        function in another graph form; e.g. MoE-SAM's "dense" MoE for backends that reject
        data-dependent gathers); None: the default.
      verify, verify_images, tolerances: the parity stage, its set size and gate overrides.
      triton: also write a Triton model repository there.
      seed: seed of the random initialisation.
      progress: show the stage progress bar.
      engine: TensorRT builder settings.
      calibration: INT8 calibration images: a dataset folder or name the family reads; None: the
        family's synthetic set.
      calibration_size: how many calibration images (drawn seeded from the training split).
      int8_attention: the INT8 graphs' products of two activations (attention): "auto" (quantized, kept in
        floating point where a trained model's INT8 gates then fail), "quantize" or "keep".
    """

    checkpoint: Optional[Path] = None
    random_init: bool = False
    model: str = DEFAULT_FAMILY
    config: str = DEFAULT_CONFIG
    precision: str = "fp32"
    out: Optional[Path] = None
    batch: Tuple[int, int, int] = (1, 1, 8)
    backend: str = "auto"
    opset: int = DEFAULT_OPSET
    force: bool = False
    rewrite: bool = True
    variant: Optional[str] = None
    verify: bool = True
    verify_images: int = 64
    tolerances: Dict[str, float] = field(default_factory=dict)
    triton: Optional[Path] = None
    seed: int = 0
    progress: bool = True
    engine: EngineSettings = EngineSettings()
    calibration: Optional[str] = None
    calibration_size: int = 64
    int8_attention: str = "auto"


@dataclass
class BuildState:
    """What the stages share: the options, the model, and the staging folder they fill."""

    options: BuildOptions
    family: Family
    config: Any
    out: Path
    backend: str
    staging: Path = Path()
    triton_staging: Optional[Path] = None  # the Triton repository's models, staged next to --triton
    created: List[Path] = field(default_factory=list)  # folders made for the outputs (removed on failure)
    model: Any = None
    report: Optional[Dict[str, Any]] = None
    calibration: Any = None  # INT8 calibration images, float32 (n, 3, S, S)


@dataclass(frozen=True)
class Stage:
    """A named build step: runs when `applies(state)`; `run(state)` fills `state.staging`."""

    name: str
    run: Callable[[BuildState], None]
    applies: Callable[[BuildState], bool] = lambda state: True


# ------------------------------------------------------------------------------------------ inputs


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


def precisions(text: str) -> List[str]:
    """"fp16,int8" -> ["fp16", "int8"]: the graph precisions of a build, the first its own; one-line errors."""
    items = [p.strip() for p in str(text).split(",") if p.strip()]
    bad = [p for p in items if p not in PRECISIONS]
    if not items or bad or len(set(items)) != len(items):
        raise BuildError(f"--precision must be one or more of {', '.join(PRECISIONS)}, comma-separated, each once; "
                         f"got {text!r}")
    return items


def parse_batch(text: str) -> Tuple[int, int, int]:
    """"MIN,OPT,MAX" -> (min, opt, max) with 1 <= min <= opt <= max."""
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise BuildError(f"--dynamic-batch must be MIN,OPT,MAX integers, got {text!r}") from None
    if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2]:
        raise BuildError(f"--dynamic-batch must be MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got {text!r}")
    return parts  # type: ignore[return-value]


def resolve_backend(backend: str) -> str:
    """`auto` -> tensorrt where TensorRT imports and a CUDA GPU exists, else onnxruntime (says which)."""
    if backend != "auto":
        return backend
    why = unavailable_reason()
    chosen = "onnxruntime" if why else "tensorrt"
    log.info(f"backend auto: using {chosen}" + (f" ({why})" if why else ""))
    return chosen


def _check_target(out: Path, family: str, config: Dict[str, Any], force: bool) -> None:
    """Refuse to replace a build of another model (or a non-build folder) without --force."""
    if not out.exists() or force:
        return
    if not out.is_dir():
        raise BuildError(f"{out}: exists and is not a directory")
    if not any(out.iterdir()):
        return
    try:
        old = read_manifest(out)
    except ManifestError as e:
        raise BuildError(f"{out}: not a build directory ({e}); pass --force to replace it") from None
    if old["model"]["family"] != family or old["model"]["config"] != config:
        raise BuildError(f"{out}: holds a build of {model_label(old)} with another model or configuration; "
                         f"pass --force to replace it or choose --out")


def _check_folder_target(path: Path, flag: str) -> None:
    """Refuse a folder target that cannot become a folder: it, or the nearest part of it that exists, is a file."""
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                what = "exists and is not a directory" if part == path else f"{part} is not a directory"
                raise BuildError(f"{flag} {path}: {what}")
            return


def prepare(options: BuildOptions) -> BuildState:
    """Check the options and find the model; nothing is written yet."""
    precisions(options.precision)  # a one-line error for an unknown one
    if options.backend not in BACKENDS:
        raise BuildError(f"--backend must be one of {', '.join(BACKENDS)}, got {options.backend!r}")
    bmin, bopt, bmax = options.batch
    if not 1 <= bmin <= bopt <= bmax:
        raise BuildError(f"batch range must satisfy 1 <= min <= opt <= max, got {options.batch}")
    if options.checkpoint is not None and options.random_init:
        raise BuildError("give either --checkpoint or --random-init, not both")
    if options.checkpoint is None and not options.random_init:
        options.checkpoint = newest_run_checkpoint()
        if options.checkpoint is None:
            raise BuildError("no checkpoint: train one (python -m icmoe.train --dataset synthetic --config tiny), "
                             "pass --checkpoint DIR, or use --random-init to export the untrained architecture")
        log.info(f"checkpoint: newest run {options.checkpoint}")
    if options.checkpoint is not None:
        meta = read_meta(options.checkpoint)
        family, config = get_family(meta["family"]), meta["config"]
    else:
        family = get_family(options.model)
        config = family.get_config(options.config)
    if options.variant not in (None, family.eager_name, *family.variants):
        raise BuildError(f"{family.name} has no variant {options.variant!r} (has: {', '.join(family.variants) or 'none'})")
    name = f"{family.name}-{config.name}-{'+'.join(precisions(options.precision))}"
    out = Path(options.out) if options.out else Path("build") / name
    _check_target(out, family.name, config.to_dict(), options.force)
    if options.triton is not None:
        _check_folder_target(Path(options.triton), "--triton")
    if "fp16" in precisions(options.precision) and fp16_unavailable():  # before minutes of export, not after
        raise BuildError(f"--precision fp16: {fp16_unavailable()}")
    _check_int8(options)
    backend = resolve_backend(options.backend)
    why = unavailable_reason() if backend in ("tensorrt", "torch-tensorrt") else None
    why = why or (openvino_unavailable() if backend == "openvino" else None)
    if why:  # say so before minutes of export, not after
        raise BuildError(f"--backend {backend} is unavailable here: {why}")
    return BuildState(options=options, family=family, config=config, out=out, backend=backend)


def _check_int8(options: BuildOptions) -> None:
    """INT8 options, checked before anything is written: the packages, the calibration count and source."""
    if "int8" not in precisions(options.precision):
        if options.calibration is not None:
            raise BuildError("--calibration applies to --precision int8 only")
        return
    why = int8_unavailable()
    if why:
        raise BuildError(f"--precision int8: {why}")
    if options.calibration_size < 1:
        raise BuildError(f"--calibration-size must be >= 1, got {options.calibration_size}")


# ------------------------------------------------------------------------------------------ stages


def _place_checkpoint(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder into the build, hard-linking the weights where the filesystem allows."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("."):
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)


def stage_load(state: BuildState) -> None:
    """The weights: a copy of the checkpoint (or the seeded random init) in `<build>/checkpoint/`."""
    o, ck_dir = state.options, state.staging / CHECKPOINT_DIR
    if o.checkpoint is not None:
        _place_checkpoint(Path(o.checkpoint), ck_dir)
        state.model = load(ck_dir)
        ck = {"random_init": False, "source": str(Path(o.checkpoint).resolve())}
    else:
        torch.manual_seed(o.seed)
        state.model = state.family.build(state.config)
        save_checkpoint(state.model, ck_dir, extra={"random_init": True, "seed": o.seed})
        ck = {"random_init": True, "seed": o.seed}
    ck.update(path=CHECKPOINT_DIR, sha256=read_meta(ck_dir)["weights_sha256"])
    held = precisions(o.precision)
    manifest = new_manifest(family=state.family.name, config=state.config.to_dict(), precision=held[0],
                            precisions=held, mask_rule=state.family.graph.mask_rule(state.config),
                            inputs=state.family.graph.inputs(state.config), outputs=state.family.graph.outputs(state.config),
                            opset=o.opset, batch=o.batch, checkpoint=ck,
                            class_names=state.family.graph.class_names(state.config),
                            segment_codes=state.family.graph.segment_codes(state.config))
    manifest.update(backend=state.backend, rewrites=list(REWRITES) if o.rewrite else [], variant=o.variant)
    write_manifest(state.staging, manifest)
    log.info(f"load: {state.family.title} {state.config.name} "
             f"({'random init, seed %d' % o.seed if o.checkpoint is None else o.checkpoint})")


def stage_onnx(state: BuildState) -> None:
    model = state.family.variant(state.model, state.options.variant)  # the same weights
    path = export_onnx(model, state.staging / ONNX_GRAPHS["fp32"], batch=state.options.batch,
                       opset=state.options.opset, rewrite=state.options.rewrite)
    stats = initializer_stats(path)
    add_artifact(state.staging, path.name, kind="onnx", precision="fp32", initializers=stats)
    log.info(f"onnx: {path.name} ({stats['bytes'] / 2**20:.1f} MiB of initializers, {stats['count']} tensors)")


def stage_calibration(state: BuildState) -> None:
    """The INT8 calibration images: real ones from --calibration (the family's readers), else its synthetic set."""
    o, size = state.options, int(state.config.image_size)
    if o.calibration is None:
        state.calibration = state.family.parity.synthetic_inputs(o.calibration_size, size, CALIBRATION_SEED)
    else:
        state.calibration = state.family.precision.calibration_images(o.calibration, o.calibration_size, size, CALIBRATION_SEED)
    log.info(f"calibration: {len(state.calibration)} images from {o.calibration or 'the synthetic set'}")


def stage_int8(state: BuildState) -> None:
    o = state.options
    source = "synthetic" if o.calibration is None else str(Path(o.calibration).resolve() if Path(o.calibration).is_dir()
                                                                 else o.calibration)
    graph = state.family.graph
    quantize_build(state.staging, family=state.family, inputs=graph.inputs(state.config),
                   outputs=graph.outputs(state.config), batch=(o.batch[0], o.batch[2]),
                   class_names=graph.class_names(state.config), images=state.calibration, progress=o.progress,
                   attention=o.int8_attention, trained=o.checkpoint is not None,
                   calibration={"source": source, "images": int(len(state.calibration)), "seed": CALIBRATION_SEED})


def stage_openvino(state: BuildState) -> None:
    """OpenVINO's compiled models for this host, one per graph it runs (see engines.openvino)."""
    for precision in cache_precisions(read_manifest(state.staging)):
        write_cache(state.staging, precision)


def stage_fp16(state: BuildState) -> None:
    dst = state.staging / ONNX_GRAPHS["fp16"]
    convert_fp16(state.staging / ONNX_GRAPHS["fp32"], dst, family=state.family,
                 inputs=state.family.graph.inputs(state.config), outputs=state.family.graph.outputs(state.config))
    add_artifact(state.staging, dst.name, kind="onnx", precision="fp16", tool="modelopt.onnx.autocast")
    log.info(f"fp16: {dst.name}")


def stage_family_steps(state: BuildState) -> None:
    """Steps the family adds (e.g. extra artifacts), in its order."""
    for name, step in state.family.precision.build_steps:
        step(state.staging, state.model, read_manifest(state.staging))
        log.info(f"{name}: done")


def stage_tensorrt(state: BuildState) -> None:
    build_engine(state.staging, onnx_name=ONNX_GRAPHS[precisions(state.options.precision)[0]],
                 batch=state.options.batch,
                 settings=state.options.engine)


def stage_torch_tensorrt(state: BuildState) -> None:
    compile_and_save(state.staging, model=state.model, batch=state.options.batch,
                     precision=precisions(state.options.precision)[0],
                     optimization_level=state.options.engine.optimization_level)


def stage_verify(state: BuildState) -> None:
    o = state.options
    report = verify_build(state.staging, n=o.verify_images, overrides=o.tolerances, progress=o.progress)
    manifest = read_manifest(state.staging)
    manifest["verify"] = {k: v for k, v in report.items() if k != "build_dir"}
    write_manifest(state.staging, manifest)
    state.report = report
    if not report["passed"]:
        failed = [k for k, r in report["engines"].items() if not r["passed"] and r["required"]] or ["no engine ran"]
        raise ParityFailed(f"parity with eager FP32 failed for {', '.join(failed)} (see {LOG_NAME})")


def stage_triton(state: BuildState) -> None:
    """The model repository, staged in a folder next to the --triton target (never inside the build);
    its models are moved into the target together with the build's swap (`_commit`)."""
    target = Path(state.options.triton)
    state.created += _make_folders(target.parent)
    state.triton_staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    give_default_mode(state.triton_staging)
    make_repository(state.staging, state.triton_staging, options=RepositoryOptions())


STAGES: List[Stage] = [
    # First: a calibration source that cannot be read stops the build before anything is written.
    Stage("calibration", stage_calibration, lambda s: "int8" in precisions(s.options.precision)),
    Stage("load", stage_load),
    Stage("onnx", stage_onnx),
    Stage("fp16", stage_fp16, lambda s: "fp16" in precisions(s.options.precision)),
    Stage("int8", stage_int8, lambda s: "int8" in precisions(s.options.precision)),
    Stage("family", stage_family_steps, lambda s: bool(s.family.precision.build_steps)),
    Stage("openvino", stage_openvino, lambda s: s.backend == "openvino"),
    Stage("tensorrt", stage_tensorrt, lambda s: s.backend == "tensorrt"),
    Stage("torch-tensorrt", stage_torch_tensorrt, lambda s: s.backend == "torch-tensorrt"),
    Stage("verify", stage_verify, lambda s: s.options.verify),
    Stage("triton", stage_triton, lambda s: s.options.triton is not None),
]


# ------------------------------------------------------------------------------------------ driver


@contextlib.contextmanager
def _captured_log(lines: List[str]) -> Iterator[None]:
    """Collect every log line of the toolkit's loggers for build.log (they still go where they went)."""

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{_dt.datetime.now():%H:%M:%S} {record.getMessage()}")

    handler = ListHandler(logging.INFO)
    loggers = [logging.getLogger(n) for n in cli.LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)  # build.log is complete even when the terminal is quiet
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def _make_folders(folder: Path) -> List[Path]:
    """Create `folder` and its missing parents; returns the ones created, outermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove(path: Path) -> None:
    """Remove a file or a folder tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _moves(state: BuildState) -> List[Tuple[Path, Path]]:
    """(staged, target) renames that put a finished build in place: the Triton models, then the build."""
    moves: List[Tuple[Path, Path]] = []
    if state.triton_staging is not None:
        target = Path(state.options.triton)
        if target.is_dir():  # an existing repository: its other models stay, same-named ones are replaced
            moves += [(m, target / m.name) for m in sorted(state.triton_staging.iterdir())]
        else:
            moves.append((state.triton_staging, target))
    return moves + [(state.staging, state.out)]


def _commit(moves: List[Tuple[Path, Path]]) -> None:
    """Rename every staged path onto its target, all or none: a target that exists is set aside first and
    removed only once every rename succeeded; if one fails, the renames done are undone in reverse."""
    done: List[Tuple[Path, Path, Optional[Path]]] = []
    try:
        for staged, target in moves:
            old = None
            if target.exists() or target.is_symlink():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
            done.append((staged, target, old))
            os.replace(staged, target)
    except BaseException:
        for staged, target, old in reversed(done):
            if not staged.exists() and target.exists():
                os.replace(target, staged)
            if old is not None:
                os.replace(old, target)
        raise
    for _, target, old in done:
        if old is not None:
            _remove(old)
        log.info(f"wrote {target}")


def _keep_failed(staging: Path, out: Path) -> Path:
    failed = out.with_name(f"{out.name}.failed")
    _remove(failed)
    os.replace(staging, failed)
    return failed


def _clean_up(state: BuildState, committed: bool) -> None:
    """Remove the staging folders; after a failure, also the folders made for the outputs (if still empty)."""
    shutil.rmtree(state.staging, ignore_errors=True)
    if state.triton_staging is not None:
        shutil.rmtree(state.triton_staging, ignore_errors=True)
    if not committed:
        for folder in reversed(state.created):
            with contextlib.suppress(OSError):
                folder.rmdir()


def build(checkpoint: Optional[Path] = None, **fields: Any) -> Path:
    """Build (and verify) the deployment artifacts of a model; see `BuildOptions` for the fields.

    Returns:
      Path: the build directory.

    Raises:
      IcmoeError (BuildError, ManifestError, ExportError, ...): one line; ParityFailed (a
      CheckFailed) when the engines are outside their gates. On any failure the previous build
      and Triton repository are untouched, and the failed build is kept in `<out>.failed/` when a
      stage had started. Every stage writes into staging folders (next to `out` and to `triton`); only
      when all passed are they renamed into place, together (`_commit`).
    """
    state = prepare(BuildOptions(checkpoint=checkpoint, **fields))
    stages = [s for s in STAGES if s.applies(state)]
    state.created = _make_folders(state.out.parent)
    state.staging = Path(tempfile.mkdtemp(prefix=f".{state.out.name}.staging-", dir=state.out.parent))
    give_default_mode(state.staging)
    lines: List[str] = []
    bar = tqdm(total=len(stages), desc="build", unit="stage", disable=not state.options.progress,
               bar_format="{desc}: {n_fmt}/{total_fmt} stages |{bar}| {elapsed}")
    t_all = time.time()
    committed = False
    try:
        with _captured_log(lines):
            for stage in stages:
                bar.set_description_str(f"build [{stage.name}]")
                t = time.time()
                stage.run(state)
                log.info(f"stage {stage.name}: {time.time() - t:.1f}s")
                bar.update()
            log.info(f"build: {state.out} complete in {time.time() - t_all:.1f}s")
        atomic_write_bytes(state.staging / LOG_NAME, ("\n".join(lines) + "\n").encode())
        _commit(_moves(state))
        committed = True
        return state.out
    except IcmoeError as e:
        if (state.staging / "manifest.json").is_file():
            atomic_write_bytes(state.staging / LOG_NAME, ("\n".join(lines) + f"\nfailed: {e}\n").encode())
            kept = _keep_failed(state.staging, state.out)
            raise type(e)(f"{e}; {state.out} is untouched, the failed build is kept in {kept}") from e
        raise
    finally:
        bar.close()
        _clean_up(state, committed)


def _options(args) -> Dict[str, Any]:
    engine = EngineSettings(optimization_level=args.opt_level, version_compatible=args.version_compatible,
                            hardware_compatible=args.hardware_compatible,
                            workspace_bytes=int(args.workspace * 2**20) if args.workspace else None,
                            timing_cache_dir=args.timing_cache, progress=not args.no_progress,
                            passes=not args.no_graph_passes)
    return dict(random_init=args.random_init, model=args.model, config=args.config, precision=args.precision,
                out=args.out, batch=parse_batch(args.dynamic_batch), backend=args.backend, opset=args.opset,
                force=args.force, rewrite=not args.no_rewrite, variant=args.variant, verify=not args.no_verify,
                verify_images=args.verify_images, tolerances=tolerance_overrides(args), triton=args.triton,
                seed=args.seed, progress=not args.no_progress, engine=engine, calibration=args.calibration,
                calibration_size=args.calibration_size, int8_attention=args.int8_attention)


def _parser():
    p = cli.parser("python -m export.build", __doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: the newest runs/*/best)")
    src.add_argument("--random-init", action="store_true", help="export the untrained architecture (latency work)")
    add_model_args(p, config_help="size variant for --random-init (a checkpoint names its own)")
    p.add_argument("--precision", default="fp32", metavar="P[,P]",
                   help=f"graphs beside FP32, one or several comma-separated of {', '.join(PRECISIONS)} "
                        "(e.g. fp16,int8; the first is the build's precision; default fp32)")
    p.add_argument("--out", type=Path, default=None,
                   help="build directory (default build/<model>-<config>-<precisions joined by +>)")
    p.add_argument("--dynamic-batch", default="1,1,8", metavar="MIN,OPT,MAX",
                   help="the graphs' dynamic batch range (default 1,1,8)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: TensorRT where it and a GPU exist, else ONNX Runtime; openvino: also compile "
                        "OpenVINO's caches for this host")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--force", action="store_true", help="replace an existing build of a different model")
    p.add_argument("--no-rewrite", action="store_true",
                   help="export SAM's windowed attention as is, padded projections included (export.rewrite)")
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="export another graph form of the same weights, one of the family's eager variants "
                        "(see docs/families.md, Eager variants; default: the family's own structure)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check")
    p.add_argument("--verify-images", type=int, default=64, help="parity images (default 64)")
    add_tolerance_args(p)
    p.add_argument("--triton", type=Path, default=None, metavar="DIR", help="also write a Triton model repository")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init")
    q = p.add_argument_group("INT8 (--precision int8)")
    q.add_argument("--calibration", default=None, metavar="DIR_OR_DATASET",
                   help="calibration images: a dataset folder or name the model family reads (2-D: isic, busi, glas, "
                        "synthetic or a plain image folder; 3-D: acdc, btcv, mmwhs, synapse, synthetic3d); "
                        "default: the family's synthetic set")
    q.add_argument("--calibration-size", type=int, default=64, metavar="N",
                   help="calibration images, drawn seeded from the training split (default 64)")
    q.add_argument("--int8-attention", choices=ATTENTION_MODES, default="auto",
                   help="products of two activations (attention): auto quantizes them unless a trained model's "
                        "INT8 gates then fail (default), quantize, or keep them in floating point")
    trt = p.add_argument_group("TensorRT builder (--backend tensorrt / torch-tensorrt)")
    trt.add_argument("--opt-level", type=int, default=3, choices=range(6), help="builder optimization level (default 3)")
    trt.add_argument("--workspace", type=float, default=None, metavar="MIB", help="workspace memory limit in MiB")
    trt.add_argument("--timing-cache", type=Path, default=None, metavar="DIR",
                     help="timing-cache folder (default ~/.cache/icmoe/tensorrt)")
    trt.add_argument("--version-compatible", action="store_true", help="engine runs on later TensorRT versions")
    trt.add_argument("--hardware-compatible", action="store_true", help="engine runs on any Ampere or newer GPU")
    trt.add_argument("--no-graph-passes", action="store_true", help="skip the family's graph passes (e.g. a fused plugin)")
    cli.add_progress(p)
    return p


def _main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    cli.setup_logging(args.verbosity)
    out = build(args.checkpoint, **_options(args))
    print(f"build: {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
