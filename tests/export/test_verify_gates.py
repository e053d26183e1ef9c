"""The parity gates fail a graph with a real precision defect and pass the graphs the build makes.

The range defect: a cast to FP16 (and back) placed where activations exceed FP16's range. The model is
a random-init tiny IC-MoE whose neck convolution is scaled by 1e5: SAM's LayerNorm2d right after
it normalises the scale away, so the FP32 function is unchanged, but that convolution's outputs
(~1e4..1e6) overflow FP16 (max 65504) and the normalisation then turns inf into NaN.

Ties: a tiny IC-MoE trained one epoch (seeded) has near-identical experts, so PPAV's vote nearly ties
and FP16 rounding may flip it: its FP16 build passes, since a flip within the reference's own margin is
judged against eager's output for the candidate the engine chose; a wrong weight in one expert still
fails; INT8 judges the same flip by its own, wider bound.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from engines.eager import EagerEngine
from engines.onnxruntime import OnnxRuntimeEngine
from export.build import build
from export.onnx_export import export_onnx
from export.verify import eager_choices, parity_inputs, run_batched, verify_build
from icmoe.families import get_family
from icmoe.training import train

FAMILY = get_family("icmoe")


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """(model, FP32 graph, eager reference on 8 parity images, the images)."""
    torch.manual_seed(0)
    model = FAMILY.build(FAMILY.get_config("tiny"))
    with torch.no_grad():
        model.encoder.vit.neck[0].weight.mul_(1e5)
    path = export_onnx(model, tmp_path_factory.mktemp("gates") / "model.onnx", batch=(1, 2, 4))
    images = parity_inputs(FAMILY, 8, 128, seed=0)
    with EagerEngine(model=model) as eager:
        reference = run_batched(eager, images, 4)
    return model, path, reference, images


def _run(model, path, images):
    cfg = model.config
    with OnnxRuntimeEngine(path=path, inputs=FAMILY.graph.inputs(cfg), outputs=FAMILY.graph.outputs(cfg)) as engine:
        return run_batched(engine, images, 4)


def _with_fp16_round_trip(path, out_path):
    """The graph with Cast(FLOAT16) -> Cast(FLOAT) on the output of the neck's first convolution."""
    g = onnx.load(str(path))
    conv = next(n for n in g.graph.node if n.op_type == "Conv" and any("neck.0.weight" in i for i in n.input))
    name = conv.output[0]
    for n in g.graph.node:
        n.input[:] = [f"{name}_fp32" if i == name else i for i in n.input]
    at = list(g.graph.node).index(conv) + 1
    g.graph.node.insert(at, helper.make_node("Cast", [f"{name}_fp16"], [f"{name}_fp32"], to=TensorProto.FLOAT))
    g.graph.node.insert(at, helper.make_node("Cast", [name], [f"{name}_fp16"], to=TensorProto.FLOAT16))
    onnx.save(g, str(out_path))
    return out_path


def test_the_exported_graph_passes_every_gate(scaled):
    model, path, reference, images = scaled
    out = _run(model, path, images)
    for precision in ("fp32", "fp16"):
        report = FAMILY.parity.compare(reference, out, FAMILY.parity.tolerances(precision))
        assert report["passed"], (precision, report)


def test_a_cast_to_fp16_in_the_wrong_place_fails_the_fp16_gates(scaled, tmp_path):
    model, path, reference, images = scaled
    out = _run(model, _with_fp16_round_trip(path, tmp_path / "defect.onnx"), images)
    report = FAMILY.parity.compare(reference, out, FAMILY.parity.tolerances("fp16"))
    assert not report["passed"] and not report["logits_within_tol"], report
    assert report["flipped"] > 5e-3  # the masks say so too


