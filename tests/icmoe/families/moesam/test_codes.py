"""MoE-SAM's segment codes: every organ of its datasets has a SNOMED CT code, and each code agrees with
pydicom's dictionary of DICOM's coded concepts (value and meaning); other names get the generic code."""

from __future__ import annotations

import pytest

from icmoe.core.codes import GENERIC_CODE
from icmoe.data.volumes.spec import VOLUME_DATASETS
from icmoe.families import get_family

codes = pytest.importorskip("pydicom.sr.codedict", reason="needs pydicom (the dicom extra)").codes
SCT = {}  # value -> the meanings DICOM's dictionary gives it (a concept may have several)
for _keyword in codes.SCT.dir():
    _code = getattr(codes.SCT, _keyword)
    SCT.setdefault(_code.value, set()).add(_code.meaning)


def declared(family, config):
    return get_family(family).graph.segment_codes(config)


@pytest.mark.parametrize("dataset", ["acdc", "btcv", "mmwhs", "synapse"])
def test_every_organ_has_a_code_dicom_knows(dataset):
    family = get_family("moesam")
    config = family.get_config("tiny", **family.training.datasets()[dataset])
    entries = declared("moesam", config)
    assert len(entries) == len(VOLUME_DATASETS[dataset].classes)
    for name, entry in zip(VOLUME_DATASETS[dataset].classes, entries):
        assert entry != GENERIC_CODE, name
        for concept in [entry["category"], entry["type"]] + ([entry["modifier"]] if "modifier" in entry else []):
            assert concept["scheme"] == "SCT" and concept["meaning"] in SCT.get(concept["value"], ()), (name, concept)


def test_laterality_is_a_modifier_and_unknown_names_are_generic():
    family = get_family("moesam")
    btcv = declared("moesam", family.get_config("tiny", **family.training.datasets()["btcv"]))
    right, left = btcv[1], btcv[2]  # right kidney, left kidney
    assert right["type"] == left["type"]
    assert (right["modifier"]["meaning"], left["modifier"]["meaning"]) == ("Right", "Left")
    assert declared("moesam", family.get_config("tiny")) == [GENERIC_CODE] * 3  # class1..class3


def test_icmoe_declares_a_lesion_dicom_knows():
    (entry,) = declared("icmoe", get_family("icmoe").get_config("tiny"))
    for concept in (entry["category"], entry["type"]):
        assert concept["meaning"] in SCT[concept["value"]]
    assert entry["type"]["meaning"] == "Lesion"
