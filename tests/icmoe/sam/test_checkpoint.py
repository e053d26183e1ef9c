"""Loading SAM checkpoints (official state-dict format) at other input sizes, and bad files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from icmoe.core.errors import CheckpointError
from icmoe.families import get_family
from icmoe.families.icmoe import build_icmoe
from icmoe.sam.build import build_image_encoder, build_mask_decoder, build_prompt_encoder
from icmoe.sam.checkpoint import load_sam_state_dict

ICMOE = get_family("icmoe")


def _sam_state(cfg) -> dict:
    """A SAM-format state dict for `cfg`, with non-trivial position tables."""
    torch.manual_seed(0)
    state = {}
    for prefix, module in (
        ("image_encoder.", build_image_encoder(cfg)),
        ("prompt_encoder.", build_prompt_encoder(cfg)),
        ("mask_decoder.", build_mask_decoder(cfg)),
    ):
        for k, v in module.state_dict().items():
            state[prefix + k] = torch.randn_like(v) if k.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")) else v
    return state


@pytest.fixture(scope="module")
def tiny_1024_file(tmp_path_factory):
    """A tiny-architecture checkpoint made for 1024x1024 inputs, as SAM's are."""
    cfg = ICMOE.get_config("tiny", image_size=1024)
    path = tmp_path_factory.mktemp("sam") / "sam_tiny_1024.pth"
    torch.save(_sam_state(cfg), path)
    return path


def test_1024_checkpoint_loads_at_256_with_resized_tables(tiny_1024_file):
    src = torch.load(tiny_1024_file, weights_only=True)
    cfg = ICMOE.get_config("tiny", image_size=256)  # grid 32
    state = load_sam_state_dict(tiny_1024_file, cfg)
    # pos_embed (1, 128, 128, D) -> (1, 32, 32, D), by an independent bilinear resize.
    ref = F.interpolate(src["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(32, 32), mode="bilinear").permute(0, 2, 3, 1)
    torch.testing.assert_close(state["image_encoder.pos_embed"], ref, rtol=0, atol=1e-6)
    for i in range(cfg.depth):
        for axis in "hw":
            key = f"image_encoder.blocks.{i}.attn.rel_pos_{axis}"
            if i in cfg.global_attn_indexes:
                assert src[key].shape[0] == 2 * 128 - 1
                ref = F.interpolate(src[key].T[None], size=2 * 32 - 1, mode="linear")[0].T
                assert state[key].shape == (63, src[key].shape[1])
                torch.testing.assert_close(state[key], ref, rtol=0, atol=1e-6)
            else:  # windowed blocks keep their tables
                assert torch.equal(state[key], src[key])
    model = build_icmoe(cfg, sam_checkpoint=tiny_1024_file)
    torch.testing.assert_close(model.encoder.vit.pos_embed.data, state["image_encoder.pos_embed"])
    # every expert starts from the checkpoint's decoder and the semantic tail from its last blocks
    for d in model.decoders:
        torch.testing.assert_close(d.iou_token.weight.data, src["mask_decoder.iou_token.weight"])
    torch.testing.assert_close(
        model.encoder.semantic_tail[-1].attn.rel_pos_h.data, state[f"image_encoder.blocks.{cfg.depth - 1}.attn.rel_pos_h"]
    )
    with torch.no_grad():
        out = model(torch.rand(1, 3, 256, 256) * 255)
    assert out.logits.shape == (1, 1, 256, 256)


def test_global_blocks_come_from_the_config_not_key_names(tiny_1024_file):
    # Moving the global blocks changes which tables are resized (and the loader then refuses shapes).
    cfg = ICMOE.get_config("tiny", image_size=256, global_attn_indexes=(0, 2))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.rel_pos_h has shape \(255, 32\).*needs \(15, 32\)"):
        load_sam_state_dict(tiny_1024_file, cfg)


def test_truncated_file(tiny_1024_file, tmp_path):
    bad = tmp_path / "truncated.pth"
    data = tiny_1024_file.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint") as e:
        load_sam_state_dict(bad, ICMOE.get_config("tiny"))
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_other_model_type(tmp_path):
    # A checkpoint of a wider, deeper encoder (like vit_l vs vit_b) is named as such.
    other = ICMOE.get_config("tiny", embed_dim=96, num_heads=3, depth=6, global_attn_indexes=(2, 5))
    path = tmp_path / "other.pth"
    torch.save(_sam_state(other), path)
    with pytest.raises(CheckpointError, match=r"96 wide with 6 blocks.*needs 64 wide with 4 blocks"):
        load_sam_state_dict(path, ICMOE.get_config("tiny"))


def test_missing_and_unexpected_keys(tiny_1024_file, tmp_path):
    state = torch.load(tiny_1024_file, weights_only=True)
    missing = dict(state)
    del missing["mask_decoder.iou_token.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"1 keys missing, e\.g\. mask_decoder\.iou_token\.weight"):
        load_sam_state_dict(tmp_path / "missing.pth", ICMOE.get_config("tiny"))
    extra = dict(state, **{"mask_decoder.extra.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_sam_state_dict(tmp_path / "extra.pth", ICMOE.get_config("tiny"))


def test_not_a_sam_checkpoint_and_no_file(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="not a SAM checkpoint"):
        load_sam_state_dict(tmp_path / "x.pth", ICMOE.get_config("tiny"))
    with pytest.raises(CheckpointError, match="no such SAM checkpoint file"):
        load_sam_state_dict(tmp_path / "absent.pth", ICMOE.get_config("tiny"))
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        load_sam_state_dict(tmp_path / "text.pth", ICMOE.get_config("tiny"))
