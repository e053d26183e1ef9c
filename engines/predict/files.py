"""A predict run over files: open the engine (or a Triton server), read the inputs, run the batching
pipeline, write the outputs, report (docs/predict.md). Inputs are read ahead and outputs written behind in a
small thread pool (a bounded queue of each), so reading and writing overlap with inference."""

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
from engines.predict.journal import Journal, model_digest, open_journal, remove_temporaries
from engines.predict.pipeline import LOGITS_OUTPUT, Contract, LocalRunner, engine_contract, predict_jobs
from engines.predict.series import InputItem, plan_inputs
from engines.predict.writers import Writer
from engines.select import Choice, choose
from icmoe.core import cli
from icmoe.core.codes import read_codes_file
from icmoe.core.errors import DataError, first_line
from icmoe.core.io import sha256_file
from icmoe.core.manifest import MANIFEST_NAME, read_manifest, segment_codes
from icmoe.data.dicom_series import load_series
from icmoe.data.images import Picture, read_images

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
      mode: "auto" (throughput settings for several inputs, a volume or a DICOM series, else latency),
        "latency" or "throughput" (`engines.select.engine_kwargs`).
      upsample: "logits" (masks from the logits resized bilinearly, where the model has a mask rule) or
        "nearest" (the model-size mask resized).
      batch_size: pictures per batch (default 8 within the batch range).
      overlays: folder for overlay PNGs, or None.
      skip_bad: report an unreadable file and go on, instead of stopping.
      window: (low, high) intensity window for NIfTI volumes and DICOM series, or None (DICOM: each
        slice's window, else its min..max; NIfTI: each slice's min..max).
      server, protocol, model_name, concurrency: a Triton server instead of a local engine.
      progress: show a progress bar.
      fmt: "auto" (SEG for DICOM series, NIfTI for NIfTI, PNG for pictures), "png" or "seg".
      seg_type: "binary" or "fractional" (probabilities from the `logits` output).
      seg_codes: a JSON file overriding the build's segment codes (`icmoe.core.codes.read_codes_file`).
      resume: skip the inputs an earlier run into `out` finished (engines/predict/journal.py).
      report_images: keep every picture's entry for the report's `images` (about 1.7 KiB a file); False
        (the command without --json) keeps the totals only, so memory stays flat however many files.
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
    fmt: str = "auto"
    seg_type: str = "binary"
    seg_codes: Optional[Path] = None
    resume: bool = False
    report_images: bool = True

    @property
    def probabilities(self) -> bool:
        return self.seg_type == "fractional"


def run_mode(items: Sequence[InputItem], mode: str) -> str:
    """"latency" or "throughput": `mode`, or for "auto" throughput where there are many pictures (several
    inputs, a volume, or a DICOM series)."""
    if mode not in MODES:
        raise cli.UsageError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    many = len(items) > 1 or any(it.group is not None or str(it.path).lower().endswith(VOLUME_SUFFIXES)
                                 for it in items)
    return "throughput" if many else "latency"


def open_runner(source: Path, opts: PredictOptions, mode: str = "latency") -> Tuple[Any, Contract, Dict[str, Any]]:
    """(runner, contract, report header) for a local engine or a Triton server."""
    if opts.server is None:
        engine, choice = open_engine(source, opts.backend, opts.precision, opts.threads, mode)
        engine.activate()
        contract = engine_contract(engine)
        return LocalRunner(engine, owned=True), contract, {
            "engine": engine.name, "server": None, "precision": engine_precision(engine), "mode": mode,
            "settings": engine.settings(), "choice": None if choice is None else choice.to_dict()}
    from engines.triton.client import (
        TritonRunner,  # tritonclient is an optional dependency
    )

    info = BuildInfo(source)
    contract = Contract.of(info.inputs, info.outputs, info.batch_range, info.class_names, info.mask_rule)
    outputs = contract.outputs_needed(contract.upsampling(opts.upsample), opts.probabilities)
    runner = TritonRunner(opts.server, info, protocol=opts.protocol, model_name=opts.model_name,
                          concurrency=opts.concurrency, outputs=outputs)
    precision = opts.precision or info.manifest["precision"]
    return runner, contract, {"engine": runner.label, "server": opts.server, "protocol": runner.protocol,
                              "concurrency": runner.concurrency, "precision": precision}


def engine_precision(engine: Engine) -> str:
    """The precision an engine runs (the eager model: FP32)."""
    return str(getattr(engine, "precision", None) or "fp32")


def read_ahead(items: Sequence[Any], read: Any, pool: ThreadPoolExecutor,
               depth: int) -> Iterator[Tuple[Any, "Future[Any]"]]:
    """(item, future of read(item)) in the items' order, at most `depth` items read ahead in `pool`."""
    queued: "deque[Tuple[Any, Future]]" = deque()
    it = iter(items)
    for item in it:
        queued.append((item, pool.submit(read, item)))
        if len(queued) >= depth:
            break
    while queued:
        yield queued.popleft()
        for item in it:  # refill one
            queued.append((item, pool.submit(read, item)))
            break


