"""SAM checkpoints in the official format (`sam_vit_b_01ec64.pth`), read and resized to any input size.

The state dicts are made for 1024x1024 inputs; a model at 256 (ISIC, BUSI) or 512 (GlaS)
needs its position tables resized: `pos_embed` bilinearly to the token grid, the global
blocks' relative-position tables linearly (docs/sam.md).
"""

from __future__ import annotations

import os
import re
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

from icmoe.core.errors import CheckpointError
from icmoe.sam.build import build_image_encoder, build_mask_decoder, build_prompt_encoder
from icmoe.sam.config import SamConfig

PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Bilinearly resize a (1, G, G, D) absolute position table to (1, grid, grid, D)."""
    if pos_embed.shape[1] == grid and pos_embed.shape[2] == grid:
        return pos_embed
    x = pos_embed.permute(0, 3, 1, 2).float()  # (1, D, G, G)
    x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1).to(pos_embed.dtype)  # (1, grid, grid, D)


def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resize a (L, head_dim) relative-position table along L (as SAM's get_rel_pos does)."""
    if table.shape[0] == length:
        return table
    x = table.float().t().unsqueeze(0)  # (1, head_dim, L)
    x = F.interpolate(x, size=length, mode="linear", align_corners=False)
    return x[0].t().to(table.dtype)  # (length, head_dim)


def resize_sam_state_dict(state: Dict[str, torch.Tensor], cfg: SamConfig) -> Dict[str, torch.Tensor]:
    """Adapt a SAM state dict made for any input size to `cfg.image_size`.

    `pos_embed` is resized bilinearly to the token grid; the relative-position
    tables of the global-attention blocks (taken from `cfg.global_attn_indexes`,
    never guessed from key names) are resized linearly to `2 * grid - 1`.
    Windowed blocks keep their `2 * window_size - 1` tables.
    """
    out = dict(state)
    key = "image_encoder.pos_embed"
    if key in out:
        out[key] = resize_pos_embed(out[key], cfg.grid)
    for i in cfg.global_attn_indexes:
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{i}.attn.rel_pos_{axis}"
            if key in out:
                out[key] = resize_rel_pos(out[key], 2 * cfg.grid - 1)
    return out


def expected_sam_shapes(cfg: SamConfig) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of the SAM state dict for `cfg` (built on the meta device: no memory)."""
    with torch.device("meta"):
        parts = {
            "image_encoder.": build_image_encoder(cfg),
            "prompt_encoder.": build_prompt_encoder(cfg),
            "mask_decoder.": build_mask_decoder(cfg),
        }
    shapes = {}
    for prefix, module in parts.items():
        for k, v in module.state_dict().items():
            shapes[prefix + k] = tuple(v.shape)
    return shapes


def read_sam_checkpoint(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """Read a SAM checkpoint file into a state dict, with one-line errors for bad files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such SAM checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types on garbage (KeyError, EOFError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: truncated or not a PyTorch checkpoint ({first})") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return obj


def _describe_encoder(state: Dict[str, torch.Tensor]) -> Tuple[int, int]:
    """(width, number of blocks) of the image encoder held in a SAM state dict."""
    w = state.get("image_encoder.patch_embed.proj.weight")
    width = int(w.shape[0]) if w is not None else -1
    blocks = {int(m.group(1)) for k in state for m in [re.match(r"image_encoder\.blocks\.(\d+)\.", k)] if m}
    return width, len(blocks)


def load_sam_state_dict(
    path: str | os.PathLike, cfg: SamConfig, *, random_init: Sequence[str] = ()
) -> Dict[str, torch.Tensor]:
    """Load a SAM checkpoint (official format) for `cfg`, resized to `cfg.image_size`.

    Arguments:
      path: a file holding SAM's state dict (`image_encoder.*`, `prompt_encoder.*`,
        `mask_decoder.*`), e.g. `sam_vit_b_01ec64.pth`, made for any input size.
      cfg (SamConfig): the configuration to load it for.
      random_init: key prefixes the model keeps randomly initialised (e.g. MoE-SAM's
        C+1 mask tokens): dropped from the file's state and from the expected keys.

    Returns:
      dict: the state dict with `pos_embed` and global rel-pos tables resized.

    Raises:
      CheckpointError: truncated/unreadable file, another model type, missing,
        unexpected or misshapen keys. The message names the file and the problem.
    """
    path = os.fspath(path)
    state = read_sam_checkpoint(path)
    if not any(k.startswith(PREFIXES) for k in state):
        raise CheckpointError(
            f"{path}: not a SAM checkpoint (no image_encoder./prompt_encoder./mask_decoder. keys)"
        )
    width, blocks = _describe_encoder(state)
    if width not in (-1, cfg.embed_dim) or (blocks and blocks != cfg.depth):
        raise CheckpointError(
            f"{path}: holds an image encoder {width} wide with {blocks} blocks, "
            f"but config {cfg.name!r} needs {cfg.embed_dim} wide with {cfg.depth} blocks"
        )
    prefixes = tuple(random_init)
    expected = {k: v for k, v in expected_sam_shapes(cfg).items() if not k.startswith(prefixes)}
    state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} keys missing, e.g. {missing[0]}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
    state = resize_sam_state_dict(state, cfg)
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointError(
                f"{path}: {k} has shape {tuple(state[k].shape)}, config {cfg.name!r} needs {shape}"
            )
    return state


def split_sam_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    """{'image_encoder': {...}, 'prompt_encoder': {...}, 'mask_decoder': {...}} without prefixes."""
    parts: Dict[str, Dict[str, torch.Tensor]] = {p[:-1]: {} for p in PREFIXES}
    for k, v in state.items():
        head, _, rest = k.partition(".")
        parts[head][rest] = v
    return parts
