"""MoE-SAM's structure: parameter counts, shapes, per-image routing, the two MoE forms, SAM loading."""

from __future__ import annotations

import pytest
import torch

from icmoe.core.errors import CheckpointError
from icmoe.families import get_family
from icmoe.families.moesam import build_moesam
from icmoe.families.moesam.feb import ExpertChoiceMoE, chunked_attention

TINY = get_family("moesam").get_config("tiny")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_moesam(TINY)


def _images(n, seed=0, size=TINY.image_size):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 255


def test_vit_b_parameter_counts():
    """The counts of the method's description (MMWHS, C = 7), on the meta device (no memory)."""
    with torch.device("meta"):
        m = build_moesam(get_family("moesam").get_config("vit_b", num_classes=7))
    params = dict(m.named_parameters())
    count = lambda pred: sum(p.numel() for n, p in params.items() if pred(n, p))  # noqa: E731
    assert count(lambda n, p: True) == 120_454_092
    assert count(lambda n, p: p.requires_grad) == 33_775_232
    assert count(lambda n, p: n.startswith("adapters.")) == 7_100_928
    assert count(lambda n, p: n.startswith("feb.")) == 22_045_704
    assert count(lambda n, p: n.startswith("lpeg.")) == 8_976
    assert count(lambda n, p: n.startswith("decoder.")) == 4_619_624
    assert count(lambda n, p: n.startswith(("vit.", "prompt_encoder.")) and p.requires_grad) == 0


def test_shapes_dtypes_and_labels(model):
    with torch.no_grad():
        logits, mask = model.segment(_images(2))
    c, s = TINY.num_classes, TINY.image_size
    assert logits.shape == (2, c + 1, s, s) and logits.dtype == torch.float32
    assert mask.shape == (2, 1, s, s) and mask.dtype == torch.uint8
    assert torch.equal(mask[:, 0].long(), logits.argmax(1))
    assert int(mask.max()) <= c


def test_bad_input_is_one_line(model):
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 128, 128\)"):
        model(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="dtype torch.uint8"):
        model(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))


def _routes(model, images):
    """The per-image TopK picks of the FEB router (B, E, k), recorded with a forward hook."""
    seen = []
    handle = model.feb.moe.register_forward_hook(lambda mod, inp, out: seen.append(mod.route(inp[0])[1]))
    with torch.no_grad():
        out = model.segment(images)
    handle.remove()
    return seen[0], out


def test_routing_is_per_image_and_batch_independent(model):
    """k = N/2 picks per expert per image; an image routes and segments the same alone or in a batch."""
    images = _images(8, seed=1)
    alone_idx, (alone_logits, alone_mask) = _routes(model, images[:1])
    assert alone_idx.shape == (1, TINY.num_experts, TINY.tokens // 2)
    for b in range(2, 9):
        idx, (logits, mask) = _routes(model, images[:b])
        assert torch.equal(idx[:1], alone_idx), f"batch {b}: routing of image 0 changed"
        assert torch.equal(mask[:1], alone_mask), f"batch {b}: labels of image 0 changed"
        torch.testing.assert_close(logits[:1], alone_logits, rtol=0, atol=1e-5)


def test_noise_and_dropout_only_in_training(model):
    x = _images(1, seed=2)
    with torch.no_grad():
        a, b = model(x), model(x)
        assert torch.equal(a, b)
        model.train()
        try:
            c = model(x)
        finally:
            model.eval()
    assert not torch.allclose(a, c)


def test_sparse_and_dense_forms_agree():
    torch.manual_seed(0)
    moe = ExpertChoiceMoE(dim=16, hidden=64, num_experts=4, k=6, dropout=0.1).eval()
    x = torch.randn(3, 12, 16)
    with torch.no_grad():
        sparse = moe(x)
        moe.form = "dense"
        dense = moe(x)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-6)
    # every expert picks exactly k tokens of each image; an unpicked token passes through unchanged
    weights, index = moe.route(x)
    assert index.shape == (3, 4, 6) and torch.allclose(weights.sum(-1), torch.ones(3, 4))
    picked = torch.zeros(3, 12, dtype=torch.bool)
    for e in range(4):
        picked.scatter_(1, index[:, e], True)
    assert torch.equal(sparse[~picked], x[~picked])


