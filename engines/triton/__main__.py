"""CLI: python -m engines.triton BUILD_DIR --out model_repository/"""

from __future__ import annotations

import argparse
import sys

from engines.base import EngineError
from engines.triton.repository import KINDS, RepositoryOptions, make_repository


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engines.triton",
        description="Write a Triton Inference Server model repository for a build directory "
        "(tensorrt_plan for a TensorRT build; onnxruntime_onnx and python models for a CPU build).",
    )
    parser.add_argument("build_dir", help="build directory with manifest.json (python -m export.build)")
    parser.add_argument("--out", default="model_repository", help="model repository to write (default: %(default)s)")
    parser.add_argument("--kind", action="append", choices=KINDS,
                        help="model kind to write (repeatable; default: tensorrt if the build has model.plan, "
                        "else onnxruntime and python)")
    parser.add_argument("--name", default="icmoe", help="model name prefix: <name>_<kind> (default: %(default)s)")
    parser.add_argument("--instances", type=int, default=1, help="instances per model (default: %(default)s)")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000,
                        help="dynamic batching: longest wait for more requests, microseconds (default: %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "fp16"),
                        help="ONNX graph the onnxruntime/python models serve (default: the build's precision)")
    args = parser.parse_args(argv)
    options = RepositoryOptions(name=args.name, instances=args.instances, max_queue_delay_us=args.max_queue_delay_us,
                                precision=args.precision)
    try:
        make_repository(args.build_dir, args.out, kinds=args.kind, options=options)
    except (EngineError, ValueError, OSError) as e:  # ManifestError is a ValueError
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
