"""Segment image files with a build (any backend), a checkpoint or a Triton server.

    python -m engines.predict build/icmoe-tiny-fp16 scans/ photo.jpg 'more/**/*.dcm' --out masks/ --json report.json
    python -m engines.predict runs/synthetic/best images/ --out masks/ --overlay      # a checkpoint: eager
    python -m engines.predict build/icmoe-tiny-fp16 images/ --out masks/ --server localhost:8001 --concurrency 8

    from engines import load_engine
    with load_engine("build/icmoe-tiny-fp16") as engine:
        results = engine.predict(["scan.dcm", "photo.jpg", uint16_array])
    results[0].mask        # uint8 (H, W) at the input's size: 0/1, or label values

Inputs are files, folders (searched recursively for `icmoe.data.images.IMAGE_SUFFIXES`, hidden
entries and the output folder left out, sorted) and glob patterns (`**` recurses); every format
`icmoe.data.images` reads. Each picture (image, DICOM frame, TIFF page, NIfTI slice) is resized to
the model's input as training resizes it, run in batches of `--batch-size` (within the build's
batch range; a short last batch is padded with copies), and its mask resized back to the
picture's size by nearest neighbour.

Outputs under `--out`, mirroring each input's path relative to the folder (or the glob's fixed
leading folders) it was found in; a file named directly goes to the top:

- `<stem>.png`: the mask, 0/255 for a binary model, the label values for a multi-class one;
- a multi-frame DICOM or multi-page TIFF: `<stem>_f000.png`, `<stem>_f001.png`, ... one per frame;
- a NIfTI volume: `<stem>_mask.nii.gz`, a uint8 label volume (binary: 0/1) with the input's
  affine and header (intent "label");
- `--overlay` (in `<out>/overlays`, or `--overlay-dir DIR`): PNG pictures drawn as `icmoe.evaluate` draws
  them, the predicted contour (binary) or one colour per class (labels), at the same relative
  paths (NIfTI: up to three slices with foreground, `<stem>_z012.png`);
- `--json FILE|-`: per image its path, frame, size, foreground fraction per class, the per-image
  outputs of the graph (those with only a batch axis, e.g. a chosen candidate), seconds and
  output files; the files skipped and why; totals with images/s.

Files are written atomically (a temporary file renamed into place). A file that cannot be read
stops the run with `error: <file>: <why>` (exit 2) after the files before it are written; with
`--skip-bad` it is reported (`error: ...` on stderr, `skipped` in the JSON) and the run goes on.
`--server URL` sends the same batches to a Triton Inference Server serving the repository
`python -m engines.triton` writes (`engines.triton.client.TritonRunner`: HTTP or gRPC, from
`--protocol`, the URL's scheme or port 8001 = gRPC), with `--concurrency N` requests in flight;
the build is read for its contract only.
"""

from __future__ import annotations

import argparse
import glob
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
from tqdm import tqdm

from engines import load_engine
from engines.base import BuildInfo, Engine, EngineError
from engines.prediction import (
    MASK_OUTPUT,
    Contract,
    LocalRunner,
    Prediction,
    engine_contract,
    predict_jobs,
)
from icmoe.core import cli
from icmoe.core.errors import first_line
from icmoe.core.manifest import MANIFEST_NAME, PRECISIONS
from icmoe.data.images import (
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    ImageFile,
    Picture,
    display_pixels,
    read_images,
    write_nifti_labels,
    write_png,
)
from icmoe.data.overlays import class_overlay, overlay, pick_slices
from icmoe.data.readers import DataError

log = logging.getLogger("engines.predict")  # not __name__: that is "__main__" under python -m

PLAN_ARTIFACT = "model.plan"
OVERLAY_SLICES = 3  # overlays of a volume: this many slices with foreground

# ----------------------------------------------------------------------------- engines and servers


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


# ----------------------------------------------------------------------------- files in, files out


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _visible(rel: Path) -> bool:
    return not any(part.startswith(".") for part in rel.parts)


