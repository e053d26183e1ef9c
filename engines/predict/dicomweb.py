"""A PACS round trip over DICOMweb: the series of a study retrieved with WADO-RS, segmented, and their SEGs
stored back with STOW-RS (`dicomweb-client`, the `dicom` extra). docs/clinical.md.

    python -m engines.predict BUILD --dicomweb URL --study UID [--series UID] [--dicomweb-out URL]

Credentials never come from the command line: ICMOE_DICOMWEB_USER and ICMOE_DICOMWEB_PASSWORD (HTTP basic),
or ICMOE_DICOMWEB_TOKEN (a bearer token), else the netrc file (`~/.netrc`, or `$NETRC`) entry of the
host; none is ever printed. HTTPS certificates are verified unless `insecure` (`--insecure`). Nothing
is stored until every series is segmented, and then all SEGs go in one STOW-RS request.
"""

from __future__ import annotations

import io
import logging
import os
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from engines.predict.files import PredictOptions, open_runner, seg_spec
from engines.predict.pipeline import Contract, predict_jobs
from engines.predict.series import stack_masks
from engines.predict.writers import seg_entry
from icmoe.core import cli
from icmoe.core.errors import DataError, IcmoeError, first_line
from icmoe.core.extras import require
from icmoe.data.dicom_series import NON_IMAGE_MODALITIES, DicomSeries, series_from_datasets, series_label

log = logging.getLogger("engines.predict")

USER_ENV, PASSWORD_ENV, TOKEN_ENV = "ICMOE_DICOMWEB_USER", "ICMOE_DICOMWEB_PASSWORD", "ICMOE_DICOMWEB_TOKEN"
TIMEOUT_S = 60.0  # per request
# DICOM JSON tags (PS3.18 F.2) read from QIDO-RS answers
SERIES_UID_TAG, MODALITY_TAG, DESCRIPTION_TAG = "0020000E", "00080060", "0008103E"
FAILED_SOP_SEQUENCE = "FailedSOPSequence"


class DicomwebError(IcmoeError):
    """A DICOMweb server that cannot be reached, refuses a request or fails it; one line with the HTTP status."""


@dataclass(frozen=True)
class DicomwebOptions:
    """Where the series come from and where their SEGs go.

    Attributes:
      url: the DICOMweb service root (e.g. http://pacs:8042/dicom-web).
      study: StudyInstanceUID to segment.
      series: one SeriesInstanceUID of it (default: every image series of the study).
      out_url: another service root to store the SEGs (default `url`).
      insecure: do not verify HTTPS certificates.
    """

    url: str
    study: str
    series: Optional[str] = None
    out_url: Optional[str] = None
    insecure: bool = False


def _check_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise cli.UsageError(f"DICOMweb URL must be http:// or https://host..., got {url!r}")
    if parts.username or parts.password:  # the command line is visible to every user of the host
        raise cli.UsageError(f"credentials in a URL are not accepted (they would be on the command line); use "
                             f"{USER_ENV}/{PASSWORD_ENV}, {TOKEN_ENV} or a netrc file")
    return url.rstrip("/")


def session(insecure: bool = False) -> Any:
    """A requests session with the credentials of the environment (else netrc, which requests reads itself)."""
    requests = require("requests", "dicom", "DICOMweb")
    s = requests.Session()
    s.verify = not insecure
    token, user = os.environ.get(TOKEN_ENV), os.environ.get(USER_ENV)
    if token:
        s.headers["Authorization"] = f"Bearer {token}"
    elif user:
        s.auth = (user, os.environ.get(PASSWORD_ENV, ""))
    return s


def connect(url: str, insecure: bool = False, http: Optional[Any] = None) -> Any:
    """A `dicomweb_client.DICOMwebClient` for a service root (over `http`, else a new `session`)."""
    api = require("dicomweb_client.api", "dicom", "DICOMweb")
    return api.DICOMwebClient(_check_url(url), session=http or session(insecure), timeout=TIMEOUT_S)


WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def retrieve_series(http: Any, url: str, study: str, series: str) -> List[Any]:
    """The instances of a series over WADO-RS, as pydicom datasets.

    The parts are read leniently: some servers (Orthanc's DICOMweb plugin 1.7) send each instance without
    the 128-byte preamble, which dicomweb-client's own retrieval refuses.
    """
    pydicom = require("pydicom", "dicom", "DICOMweb")
    response = http.get(f"{url.rstrip('/')}/studies/{study}/series/{series}", headers={"Accept": WADO_ACCEPT},
                        timeout=TIMEOUT_S)
    response.raise_for_status()
    out = []
    for part in multipart_parts(response.headers.get("Content-Type", ""), response.content):
        try:
            out.append(pydicom.dcmread(io.BytesIO(part), force=True))
        except Exception as e:  # pydicom raises many kinds on a damaged part
            raise DataError(f"{url}: WADO-RS part of series {series} is no DICOM instance "
                            f"({type(e).__name__}: {first_line(e)})") from None
    return out


def multipart_parts(content_type: str, body: bytes) -> List[bytes]:
    """The bodies of a multipart/related message (RFC 2046), headers of each part left out."""
    params = dict(p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p)
    boundary = params.get("boundary", "").strip('"')
    if not content_type.startswith("multipart/related") or not boundary:
        raise DataError(f"WADO-RS answer is not multipart/related with a boundary ({content_type or 'no type'})")
    parts = []
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if sep:
            parts.append(content[:-2] if content.endswith(b"\r\n") else content)
    return parts


def _call(what: str, url: str, fn: Any, *args: Any, **kw: Any) -> Any:
    """fn(*args, **kw), with the HTTP status (or the connection problem) of a failure in one line."""
    requests = require("requests", "dicom", "DICOMweb")
    try:
        return fn(*args, **kw)
    except requests.HTTPError as e:
        r = e.response
        status = f"HTTP {r.status_code} {r.reason}" if r is not None else "an HTTP error"
        raise DicomwebError(f"{what} at {url}: {status}") from None
    except requests.exceptions.SSLError as e:
        raise DicomwebError(f"{what} at {url}: TLS failed ({first_line(e, 160)}); --insecure skips the "
                            "certificate check") from None
    except requests.ConnectionError:
        raise DicomwebError(f"{what} at {url}: cannot connect (refused, or no such host)") from None
    except requests.Timeout:
        raise DicomwebError(f"{what} at {url}: no answer within {TIMEOUT_S:.0f} s") from None
    except requests.RequestException as e:  # the message names the URL, never the credentials
        raise DicomwebError(f"{what} at {url}: {type(e).__name__}: {first_line(e, 200)}") from None


