"""Multi-class masks through the manifest, the engines and the Triton configs.

A build of the multi-class toy family (`toy_labels`, tests/icmoe/families/toy/: logits (B, 3, S, S), mask
(B, 1, S, S) labels 0..2) records its label names in `model.classes`; every engine loaded from it
carries them (`Engine.class_names`), and every Triton config written for it names them in its
`parameters`, read back with Triton's own ModelConfig protobuf. Manifests without the field read as
binary; manifests whose label names are malformed or contradict the outputs are refused in one line.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from engines import BuildInfo, EngineError, load_engine
from engines.cpp import class_arguments
from engines.eager import EagerEngine
from icmoe.core.manifest import (
    ManifestError,
    checkpoint_path,
    class_names,
    mask_kind,
    new_manifest,
    read_manifest,
    write_manifest,
)
from icmoe.core.specs import BATCH, TensorSpec
from tests.engines.label_checks import check_label_mask
from tests.icmoe.families.toy import LABELS

LOGIT_ATOL = 1e-4


def test_manifest_records_class_names(labels_build):
    m = read_manifest(labels_build)
    assert m["model"]["classes"] == LABELS == ["background", "lesion", "rim"]
    assert class_names(m) == LABELS and mask_kind(m) == "labels"
    on_disk = json.loads((labels_build / "manifest.json").read_text())
    assert on_disk["model"]["classes"] == LABELS
    assert [(o["name"], o["shape"][1]) for o in m["outputs"]] == [("logits", 3), ("mask", 1)]


def _binary_manifest(**kw):
    outputs = [TensorSpec("logits", "float32", (BATCH, 1, 8, 8)), TensorSpec("mask", "uint8", (BATCH, 1, 8, 8))]
    return new_manifest(family="toy", config={"name": "t", "image_size": 8}, precision="fp32", opset=18,
                        inputs=[TensorSpec("image", "float32", (BATCH, 3, 8, 8))], outputs=outputs, batch=(1, 1, 2),
                        **kw)


def test_binary_and_older_manifests_read_as_binary(tmp_path):
    m = _binary_manifest()
    assert m["model"]["classes"] is None
    write_manifest(tmp_path, m)
    assert class_names(read_manifest(tmp_path)) is None and mask_kind(read_manifest(tmp_path)) == "binary"
    del m["model"]["classes"]  # written before label models existed
    write_manifest(tmp_path, m)
    assert "classes" not in json.loads((tmp_path / "manifest.json").read_text())["model"]
    assert class_names(read_manifest(tmp_path)) is None and BuildInfo(tmp_path).mask_kind == "binary"


@pytest.mark.parametrize("classes, match", [
    ("background,lesion,rim", "must be a list of strings"),
    (["background"], "needs 2..256 class names"),
    (["background", "lesion", "lesion"], "'lesion' given twice"),
    (["background", "lesion,rim", "x"], "contains a comma"),
    (["background", "", "rim"], "not a non-empty string"),
    (["background", "lesion"], "2 class names, but logits has 3 channels"),
    (["background", "lesion", "rim", "core"], "4 class names, but logits has 3 channels"),
])
def test_edited_classes_refused(labels_build, tmp_path, classes, match):
    build = tmp_path / "build"
    shutil.copytree(labels_build, build)
    m = json.loads((build / "manifest.json").read_text())
    m["model"]["classes"] = classes
    (build / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=match) as err:
        read_manifest(build)
    assert str(build / "manifest.json") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(EngineError, match=match):  # every engine reads through the manifest
        load_engine(build, "onnxruntime")


def test_label_names_need_a_uint8_mask(tmp_path):
    with pytest.raises(ManifestError, match="class names need a uint8 output named mask"):
        new_manifest(family="toy", config={"name": "t", "image_size": 8}, precision="fp32", opset=18,
                     inputs=[TensorSpec("image", "float32", (BATCH, 3, 8, 8))],
                     outputs=[TensorSpec("mask", "float32", (BATCH, 1, 8, 8))], batch=(1, 1, 2),
                     class_names=["background", "lesion"])
    with pytest.raises(ManifestError, match="model family 'toy': class name 'a' given twice"):
        _binary_manifest(class_names=["background", "a", "a"])


def test_engines_carry_class_names(labels_build, labels_family):
    images = labels_family.parity.synthetic_inputs(3, 64, seed=1)
    assert BuildInfo(labels_build).class_names == LABELS
    with load_engine(labels_build, "eager") as eager, load_engine(labels_build, "onnxruntime", "fp32") as ort:
        ref, out = eager.infer(images), ort.infer(images)
        for engine in (eager, ort):
            assert engine.class_names == LABELS and engine.mask_kind == "labels", engine.name
    assert out["logits"].shape == (3, 3, 64, 64) and out["mask"].dtype == np.uint8
    np.testing.assert_array_equal(ref["mask"][:, 0], ref["logits"].argmax(1))  # the mask is the label map
    assert set(np.unique(ref["mask"])) == {0, 1, 2}, "the test images should show every label"
    assert float(np.abs(out["logits"] - ref["logits"]).max()) <= LOGIT_ATOL
    check_label_mask(out["mask"], ref["mask"], ref["logits"], LOGIT_ATOL)


def test_eager_engine_from_a_checkpoint_carries_class_names(labels_build):
    folder = checkpoint_path(labels_build, read_manifest(labels_build))
    with EagerEngine.from_checkpoint(folder) as eager:
        assert eager.class_names == LABELS and eager.mask_kind == "labels"


def test_class_arguments_for_icmoe_trt(labels_build, tmp_path):
    assert class_arguments(labels_build) == ["--classes", "background,lesion,rim", "--mask-rule", "argmax"]
    write_manifest(tmp_path, _binary_manifest())
    assert class_arguments(tmp_path) == []


def _parse(path):
    """Triton's own ModelConfig parser, independent of the code under test."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_triton_configs_name_the_labels(labels_build, tmp_path):
    pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (the test extra)")
    from tritonclient.grpc import model_config_pb2 as mc

    from engines.triton import make_repository
    from icmoe.core.manifest import add_artifact

    build = tmp_path / "build"  # a copy that also lists a model.plan: no TensorRT here to build a real one
    shutil.copytree(labels_build, build)
    (build / "model.plan").write_bytes(b"not a real engine: this test checks the config only" * 10)
    add_artifact(build, "model.plan", kind="tensorrt", precision="fp32")
    written = make_repository(build, tmp_path / "repo", kinds=["tensorrt", "onnxruntime", "python"])
    assert sorted(p.name for p in written) == ["toy_labels_onnxruntime", "toy_labels_python", "toy_labels_tensorrt"]
    for model in written:
        cfg = _parse(model / "config.pbtxt")
        assert cfg.parameters["mask_kind"].string_value == "labels", model.name
        assert cfg.parameters["class_names"].string_value.split(",") == LABELS, model.name
        outs = {o.name: (o.data_type, list(o.dims)) for o in cfg.output}
        assert outs == {"logits": (mc.TYPE_FP32, [3, 64, 64]), "mask": (mc.TYPE_UINT8, [1, 64, 64])}, model.name
        assert cfg.max_batch_size == 4
