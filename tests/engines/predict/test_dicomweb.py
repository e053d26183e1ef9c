"""The PACS round trip against a real Orthanc with its DICOMweb plugin (tests/engines/predict/orthanc.py):
a generated study (CT-like and MR-like series) is uploaded, `python -m engines.predict --dicomweb`
retrieves it (WADO-RS), stores one SEG per series back (STOW-RS), and the SEGs found with QIDO-RS decode
to the masks of a local `--format png` run, frame by frame, at their source slices. Wrong credentials and
a PACS that refuses the SEGs meet one-line errors with the HTTP status, and nothing is stored.
"""

from __future__ import annotations

import json
import socket

import pytest

from engines.predict import main as predict_main
from engines.predict.dicomweb import PASSWORD_ENV, TOKEN_ENV, USER_ENV, connect, multipart_parts, session
from tests.engines.predict.orthanc import PASSWORD, REFUSE_SEG, USER, orthanc, orthanc_missing
from tests.engines.predict.seg_checks import check_seg
from tests.icmoe.data.series_samples import write_study

hd = pytest.importorskip("highdicom", reason="needs highdicom (the dicom extra)")
pytest.importorskip("dicomweb_client", reason="needs dicomweb-client (the dicom extra)")

# Refuses every write (STOW-RS is a POST) with HTTP 403: a PACS that will not take the results.
READ_ONLY = """function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  return method ~= 'POST'
end
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pacs_study")
    specs = write_study(folder, enhanced=False)  # CT, CT in reversed order, oblique MR: one study
    return folder, specs


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, study):
    """A running Orthanc holding the study (uploaded over STOW-RS); yields its DICOMweb root."""
    if orthanc_missing():
        pytest.skip(orthanc_missing())
    _, specs = study
    with pytest.MonkeyPatch.context() as env, orthanc(tmp_path_factory.mktemp("orthanc")) as url:
        env.setenv(USER_ENV, USER)
        env.setenv(PASSWORD_ENV, PASSWORD)
        connect(url).store_instances([ds for spec in specs.values() for ds in spec.datasets])
        yield url


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    return monkeypatch


def segs_in(url, study_uid):
    """The SEG series of a study, found with QIDO-RS."""
    client = connect(url)
    return client.search_for_series(study_instance_uid=study_uid, search_filters={"Modality": "SEG"})


def run(args, capsys):
    code = predict_main([str(a) for a in args] + ["--no-progress", "--threads", "1"])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_round_trip_stores_one_seg_per_series_equal_to_a_local_run(pacs, study, tiny_build, credentials, tmp_path,
                                                                     capsys):
    folder, specs = study
    study_uid = next(iter(specs.values())).datasets[0].StudyInstanceUID
    assert segs_in(pacs, study_uid) == []
    code, out, err = run([tiny_build, "--dicomweb", pacs, "--study", study_uid, "-q", "--json", tmp_path / "r.json"],
                         capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert sorted(e["source_series"] for e in report["series"]) == sorted(s.uid for s in specs.values())
    for e in report["series"]:  # the new SEGs' UIDs are printed
        assert f"{e['source_series']} -> SEG study {study_uid} series {e['series_instance_uid']} " \
               f"instance {e['sop_instance_uid']}" in out
    assert PASSWORD not in out + err
    code, _, err = run([tiny_build, folder, "--out", tmp_path / "png", "--format", "png", "-q"], capsys)
    assert code == 0, err
    found = segs_in(pacs, study_uid)
    assert len(found) == len(specs)
    client = connect(pacs)
    by_source = {e["series_instance_uid"]: e["source_series"] for e in report["series"]}
    for item in found:
        seg_series = item["0020000E"]["Value"][0]
        (ds,) = client.retrieve_series(study_uid, seg_series)
        spec = next(s for s in specs.values() if s.uid == by_source[seg_series])
        check_seg(hd.seg.Segmentation.from_dataset(ds), spec, folder, tmp_path / "png", [(1, "foreground")], True)


def test_netrc_credentials_and_one_series(pacs, study, tiny_build, monkeypatch, tmp_path, capsys):
    _, specs = study
    spec = specs["mr_oblique"]
    study_uid = spec.datasets[0].StudyInstanceUID
    for k in (USER_ENV, PASSWORD_ENV, TOKEN_ENV):
        monkeypatch.delenv(k, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    before = len(segs_in_with(pacs, study_uid, monkeypatch))
    code, out, err = run([tiny_build, "--dicomweb", pacs, "--study", study_uid, "--series", spec.uid,
                          "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert len(segs_in_with(pacs, study_uid, monkeypatch)) == before + 1
    assert (tmp_path / "o" / f"{spec.uid}.seg.dcm").is_file() and out.count(" -> SEG ") == 1


def segs_in_with(url, study_uid, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv(USER_ENV, USER)
        m.setenv(PASSWORD_ENV, PASSWORD)
        return segs_in(url, study_uid)


def test_wrong_credentials_are_one_line_with_the_status_and_never_printed(pacs, study, tiny_build, credentials,
                                                                          capsys):
    _, specs = study
    study_uid = specs["ct"].datasets[0].StudyInstanceUID
    before = len(segs_in(pacs, study_uid))
    credentials.setenv(PASSWORD_ENV, "not-the-password")
    code, out, err = run([tiny_build, "--dicomweb", pacs, "--study", study_uid], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "HTTP 401 Unauthorized" in lines[0], err
    assert "not-the-password" not in out + err and PASSWORD not in out + err
    credentials.setenv(PASSWORD_ENV, PASSWORD)
    assert len(segs_in(pacs, study_uid)) == before


def test_a_pacs_that_refuses_the_segs_stores_nothing(pacs, study, tiny_build, credentials, tmp_path, capsys):
    _, specs = study
    study_uid = specs["ct"].datasets[0].StudyInstanceUID
    before = len(segs_in(pacs, study_uid))
    with orthanc(tmp_path / "read_only", lua=READ_ONLY) as refusing:
        code, _, err = run([tiny_build, "--dicomweb", pacs, "--study", study_uid, "--series", specs["ct"].uid,
                            "--dicomweb-out", refusing], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: STOW-RS of 1 SEG(s) at "), err
        assert "HTTP 403 Forbidden" in lines[0]
        assert connect(refusing).search_for_series() == []
    with orthanc(tmp_path / "filtering", lua=REFUSE_SEG) as filtering:  # answers 200 but drops every SEG
        code, _, err = run([tiny_build, "--dicomweb", pacs, "--study", study_uid, "--series", specs["ct"].uid,
                            "--dicomweb-out", filtering], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "does not hold 1 of 1 SEG(s)" in lines[0], err
    assert len(segs_in(pacs, study_uid)) == before


def test_an_unreachable_server_is_one_line(tiny_build, capsys):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = run([tiny_build, "--dicomweb", f"http://127.0.0.1:{port}/dicom-web", "--study", "1.2.3"], capsys)
    assert code == 2 and err.strip() == (f"error: QIDO-RS search of study 1.2.3 at http://127.0.0.1:{port}/dicom-web: "
                                         "cannot connect (refused, or no such host)")


def test_credentials_on_the_command_line_are_refused(tiny_build, capsys):
    code, _, err = run([tiny_build, "--dicomweb", f"http://{USER}:{PASSWORD}@127.0.0.1:9/dicom-web",
                        "--study", "1.2.3"], capsys)
    assert code == 2 and "credentials in a URL are not accepted" in err and PASSWORD not in err


def test_credentials_come_from_the_environment_and_tls_is_verified(monkeypatch):
    for k in (USER_ENV, PASSWORD_ENV, TOKEN_ENV):
        monkeypatch.delenv(k, raising=False)
    plain = session()
    assert plain.auth is None and "Authorization" not in plain.headers and plain.verify is True  # netrc: requests
    monkeypatch.setenv(USER_ENV, "u")
    monkeypatch.setenv(PASSWORD_ENV, "p")
    assert session().auth == ("u", "p")
    monkeypatch.setenv(TOKEN_ENV, "t0ken")
    token = session(insecure=True)
    assert token.headers["Authorization"] == "Bearer t0ken" and token.auth is None and token.verify is False


def test_multipart_answers_are_split_into_their_parts():
    a, b = b"\x00\x01\r\n\r\nbinary\r\n--not-the-boundary", b"DICM" * 3
    body = (b"--xyz\r\nContent-Type: application/dicom\r\n\r\n" + a + b"\r\n--xyz\r\n"
            b"Content-Type: application/dicom\r\nContent-Length: 12\r\n\r\n" + b + b"\r\n--xyz--\r\n")
    assert multipart_parts('multipart/related; type="application/dicom"; boundary=xyz', body) == [a, b]
    with pytest.raises(Exception, match="not multipart/related with a boundary"):
        multipart_parts("application/json", b"[]")