def _inside(path: Path, folder: Optional[Path]) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def _image_files(folder: Path, skip: Optional[Path]) -> List[Path]:
    """Image files under `folder` (by suffix), hidden entries and the `skip` folder left out, sorted."""
    found = [p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)
             and _visible(p.relative_to(folder)) and not _inside(p, skip)]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def expand_inputs(inputs: Sequence[str], *, skip: Optional[Path] = None) -> List[Tuple[Path, Path]]:
    """The files named by files, folders and glob patterns, each with its output path relative to `--out`.

    Arguments:
      inputs: files (any name), folders (searched recursively), glob patterns (`**` recurses).
      skip: a folder left out of the search (the output folder).

    Returns:
      [(file, relative path)] in the inputs' order, each folder's files sorted, every file once.

    Raises:
      UsageError: an input that names nothing, or no image file at all.
    """
    skip = skip.resolve() if skip is not None else None
    found: List[Tuple[Path, Path]] = []
    for text in inputs:
        path = Path(text)
        if path.is_file():
            found.append((path, Path(path.name)))
        elif path.is_dir():
            files = _image_files(path, skip)
            if not files:
                log.warning(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
            found += [(f, f.relative_to(path)) for f in files]
        elif _has_magic(text):
            found += _glob(text, skip)
        else:
            raise cli.UsageError(f"{text}: no such file or folder")
    seen: Set[Path] = set()
    unique = []
    for f, rel in found:  # a file named twice (or matched by two inputs) is read once, as first named
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append((f, rel))
    if not unique:
        raise cli.UsageError("no image files in the inputs")
    return unique


def _glob(pattern: str, skip: Optional[Path]) -> List[Tuple[Path, Path]]:
    """Files matching a pattern, relative to its leading folders without wildcards (folders searched)."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if _has_magic(part))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    out: List[Tuple[Path, Path]] = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        m = Path(match)
        if m.is_dir():
            out += [(f, f.relative_to(base)) for f in _image_files(m, skip)]
        elif m.is_file() and not _inside(m, skip) and _visible(m.relative_to(base)):
            out.append((m, m.relative_to(base)))
    if not out:
        raise cli.UsageError(f"{pattern}: no file matches")
    return out


def output_stem(rel: Path) -> Path:
    """The relative output path without suffix: `sub/a.png` -> `sub/a`, `ct.nii.gz` -> `ct`."""
    name = rel.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return rel.with_name(name[: -len(suffix)])
    return rel.with_name(rel.stem)


def check_output_names(files: Sequence[Tuple[Path, Path]]) -> None:
    """Two inputs must not write the same outputs (e.g. `a.png` and `a.jpg` in one folder)."""
    by_stem: Dict[Path, Path] = {}
    for f, rel in files:
        stem = output_stem(rel)
        if stem in by_stem:
            raise cli.UsageError(f"{by_stem[stem]} and {f} would both write {stem}.*; "
                                 "rename one or predict them into separate --out folders")
        by_stem[stem] = f


@dataclass
class Writer:
    """Writes masks and overlays of finished files under `out` (atomically; never the same path twice).

    Attributes:
      out: the mask folder.
      overlays: the overlay folder, or None for none.
      contract: the model's labels (binary masks are written 0/255, label masks as they are).
    """

    out: Path
    overlays: Optional[Path]
    contract: Contract
    written: Set[Path] = field(default_factory=set)

    def _claim(self, path: Path, source: Path) -> Path:
        if path in self.written:
            raise cli.UsageError(f"{source}: its output {path} was already written for another input")
        self.written.add(path)
        return path

    def write(self, file: ImageFile, rel: Path, preds: List[Prediction]) -> List[Dict[str, Any]]:
        """Write one file's outputs; returns the report entry of each of its pictures."""
        stem = output_stem(rel)
        if file.nifti is not None:
            return self._write_volume(file, stem, preds)
        entries = []
        for pic, pred in zip(file.pictures, preds):
            name = f"{stem.name}_f{pic.frame:03d}" if file.multi else stem.name
            mask_path = self._claim(self.out / stem.parent / f"{name}.png", file.path)
            write_png(mask_path, pred.mask * 255 if self.contract.binary else pred.mask)
            entry = {**pred.to_dict(), "mask": str(mask_path)}
            if self.overlays is not None:
                entry["overlay"] = str(self._overlay(pic, pred.mask, self.overlays / stem.parent / f"{name}.png", file))
            entries.append(entry)
        return entries

    def _write_volume(self, file: ImageFile, stem: Path, preds: List[Prediction]) -> List[Dict[str, Any]]:
        labels = np.stack([p.mask for p in preds])  # (Z, X, Y), binary 0/1: a label volume
        path = write_nifti_labels(self._claim(self.out / stem.parent / f"{stem.name}_mask.nii.gz", file.path),
                                  labels, file)
        entries = [{**p.to_dict(), "mask": str(path)} for p in preds]
        if self.overlays is not None:
            for z in pick_slices(None, labels, OVERLAY_SLICES):
                target = self.overlays / stem.parent / f"{stem.name}_z{z:03d}.png"
                entries[z]["overlay"] = str(self._overlay(file.pictures[z], labels[z], target, file))
        return entries

    def _overlay(self, pic: Picture, mask: np.ndarray, path: Path, file: ImageFile) -> Path:
        image = display_pixels(pic)
        caption = f"{Path(pic.source).name}" + (f" [{pic.frame}]" if pic.frame is not None else "")
        if self.contract.binary:
            drawn = overlay(image, None, mask, caption=caption)
        else:
            drawn = class_overlay(image, None, mask, [n for _, n in self.contract.labels], caption=caption)
        return write_png(self._claim(path, file.path), drawn)


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
    runner, contract, header = open_runner(Path(source), opts)
    try:
        batch_size = contract.batch_size(opts.batch_size)
        runner.check_batch(batch_size)
        entries, skipped, totals = _run(files, runner, contract, batch_size, Writer(out, opts.overlays, contract),
                                        opts)
    finally:
        runner.close()
    return {**header, "source": str(source), "image_size": contract.image_size, "batch_size": batch_size,
            "mask_kind": "binary" if contract.binary else "labels", "classes": [n for _, n in contract.labels],
            "out": str(out), "overlays": None if opts.overlays is None else str(opts.overlays),
            "images": entries, "skipped": skipped, "totals": totals}


def _run(files: Sequence[Tuple[Path, Path]], runner: Any, contract: Contract, batch_size: int, writer: Writer,
         opts: PredictOptions) -> Tuple[List[Dict[str, Any]], List[Dict[str, str]], Dict[str, Any]]:
    """Read, predict and write every file; returns (image entries, skipped files, totals)."""
    entries: List[Dict[str, Any]] = []
    skipped: List[Dict[str, str]] = []
    n_files = 0
    t0 = time.perf_counter()
    with tqdm(total=len(files), unit="file", desc="predict", disable=not opts.progress, leave=False) as bar:
        for (file, rel), preds in predict_jobs(_read_jobs(files, opts, skipped, bar), runner, contract,
                                               batch_size=batch_size):
            entries += writer.write(file, rel, preds)
            n_files += 1
            bar.update(1)
    wall = time.perf_counter() - t0
    totals = {"files": n_files, "images": len(entries), "skipped": len(skipped), "seconds": round(wall, 3),
              "inference_seconds": round(sum(e["seconds"] for e in entries), 3),
              "images_per_s": round(len(entries) / wall, 3) if wall > 0 else None}
    return entries, skipped, totals


# ----------------------------------------------------------------------------- the command


def _window(text: Optional[str]) -> Optional[Tuple[float, float]]:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise cli.UsageError(f"--window must be LOW,HIGH (two numbers), got {text!r}") from None
    if not lo < hi:
        raise cli.UsageError(f"--window {text}: LOW must be below HIGH")
    return lo, hi


def _parser() -> argparse.ArgumentParser:
    from engines import BACKENDS

    p = cli.parser("python -m engines.predict", "Segment image files (PNG, JPEG, BMP, TIFF, DICOM, NIfTI) with a "
                   "build, a checkpoint or a Triton server; write masks at the images' own sizes.")
    p.add_argument("source", type=Path, metavar="BUILD_OR_CHECKPOINT",
                   help="a build directory (python -m export.build) or a checkpoint folder (eager)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--out", type=Path, required=True, help="output folder (masks mirror the inputs' relative paths)")
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                   help="engine of the build (auto: TensorRT where the build has a plan this host runs, else "
                        "ONNX Runtime; a checkpoint: eager)")
    p.add_argument("--precision", choices=list(PRECISIONS), default=None, help="graph precision (default: the build's)")
    p.add_argument("--batch-size", type=int, default=None, help="pictures per batch (default 8 within the build's range)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of eager/ONNX Runtime (default: all usable)")
    p.add_argument("--overlay", action="store_true", help="also write overlay PNGs (to <out>/overlays)")
    p.add_argument("--overlay-dir", type=Path, default=None, metavar="DIR", help="write the overlays here (implies --overlay)")
    p.add_argument("--skip-bad", action="store_true", help="report unreadable files and go on (else stop at the first)")
    p.add_argument("--window", default=None, metavar="LOW,HIGH",
                   help="NIfTI intensity window mapped to 0..255 (e.g. CT: --window=-150,500); default each "
                        "slice's min..max")
    p.add_argument("--server", default=None, metavar="URL", help="a Triton server (host:port, http://, grpc://)")
    p.add_argument("--protocol", choices=["http", "grpc"], default=None,
                   help="with --server (default: from the URL's scheme; port 8001 means grpc)")
    p.add_argument("--model-name", default=None, help="with --server: the repository model (default <family>_<kind>)")
    p.add_argument("--concurrency", type=int, default=1, help="with --server: requests in flight (default 1)")
    cli.add_json(p)
    cli.add_progress(p)
    return p


