"""Export-time rewrites: padding-free windowed attention computes SAM's function with less work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.modeling.image_encoder import Block
from torch.utils.flop_counter import FlopCounterMode

from export.onnx_export import export_onnx
from export.rewrite import PaddingFreeWindowAttention, PaddingFreeWindowBlock, padding_free_windows
from icmoe.families import get_family
from icmoe.families.icmoe import NaiveICMoE, build_icmoe

ICMOE = get_family("icmoe")

# tiny with 6x6 windows: the 16x16 token grid pads to 18x18 (as vit_b's 16x16 pads to 28x28)
PADDED = ICMOE.get_config("tiny", window_size=6)


def _distinct_model(config=PADDED, naive: bool = False, seed: int = 0):
    """Random model whose trainable parts differ from the frozen ViT and whose rel-pos tables are non-zero
    (SAM zero-initialises them, which would hide a wrong rel-pos window)."""
    torch.manual_seed(seed)
    model = build_icmoe(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.normal_(0.0, 0.5)
            elif not name.startswith("encoder.vit."):
                p.add_(torch.randn_like(p) * 1e-2)
    model = NaiveICMoE.from_shared(model) if naive else model
    return model.eval()


@pytest.mark.parametrize("naive", [False, True], ids=["shared", "naive"])
def test_same_function_fewer_flops(naive):
    model = _distinct_model(naive=naive)
    x = torch.rand(2, 3, 128, 128) * 255
    calls = []
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            ref = model(x)
        with padding_free_windows(model) as swapped, FlopCounterMode(display=False) as fc_rw:
            for m in model.modules():
                if isinstance(m, PaddingFreeWindowAttention):
                    m.register_forward_hook(lambda *_: calls.append(1))
            out = model(x)
    windowed = sum(1 for m in model.modules() if isinstance(m, Block) and m.window_size > 0)
    assert swapped == windowed > 0
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-4)
    assert torch.equal(out.mask, ref.mask) and torch.equal(out.expert, ref.expert)
    # every windowed attention call projects 16x16 real tokens instead of 18x18 padded ones:
    # qkv (D -> 3D) and proj (D -> D), 2 FLOPs per multiply-add
    d = PADDED.embed_dim
    saved = len(calls) * 2 * x.shape[0] * (18 * 18 - 16 * 16) * (3 * d * d + d * d)
    assert len(calls) >= swapped and fc.get_total_flops() - fc_rw.get_total_flops() == saved


def test_model_restored_and_weights_shared():
    model = _distinct_model()
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    with pytest.raises(RuntimeError, match="inside"):
        with padding_free_windows(model):
            assert any(isinstance(m, PaddingFreeWindowBlock) for m in model.modules())
            # the swapped blocks reuse the original tensors: no copies, nothing new to store
            assert sum(p.numel() for p in model.parameters()) == n_params
            raise RuntimeError("an error inside the block")
    assert not any(isinstance(m, PaddingFreeWindowBlock) for m in model.modules())
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before


def test_only_windowed_blocks():
    block = build_icmoe("tiny").encoder.vit.blocks[ICMOE.get_config("tiny").global_attn_indexes[0]]
    assert block.window_size == 0
    with pytest.raises(ValueError, match="windowed"):
        PaddingFreeWindowBlock(block=block)


def test_onnx_parity_with_padding(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _distinct_model(seed=1)
    x = torch.rand(3, 3, 128, 128) * 255
    with torch.inference_mode():
        ref = model(x)
    path = export_onnx(model, tmp_path / "padded.onnx", batch=(1, 1, 4))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, mask, expert = sess.run(["logits", "mask", "expert"], {"image": x.numpy()})
    np.testing.assert_allclose(logits, ref.logits.numpy(), rtol=0, atol=1e-3)
    assert np.array_equal(expert, ref.expert.numpy()) and np.array_equal(mask, ref.mask.numpy())
