"""CLI: python -m engines.triton BUILD_DIR --out model_repository/"""

from __future__ import annotations

import sys

from engines.triton.repository import INPUT_DTYPES, KINDS, RepositoryOptions, make_repository
from icmoe.core import cli


def _main(argv=None) -> int:
    p = cli.parser("python -m engines.triton",
                   "Write a Triton Inference Server model repository for a build directory "
                   "(tensorrt_plan for a TensorRT build; onnxruntime_onnx and python models for a CPU build).")
    p.add_argument("build_dir", help="build directory with manifest.json (python -m export.build)")
    p.add_argument("--out", default="model_repository", help="model repository to write (default: %(default)s)")
    p.add_argument("--kind", action="append", choices=KINDS,
                   help="model kind to write (repeatable; default: tensorrt if the build has model.plan, "
                   "else onnxruntime and python)")
    p.add_argument("--name", default=None, help="model name prefix: <name>_<kind> (default: the build's family)")
    p.add_argument("--instances", type=int, default=1, help="instances per model (default: %(default)s)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000,
                   help="dynamic batching: longest wait for more requests, microseconds (default: %(default)s)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"),
                   help="graph the onnxruntime/python/openvino models serve (default: the build's precision)")
    p.add_argument("--input-dtype", choices=INPUT_DTYPES, default=None,
                   help="type clients send the image as instead of the build's (FP32 RGB 0..255): uint8 is 4x "
                   "smaller, cast by the onnxruntime graph and the python model; not for TensorRT plans")
    args = p.parse_args(argv)
    cli.setup_logging(args.verbosity)
    options = RepositoryOptions(name=args.name, instances=args.instances, max_queue_delay_us=args.max_queue_delay_us,
                                precision=args.precision, input_dtype=args.input_dtype)
    for path in make_repository(args.build_dir, args.out, kinds=args.kind, options=options):
        print(path)
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
