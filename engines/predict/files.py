"""A predict run over files: open the engine (or a Triton server), read the inputs, run the batching
pipeline, write the outputs, report (docs/predict.md). Files are read ahead and written behind in a small
thread pool (a bounded queue of each), so reading and writing overlap with inference."""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from tqdm import tqdm

from engines.base import BuildInfo, Engine
from engines.predict.inputs import check_output_names, expand_inputs
from engines.predict.pipeline import Contract, LocalRunner, engine_contract, predict_jobs
from engines.predict.writers import Writer
from engines.select import Choice, choose
from icmoe.core import cli
from icmoe.core.errors import DataError, first_line
from icmoe.core.manifest import MANIFEST_NAME
from icmoe.data.images import ImageFile, Picture, read_images

log = logging.getLogger("engines.predict")  # not __name__: that is "__main__" under python -m

IO_WORKERS = 2  # threads reading and writing files beside inference
VOLUME_SUFFIXES = (".nii", ".nii.gz")  # one file, many pictures: throughput settings
MODES = ("auto", "latency", "throughput")


def open_engine(source: Path, backend: str = "auto", precision: Optional[str] = None,
                threads: Optional[int] = None, mode: str = "latency") -> Tuple[Engine, Optional[Choice]]:
    """The engine of a build directory (any backend it has) or of a checkpoint folder (eager), and why.

    Arguments:
      backend: a key of `engines.BACKENDS`, or "auto": the fastest engine of the build whose parity gates
        passed and that runs here (`engines.select.choose`; a checkpoint: eager).
      precision: an engine precision (fp32, fp16, bf16, int8, int8-bf16), or None for any.
      threads: CPU threads of the CPU engines (default: the usable cores).
      mode: "latency" or "throughput" (several requests at once, for many pictures).

    Returns:
      (engine, the Choice made; None for a checkpoint).
    """
    source = Path(source)
    if not source.is_dir():
        raise cli.UsageError(f"{source}: no such build or checkpoint folder")
    if not (source / MANIFEST_NAME).is_file():  # a checkpoint folder: only the eager model runs it
        if backend not in ("auto", "eager") or precision not in (None, "fp32"):
            raise cli.UsageError(f"{source} is a checkpoint folder (no {MANIFEST_NAME}): it runs on the eager "
                                 "backend in FP32 only; build it with `python -m export.build` for the others")
        from engines.eager import EagerEngine

        return EagerEngine.from_checkpoint(source, **({"threads": threads} if threads else {})), None
    engine, choice = choose(source, backend, precision, threads=threads, mode=mode)
    log.debug(f"predict: {choice.describe()}")
    return engine, choice


@dataclass
class PredictOptions:
    """Options of `predict_files` (the command's flags).

    Attributes:
      out: the output folder.
      backend, precision, threads: the local engine (`open_engine`); ignored with `server`.
      mode: "auto" (throughput settings for several files or a volume, else latency), "latency" or
        "throughput" (`engines.select.engine_kwargs`).
      upsample: "logits" (masks from the logits resized bilinearly, where the model has a mask rule) or
        "nearest" (the model-size mask resized).
      batch_size: pictures per batch (default 8 within the batch range).
      overlays: folder for overlay PNGs, or None.
      skip_bad: report an unreadable file and go on, instead of stopping.
      window: (low, high) intensity window for NIfTI volumes, or None (each slice's min..max).
      server, protocol, model_name, concurrency: a Triton server instead of a local engine.
      progress: show a progress bar.
    """

    out: Path
    backend: str = "auto"
    precision: Optional[str] = None
    threads: Optional[int] = None
    mode: str = "auto"
    upsample: str = "logits"
    batch_size: Optional[int] = None
    overlays: Optional[Path] = None
    skip_bad: bool = False
    window: Optional[Tuple[float, float]] = None
    server: Optional[str] = None
    protocol: Optional[str] = None
    model_name: Optional[str] = None
    concurrency: int = 1
    progress: bool = True


def run_mode(files: Sequence[Tuple[Path, Path]], mode: str) -> str:
    """"latency" or "throughput": `mode`, or for "auto" throughput where there are many pictures (several
    files, or a volume)."""
    if mode not in MODES:
        raise cli.UsageError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    many = len(files) > 1 or any(str(path).lower().endswith(VOLUME_SUFFIXES) for path, _ in files)
    return "throughput" if many else "latency"


def open_runner(source: Path, opts: PredictOptions, mode: str = "latency") -> Tuple[Any, Contract, Dict[str, Any]]:
    """(runner, contract, report header) for a local engine or a Triton server."""
    if opts.server is None:
        engine, choice = open_engine(source, opts.backend, opts.precision, opts.threads, mode)
        engine.activate()
        contract = engine_contract(engine)
        return LocalRunner(engine, owned=True), contract, {
            "engine": engine.name, "server": None, "mode": mode, "settings": engine.settings(),
            "choice": None if choice is None else choice.to_dict()}
    from engines.triton.client import (
        TritonRunner,  # tritonclient is an optional dependency
    )

    info = BuildInfo(source)
    contract = Contract.of(info.inputs, info.outputs, info.batch_range, info.class_names, info.mask_rule)
    runner = TritonRunner(opts.server, info, protocol=opts.protocol, model_name=opts.model_name,
                          concurrency=opts.concurrency,
                          outputs=contract.outputs_needed(contract.upsampling(opts.upsample)))
    return runner, contract, {"engine": runner.label, "server": opts.server, "protocol": runner.protocol,
                              "concurrency": runner.concurrency}


