"""The quick start: train `tiny` on the synthetic set, export it (FP32 + FP16), verify parity, benchmark.

README.md has the commands.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from engines.predict import main as predict_main
from export.build import build
from export.precision import fp16_unavailable
from icmoe.core import cli
from icmoe.core.extras import require
from icmoe.core.io import atomic_path
from icmoe.data.synthetic import synthetic_images
from icmoe.training import train


def _main(argv=None) -> int:
    p = cli.parser("python benchmarks/quickstart.py", __doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo recipe's)")
    p.add_argument("--run", type=Path, default=Path("runs/quickstart"), help="run folder")
    p.add_argument("--data-root", type=Path, default=Path("data/synthetic"))
    p.add_argument("--build", type=Path, default=Path("build/icmoe-tiny-fp16"))
    p.add_argument("--skip-train", action="store_true", help="reuse the run folder's checkpoint")
    p.add_argument("--iters", type=int, default=10, help="benchmark timed runs per batch size")
    p.add_argument("--images", type=Path, default=Path("quickstart"), help="folder for the predict example")
    args = p.parse_args(argv)
    cli.setup_logging(args.verbosity)
    # The FP16 graph and the benchmark's plot need extras: say so now, not after minutes of training.
    if fp16_unavailable():
        raise cli.UsageError(fp16_unavailable())
    require("matplotlib", "bench", "the quick start's benchmark plot")
    t0 = time.time()
    ckpt = args.run / "best"
    if not args.skip_train:
        print(f"[1/4] training tiny on the synthetic set ({args.data_root}) -> {args.run}", flush=True)
        train(dataset="synthetic", data_root=args.data_root, out=args.run, config="tiny", epochs=args.epochs,
              resume=(args.run / "last").is_dir(), device="cpu")
    if not (ckpt / "config.json").is_file():
        ckpt = args.run / "last"
    print(f"[2/4] exporting {ckpt} (FP32 + FP16) and verifying parity -> {args.build}", flush=True)
    build(ckpt, precision="fp16", out=args.build, backend="onnxruntime", force=True)
    print(f"[3/4] benchmarking every engine of {args.build}", flush=True)
    bench = Path(__file__).resolve().parent / "latency.py"
    rc = subprocess.call([sys.executable, str(bench), "--build", str(args.build), "--iters", str(args.iters),
                          "--batch-sizes", "1,4,8", "--no-compiled"])
    rc = max(rc, segment_own_image(args.build, args.images))
    print(f"quick start done in {time.time() - t0:.0f}s")
    return rc


def segment_own_image(build_dir: Path, folder: Path) -> int:
    """Write an image the model has never seen, at a size other than the model's, and segment it."""
    image, _ = synthetic_images(1, 240, seed=2026)  # float32 (1, 3, 240, 240), RGB 0..255
    picture = Image.fromarray(np.clip(image[0].transpose(1, 2, 0), 0, 255).astype(np.uint8)).resize((300, 240))
    path = folder / "images" / "lesion.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    cmd = [str(build_dir), str(path.parent), "--out", str(folder / "masks"), "--overlay"]
    print(f"[4/4] segmenting {path}: python -m engines.predict {' '.join(cmd)}", flush=True)
    return predict_main(cmd)


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
