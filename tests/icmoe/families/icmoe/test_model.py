"""The IC-MoE module: shapes, frozen weights, expert structure, shared vs naive equivalence."""

from __future__ import annotations

import copy

import pytest
import torch

from icmoe.families import get_family
from icmoe.families.icmoe import NaiveICMoE, build_icmoe
from icmoe.families.icmoe.model import TrainOutput

ICMOE = get_family("icmoe")


def _randomize_trainable(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every trainable weight away from its initial value (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_icmoe("tiny")
    _randomize_trainable(model)
    return model


def _images(b: int, size: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255


def test_inference_outputs_shapes_and_dtypes(tiny):
    with torch.no_grad():
        out = tiny(_images(2))
    assert out.logits.shape == (2, 1, 128, 128) and out.logits.dtype == torch.float32
    assert out.mask.shape == (2, 1, 128, 128) and out.mask.dtype == torch.uint8
    assert out.expert.shape == (2,) and out.expert.dtype == torch.int32
    assert torch.equal(out.mask, (out.logits > 0).to(torch.uint8))
    assert set(out.expert.tolist()) <= {0, 1, 2}


def test_training_outputs_carry_expert_logits_and_features(tiny):
    target = (torch.rand(2, 1, 128, 128) > 0.5).float()
    out = tiny(_images(2), target)
    assert isinstance(out, TrainOutput)
    assert [z.shape for z in out.expert_logits] == [(2, 1, 128, 128)] * 3
    cfg = tiny.config
    assert [y.shape for y in out.features] == [(2, cfg.out_chans, cfg.grid, cfg.grid)] * 3


def test_rejects_wrong_shape_and_dtype(tiny):
    with pytest.raises(ValueError, match=r"\(B, 3, 128, 128\)"):
        tiny(torch.rand(1, 1, 128, 128))
    with pytest.raises(ValueError, match=r"\(B, 3, 128, 128\)"):
        tiny(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="dtype"):
        tiny(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))


def test_frozen_weights_get_no_gradient_and_stay_bit_identical():
    torch.manual_seed(0)
    model = build_icmoe("tiny").train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoder.vit.blocks.") for n in frozen)
    assert all(n.startswith(("encoder.semantic_tail.", "encoder.adapters.", "decoders.")) for n in trainable)
    opt = torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    target = (torch.rand(2, 1, 128, 128) > 0.5).float()
    out = model(_images(2), target)
    (out.logits.mean() + sum(y.mean() for y in out.features)).backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    moved = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert any(n.startswith("encoder.semantic_tail.") for n in moved)
    assert any(n.startswith("encoder.adapters.") for n in moved)
    assert any(n.startswith("decoders.2.") for n in moved)


def test_frozen_vit_is_stored_once():
    model = build_icmoe("tiny")
    vit_params = {id(p) for p in model.encoder.vit.parameters()}
    # The adaptive path uses the frozen blocks themselves: no copy of any of them exists elsewhere.
    others = [p for n, p in model.named_parameters() if not n.startswith("encoder.vit.")]
    assert not vit_params & {id(p) for p in others}
    # ...and the saved state holds each tensor once.
    ptrs = [v.data_ptr() for v in model.state_dict().values() if v.numel()]
    assert len(ptrs) == len(set(ptrs))


def test_semantic_expert_differs_from_basic_only_in_last_two_blocks(tiny):
    naive = NaiveICMoE.from_shared(tiny)
    basic = naive.encoders[0].vit.state_dict()
    semantic = naive.encoders[1].vit.state_dict()
    assert basic.keys() == semantic.keys()
    depth = tiny.config.depth
    tail = tuple(f"blocks.{i}." for i in range(depth - 2, depth))
    differing = {k for k in basic if not torch.equal(basic[k], semantic[k])}
    assert differing, "the semantic tail was randomised, so some tail weights must differ"
    assert all(k.startswith(tail) for k in differing), sorted(differing)
    for k in basic:
        if not k.startswith(tail):
            assert torch.equal(basic[k], semantic[k]), k


def test_untrained_semantic_expert_equals_basic_features():
    torch.manual_seed(0)
    model = build_icmoe("tiny")  # semantic tail starts as a copy of the frozen tail
    with torch.no_grad():
        y0, y1, _ = model.encoder(model.preprocess(_images(1)))
    torch.testing.assert_close(y0, y1, rtol=0, atol=0)


@pytest.mark.parametrize("batch", [1, 3])
def test_shared_and_naive_modes_agree(tiny, batch):
    naive = NaiveICMoE.from_shared(tiny)
    x = _images(batch, seed=batch)
    with torch.no_grad():
        (s0, s1, s2), sf = tiny.experts(x)
        (n0, n1, n2), nf = naive.experts(x)
        vs, vn = tiny(x), naive(x)
    for a, b in zip((s0, s1, s2, *sf), (n0, n1, n2, *nf)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(vs.logits, vn.logits, rtol=0, atol=1e-5)
    assert torch.equal(vs.expert, vn.expert)


def test_naive_stores_three_encoders_and_counts_more(tiny):
    naive = NaiveICMoE.from_shared(tiny)
    shared_n = sum(p.numel() for p in tiny.parameters())
    naive_n = sum(p.numel() for p in naive.parameters())
    vit_n = sum(p.numel() for p in tiny.encoder.vit.parameters())
    # naive holds two extra full ViTs minus the semantic tail it no longer keeps separately
    tail_n = sum(p.numel() for p in tiny.encoder.semantic_tail.parameters())
    assert naive_n == shared_n + 2 * vit_n - tail_n


def test_inference_is_batch_independent(tiny):
    x = _images(4, seed=7)
    with torch.no_grad():
        together = tiny(x)
        alone = tiny(x[2:3])
        other = tiny(torch.cat([_images(3, seed=99), x[2:3]]))
    torch.testing.assert_close(together.logits[2:3], alone.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(other.logits[3:4], alone.logits, rtol=0, atol=1e-5)
    assert together.expert[2] == alone.expert[0] == other.expert[3]


def test_config_registry_and_vit_b_values():
    cfg = ICMOE.get_config("vit_b")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.global_attn_indexes) == (768, 12, 12, (2, 5, 8, 11))
    assert ICMOE.get_config("vit_b", image_size=512).grid == 32
    with pytest.raises(KeyError, match="unknown icmoe config"):
        ICMOE.get_config("vit_x")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ICMOE.get_config("tiny", image_size=100)
    cfg2 = type(cfg).from_dict(copy.deepcopy(cfg.to_dict()))
    assert cfg2 == cfg
