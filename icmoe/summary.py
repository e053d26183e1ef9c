"""Model summary: parameters and forward FLOPs of one image, for any registered family.

Details: docs/families.md.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Sequence

from icmoe.core import cli
from icmoe.families import add_model_args, get_family


def summarize(config: str = "vit_b", *, model: str = "icmoe", **overrides: Any) -> Dict[str, Any]:
    """Parameter and FLOP counts of a registered configuration (random weights)."""
    return get_family(model).summary(config, **overrides)


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
