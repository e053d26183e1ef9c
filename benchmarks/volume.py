"""Whole volumes end to end: a generated 3-D volume (NIfTI, and the same slices as a DICOM series) segmented
with every engine, as `predict` does it: read, slice, resize, infer, make the masks, write the label volume.

Per engine and format: seconds per volume (reading to writing, the engine already open and warm), the
inference alone on the same prepared slices with the same settings (the batches run back to back), their
ratio (target: end to end at most 1.1x the inference), the inference's share, and the worker's peak RSS.
Each engine runs in its own process (peak memory is per engine). Works for any family: MoE-SAM gives label
volumes, IC-MoE segments the slices one by one (binary masks).

    python benchmarks/volume.py --model moesam --config vit_b            # 100 slices of 512x512
    python benchmarks/volume.py --model icmoe --config tiny --slices 20  # a quick look

Details: docs/measurements.md ("Whole volumes").
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks.report import write_results  # noqa: E402
from benchmarks.worker import rss_peak_mib  # noqa: E402  (light: the worker imports no torch for graph engines)
from icmoe.core import cli  # noqa: E402
from icmoe.core.io import atomic_write_json  # noqa: E402
from icmoe.core.manifest import read_manifest  # noqa: E402
from icmoe.families import add_model_args, get_family  # noqa: E402

FORMATS = ("nifti", "dicom")
ENGINES = ("onnxruntime-fp32", "onnxruntime-fp16", "onnxruntime-int8", "openvino-fp32", "openvino-bf16",
           "openvino-int8", "openvino-int8-bf16")
TARGET_RATIO = 1.1  # end to end / inference alone
SEED = 0


# ----------------------------------------------------------------------------- the volume on disk


def write_volume(folder: Path, size: int, depth: int, seed: int = SEED) -> Dict[str, Path]:
    """The synthetic volume (icmoe.data.synthetic_volumes) as one NIfTI file and as a DICOM series (one CT
    file per slice, written with pydicom): {"nifti": file, "dicom": folder}."""
    import nibabel as nib

    from icmoe.data.synthetic_volumes import SPACING_MM, synthetic_volume

    image, _ = synthetic_volume(size, depth, seed)  # int16 (Z, H, W)
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*SPACING_MM, 1.0])
    nifti = folder / "volume.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(np.moveaxis(image, 0, -1)), affine), str(nifti))
    dicom = folder / "series"
    dicom.mkdir(exist_ok=True)
    for z in range(depth):
        _write_dicom_slice(dicom / f"slice_{z:03d}.dcm", image[z], z)
    return {"nifti": nifti, "dicom": dicom}


def _write_dicom_slice(path: Path, pixels: np.ndarray, z: int) -> None:
    """One slice of a CT series: 16-bit signed, monochrome, its position along z."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(SEED), str(z)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.PatientName = "CT", "SYNTHETIC", "Volume^Bench"
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(SEED), "study"])
    ds.StudyID, ds.AccessionNumber, ds.StudyDate, ds.StudyTime = "1", "", "20261204", "120000"
    ds.ReferringPhysicianName, ds.Manufacturer = "", "icmoe-benchmark"
    ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(entropy_srcs=[str(SEED), "series"]), 1
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[str(SEED), "frame"])
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber, ds.ImagePositionPatient = z + 1, [0.0, 0.0, 5.0 * z]
    ds.ImageOrientationPatient, ds.PixelSpacing, ds.SliceThickness = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], [0.8, 0.8], 5.0
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.int16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


# ----------------------------------------------------------------------------- one engine (worker process)


def _inference_alone(runner: Any, pictures: List[Any], size: int, batch: int) -> float:
    """Seconds to run the pictures' prepared model inputs through the runner, batches back to back (as many in
    flight as predict keeps), nothing else: what end to end is compared with."""
    from icmoe.data.images import model_input

    x = np.stack([model_input(p, size) for p in pictures])
    batches = [x[i:i + batch] for i in range(0, len(x), batch)]
    lo = runner.engine.batch_range[0] if runner.engine.batch_range else 1
    batches = [b if len(b) >= lo else np.concatenate([b, np.repeat(b[-1:], lo - len(b), axis=0)]) for b in batches]
    t0 = time.perf_counter()
    window: List[Any] = []
    for b in batches:
        window.append(runner.submit(b, False))
        if len(window) > runner.concurrency + 1:
            window.pop(0).result()
    for f in window:
        f.result()
    return time.perf_counter() - t0