def read_ahead(files: Sequence[Tuple[Path, Path]], read: Any, pool: ThreadPoolExecutor,
               depth: int) -> Iterator[Tuple[Tuple[Path, Path], "Future[Any]"]]:
    """((path, rel), future of read(path)) in the files' order, at most `depth` files read ahead in `pool`."""
    queued: "deque[Tuple[Tuple[Path, Path], Future]]" = deque()
    it = iter(files)
    for item in it:
        queued.append((item, pool.submit(read, item[0])))
        if len(queued) >= depth:
            break
    while queued:
        yield queued.popleft()
        for item in it:  # refill one
            queued.append((item, pool.submit(read, item[0])))
            break


def _read_jobs(files: Sequence[Tuple[Path, Path]], opts: PredictOptions, skipped: List[Dict[str, str]],
               bar: Any, pool: ThreadPoolExecutor,
               depth: int) -> Iterator[Tuple[Tuple[ImageFile, Path], List[Picture]]]:
    """(key, pictures) of each readable file, read ahead in `pool`; unreadable ones raise, or with skip_bad are
    reported and skipped."""
    for (path, rel), future in read_ahead(files, lambda f: read_images(f, window=opts.window), pool, depth):
        try:
            file = future.result()
        except DataError as e:
            if not opts.skip_bad:
                raise
            log.error(f"error: {first_line(e)}")
            skipped.append({"path": str(path), "error": first_line(e)})
            bar.update(1)
            continue
        yield (file, rel), file.pictures


def predict_files(source: Path, inputs: Sequence[str], opts: PredictOptions) -> Dict[str, Any]:
    """Segment files, folders and glob patterns with a build, a checkpoint or a server; write masks.

    Arguments:
      source: a build directory or a checkpoint folder (with a server: the build it serves).
      inputs: see `expand_inputs`.
      opts: the options.

    Returns:
      the report: header (engine, server, image_size, batch_size, mask_kind, classes, out), `images`
      (per picture: path, frame, size, fractions, choice, seconds, mask, overlay), `skipped`, `totals`.

    Raises:
      DataError: an unreadable file (without skip_bad); UsageError: bad inputs or options; EngineError.
    """
    out = Path(opts.out)
    files = expand_inputs(inputs, skip=out)
    check_output_names(files)
    runner, contract, header = open_runner(Path(source), opts, run_mode(files, opts.mode))
    try:
        batch_size = contract.batch_size(opts.batch_size)
        runner.check_batch(batch_size)
        entries, skipped, totals = run_files(files, runner, contract, batch_size,
                                             Writer(out, opts.overlays, contract), opts)
    finally:
        runner.close()
    return {**header, "source": str(source), "image_size": contract.image_size, "batch_size": batch_size,
            "upsample": contract.upsampling(opts.upsample), "mask_rule": contract.mask_rule,
            "mask_kind": "binary" if contract.binary else "labels", "classes": [n for _, n in contract.labels],
            "out": str(out), "overlays": None if opts.overlays is None else str(opts.overlays),
            "images": entries, "skipped": skipped, "totals": totals}


def run_files(files: Sequence[Tuple[Path, Path]], runner: Any, contract: Contract, batch_size: int, writer: Writer,
              opts: PredictOptions) -> Tuple[List[Dict[str, Any]], List[Dict[str, str]], Dict[str, Any]]:
    """Read, predict and write every file (`expand_inputs`' pairs) with an open runner; returns (image entries,
    skipped files, totals: files, images, seconds of the whole, images/s)."""
    entries: List[Dict[str, Any]] = []
    skipped: List[Dict[str, str]] = []
    n_files = 0
    depth = max(4, batch_size * (runner.concurrency + 1))  # files read ahead: the batches in flight, and one more
    writes: "deque[Future]" = deque()
    t0 = time.perf_counter()
    with tqdm(total=len(files), unit="file", desc="predict", disable=not opts.progress, leave=False) as bar, \
            ThreadPoolExecutor(IO_WORKERS, thread_name_prefix="predict-io") as io:
        jobs = _read_jobs(files, opts, skipped, bar, io, depth)
        for (file, rel), preds in predict_jobs(jobs, runner, contract, batch_size=batch_size,
                                               upsampling=opts.upsample):
            writes.append(io.submit(writer.write, file, rel, preds))
            while len(writes) > IO_WORKERS or (writes and writes[0].done()):  # bounded, in order
                entries += writes.popleft().result()
                n_files += 1
                bar.update(1)
        while writes:
            entries += writes.popleft().result()
            n_files += 1
            bar.update(1)
    wall = time.perf_counter() - t0
    totals = {"files": n_files, "images": len(entries), "skipped": len(skipped), "seconds": round(wall, 3),
              "inference_seconds": round(sum(e["seconds"] for e in entries), 3),
              "images_per_s": round(len(entries) / wall, 3) if wall > 0 else None}
    return entries, skipped, totals
