"""AOTInductor package of IC-MoE for the C++ program `icmoe_aoti` (CPU, libtorch).

    python -m engines.cpp.aoti CHECKPOINT_OR_BUILD_DIR --out icmoe.pt2
    python -m engines.cpp.aoti --random-init --config tiny --out tiny.pt2     # untrained, for trying it out

`torch.export` of images (1, 3, S, S) float32 RGB 0..255 -> (logits, mask, expert), compiled ahead of
time by Inductor into a `.pt2` package (C++ kernels + weights in one zip). The package's metadata
carries `icmoe.image_size` and `icmoe.config` so the C++ program can check its input. One image per
call (static batch 1): the program segments one image, and a static graph compiles much faster.

Compiling takes minutes on a small CPU (Inductor's code generation, then g++); `fast_compile` builds
the wrapper at -O0 and skips Inductor's pattern matcher (same results, somewhat slower code), which is
what the tests use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Tuple

import torch
from torch import nn

from icmoe.io import PathLike, atomic_path

from engines.base import EngineError
from export.rewrite import padding_free_windows

PACKAGE_NAME = "model.pt2"


class VoteOutputs(nn.Module):
    """images -> (logits (B,1,S,S) f32, mask (B,1,S,S) u8, expert (B,) i32): a Vote as a tuple for export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vote = self.model(image)
        return vote.logits, vote.mask, vote.expert


def load_model(source) -> nn.Module:
    """IC-MoE from a checkpoint folder, or from the checkpoint a build directory's manifest names
    (a model passes through)."""
    import icmoe

    if isinstance(source, nn.Module):
        return source
    source = Path(source)
    if (source / "manifest.json").is_file():
        from export.manifest import read_manifest

        ckpt = (read_manifest(source).get("checkpoint") or {}).get("path")
        if not ckpt:
            raise EngineError(f"{source}: the build names no checkpoint (random init); pass a checkpoint folder")
        source = Path(ckpt)
    return icmoe.load(source)


def package_aoti(source, out: PathLike, *, fast_compile: bool = False, log=print) -> Path:
    """Export and AOT-compile IC-MoE into an AOTInductor package.

    Arguments:
      source: a checkpoint folder (`icmoe.load`), a build directory (its manifest's checkpoint) or an IC-MoE model.
      out: the `.pt2` file to write (atomically).
      fast_compile: -O0 wrapper and no pattern matcher: quicker to build, same outputs.
      log: where progress lines go.

    Returns:
      The package path.
    """
    model = load_model(source).eval()
    size = model.config.image_size
    example = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255.0
    log(f"exporting {model.config.name} ({size}x{size}, batch 1) with torch.export ...")
    with torch.no_grad(), padding_free_windows(model):  # the same function, less work (export/rewrite.py)
        program = torch.export.export(VoteOutputs(model).eval(), (example,))
    configs = {
        "aot_inductor.metadata": {"icmoe.image_size": str(size), "icmoe.config": json.dumps(model.config.to_dict())},
    }
    if fast_compile:
        configs.update({"aot_inductor.compile_wrapper_opt_level": "O0", "pattern_matcher": False})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log("compiling with AOTInductor (minutes on a small CPU) ...")
    with atomic_path(out) as tmp:
        # aoti_compile_and_package insists on a .pt2 suffix.
        tmp_pt2 = Path(tmp).with_suffix(".pt2")
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_pt2), inductor_configs=configs)
            tmp_pt2.replace(tmp)
        finally:
            tmp_pt2.unlink(missing_ok=True)
    log(f"wrote {out}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.cpp.aoti",
                                     description="AOTInductor package (.pt2) of IC-MoE for the C++ program icmoe_aoti.")
    parser.add_argument("source", nargs="?", help="checkpoint folder, or build directory (uses the checkpoint its manifest names)")
    parser.add_argument("--random-init", action="store_true", help="package the untrained architecture instead")
    parser.add_argument("--config", default="tiny", help="configuration for --random-init: tiny or vit_b (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-init")
    parser.add_argument("--out", default=PACKAGE_NAME, help="package to write (default: %(default)s)")
    parser.add_argument("--fast-compile", action="store_true", help="-O0 wrapper, no pattern matcher: quicker build")
    args = parser.parse_args(argv)
    if (args.source is None) == (not args.random_init):
        parser.error("give a checkpoint/build directory or --random-init (not both)")
    try:
        source = args.source
        if args.random_init:
            import icmoe

            torch.manual_seed(args.seed)
            source = icmoe.build_icmoe(args.config)
        package_aoti(source, args.out, fast_compile=args.fast_compile)
    except (EngineError, ValueError, KeyError, OSError) as e:  # CheckpointError / ManifestError are ValueErrors
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