def measure_engine(build: Path, engine: str, source: Path, batch: int, threads: Optional[int]) -> Dict[str, Any]:
    """End to end (warm engine) and inference alone for one engine on one input (file or series folder)."""
    from engines.predict.files import PredictOptions, open_runner, read_job, run_jobs, run_mode, seg_spec
    from engines.predict.inputs import expand_inputs
    from engines.predict.series import plan_inputs
    from engines.predict.writers import Writer

    label = engine.split("-", 1)
    backend, precision = (label[0], None) if label[0] == "eager" else (label[0], label[1])
    items, _ = plan_inputs(expand_inputs([str(source)]), "auto", skip_bad=False)  # a series is one job
    with tempfile.TemporaryDirectory(prefix="icmoe-volume-") as tmp:
        opts = PredictOptions(out=Path(tmp) / "out", backend=backend, precision=precision, threads=threads,
                              batch_size=batch, progress=False)
        runner, contract, header = open_runner(build, opts, run_mode(items, "auto"))
        try:
            pictures = [p for it in items for p in read_job(it, opts).pictures]
            _inference_alone(runner, pictures[:batch], contract.image_size, batch)  # warm-up
            seg = seg_spec(build, contract, header, opts) if any(it.group for it in items) else None  # a DICOM SEG
            writer = Writer(opts.out, None, contract, fmt="auto", seg=seg)
            _, totals = run_jobs(items, runner, contract, batch, writer, opts, [], None)
            peak = rss_peak_mib()
            alone = _inference_alone(runner, pictures, contract.image_size, batch)
        finally:
            runner.close()
    return {"engine": header["engine"], "mode": header["mode"], "settings": header["settings"],
            "slices": totals["images"], "files": totals["files"], "seconds": totals["seconds"],
            "inference_seconds": alone, "ratio": totals["seconds"] / alone,
            "inference_share": alone / totals["seconds"], "peak_mib": peak}


# ----------------------------------------------------------------------------- the run


def _worker_cmd(args, build: Path, engine: str, source: Path, result: Path) -> List[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--build", str(build),
           "--input", str(source), "--result", str(result), "--batch-size", str(args.batch_size)]
    return cmd + (["--threads", str(args.threads)] if args.threads else [])


def run(args) -> Dict[str, Any]:
    from tqdm import tqdm

    from benchmarks.latency import get_build, why_not_here  # torch (the roofline): the parent process only

    build = get_build(args, "fp16,int8")
    manifest = read_manifest(build)
    family = get_family(manifest["model"]["family"])
    engines = args.engines or [family.eager_label(), *ENGINES]
    report: Dict[str, Any] = {"build": str(build), "family": family.name, "model": manifest["model"]["name"],
                              "image_size": manifest["image_size"], "slices": args.slices, "size": args.size,
                              "batch_size": args.batch_size, "formats": args.formats, "cpu": _cpu(),
                              "load_avg_before": os.getloadavg()[0], "engines": {}, "skipped": {},
                              "measured_at": _dt.datetime.now().isoformat(timespec="seconds")}
    with tempfile.TemporaryDirectory(prefix="icmoe-volume-data-") as tmp:
        t = time.perf_counter()
        sources = write_volume(Path(tmp), args.size, args.slices)
        report["generate_seconds"] = round(time.perf_counter() - t, 1)
        for engine in tqdm(engines, desc="volume", unit="engine", disable=args.no_progress):
            why = None if engine.startswith("eager") else why_not_here(engine, build)
            if why:
                report["skipped"][engine] = f"not run: {why}"
                continue
            for fmt in args.formats:
                res = Path(tmp) / f"{engine}-{fmt}.json"
                proc = subprocess.run(_worker_cmd(args, build, engine, sources[fmt], res), capture_output=True,
                                      text=True)
                if proc.returncode != 0 or not res.is_file():
                    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or [f"exit {proc.returncode}"]
                    report["skipped"][f"{engine} ({fmt})"] = f"failed while running: {lines[-1].removeprefix('error: ')}"
                    continue
                report["engines"].setdefault(engine, {})[fmt] = json.loads(res.read_text())
    report["load_avg_after"] = os.getloadavg()[0]
    return report


