"""`python -m engines.predict BUILD_OR_CHECKPOINT INPUTS... --out DIR`: the predict command (docs/predict.md)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence, Tuple

from engines import BACKENDS
from engines.predict.files import MODES, PredictOptions, predict_files
from engines.predict.pipeline import UPSAMPLING
from engines.predict.seg import SEG_TYPES
from engines.predict.series import FORMATS
from engines.select import Choice
from icmoe.core import cli
from icmoe.core.manifest import RUNTIME_PRECISIONS

log = logging.getLogger("engines.predict")

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
    p = cli.parser("python -m engines.predict", "Segment image files (PNG, JPEG, BMP, TIFF, DICOM, NIfTI) with a "
                   "build, a checkpoint or a Triton server; write masks at the images' own sizes.")
    p.add_argument("source", type=Path, metavar="BUILD_OR_CHECKPOINT",
                   help="a build directory (python -m export.build) or a checkpoint folder (eager)")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (masks mirror the inputs' relative paths); with --dicomweb optional")
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                   help="engine of the build (auto: the fastest whose parity gates passed when the build was "
                        "verified, among those this host runs; a checkpoint: eager)")
    p.add_argument("--precision", choices=list(RUNTIME_PRECISIONS), default=None,
                   help="engine precision (bf16, int8-bf16: OpenVINO with BF16 arithmetic; default: any, as --backend)")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="latency (one batch at a time) or throughput (several at once: OpenVINO's throughput hint, "
                        "ONNX Runtime requests in parallel); auto: throughput for several files, a volume or a series")
    p.add_argument("--upsample", choices=UPSAMPLING, default="logits",
                   help="masks at the images' sizes from the logits resized bilinearly, then thresholded or "
                        "arg-maxed (default, where the model has a mask rule), or the model-size mask resized "
                        "by nearest neighbour")
    p.add_argument("--batch-size", type=int, default=None, help="pictures per batch (default 8 within the build's range)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the CPU engines (default: all usable)")
    p.add_argument("--overlay", action="store_true", help="also write overlay PNGs (to <out>/overlays)")
    p.add_argument("--overlay-dir", type=Path, default=None, metavar="DIR", help="write the overlays here (implies --overlay)")
    p.add_argument("--skip-bad", action="store_true", help="report unreadable files and go on (else stop at the first)")
    p.add_argument("--resume", action="store_true",
                   help="skip the files an earlier run into --out finished (its predict-journal.jsonl), do the rest")
    p.add_argument("--window", default=None, metavar="LOW,HIGH",
                   help="NIfTI and DICOM series intensity window mapped to 0..255 (e.g. CT: --window=-150,500); "
                        "default a DICOM slice's own window, else each slice's min..max")
    p.add_argument("--format", default="auto", choices=FORMATS, dest="fmt",
                   help="auto: DICOM SEG for DICOM series, NIfTI for NIfTI, PNG for pictures; png: PNG for "
                        "every picture; seg: DICOM SEG (DICOM series only)")
    p.add_argument("--seg-type", default="binary", choices=SEG_TYPES,
                   help="DICOM SEG type: binary masks, or fractional (probabilities of the logits output)")
    p.add_argument("--seg-codes", type=Path, default=None, metavar="FILE.json",
                   help="segment codes overriding the build's (JSON keyed by label value or name; docs/clinical.md)")
    p.add_argument("--server", default=None, metavar="URL", help="a Triton server (host:port, http://, grpc://)")
    p.add_argument("--protocol", choices=["http", "grpc"], default=None,
                   help="with --server (default: from the URL's scheme; port 8001 means grpc)")
    p.add_argument("--model-name", default=None, help="with --server: the repository model (default <family>_<kind>)")
    p.add_argument("--concurrency", type=int, default=1, help="with --server: requests in flight (default 1)")
    web = p.add_argument_group("PACS over DICOMweb (credentials: $ICMOE_DICOMWEB_USER and $ICMOE_DICOMWEB_PASSWORD, "
                               "or $ICMOE_DICOMWEB_TOKEN, else netrc; docs/clinical.md)")
    web.add_argument("--dicomweb", default=None, metavar="URL",
                     help="segment a study of this DICOMweb service (WADO-RS) and store the SEGs back (STOW-RS)")
    web.add_argument("--study", default=None, metavar="UID", help="with --dicomweb: the StudyInstanceUID")
    web.add_argument("--series", default=None, metavar="UID",
                     help="with --dicomweb: one SeriesInstanceUID (default: every image series of the study)")
    web.add_argument("--dicomweb-out", default=None, metavar="URL", help="store the SEGs at this service instead")
    web.add_argument("--insecure", action="store_true", help="with --dicomweb: do not verify HTTPS certificates")
    cli.add_json(p)
    cli.add_progress(p)
    return p


def _options(a: argparse.Namespace) -> PredictOptions:
    if a.concurrency < 1 or (a.threads is not None and a.threads < 1):
        raise cli.UsageError(f"need --concurrency >= 1 and --threads >= 1, got {a.concurrency} and {a.threads}")
    if a.server is None and (a.protocol or a.model_name or a.concurrency != 1):
        raise cli.UsageError("--protocol, --model-name and --concurrency need --server")
    if (a.overlay or a.overlay_dir) and a.out is None:
        raise cli.UsageError("--overlay needs --out")
    overlays = a.overlay_dir or (a.out / "overlays" if a.overlay else None)
    return PredictOptions(out=a.out, backend=a.backend, precision=a.precision, threads=a.threads, mode=a.mode,
                          upsample=a.upsample,
                          batch_size=a.batch_size, overlays=overlays, skip_bad=a.skip_bad, window=_window(a.window),
                          server=a.server, protocol=a.protocol, model_name=a.model_name, concurrency=a.concurrency,
                          progress=not a.no_progress, fmt=a.fmt, seg_type=a.seg_type, seg_codes=a.seg_codes,
                          resume=a.resume, report_images=a.json is not None)


def _check_sources(a: argparse.Namespace) -> None:
    if a.dicomweb is None:
        if a.study or a.series or a.dicomweb_out or a.insecure:
            raise cli.UsageError("--study, --series, --dicomweb-out and --insecure need --dicomweb")
        if not a.inputs or a.out is None:
            raise cli.UsageError("need INPUT files or folders and --out DIR (or --dicomweb URL --study UID)")
        return
    if a.inputs:
        raise cli.UsageError("--dicomweb reads its series from the server: give no INPUT files")
    if not a.study:
        raise cli.UsageError("--dicomweb needs --study UID")
    if a.fmt == "png":
        raise cli.UsageError("--dicomweb stores DICOM SEG; --format png does not apply")


def _dicomweb(a: argparse.Namespace) -> int:
    from engines.predict.dicomweb import DicomwebOptions, predict_dicomweb

    web = DicomwebOptions(a.dicomweb, a.study, a.series, a.dicomweb_out, a.insecure)
    report = predict_dicomweb(a.source, web, _options(a))
    cli.write_json(report, a.json)
    for e in report["series"] if a.json != "-" else []:  # the new SEGs' UIDs on stdout (unless JSON goes there)
        print(f"{e['source_series']} -> SEG study {e['study_instance_uid']} series {e['series_instance_uid']} "
              f"instance {e['sop_instance_uid']}")
    return cli.EXIT_OK


def _main(argv: Optional[Sequence[str]]) -> int:
    a = _parser().parse_args(argv)
    cli.setup_logging(a.verbosity)
    _check_sources(a)
    if a.dicomweb is not None:
        return _dicomweb(a)
    report = predict_files(a.source, a.inputs, _options(a))
    cli.write_json(report, a.json)
    t = report["totals"]
    skipped = f", {t['skipped']} skipped" if t["skipped"] else ""
    skipped += f", {t['resumed']} done before" if t.get("resumed") else ""
    log.info(f"{t['images']} images from {t['files']} inputs in {t['seconds']:.2f} s "
             f"({t['images_per_s'] or 0:.1f} images/s, {report['engine']}){skipped}; masks in {report['out']}")
    if report.get("choice"):  # which engine ran, and why (engines.select)
        log.info(f"{Choice(**report['choice']).describe()}; {report['mode']} settings")
    return cli.EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_main, argv)
