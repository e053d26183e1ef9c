"""Model summary: parameters and forward FLOPs of one image, for any registered family.

    python -m icmoe.summary --config vit_b [--image-size 512] [--json]
    python -m icmoe.summary --model moesam --config vit_b --classes 7 [--json]

What is counted is the family's (`Family.summarize`); for IC-MoE:

- params_total: parameters the three experts use, each expert counted in full
  (what the paper's three SAM copies hold, i.e. the naive structure).
- params_stored: unique parameters the shared model stores (frozen ViT once).
- params_trainable: parameters that receive gradients in training (semantic tail blocks,
  adapters, the three mask decoders; not the IoU heads, which prompt-free single-mask
  decoding never uses).
- gflops_*: forward FLOPs counted by `torch.utils.flop_counter.FlopCounterMode`, a
  multiply-add counted as 2 FLOPs; gmacs_*: the same in multiply-adds, the unit of the
  paper's "GFLOPs".
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Sequence

from icmoe.core import cli
from icmoe.families import add_model_args, get_family


def summarize(config: str = "vit_b", *, model: str = "icmoe", **overrides: Any) -> Dict[str, Any]:
    """Parameter and FLOP counts of a registered configuration (random weights)."""
    return get_family(model).summarize(config, **overrides)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    p = cli.parser("python -m icmoe.summary", __doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--image-size", type=int, default=None, help="override the configured input size")
    p.add_argument("--classes", type=int, default=None,
                   help="number of foreground classes, for multi-class families (MoE-SAM; e.g. 7 for MMWHS)")
    cli.add_json(p, "the summary")
    args = p.parse_args(argv)
    cli.setup_logging(args.verbosity)
    overrides = {k: v for k, v in (("image_size", args.image_size), ("num_classes", args.classes)) if v is not None}
    try:
        s = summarize(args.config, model=args.model, **overrides)
    except ValueError as e:  # a configuration the model cannot take (e.g. a size not a multiple of the patch)
        raise cli.UsageError(str(e)) from None
    if args.json:
        cli.write_json(s, args.json)
    else:
        print(get_family(args.model).format_summary(s))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