def _cpu() -> str:
    from engines.select import cpu_name

    return cpu_name()


def markdown(report: Dict[str, Any]) -> str:
    title = get_family(report["family"]).title
    lines = [f"{title} `{report['model']}` at {report['image_size']}, one volume of {report['slices']} slices of "
             f"{report['size']}x{report['size']} (NIfTI; DICOM series: one file per slice), batch "
             f"{report['batch_size']}, load average {report['load_avg_before']:.1f} -> {report['load_avg_after']:.1f}, "
             f"{report['cpu']}", "",
             "| engine | format | s / volume | inference alone s | end to end / inference | inference share | "
             "peak RSS MiB | settings |", "|---|---|---|---|---|---|---|---|"]
    for name, by_format in report["engines"].items():
        for fmt, r in by_format.items():
            s = r["settings"] or {}
            setting = f"{r['mode']}, {s.get('num_streams') or s.get('streams', 1)} stream(s)"
            lines.append(f"| {name} | {fmt} | {r['seconds']:.2f} | {r['inference_seconds']:.2f} | {r['ratio']:.3f} | "
                         f"{r['inference_share']:.1%} | {r['peak_mib']:.0f} | {setting} |")
    for name, why in report["skipped"].items():
        lines.append(f"| {name} | - | {why} | | | | | |")
    worst = [r["ratio"] for by in report["engines"].values() for r in by.values()]
    if worst:
        lines.append(f"\nLargest end to end / inference: {max(worst):.3f} (target <= {TARGET_RATIO}).")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = cli.parser("python benchmarks/volume.py", __doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: random init)")
    add_model_args(p, config_help="size variant without a checkpoint")
    p.add_argument("--build", type=Path, default=None, help="use this build directory instead of building")
    p.add_argument("--slices", type=int, default=100, help="slices of the volume (default 100)")
    p.add_argument("--size", type=int, default=512, help="slice side in pixels (default 512)")
    p.add_argument("--formats", type=lambda t: [f for f in t.split(",") if f], default=list(FORMATS),
                   help="comma-separated: nifti, dicom (default both)")
    p.add_argument("--engines", type=lambda t: [e for e in t.split(",") if e], default=None,
                   help="comma-separated subset (default: eager and every graph engine)")
    p.add_argument("--batch-size", type=int, default=8, help="pictures per batch, as predict's --batch-size (default 8)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per engine (default: usable cores)")
    p.add_argument("--calibration", default=None, help="INT8 calibration of the benchmark's own build")
    p.add_argument("--int8-attention", choices=("auto", "quantize", "keep"), default="auto",
                   help="attention products of the benchmark's own INT8 build (export.build's flag)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    cli.add_json(p)
    cli.add_progress(p)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one engine, in its own process
    p.add_argument("--input", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def _main(argv=None) -> int:
    args = _parser().parse_args(argv)
    cli.setup_logging(args.verbosity)
    if args.worker:
        atomic_write_json(args.result, measure_engine(args.build, args.worker, args.input, args.batch_size, args.threads))
        return 0
    bad = [f for f in args.formats if f not in FORMATS]
    if bad or args.slices < 1 or args.size < 32 or args.batch_size < 1:
        raise cli.UsageError(f"need --formats from {', '.join(FORMATS)}, --slices >= 1, --size >= 32 and "
                             f"--batch-size >= 1 (got {args.formats}, {args.slices}, {args.size}, {args.batch_size})")
    args.batch_sizes = [args.batch_size]  # what get_build reads
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(args)
    stem = f"volume-{report['family']}-{report['model']}-{report['slices']}x{report['size']}"
    write_results(args.out, stem, report, markdown(report), args.json)
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
