"""Tiny-config export round trip: the build directory, the graph's contract, parity bounds, shared weights."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest

import icmoe
from engines import load_engine
from engines.eager import EagerEngine
from export.onnx_export import initializer_stats
from export.verify import parity_inputs, run_batched
from icmoe.core.manifest import MANIFEST_NAME, artifact_path, read_manifest
from icmoe.families import get_family
from icmoe.families.icmoe import NaiveICMoE

ICMOE = get_family("icmoe")

FAMILY = get_family("icmoe")


@pytest.fixture(scope="module")
def parity(tiny_build):
    """Eager FP32, ORT FP32 and ORT FP16 outputs on a 64-image parity set (half synthetic, half random)."""
    images = parity_inputs(FAMILY, 64, 128, seed=0)
    outs = {}
    with EagerEngine.from_build(tiny_build) as eager:
        outs["eager"] = run_batched(eager, images, 4)
    for prec in ("fp32", "fp16"):
        with load_engine(tiny_build, "onnxruntime", prec) as eng:
            outs[prec] = run_batched(eng, images, 4)
    return images, outs


def test_build_directory_layout(tiny_build, tiny_checkpoint):
    names = {p.name for p in tiny_build.iterdir()}
    assert {"model.onnx", "model.fp16.onnx", MANIFEST_NAME, "build.log", "checkpoint"} <= names
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")], names  # no leftovers
    m = read_manifest(tiny_build)
    assert m["version"] == 2 and m["model"]["family"] == "icmoe"
    assert m["model"]["name"] == "tiny" and m["model"]["config"] == ICMOE.get_config("tiny").to_dict()
    assert m["precision"] == "fp16" and m["image_size"] == 128 and m["opset"] == 18
    assert m["rewrites"] == ["padding_free_windows"]  # export.rewrite, on by default
    assert m["batch"] == {"min": 1, "opt": 2, "max": 4}
    assert m["checkpoint"]["sha256"] == icmoe.checkpoint.read_meta(tiny_checkpoint)["weights_sha256"]
    # the weights travel with the build: a relative path inside it, the source kept for the record
    assert m["checkpoint"]["path"] == "checkpoint" and m["checkpoint"]["source"] == str(tiny_checkpoint.resolve())
    assert icmoe.checkpoint.read_meta(tiny_build / "checkpoint")["weights_sha256"] == m["checkpoint"]["sha256"]
    assert [i["name"] for i in m["inputs"]] == ["image"]
    assert [(o["name"], o["dtype"]) for o in m["outputs"]] == [("logits", "float32"), ("mask", "uint8"), ("expert", "int32")]
    for name in ("model.onnx", "model.fp16.onnx"):
        info = m["artifacts"][name]
        data = (tiny_build / name).read_bytes()
        assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["bytes"] == len(data)
        assert artifact_path(tiny_build, name) == tiny_build / name
    assert {"torch", "onnx", "onnxruntime"} <= set(m["versions"])
    assert m["verify"]["passed"] is True and m["verify"]["n"] == 16
    log = (tiny_build / "build.log").read_text()
    assert "onnx: model.onnx" in log and "fp16: model.fp16.onnx" in log and "verify: onnxruntime-fp32" in log


def test_graph_contract(tiny_build):
    model = onnx.load(str(tiny_build / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    g = model.graph
    assert [i.name for i in g.input] == ["image"]
    assert [o.name for o in g.output] == ["logits", "mask", "expert"]

    def sig(vi):
        t = vi.type.tensor_type
        return t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]

    T = onnx.TensorProto
    assert sig(g.input[0]) == (T.FLOAT, ["batch", 3, 128, 128])
    assert sig(g.output[0]) == (T.FLOAT, ["batch", 1, 128, 128])
    assert sig(g.output[1]) == (T.UINT8, ["batch", 1, 128, 128])
    assert sig(g.output[2]) == (T.INT32, ["batch"])
    ops = {n.op_type for n in g.node}
    assert {"ArgMin", "GatherElements", "ReduceSum", "Abs"} <= ops  # voting as standard ONNX ops
    assert all(n.domain in ("", "ai.onnx") for n in g.node), "no custom ops in the portable graph"


def test_fp32_parity_with_eager(parity):
    images, outs = parity
    r = FAMILY.parity.compare(outs["eager"], outs["fp32"], FAMILY.parity.tolerances("fp32"))
    assert r["images"] == 64
    assert r["max_abs_logit"] <= 1e-3, r
    assert r["agreement"] == 1.0 and r["flipped"] <= 1e-4, r
    assert np.array_equal(outs["eager"]["expert"], outs["fp32"]["expert"])
    assert r["logits_within_tol"] is True and r["passed"]
    # Not vacuous: the experts disagree somewhere, and the masks are neither empty nor full everywhere.
    assert outs["eager"]["mask"].mean() not in (0.0, 1.0)


def test_fp16_parity_with_eager(parity):
    _, outs = parity
    r = FAMILY.parity.compare(outs["eager"], outs["fp16"], FAMILY.parity.tolerances("fp16"))
    assert r["passed"] and r["logits_within_tol"], r
    assert r["flipped"] <= 5e-3 and r["agreement"] >= 0.95, r
    assert r["min_dice"] >= 0.99, r  # reported beside the gates
    assert r["max_abs_logit"] > 0  # it really ran in reduced precision
    assert outs["fp16"]["logits"].dtype == np.float32 and outs["fp16"]["mask"].dtype == np.uint8
    assert outs["fp16"]["expert"].dtype == np.int32


def test_dynamic_batch_and_batch_independence(tiny_build, parity):
    """FP32: an image's mask and chosen candidate are identical whatever its batch (balancing off at
    inference); its logits differ only in float rounding (ONNX Runtime's GEMM blocking follows the batch)."""
    images, outs = parity
    with load_engine(tiny_build, "onnxruntime", "fp32") as eng:
        alone = run_batched(eng, images[:8], 1)
        for b in (1, 3, 4):
            out = eng.infer(images[:b])
            assert out["logits"].shape == (b, 1, 128, 128) and out["expert"].shape == (b,)
            np.testing.assert_array_equal(out["mask"], alone["mask"][:b])
            np.testing.assert_array_equal(out["expert"], alone["expert"][:b])
            np.testing.assert_allclose(out["logits"], alone["logits"][:b], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(outs["fp32"]["mask"][:8], alone["mask"])  # batch 4 (the parity run) vs 1
    np.testing.assert_array_equal(outs["fp32"]["expert"][:8], alone["expert"])


def test_fp16_batch_consistency_is_reported(tiny_build):
    """verify reports batch 1 vs batched differences per engine: FP32 masks and choices identical,
    FP16 within the bound docs/icmoe.md states."""
    v = read_manifest(tiny_build)["verify"]["engines"]
    fp32 = v["onnxruntime-fp32"]["batch_consistency"]
    assert fp32["mask_differing"] == 0 and fp32["expert_differing"] == 0 and fp32["logits_max_abs"] < 1e-6
    fp16 = v["onnxruntime-fp16"]["batch_consistency"]
    assert fp16["images"] == 8 and fp16["logits_max_abs"] < 5e-3 and fp16["mask_differing"] <= 16


def test_frozen_weights_stored_once(tiny_build, tiny_checkpoint):
    """Every frozen ViT tensor appears exactly once among the initializers (the trunk is not copied)."""
    model = icmoe.load(tiny_checkpoint)
    proto = onnx.load(str(tiny_build / "model.onnx"))
    digests = {}
    for init in proto.graph.initializer:
        arr = onnx.numpy_helper.to_array(init)
        if arr.size >= 256:
            d = hashlib.sha256(np.ascontiguousarray(arr, dtype=np.float32).tobytes()).hexdigest()
            digests[d] = digests.get(d, 0) + 1
    k = model.encoder.trunk_depth
    checked = 0
    for name, p in model.encoder.vit.named_parameters():
        # Matrices only: rel-pos tables are gathered into per-block tables, small vectors may be fused.
        if p.numel() < 256 or p.dim() < 2 or "rel_pos" in name:
            continue
        # Trunk blocks (and the patch embedding, neck) are stored once. The last blocks also
        # exist as the semantic expert's copies (equal at random init), so they appear twice.
        tail = any(name.startswith(f"blocks.{i}.") for i in range(k, len(model.encoder.vit.blocks)))
        candidates = [p.detach().numpy(), p.detach().numpy().T]  # Linear weights may be stored transposed
        keys = {hashlib.sha256(np.ascontiguousarray(c, dtype=np.float32).tobytes()).hexdigest() for c in candidates}
        hits = sum(digests.get(key, 0) for key in keys)
        assert hits == (2 if tail else 1), (name, hits)
        checked += 1
    assert checked > 10
    # All stored bytes: about one shared model, far below three full experts.
    naive_bytes = sum(t.numel() * 4 for t in NaiveICMoE.from_shared(model).state_dict().values())
    shared_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    got = initializer_stats(tiny_build / "model.onnx")["bytes"]
    assert got <= shared_bytes * 1.05, (got, shared_bytes)
    assert got < 0.75 * naive_bytes


def test_manifest_json_is_plain_json(tiny_build):
    json.loads((tiny_build / MANIFEST_NAME).read_text())