def read_job(item: InputItem, opts: PredictOptions) -> Any:
    """A job's data: the file's ImageFile, or the DICOM series' volume."""
    return read_images(item.path, window=opts.window) if item.group is None else \
        load_series(item.group, window=opts.window)


def _read_jobs(items: Sequence[InputItem], opts: PredictOptions, skipped: List[Dict[str, str]], bar: Any,
               pool: ThreadPoolExecutor, depth: int) -> Iterator[Tuple[Tuple[InputItem, Any], List[Picture]]]:
    """((item, file or series), pictures) of each readable job, read ahead in `pool`; an unreadable file or
    inconsistent series raises, or with skip_bad is reported and skipped."""
    for item, future in read_ahead(items, lambda it: read_job(it, opts), pool, depth):
        try:
            data = future.result()
        except DataError as e:
            if not opts.skip_bad:
                raise
            log.error(f"error: {first_line(e)}")
            skipped.append({"path": item.label, "error": first_line(e)})
            bar.update(1)
            continue
        yield (item, data), data.pictures


def model_identity(source: Path, engine_label: str, precision: str) -> Dict[str, str]:
    """What a SEG names as its algorithm: family, config, precision, engine and the build's sha256 (of its
    manifest, which holds every artifact's) or a checkpoint's (of its weights)."""
    if (source / MANIFEST_NAME).is_file():
        m = read_manifest(source)
        return {"family": m["model"]["family"], "config": m["model"]["name"],
                "precision": precision,
                "engine": engine_label, "build_sha256": sha256_file(source / MANIFEST_NAME)}
    from icmoe.checkpoint import read_meta  # torch: a checkpoint folder runs eager anyway

    meta = read_meta(source)
    return {"family": meta["family"], "config": meta["config"].name, "precision": precision, "engine": engine_label,
            "checkpoint_sha256": str(meta.get("weights_sha256", ""))}


def build_codes(source: Path) -> List[Dict[str, Any]]:
    """The segment codes of a build (its manifest) or a checkpoint folder (its family's declaration)."""
    if (source / MANIFEST_NAME).is_file():
        return segment_codes(read_manifest(source))
    from icmoe.checkpoint import read_meta
    from icmoe.families import get_family

    meta = read_meta(source)
    return get_family(meta["family"]).graph.segment_codes(meta["config"])


def seg_spec(source: Path, contract: Contract, header: Dict[str, Any], opts: PredictOptions) -> Any:
    """What the run's SEGs say of the model (`engines.predict.seg.SegSpec`)."""
    from engines.predict.seg import SegSpec, highdicom

    highdicom()  # a missing dicom extra stops the run before any inference
    if opts.probabilities and not contract.has_logits:
        raise cli.UsageError(f"--seg-type fractional needs a {LOGITS_OUTPUT!r} output; this model has none")
    codes = build_codes(source)
    if opts.seg_codes is not None:
        codes = read_codes_file(opts.seg_codes, contract.labels, codes)
    return SegSpec(opts.seg_type, contract.labels, contract.binary, tuple(codes),
                   model_identity(source, header["engine"], header["precision"]))


