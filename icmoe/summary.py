"""Model summary: parameters and forward FLOPs of the shared and naive structures.

    python -m icmoe.summary --config vit_b [--image-size 512] [--json]

- params_total: parameters the three experts use, each expert counted in full
  (what the paper's three SAM copies hold, i.e. the naive structure).
- params_stored: unique parameters the shared model stores (frozen ViT once).
- params_trainable: parameters that receive gradients (semantic tail blocks,
  adapters, the three mask decoders).
- gflops_shared / gflops_naive: forward GFLOPs for one image at the configured
  size, counted by `torch.utils.flop_counter.FlopCounterMode` (a multiply-add
  counts as 2 FLOPs).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict

import torch
from torch.utils.flop_counter import FlopCounterMode

from icmoe.config import CONFIGS, get_config
from icmoe.model import NaiveICMoE, build_icmoe


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Unique parameters (a tensor shared by several submodules counts once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def forward_gflops(model: torch.nn.Module, image_size: int, batch: int = 1) -> float:
    x = torch.rand(batch, 3, image_size, image_size) * 255
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 1e9


def summarize(config: str = "vit_b", **overrides: Any) -> Dict[str, Any]:
    """Parameter and FLOP counts for a registered configuration (random weights).

    Returns:
      dict with params_total, params_stored, params_trainable, gflops_shared,
      gflops_naive, and the config name and image size.
    """
    cfg = get_config(config, **overrides)
    torch.manual_seed(0)
    shared = build_icmoe(cfg)
    naive = NaiveICMoE.from_shared(shared)
    return {
        "config": cfg.name,
        "image_size": cfg.image_size,
        "params_total": count_parameters(naive),
        "params_stored": count_parameters(shared),
        "params_trainable": count_parameters(shared, trainable_only=True),
        "gflops_shared": forward_gflops(shared, cfg.image_size),
        "gflops_naive": forward_gflops(naive, cfg.image_size),
    }


def format_summary(s: Dict[str, Any]) -> str:
    m = lambda n: f"{n / 1e6:8.2f} M"  # noqa: E731
    return "\n".join(
        [
            f"IC-MoE {s['config']} at {s['image_size']}x{s['image_size']}",
            f"  parameters, total (3 experts) {m(s['params_total'])}",
            f"  parameters, stored (shared)   {m(s['params_stored'])}",
            f"  parameters, trainable         {m(s['params_trainable'])}",
            f"  GFLOPs, shared structure      {s['gflops_shared']:8.2f}",
            f"  GFLOPs, naive structure       {s['gflops_naive']:8.2f}",
            f"  shared / naive FLOPs          {s['gflops_shared'] / s['gflops_naive']:8.3f}",
        ]
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m icmoe.summary", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="vit_b", choices=sorted(CONFIGS), help="model configuration (default vit_b)")
    p.add_argument("--image-size", type=int, default=None, help="override the configured input size")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    overrides = {} if args.image_size is None else {"image_size": args.image_size}
    try:
        s = summarize(args.config, **overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s) if args.json else format_summary(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