def test_tolerances_are_what_the_docs_state():
    fp32, fp16 = FAMILY.parity.tolerances("fp32"), FAMILY.parity.tolerances("fp16")
    assert (fp32.atol, fp32.rtol, fp32.max_flipped) == (1e-3, 1e-4, 1e-4)
    assert fp16.rtol == fp16.scaled_atol == 16 * 2.0 ** -11 and fp16.max_flipped == 5e-3
    # a logit of 100 off by 5e-3 passes FP32 (rounding at that scale), a logit of 0.1 off by 5e-3 does not
    ref = np.array([[100.0, 0.1]], np.float32)

    def passes(offset):
        out = {"logits": ref + np.array(offset, np.float32), "mask": ref > 0, "expert": np.zeros(1)}
        return FAMILY.parity.compare({"logits": ref, "mask": ref > 0, "expert": np.zeros(1)}, out, fp32)["passed"]

    assert passes([[5e-3, 0]]) and not passes([[0, 5e-3]])


# ------------------------------------------------------------------ a young model: near-ties in the vote

N_PARITY = 64  # export.build's default parity set, where the unchanged gates failed this model


@pytest.fixture(scope="module")
def young(tmp_path_factory):
    """IC-MoE tiny trained one epoch on the synthetic set (seed 0) and exported FP32 + FP16 (not yet verified)."""
    root = tmp_path_factory.mktemp("young")
    train(dataset="synthetic", data_root=root / "data", out=root / "run", config="tiny", epochs=1, seed=0,
          progress=False, device="cpu")
    return build(root / "run" / "best", precision="fp16", out=root / "b16", backend="onnxruntime", verify=False,
                 progress=False)


@pytest.fixture(scope="module")
def young_reference(young):
    """(parity images, eager's outputs, eager's outputs per choice under the FP16 and INT8 gates, model config)."""
    images = parity_inputs(FAMILY, N_PARITY, 128, seed=0)
    gates = [FAMILY.parity.tolerances(p) for p in ("fp16", "int8")]
    with EagerEngine.from_build(young) as eager:
        reference = run_batched(eager, images, 8)
        choices = eager_choices(FAMILY, eager, images, 8, gates)
        config = eager.model.config
    return images, reference, [choices[g] for g in gates], config


def test_a_young_models_fp16_build_passes_its_vote_ties(young):
    """The build the unchanged gates refused (max|dlogit| 9.19x its tolerance on the one image of 64 whose
    vote flipped, agreement 98.4%) passes: the flip is a tie, judged against eager's output for the
    candidate the engine chose."""
    report = verify_build(young, n=N_PARITY, progress=False)
    fp16 = report["engines"]["onnxruntime-fp16"]
    print(f"\nfp16: max|dlogit| {fp16['max_abs_logit']:.3g} ({fp16['logits_worst_ratio']:.2f} of tolerance), "
          f"{fp16['choice_flips']} vote(s) differ ({fp16['tie_flips']} ties), raw max|dlogit| "
          f"{fp16['as_compared']['max_abs_logit']:.3g}, min Dice {fp16['min_dice']:.4f}")
    assert report["passed"], report["engines"]
    assert fp16["clear_flips"] == 0 and fp16["tie_flips"] == fp16["choice_flips"]


def _run_graph(path, images, config):
    with OnnxRuntimeEngine(path=path, inputs=FAMILY.graph.inputs(config), outputs=FAMILY.graph.outputs(config)) as e:
        return run_batched(e, images, 8)


def test_a_wrong_weight_in_one_expert_fails(young, young_reference, tmp_path):
    """One bias of the basic expert's decoder off by 0.3 in the FP16 graph: the gates refuse it, ties or not."""
    images, reference, (fp16, _), config = young_reference
    graph = onnx.load(str(young / "model.fp16.onnx"))
    name = "model.decoders.0.output_hypernetworks_mlps.0.layers.2.bias"
    init = next(i for i in graph.graph.initializer if i.name == name)
    weights = numpy_helper.to_array(init).copy()
    weights[0] += 0.3
    init.CopyFrom(numpy_helper.from_array(weights, name))
    onnx.save(graph, str(tmp_path / "defect.onnx"))
    report = FAMILY.parity.compare({**reference, **fp16}, _run_graph(tmp_path / "defect.onnx", images, config),
                                   FAMILY.parity.tolerances("fp16"))
    assert not report["passed"] and not report["logits_within_tol"], report
    assert report["logits_worst_ratio"] > 2


