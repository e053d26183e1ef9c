"""Segment codes: validation, the `--seg-codes` override file, and the manifest's copy (old manifests get
the generic code; an edited, malformed one is a one-line error)."""

from __future__ import annotations

import json
import shutil

import pytest

from icmoe.core.codes import GENERIC_CODE, check_codes, generic_codes, read_codes_file
from icmoe.core.errors import DataError
from icmoe.core.manifest import ManifestError, read_manifest, segment_codes

LESION = {"category": {"value": "49755003", "scheme": "SCT", "meaning": "Morphologically Abnormal Structure"},
          "type": {"value": "52988006", "scheme": "SCT", "meaning": "Lesion"}}


def test_check_codes_accepts_entries_and_refuses_malformed_ones():
    assert check_codes([LESION], 1, "here") == [LESION]
    with pytest.raises(DataError, match=r"here: need 2 segment code\(s\), one per foreground label, got 1"):
        check_codes([LESION], 2, "here")
    bad = {**LESION, "type": {"value": "1", "scheme": "SCT"}}
    with pytest.raises(DataError, match="here: label 1 type: a coded concept is"):
        check_codes([bad], 1, "here")
    with pytest.raises(DataError, match="keys category, type"):
        check_codes([{"type": LESION["type"]}], 1, "here")


def test_override_file_by_name_or_value(tmp_path):
    labels = [(1, "RV"), (2, "MYO"), (3, "LV")]
    path = tmp_path / "codes.json"
    path.write_text(json.dumps({"MYO": LESION, "3": LESION}))
    got = read_codes_file(path, labels, generic_codes(3))
    assert got == [GENERIC_CODE, LESION, LESION]
    path.write_text(json.dumps({"liver": LESION}))
    with pytest.raises(DataError, match=r"'liver' names no label of this model \(labels: 1 \(RV\), 2 \(MYO\), 3"):
        read_codes_file(path, labels, generic_codes(3))
    path.write_text("{not json")
    with pytest.raises(DataError, match="unreadable segment codes"):
        read_codes_file(path, labels, generic_codes(3))


def test_manifests_carry_the_familys_codes_and_old_ones_get_the_generic_code(tiny_build, tmp_path):
    manifest = read_manifest(tiny_build)
    assert segment_codes(manifest) == [LESION]  # IC-MoE's declaration, written by the build
    old = tmp_path / "old"
    shutil.copytree(tiny_build, old)
    raw = json.loads((old / "manifest.json").read_text())
    del raw["model"]["segment_codes"]  # as written before segment codes existed
    (old / "manifest.json").write_text(json.dumps(raw))
    assert segment_codes(read_manifest(old)) == [GENERIC_CODE]
    raw["model"]["segment_codes"] = [LESION, LESION]  # edited: two codes for a binary mask
    (old / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"need 1 segment code\(s\), one per foreground label, got 2"):
        read_manifest(old)
