"""A predict run over files: open the engine (or a Triton server), read the inputs, run the batching
pipeline, write the outputs, report (docs/predict.md)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from tqdm import tqdm

from engines import load_engine
from engines.base import BuildInfo, Engine, EngineError
from engines.predict.inputs import check_output_names, expand_inputs
from engines.predict.journal import Journal, model_digest, open_journal, remove_temporaries
from engines.predict.pipeline import MASK_OUTPUT, Contract, LocalRunner, engine_contract, predict_jobs
from engines.predict.writers import Writer
from icmoe.core import cli
from icmoe.core.errors import DataError, first_line
from icmoe.core.manifest import MANIFEST_NAME
from icmoe.data.images import ImageFile, Picture, read_images

log = logging.getLogger("engines.predict")  # not __name__: that is "__main__" under python -m

PLAN_ARTIFACT = "model.plan"


def open_engine(source: Path, backend: str = "auto", precision: Optional[str] = None,
                threads: Optional[int] = None) -> Engine:
    """The engine of a build directory (any backend it has) or of a checkpoint folder (eager).

    Arguments:
      backend: a key of `engines.BACKENDS`, or "auto": TensorRT where the build has a plan this host can
        run, else ONNX Runtime (a checkpoint: eager).
      threads: CPU threads of the eager and ONNX Runtime engines (default: the usable cores).
    """
    source = Path(source)
    if not source.is_dir():
        raise cli.UsageError(f"{source}: no such build or checkpoint folder")
    cpu_kw = {"threads": threads} if threads else {}
    if not (source / MANIFEST_NAME).is_file():  # a checkpoint folder: only the eager model runs it
        if backend not in ("auto", "eager") or precision not in (None, "fp32"):
            raise cli.UsageError(f"{source} is a checkpoint folder (no {MANIFEST_NAME}): it runs on the eager "
                                 "backend in FP32 only; build it with `python -m export.build` for the others")
        from engines.eager import EagerEngine

        return EagerEngine.from_checkpoint(source, **cpu_kw)
    if backend == "auto":
        if PLAN_ARTIFACT in BuildInfo(source).manifest.get("artifacts", {}):
            try:
                return load_engine(source, "tensorrt", precision)
            except EngineError as e:
                log.info(f"TensorRT cannot run here ({first_line(e)}); using ONNX Runtime")
        backend = "onnxruntime"
    return load_engine(source, backend, precision, **(cpu_kw if backend in ("eager", "onnxruntime") else {}))


@dataclass
class PredictOptions:
    """Options of `predict_files` (the command's flags).

    Attributes:
      out: the output folder.
      backend, precision, threads: the local engine (`open_engine`); ignored with `server`.
      batch_size: pictures per batch (default 8 within the batch range).
      overlays: folder for overlay PNGs, or None.
      skip_bad: report an unreadable file and go on, instead of stopping.
      window: (low, high) intensity window for NIfTI volumes, or None (each slice's min..max).
      server, protocol, model_name, concurrency: a Triton server instead of a local engine.
      progress: show a progress bar.
      resume: skip the inputs an earlier run into `out` finished (engines/predict/journal.py).
      report_images: keep every picture's entry for the report's `images` (about 1.7 KiB a file); False
        (the command without --json) keeps the totals only, so memory stays flat however many files.
    """

    out: Path
    backend: str = "auto"
    precision: Optional[str] = None
    threads: Optional[int] = None
    batch_size: Optional[int] = None
    overlays: Optional[Path] = None
    skip_bad: bool = False
    window: Optional[Tuple[float, float]] = None
    server: Optional[str] = None
    protocol: Optional[str] = None
    model_name: Optional[str] = None
    concurrency: int = 1
    progress: bool = True
    resume: bool = False
    report_images: bool = True


def open_runner(source: Path, opts: PredictOptions) -> Tuple[Any, Contract, Dict[str, Any]]:
    """(runner, contract, report header) for a local engine or a Triton server."""
    if opts.server is None:
        engine = open_engine(source, opts.backend, opts.precision, opts.threads).activate()
        contract = engine_contract(engine)
        return LocalRunner(engine, owned=True), contract, {"engine": engine.name, "server": None}
    from engines.triton.client import (
        TritonRunner,  # tritonclient is an optional dependency
    )

    info = BuildInfo(source)
    contract = Contract.of(info.inputs, info.outputs, info.batch_range, info.class_names)
    runner = TritonRunner(opts.server, info, protocol=opts.protocol, model_name=opts.model_name,
                          concurrency=opts.concurrency, outputs=(MASK_OUTPUT,) + contract.choice)
    return runner, contract, {"engine": runner.label, "server": opts.server, "protocol": runner.protocol,
                              "concurrency": runner.concurrency}


def _read_jobs(files: Sequence[Tuple[Path, Path]], opts: PredictOptions, skipped: List[Dict[str, str]],
               bar: Any) -> Iterator[Tuple[Tuple[ImageFile, Path], List[Picture]]]:
    """(key, pictures) of each readable file; unreadable ones raise, or with skip_bad are reported and skipped."""
    for path, rel in files:
        try:
            file = read_images(path, window=opts.window)
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

    Every finished file is recorded in the run's journal (`engines.predict.journal`); with `opts.resume`
    the files an earlier run finished are skipped, their report entries taken from the journal.

    Arguments:
      source: a build directory or a checkpoint folder (with a server: the build it serves).
      inputs: see `expand_inputs`.
      opts: the options.

    Returns:
      the report: header (engine, server, image_size, batch_size, mask_kind, classes, out), `images`
      (per picture: path, frame, size, fractions, choice, seconds, mask, overlay), `skipped`, `totals`.

    Raises:
      DataError: an unreadable file (without skip_bad); UsageError: bad inputs or options; EngineError;
      WriteError: an output that cannot be written (a full disk), named.
    """
    out = Path(opts.out)
    files = expand_inputs(inputs, skip=out)
    check_output_names(files)
    runner, contract, header = open_runner(Path(source), opts)
    try:
        batch_size = contract.batch_size(opts.batch_size)
        runner.check_batch(batch_size)
        journal = _journal(Path(source), out, header, contract, opts)
        todo, resumed = _resumed(files, journal)
        try:
            by_file, skipped, totals = _run(todo, runner, contract, batch_size,
                                            Writer(out, opts.overlays, contract), opts, journal)
        finally:
            journal.close()
    finally:
        runner.close()
    entries = [e for path, _ in files for e in resumed.get(path, by_file.get(path, []))] if opts.report_images else []
    totals.update(files=totals["files"] + len(resumed), resumed=len(resumed),
                  images=totals["images"] + sum(len(v) for v in resumed.values()))
    return {**header, "source": str(source), "image_size": contract.image_size, "batch_size": batch_size,
            "mask_kind": "binary" if contract.binary else "labels", "classes": [n for _, n in contract.labels],
            "out": str(out), "overlays": None if opts.overlays is None else str(opts.overlays),
            "images": entries, "skipped": skipped, "totals": totals}


def _journal(source: Path, out: Path, header: Dict[str, Any], contract: Contract, opts: PredictOptions) -> Journal:
    """The run's journal, headed by everything that changes the outputs (a resume must match it)."""
    what = {"source": str(source.resolve()), "model": model_digest(source), "engine": header["engine"],
            "classes": [n for _, n in contract.labels], "window": opts.window,
            "overlays": None if opts.overlays is None else str(Path(opts.overlays).resolve())}
    journal = open_journal(out, what, resume=opts.resume)
    if opts.resume and remove_temporaries([out, opts.overlays]):
        log.info("--resume: removed the temporary files of the interrupted run")
    return journal


def _resumed(files: Sequence[Tuple[Path, Path]], journal: Journal) -> Tuple[List[Tuple[Path, Path]],
                                                                            Dict[Path, List[Dict[str, Any]]]]:
    """(files still to do, report entries of the files the journal holds as finished and intact)."""
    todo, done = [], {}
    for path, rel in files:
        record = journal.finished(path)
        if record is None:
            todo.append((path, rel))
        else:
            done[path] = record["entries"]
    if done:
        log.info(f"--resume: {len(done)} of {len(files)} files already done")
    return todo, done


def _run(files: Sequence[Tuple[Path, Path]], runner: Any, contract: Contract, batch_size: int, writer: Writer,
         opts: PredictOptions, journal: Journal) -> Tuple[Dict[Path, List[Dict[str, Any]]], List[Dict[str, str]],
                                                          Dict[str, Any]]:
    """Read, predict and write every file, each recorded in the journal once written; returns (image
    entries by file, kept only with `opts.report_images`; skipped files; totals)."""
    by_file: Dict[Path, List[Dict[str, Any]]] = {}
    skipped: List[Dict[str, str]] = []
    n_files, n_images, inference = 0, 0, 0.0
    t0 = time.perf_counter()
    with tqdm(total=len(files), unit="file", desc="predict", disable=not opts.progress, leave=False) as bar:
        for (file, rel), preds in predict_jobs(_read_jobs(files, opts, skipped, bar), runner, contract,
                                               batch_size=batch_size):
            entries = writer.write(file, rel, preds)
            journal.record(file.path, writer.claimed, entries)
            writer.claimed.clear()  # the outputs of the next file only
            n_files, n_images, inference = n_files + 1, n_images + len(entries), inference + sum(
                e["seconds"] for e in entries)
            if opts.report_images:
                by_file[file.path] = entries
            bar.update(1)
    wall = time.perf_counter() - t0
    totals = {"files": n_files, "images": n_images, "skipped": len(skipped), "seconds": round(wall, 3),
              "inference_seconds": round(inference, 3), "images_per_s": round(n_images / wall, 3) if wall > 0 else None}
    return by_file, skipped, totals