def test_int8_judges_the_same_flip_by_its_own_bound(young_reference):
    """A candidate whose distance gap to the reference's choice lies above FP16's bound and within INT8's:
    an engine that takes it (with eager's exact output for it) fails the FP16 gates and passes INT8's."""
    images, reference, (fp16, int8), _ = young_reference
    n = np.arange(len(images))
    ref_choice = reference["expert"].astype(int)
    gap = fp16["choice_distance"] - fp16["choice_distance"][n, ref_choice][:, None]  # (B, 3): d_c - d_ref
    bound16, bound8 = fp16["choice_bound"][n, ref_choice], int8["choice_bound"][n, ref_choice]
    found = np.argwhere((gap > bound16) & (gap <= bound8))
    assert len(found), "no candidate between the two bounds in this parity set"
    i, c = found[0]
    candidate = {k: v.copy() for k, v in reference.items()}
    candidate["logits"][i] = fp16["choice_logits"][i, c]
    candidate["mask"][i] = candidate["logits"][i] > 0
    candidate["expert"][i] = c
    r16 = FAMILY.parity.compare({**reference, **fp16}, candidate, FAMILY.parity.tolerances("fp16"))
    r8 = FAMILY.parity.compare({**reference, **int8}, candidate, FAMILY.parity.tolerances("int8"))
    assert (r16["passed"], r16["clear_flips"], r16["tie_flips"]) == (False, 1, 0), r16
    assert (r8["passed"], r8["clear_flips"], r8["tie_flips"]) == (True, 0, 1), r8
    assert int8["choice_bound"].min() >= 0 and (int8["choice_bound"] >= fp16["choice_bound"]).all()


def test_bf16_gates_are_fp16s_with_bf16_rounding():
    fp16, bf16 = FAMILY.parity.tolerances("fp16"), FAMILY.parity.tolerances("bf16")
    assert bf16.rtol == bf16.scaled_atol == 16 * 2.0 ** -9 == 4 * fp16.rtol
    assert bf16.max_flipped == fp16.max_flipped
    assert bf16.max_dice_change == 0.01 and fp16.max_dice_change is None  # BF16 is also held to the held-out Dice
    moesam = get_family("moesam").parity
    m16, mb = moesam.tolerances("fp16"), moesam.tolerances("bf16")
    assert mb.rtol == mb.scaled_atol == 4 * m16.rtol and (mb.gate_logits, mb.max_flipped) == (m16.gate_logits, 0.0)
    assert 1 - mb.min_class_dice == pytest.approx(4 * (1 - m16.min_class_dice)) and mb.max_dice_change == 0.01


def test_an_optional_engine_that_fails_is_recorded_not_fatal(tiny_build, monkeypatch):
    """A BF16 variant (what this CPU offers, not a graph the build was asked for) outside its gates is recorded
    as failed, so engines.select never chooses it, and the verify still passes."""
    from engines.openvino import bf16_unavailable, unavailable_reason
    from export import verify as verify_mod
    from icmoe.families.contracts import Tolerances

    if unavailable_reason() or bf16_unavailable():
        pytest.skip(f"needs OpenVINO with BF16 on this CPU: {unavailable_reason() or bf16_unavailable()}")
    gates = FAMILY.parity.tolerances
    monkeypatch.setattr(FAMILY.parity, "tolerances",
                        lambda p: Tolerances(atol=0.0, rtol=0.0, max_flipped=0.0) if p == "bf16" else gates(p))
    report = verify_mod.verify_build(tiny_build, n=4, progress=False)
    bf16 = report["engines"]["openvino-bf16"]
    assert not bf16["passed"] and not bf16["required"] and report["passed"]
    assert all(r["passed"] for label, r in report["engines"].items() if label != "openvino-bf16")
