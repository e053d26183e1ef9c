"""The real architecture (vit_b at 256, random init): parity bounds on 64 inputs and the size claim.

Slow (several minutes of export on 2 cores): run with --runslow or ICMOE_SLOW=1.
"""

from __future__ import annotations

import pytest

from icmoe.families.icmoe import build_icmoe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vit_b_build(tmp_path_factory):
    """Random-init vit_b whose trainable parts are perturbed, as training makes them: a purely random
    init has z0 == z1 exactly, so the chosen expert is a tie that FP16 rounding may break either way."""
    import torch

    import icmoe
    from export.build import build

    torch.manual_seed(0)
    model = build_icmoe("vit_b")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (list(model.encoder.semantic_tail.parameters()) + list(model.decoders.parameters())
                  + list(model.encoder.adapters.parameters())):
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    ckpt = icmoe.save_checkpoint(model, tmp_path_factory.mktemp("vit_b_ckpt") / "ckpt")
    out = tmp_path_factory.mktemp("vit_b") / "vit_b-fp16"
    return build(ckpt, precision="fp16", out=out, batch=(1, 1, 8), backend="onnxruntime",
                 verify=False, progress=False)


def test_vit_b_parity_64_inputs(vit_b_build):
    from export.verify import verify_build

    report = verify_build(vit_b_build, n=64, batch=8, progress=False)
    fp32, fp16 = report["engines"]["onnxruntime-fp32"], report["engines"]["onnxruntime-fp16"]
    for name, r in (("fp32", fp32), ("fp16", fp16)):  # the figures, for `pytest -s`
        print(f"vit_b {name}: max|dlogit| {r['max_abs_logit']:.3g} min Dice {r['min_dice']:.4f} "
              f"experts {100 * r['agreement']:.0f}% flipped {100 * r['flipped']:.4f}% "
              f"worst ratio {r['logits_worst_ratio']:.3f} batch {r['batch_consistency']}")
    assert fp32["passed"] and fp32["max_abs_logit"] <= 1e-3 and fp32["agreement"] == 1.0, fp32
    assert fp16["passed"] and fp16["min_dice"] >= 0.995 and fp16["agreement"] >= 0.99, fp16


def test_vit_b_initializers_vs_naive_export():
    from export.onnx_export import compare_variant

    r = compare_variant("icmoe", "vit_b", "naive")
    assert r["ratio"] <= 0.45, r
