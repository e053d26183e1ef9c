"""AOTInductor package of a model (any family) for the C++ program `icmoe_aoti` (CPU, libtorch).

Details: docs/cpp.md.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from export.rewrite import padding_free_windows
from icmoe.checkpoint import load
from icmoe.core import cli
from icmoe.core.errors import IcmoeError
from icmoe.core.io import PathLike, atomic_path
from icmoe.core.manifest import (
    CLASS_NAME_SEPARATOR,
    MANIFEST_NAME,
    ManifestError,
    check_class_names,
    check_label_outputs,
    check_mask_rule,
    checkpoint_path,
    mask_kind_of,
    read_manifest,
)
from icmoe.core.specs import specs_to_dicts
from icmoe.families import add_model_args, get_family

log = logging.getLogger(__name__)
PACKAGE_NAME = "model.pt2"


class PackageError(IcmoeError, RuntimeError):
    """The model cannot be packaged; one line."""


def load_model(source) -> nn.Module:
    """A model from a checkpoint folder, or from the checkpoint a build directory holds (relative
    paths are relative to the build); a model passes through."""
    if isinstance(source, nn.Module):
        return source
    source = Path(source)
    if (source / MANIFEST_NAME).is_file():
        path = checkpoint_path(source, read_manifest(source))
        if path is None:
            raise PackageError(f"{source}: the build names no checkpoint; pass a checkpoint folder")
        source = path
    return load(source)


def package_metadata(model: nn.Module) -> Dict[str, str]:
    """What the C++ program reads from the package: family, size, config, tensor specs, output names,
    the mask kind with its label names, and the mask rule (how the mask follows from the logits; "" for none).

    Raises:
      PackageError: the family's label names are unusable or contradict its outputs.
    """
    family = get_family(type(model.config).family)
    cfg = model.config
    outputs = family.graph.outputs(cfg)
    classes = family.graph.class_names(cfg)
    try:
        if classes is not None:
            classes = check_class_names(classes, f"model family {family.name!r}")
        check_label_outputs(classes, specs_to_dicts(outputs), f"model family {family.name!r}")
        check_mask_rule(family.graph.mask_rule(cfg), classes, specs_to_dicts(outputs), f"model family {family.name!r}")
    except ManifestError as e:
        raise PackageError(str(e)) from None
    return {
        "icmoe.family": family.name,
        "icmoe.image_size": str(cfg.image_size),
        "icmoe.config": json.dumps(cfg.to_dict()),
        "icmoe.inputs": json.dumps(specs_to_dicts(family.graph.inputs(cfg))),
        "icmoe.outputs": json.dumps(specs_to_dicts(outputs)),
        "icmoe.output_names": ",".join(o.name for o in outputs),
        "icmoe.mask_kind": mask_kind_of(classes),
        "icmoe.class_names": CLASS_NAME_SEPARATOR.join(classes or []),
        "icmoe.mask_rule": family.graph.mask_rule(cfg) or "",
    }


def package_aoti(source, out: PathLike, *, fast_compile: bool = False) -> Path:
    """Export and AOT-compile a model into an AOTInductor package.

    Arguments:
      source: a checkpoint folder, a build directory (its checkpoint) or a model.
      out: the `.pt2` file to write (atomically).
      fast_compile: -O0 wrapper and no pattern matcher: quicker to build, same outputs.

    Returns:
      The package path.
    """
    model = load_model(source).eval()
    family = get_family(type(model.config).family)
    example = family.graph.example_inputs(model.config, 1)
    log.info(f"exporting {family.title} {model.config.name} (batch 1) with torch.export ...")
    module = family.graph.export_module(model).eval()
    with torch.no_grad(), padding_free_windows(module):  # the same function, less work (export/rewrite.py)
        program = torch.export.export(module, example)
    configs: Dict[str, Any] = {"aot_inductor.metadata": package_metadata(model)}
    if fast_compile:
        configs.update({"aot_inductor.compile_wrapper_opt_level": "O0", "pattern_matcher": False})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("compiling with AOTInductor (minutes on a small CPU) ...")
    with atomic_path(out) as tmp:
        # aoti_compile_and_package insists on a .pt2 suffix.
        tmp_pt2 = Path(tmp).with_suffix(".pt2")
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_pt2), inductor_configs=configs)
            tmp_pt2.replace(tmp)
        finally:
            tmp_pt2.unlink(missing_ok=True)
    log.info(f"wrote {out}")
    return out


def _main(argv: Optional[Sequence[str]] = None) -> int:
    p = cli.parser("python -m export.aoti", "AOTInductor package (.pt2) of a model for the C++ program icmoe_aoti.")
    p.add_argument("source", nargs="?", help="checkpoint folder, or build directory (uses the checkpoint it holds)")
    p.add_argument("--random-init", action="store_true", help="package the untrained architecture instead")
    add_model_args(p, config_help="size variant for --random-init")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init")
    p.add_argument("--out", default=PACKAGE_NAME, help="package to write (default: %(default)s)")
    p.add_argument("--fast-compile", action="store_true", help="-O0 wrapper, no pattern matcher: quicker build")
    args = p.parse_args(argv)
    cli.setup_logging(args.verbosity)
    if (args.source is None) == (not args.random_init):
        p.error("give a checkpoint/build directory or --random-init (not both)")
    source = args.source
    if args.random_init:
        family = get_family(args.model)
        torch.manual_seed(args.seed)
        source = family.build(family.get_config(args.config))
    package_aoti(source, args.out, fast_compile=args.fast_compile)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
