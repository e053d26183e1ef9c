"""The manifest's record of several precisions and of the mask rule: what a build may hold, and what
`read_manifest` refuses in one line (an edited or inconsistent manifest)."""

from __future__ import annotations

import pytest

from icmoe.core.io import atomic_write_json
from icmoe.core.manifest import (
    ManifestError,
    build_precisions,
    gate_precision,
    graph_precision,
    new_manifest,
    read_manifest,
)
from icmoe.core.specs import BATCH, TensorSpec

S = 8


def _outputs(channels: int):
    return [TensorSpec("logits", "float32", (BATCH, channels, S, S)), TensorSpec("mask", "uint8", (BATCH, 1, S, S))]


def _manifest(**kw):
    args = dict(family="toy", config={"name": "t", "image_size": S}, precision="fp16", opset=18, batch=(1, 1, 2),
                inputs=[TensorSpec("image", "float32", (BATCH, 3, S, S))], outputs=_outputs(1))
    args.update(kw)
    return new_manifest(**args)


def _write(tmp_path, m):
    m["artifacts"] = {"model.onnx": {"precision": "fp32"}, "model.fp16.onnx": {"precision": "fp16"},
                      "model.int8.onnx": {"precision": "int8"}}
    atomic_write_json(tmp_path / "manifest.json", m)
    return tmp_path


def test_several_precisions_are_recorded_and_read(tmp_path):
    m = _manifest(precisions=["fp16", "int8"], mask_rule="threshold")
    assert m["precision"] == "fp16" and m["precisions"] == ["fp16", "int8"]
    back = read_manifest(_write(tmp_path, m))
    assert build_precisions(back) == ["fp16", "int8"] and back["model"]["mask_rule"] == "threshold"
    old = dict(back)
    del old["precisions"]  # manifests written before builds held several precisions
    assert build_precisions(old) == ["fp16"]


def test_an_int8_graph_the_precisions_do_not_list_is_refused(tmp_path):
    with pytest.raises(ManifestError, match="lists model.int8.onnx of another precision"):
        read_manifest(_write(tmp_path, _manifest()))


@pytest.mark.parametrize("kw, words", [
    (dict(precisions=["int8", "fp16"]), "must start with the build's precision 'fp16'"),
    (dict(precisions=["fp16", "fp16"]), "each once"),
    (dict(precisions=["fp16", "bf16"]), "precision must be one of fp32, fp16, int8"),
    (dict(mask_rule="argmax"), "mask rule 'argmax' does not fit a binary mask"),
    (dict(mask_rule="nearest"), "unknown mask rule 'nearest'"),
    (dict(mask_rule="threshold", outputs=_outputs(3)), "does not fit a binary mask with logits of 3 channels"),
    (dict(mask_rule="threshold", outputs=[TensorSpec("mask", "uint8", (BATCH, 1, S, S))]), "needs a (batch, K, S, S)"),
])
def test_inconsistent_declarations_are_refused(kw, words):
    with pytest.raises(ManifestError, match=words.replace("(", r"\(").replace(")", r"\)")):
        _manifest(**kw)


def test_an_edited_mask_rule_is_refused(tmp_path):
    m = _manifest(precisions=["fp16", "int8"], mask_rule="threshold")
    m["model"]["mask_rule"] = "argmax"
    with pytest.raises(ManifestError, match="mask rule 'argmax' does not fit a binary mask") as e:
        read_manifest(_write(tmp_path, m))
    assert "\n" not in str(e.value)


def test_label_models_take_argmax():
    m = _manifest(outputs=_outputs(3), class_names=["background", "a", "b"], mask_rule="argmax")
    assert m["model"]["classes"] == ["background", "a", "b"] and m["model"]["mask_rule"] == "argmax"


def test_engine_precisions_map_to_graphs_and_gates():
    assert [graph_precision(p) for p in ("fp32", "fp16", "bf16", "int8", "int8-bf16")] == \
        ["fp32", "fp16", "fp32", "int8", "int8"]
    # INT8 with BF16 for the floating-point remainder is an INT8 engine; BF16 alone has gates of its own
    assert [gate_precision(p) for p in ("bf16", "int8-bf16", "int8")] == ["bf16", "int8", "int8"]