def test_dense_variant_of_the_family_is_the_same_function(model):
    dense = get_family("moesam").variant(model, "dense")
    x = _images(2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), rtol=0, atol=1e-5)
    assert model.feb.moe.form == "sparse"


def test_chunked_attention_equals_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 100, 16) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(chunked_attention(q, k, v, 32), ref, rtol=1e-5, atol=1e-6)


def test_export_patches_restore_eager_attention(model):
    family = get_family("moesam")
    with family.graph.export_patches(model):
        assert model.feb.attn.query_chunk > 0
    assert model.feb.attn.query_chunk == 0


def test_lpeg_input_flag_changes_the_prompt():
    torch.manual_seed(0)
    enhanced = build_moesam(TINY)
    neck = build_moesam(TINY.replace(lpeg_input="neck"))
    neck.load_state_dict(enhanced.state_dict())
    x = _images(1, seed=4)
    with torch.no_grad():
        assert not torch.allclose(enhanced(x), neck(x))


def test_config_checks():
    with pytest.raises(ValueError, match="2 class names for num_classes 3"):
        get_family("moesam").get_config("tiny", class_names=("a", "b"))
    with pytest.raises(ValueError, match="lpeg_input"):
        get_family("moesam").get_config("tiny", lpeg_input="points")
    cfg = get_family("moesam").get_config("tiny", num_classes=2, class_names=("liver", "spleen"))
    assert cfg.labels == ("background", "liver", "spleen")
    assert type(cfg).from_dict(cfg.to_dict()) == cfg


def _sam_file(tmp_path):
    """A SAM-format checkpoint of the tiny architecture made for 1024x1024 inputs (3 multimask outputs)."""
    from icmoe.sam.build import build_image_encoder, build_mask_decoder, build_prompt_encoder
    from icmoe.sam.config import TINY as TINY_SAM
    from icmoe.sam.config import SamConfig

    cfg = SamConfig(name="tiny", **{**TINY_SAM, "image_size": 1024})  # the same SAM parts as MoE-SAM tiny
    torch.manual_seed(1)
    state = {}
    for prefix, part in (("image_encoder.", build_image_encoder(cfg)), ("prompt_encoder.", build_prompt_encoder(cfg)),
                         ("mask_decoder.", build_mask_decoder(cfg))):
        state.update({prefix + k: v for k, v in part.state_dict().items()})
    path = tmp_path / "sam_tiny_1024.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("classes", [3, 5])
def test_loads_sam_weights_except_the_class_tokens(tmp_path, classes):
    path, state = _sam_file(tmp_path)
    torch.manual_seed(0)
    m = build_moesam(TINY.replace(num_classes=classes), sam_checkpoint=path)
    torch.testing.assert_close(m.vit.blocks[0].attn.qkv.weight, state["image_encoder.blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(m.decoder.transformer.layers[0].self_attn.q_proj.weight,
                               state["mask_decoder.transformer.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(m.decoder.iou_token.weight, state["mask_decoder.iou_token.weight"])
    assert m.vit.pos_embed.shape[1] == TINY.grid  # resized from the 1024 table
    assert m.decoder.mask_tokens.weight.shape == (classes + 1, TINY.out_chans)
    assert not torch.allclose(m.decoder.mask_tokens.weight[:4], state["mask_decoder.mask_tokens.weight"])


def test_truncated_sam_file_is_one_line(tmp_path):
    path, _ = _sam_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        build_moesam(TINY, sam_checkpoint=path)


def test_summary_reports_the_split():
    s = get_family("moesam").summary("tiny")
    assert s["params_total"] == s["params_trainable"] + s["params_iou_head"] + s["params_frozen"]
    assert s["gflops_total"] == pytest.approx(s["gflops_encoder"] + s["gflops_feb"] + s["gflops_decoder"])
    assert min(s["gflops_encoder"], s["gflops_feb"], s["gflops_decoder"]) > 0
    assert s["k"] == s["tokens"] // 2