def _options(a: argparse.Namespace) -> PredictOptions:
    if a.concurrency < 1 or (a.threads is not None and a.threads < 1):
        raise cli.UsageError(f"need --concurrency >= 1 and --threads >= 1, got {a.concurrency} and {a.threads}")
    if a.server is None and (a.protocol or a.model_name or a.concurrency != 1):
        raise cli.UsageError("--protocol, --model-name and --concurrency need --server")
    overlays = a.overlay_dir or (a.out / "overlays" if a.overlay else None)
    return PredictOptions(out=a.out, backend=a.backend, precision=a.precision, threads=a.threads,
                          batch_size=a.batch_size, overlays=overlays, skip_bad=a.skip_bad, window=_window(a.window),
                          server=a.server, protocol=a.protocol, model_name=a.model_name, concurrency=a.concurrency,
                          progress=not a.no_progress)


def _main(argv: Optional[Sequence[str]]) -> int:
    a = _parser().parse_args(argv)
    cli.setup_logging(a.verbosity)
    report = predict_files(a.source, a.inputs, _options(a))
    cli.write_json(report, a.json)
    t = report["totals"]
    skipped = f", {t['skipped']} skipped" if t["skipped"] else ""
    log.info(f"{t['images']} images from {t['files']} files in {t['seconds']:.2f} s "
             f"({t['images_per_s'] or 0:.1f} images/s, {report['engine']}){skipped}; masks in {report['out']}")
    return cli.EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
