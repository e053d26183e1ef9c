"""The PACS round trip, measured: a generated study uploaded to a real Orthanc (DICOMweb plugin), segmented
with `--dicomweb` (WADO-RS in, STOW-RS out), the stored SEGs read back with highdicom and checked frame by
frame against their source slices and against a local run; seconds and SEG sizes printed, in one run.

Needs a checkout (it uses the tests' study generator and Orthanc launcher), Debian's `orthanc` and
`orthanc-dicomweb`, and the `dicom` extra. Details: docs/clinical.md.

    python benchmarks/pacs_roundtrip.py --model icmoe --slices 40 --size 256
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from engines.predict.dicomweb import (  # noqa: E402
    PASSWORD_ENV,
    USER_ENV,
    DicomwebOptions,
    connect,
    predict_dicomweb,
    retrieve_series,
    session,
)
from engines.predict.files import PredictOptions, predict_files  # noqa: E402
from icmoe.core import cli  # noqa: E402
from icmoe.core.errors import CheckFailed  # noqa: E402
from tests.engines.predict.orthanc import PASSWORD, USER, orthanc, orthanc_missing  # noqa: E402
from tests.icmoe.data.series_samples import OBLIQUE, make_series, write_files  # noqa: E402


def make_study(folder: Path, slices: int, size: int) -> List[List[Any]]:
    """A CT-like axial series and an MR-like oblique one of `slices` slices of size x size, in one study."""
    from pydicom.uid import generate_uid

    study, frame = generate_uid(), generate_uid()
    ct = make_series(study, frame, modality="CT", number=2, description="CT", rows=size, cols=size, n=slices,
                     spacing=2.5, seed=0)
    mr = make_series(study, frame, modality="MR", number=3, description="MR oblique", rows=size, cols=size,
                     n=slices, spacing=4.0, orientation=OBLIQUE, seed=1)
    rng = np.random.default_rng(0)
    for series in (ct, mr):
        write_files(series, folder, rng)
    return [ct, mr]


def _check_frames(seg: Any, sources: Dict[str, Any]) -> int:
    """Every frame's plane position equals its source slice's; returns the frames checked."""
    for item in seg.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        want = np.asarray(sources[ref].ImagePositionPatient, float)
        got = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        if not np.allclose(got, want, atol=1e-4):
            raise CheckFailed(f"SEG frame of {ref} at {got}, its source slice at {want}")
    return len(seg.PerFrameFunctionalGroupsSequence)


def run(build: Path, slices: int, size: int, threads: Optional[int], work: Path) -> Dict[str, Any]:
    """Upload, round trip, local run, read back and check; returns the figures."""
    import highdicom as hd

    series = make_study(work / "study", slices, size)
    sources = {ds.SOPInstanceUID: ds for s in series for ds in s}
    study = series[0][0].StudyInstanceUID
    os.environ[USER_ENV], os.environ[PASSWORD_ENV] = USER, PASSWORD
    with orthanc(work / "orthanc") as url:
        client = connect(url)
        t0 = time.perf_counter()
        client.store_instances([ds for s in series for ds in s])
        upload = time.perf_counter() - t0
        opts = PredictOptions(out=None, threads=threads, progress=False)
        t0 = time.perf_counter()
        report = predict_dicomweb(build, DicomwebOptions(url, study), opts)
        round_trip = time.perf_counter() - t0
        t0 = time.perf_counter()
        local = predict_files(build, [str(work / "study")], PredictOptions(out=work / "local", threads=threads,
                                                                           progress=False))
        local_s = time.perf_counter() - t0
        rows = []
        for entry in report["series"]:
            (ds,) = retrieve_series(session(), url, study, entry["series_instance_uid"])
            seg = hd.seg.Segmentation.from_dataset(ds)
            mine = hd.seg.segread(str(work / "local" / f"{entry['source_series']}.seg.dcm"))
            if not np.array_equal(seg.pixel_array, mine.pixel_array):
                raise CheckFailed(f"the stored SEG of {entry['source_series']} differs from the local run's")
            rows.append({**entry, "frames_checked": _check_frames(seg, sources)})
    return {"slices": slices, "size": size, "upload_s": round(upload, 3), "round_trip_s": round(round_trip, 3),
            "local_s": round(local_s, 3), "engine": report["engine"], "series": rows,
            "local_images_per_s": local["totals"]["images_per_s"]}


def _parser() -> Any:
    p = cli.parser("python benchmarks/pacs_roundtrip.py", __doc__.splitlines()[0])
    p.add_argument("build", nargs="?", type=Path, default=None, help="a build (default: a random-init tiny FP32 build "
                                                                     "of --model, made in a temporary folder)")
    p.add_argument("--model", default="icmoe", help="family of the random-init build (default icmoe)")
    p.add_argument("--slices", type=int, default=40, help="slices per series (default 40)")
    p.add_argument("--size", type=int, default=256, help="rows and columns of each slice (default 256)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the engine (default: all usable)")
    cli.add_json(p)
    return p


def _main(argv: Optional[Sequence[str]] = None) -> int:
    a = _parser().parse_args(argv)
    cli.setup_logging(a.verbosity)
    why = orthanc_missing()
    if why:
        raise cli.UsageError(why)
    with tempfile.TemporaryDirectory() as tmp:
        build = a.build
        if build is None:
            from export.build import build as make_build

            build = make_build(None, random_init=True, model=a.model, config="tiny", precision="fp32",
                               out=Path(tmp) / "build", batch=(1, 1, 8), backend="onnxruntime", verify=False,
                               progress=False)
        result = run(Path(build), a.slices, a.size, a.threads, Path(tmp))
    result.update(machine=platform.processor() or platform.machine(), cores=len(os.sched_getaffinity(0)),
                  build=str(a.build or f"random-init {a.model}/tiny fp32"))
    cli.write_json(result, a.json)
    print(f"{result['build']}: {len(result['series'])} series of {a.slices} slices {a.size}x{a.size}; upload "
          f"{result['upload_s']:.2f} s, round trip {result['round_trip_s']:.2f} s "
          f"(local run {result['local_s']:.2f} s)")
    for r in result["series"]:
        print(f"  series {r['source_series'][-12:]}: SEG {r['bytes'] / 1024:.1f} KiB, {r['frames']} frames of "
              f"{r['slices']} slices, every frame at its source slice ({r['frames_checked']} checked), equal to the "
              "local run")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(cli.run(_main))