def _tag(item: Dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def image_series(client: Any, web: DicomwebOptions) -> List[Tuple[str, str]]:
    """(SeriesInstanceUID, description) of the study's image series (QIDO-RS), or just `web.series`."""
    found = _call(f"QIDO-RS search of study {web.study}", web.url, client.search_for_series,
                  study_instance_uid=web.study, fields=[MODALITY_TAG, DESCRIPTION_TAG])
    listed = [(_tag(s, SERIES_UID_TAG), _tag(s, DESCRIPTION_TAG), _tag(s, MODALITY_TAG).upper()) for s in found]
    if web.series is not None:
        chosen = [(uid, desc) for uid, desc, _ in listed if uid == web.series]
        if not chosen:
            raise DataError(f"study {web.study} at {web.url} has no series {web.series}")
        return chosen
    images = [(uid, desc) for uid, desc, modality in listed if modality not in NON_IMAGE_MODALITIES]
    if not images:
        raise DataError(f"study {web.study} at {web.url} has no image series")
    return images


def _retrieve(http: Any, web: DicomwebOptions, wanted: List[Tuple[str, str]], opts: PredictOptions,
              skipped: List[Dict[str, str]]) -> Iterator[Tuple[DicomSeries, List[Any]]]:
    """(series, pictures) of each series, retrieved (WADO-RS) one at a time as the pipeline asks."""
    for uid, description in wanted:
        label = series_label(uid, description)
        datasets = _call(f"WADO-RS retrieval of {label}", web.url, retrieve_series, http, web.url, web.study, uid)
        try:
            if not datasets:
                raise DataError(f"{label}: the server returned no instances")
            series = series_from_datasets([(f"{uid}/{ds.SOPInstanceUID}", ds) for ds in datasets], window=opts.window)
        except DataError as e:
            if not opts.skip_bad:
                raise
            log.error(f"error: {first_line(e)}")
            skipped.append({"path": label, "error": first_line(e)})
            continue
        yield series, series.pictures


def _segment(source: Path, http: Any, web: DicomwebOptions, wanted: List[Tuple[str, str]], opts: PredictOptions,
             skipped: List[Dict[str, str]]) -> Tuple[List[Tuple[DicomSeries, Any]], Dict[str, Any], Contract]:
    """The SEG of every retrieved series, made in memory: [(series, seg)], the runner's header, the contract."""
    from engines.predict.seg import make_seg  # highdicom

    runner, contract, header = open_runner(source, opts, mode="throughput" if opts.mode == "auto" else opts.mode)
    segs = []
    try:
        batch_size = contract.batch_size(opts.batch_size)
        runner.check_batch(batch_size)
        spec = seg_spec(source, contract, header, opts)
        for series, preds in predict_jobs(_retrieve(http, web, wanted, opts, skipped), runner, contract,
                                          batch_size=batch_size, upsampling=opts.upsample,
                                          probabilities=opts.probabilities):
            masks, probabilities = stack_masks(preds)
            segs.append((series, make_seg(series, masks, spec, probabilities)))
    finally:
        runner.close()
    return segs, header, contract


def store(client: Any, url: str, segs: List[Any]) -> None:
    """Store SEGs in one STOW-RS request, then check with QIDO-RS that the server holds each of them.

    A refusal (HTTP status), a partial store the server reports (FailedSOPSequence), or a SEG the server
    answered for but does not hold (some servers drop what a filter refuses and still answer 200) is an error.
    """
    answer = _call(f"STOW-RS of {len(segs)} SEG(s)", url, client.store_instances, segs)
    failed = answer.get(FAILED_SOP_SEQUENCE) if answer is not None else None
    if failed:
        reason = failed[0].get("FailureReason", "?")
        raise DicomwebError(f"STOW-RS at {url}: the server refused {len(failed)} of {len(segs)} SEG(s) "
                            f"(failure reason {reason}, SOP instance {failed[0].get('ReferencedSOPInstanceUID')})")
    missing = [seg.SOPInstanceUID for seg in segs if not _call(
        "QIDO-RS check of a stored SEG", url, client.search_for_instances, study_instance_uid=seg.StudyInstanceUID,
        series_instance_uid=seg.SeriesInstanceUID, search_filters={"SOPInstanceUID": seg.SOPInstanceUID})]
    if missing:
        raise DicomwebError(f"STOW-RS at {url}: the server answered but does not hold {len(missing)} of {len(segs)} "
                            f"SEG(s) (e.g. {missing[0]}); a filter of the server may have refused them")


def predict_dicomweb(source: Path, web: DicomwebOptions, opts: PredictOptions) -> Dict[str, Any]:
    """Segment a study's series from a DICOMweb server and store their SEGs back (or at `web.out_url`).

    Arguments:
      source: a build directory or checkpoint folder (with `opts.server`: the build a Triton server serves).
      web: the server, study, series and where to store.
      opts: the predict options (`out`, when set, also gets the SEG files).

    Returns:
      the report: header, `series` (per SEG: source series, its UIDs, frames, bytes), `skipped`, totals.

    Raises:
      DicomwebError: a request refused or failed (HTTP status); DataError: a bad series (without skip_bad).
    """
    from engines.predict.seg import write_seg

    t0 = time.perf_counter()
    http = session(web.insecure)
    client = connect(web.url, http=http)
    target_url = web.out_url or web.url
    target = connect(target_url, web.insecure) if web.out_url else client
    wanted = image_series(client, web)
    skipped: List[Dict[str, str]] = []
    segs, header, contract = _segment(Path(source), http, web, wanted, opts, skipped)
    if not segs:
        raise DataError(f"study {web.study}: no series could be segmented ({len(skipped)} skipped)")
    entries = []
    for series, seg in segs:
        where = f"{target_url}/studies/{seg.StudyInstanceUID}/series/{seg.SeriesInstanceUID}"
        if opts.out is not None and str(opts.out):
            where = str(write_seg(Path(opts.out) / f"{series.uid}.seg.dcm", seg))
        entries.append(seg_entry(series, seg, where, len(_encoded(seg))))
    store(target, target_url, [seg for _, seg in segs])
    for e in entries:
        log.info(f"stored SEG {e['sop_instance_uid']} (series {e['series_instance_uid']}) of series "
                 f"{e['source_series']} at {target_url}")
    return {**header, "source": str(source), "dicomweb": web.url, "stored_at": target_url, "study": web.study,
            "mask_kind": "binary" if contract.binary else "labels", "series": entries, "skipped": skipped,
            "totals": {"series": len(entries), "skipped": len(skipped),
                       "seconds": round(time.perf_counter() - t0, 3)}}


def _encoded(seg: Any) -> bytes:
    """The SEG as a DICOM file's bytes (its size in the report)."""
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