def predict_files(source: Path, inputs: Sequence[str], opts: PredictOptions,
                  runner: Optional[Tuple[Any, Contract, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Segment files, folders and glob patterns with a build, a checkpoint or a server; write masks.

    Every finished file is recorded in the run's journal (`engines.predict.journal`); with `opts.resume`
    the files an earlier run finished are skipped, their report entries taken from the journal.

    Arguments:
      source: a build directory or a checkpoint folder (with a server: the build it serves).
      inputs: see `expand_inputs`.
      opts: the options.
      runner: (runner, contract, report header) to use instead of `open_runner`'s (e.g. a MONAI inferer,
        `engines.predict.bundle`); closed at the end.

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
    items, skipped = plan_inputs(files, opts.fmt, skip_bad=opts.skip_bad)
    runner, contract, header = runner or open_runner(Path(source), opts, run_mode(items, opts.mode))
    try:
        batch_size = contract.batch_size(opts.batch_size)
        runner.check_batch(batch_size)
        seg = seg_spec(Path(source), contract, header, opts) if any(it.group for it in items) \
            and opts.fmt != "png" else None
        writer = Writer(out, opts.overlays, contract, fmt=opts.fmt, seg=seg)
        journal = _journal(Path(source), out, header, contract, opts)
        todo, resumed = _resumed(items, journal)
        try:
            by_item, totals = run_jobs(todo, runner, contract, batch_size, writer, opts, skipped, journal)
        finally:
            journal.close()
    finally:
        runner.close()
    entries = [e for it in items for e in resumed.get(job_key(it), by_item.get(job_key(it), []))] \
        if opts.report_images else []
    totals.update(files=totals["files"] + len(resumed), resumed=len(resumed),
                  images=totals["images"] + sum(len(v) for v in resumed.values()))
    return {**header, "source": str(source), "image_size": contract.image_size, "batch_size": batch_size,
            "upsample": contract.upsampling(opts.upsample), "mask_rule": contract.mask_rule,
            "mask_kind": "binary" if contract.binary else "labels", "classes": [n for _, n in contract.labels],
            "out": str(out), "overlays": None if opts.overlays is None else str(opts.overlays),
            "images": entries, "series": writer.series, "skipped": skipped, "totals": totals}


def _journal(source: Path, out: Path, header: Dict[str, Any], contract: Contract, opts: PredictOptions) -> Journal:
    """The run's journal, headed by everything that changes the outputs (a resume must match it)."""
    what = {"source": str(source.resolve()), "model": model_digest(source), "engine": header["engine"],
            "classes": [n for _, n in contract.labels], "window": opts.window,
            "overlays": None if opts.overlays is None else str(Path(opts.overlays).resolve()),
            "output_format": opts.fmt, "seg_type": opts.seg_type, "upsample": opts.upsample,
            "seg_codes": None if opts.seg_codes is None else sha256_file(opts.seg_codes)}
    journal = open_journal(out, what, resume=opts.resume)
    if opts.resume and remove_temporaries([out, opts.overlays]):
        log.info("--resume: removed the temporary files of the interrupted run")
    return journal


def job_key(item: InputItem) -> str:
    """What the journal knows a job by: a file's resolved path, or a DICOM series' label (UID, description)."""
    return str(item.path.resolve()) if item.group is None else item.group.label


def job_inputs(item: InputItem) -> List[Path]:
    """The files a job reads (a series: every instance of it)."""
    return [item.path] if item.group is None else [Path(source) for source, _ in item.group.members]


def _resumed(items: Sequence[InputItem], journal: Journal) -> Tuple[List[InputItem], Dict[str, List[Dict[str, Any]]]]:
    """(jobs still to do, report entries of the jobs the journal holds as finished and intact)."""
    todo, done = [], {}
    for item in items:
        record = journal.finished(job_key(item), job_inputs(item))
        if record is None:
            todo.append(item)
        else:
            done[job_key(item)] = record["entries"]
    if done:
        log.info(f"--resume: {len(done)} of {len(items)} inputs already done")
    return todo, done


def run_jobs(items: Sequence[InputItem], runner: Any, contract: Contract, batch_size: int, writer: Writer,
             opts: PredictOptions, skipped: List[Dict[str, str]], journal: Optional[Journal]
             ) -> Tuple[Dict[str, List[Dict[str, Any]]], Dict[str, Any]]:
    """Read, predict and write every job (file or series) with an open runner, each recorded in the journal
    (if any) once written; returns
    (image entries by job, kept only with `opts.report_images`; totals). Unreadable jobs go to `skipped`.
    Reading runs ahead and writing behind in a pool of `IO_WORKERS` threads; jobs finish in their order."""
    by_item: Dict[str, List[Dict[str, Any]]] = {}
    counts = {"files": 0, "images": 0, "inference": 0.0}
    depth = max(4, batch_size * (runner.concurrency + 1))  # jobs read ahead: the batches in flight, and one more
    writes: "deque[Tuple[InputItem, Future]]" = deque()

    def finish(item: InputItem, future: Future) -> None:  # in order, in this thread: the journal is not shared
        entries, claimed = future.result()
        if journal is not None:
            journal.record(job_key(item), job_inputs(item), claimed, entries)
        counts["files"] += 1
        counts["images"] += len(entries)
        counts["inference"] += sum(e["seconds"] for e in entries)
        if opts.report_images:
            by_item[job_key(item)] = entries
        bar.update(1)

    t0 = time.perf_counter()
    with tqdm(total=len(items), unit="input", desc="predict", disable=not opts.progress, leave=False) as bar, \
            ThreadPoolExecutor(IO_WORKERS, thread_name_prefix="predict-io") as io:
        jobs = _read_jobs(items, opts, skipped, bar, io, depth)
        try:
            for (item, data), preds in predict_jobs(jobs, runner, contract, batch_size=batch_size,
                                                    upsampling=opts.upsample, probabilities=opts.probabilities):
                writes.append((item, io.submit(writer.write_job, item, data, preds)))
                while len(writes) > IO_WORKERS or (writes and writes[0][1].done()):  # bounded, in order
                    finish(*writes.popleft())
        except BaseException:  # a bad input or a failed write: what was written before it is still recorded
            _record_written(writes, finish)
            raise
        while writes:
            finish(*writes.popleft())
    wall = time.perf_counter() - t0
    n_images = counts["images"]
    totals = {"files": counts["files"], "images": n_images, "skipped": len(skipped), "seconds": round(wall, 3),
              "inference_seconds": round(counts["inference"], 3),
              "images_per_s": round(n_images / wall, 3) if wall > 0 else None, "segs": len(writer.series)}
    return by_item, totals


def _record_written(writes: "deque[Tuple[InputItem, Future]]", finish: Any) -> None:
    """Finish the writes still in flight while another error ends the run: each one that succeeds is recorded
    (the journal then holds every output on disk); one that fails too (the same full disk, most likely) is
    logged at debug level: the error already raised is the run's one line."""
    while writes:
        item, future = writes.popleft()
        try:
            finish(item, future)
        except Exception as e:  # noqa: BLE001
            log.debug(f"{item.label}: {first_line(e)} (after the run had already failed)")
