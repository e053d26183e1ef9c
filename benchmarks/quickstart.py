"""The quick start: train `tiny` on the synthetic set, export it (FP32, FP16 and INT8 calibrated on its
training images), verify parity, benchmark every CPU engine, segment a new image with the fastest engine
whose gates passed, and compare full-size masks made from the logits with nearest-resized ones.

README.md has the commands.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks import fullsize  # noqa: E402
from engines.predict import main as predict_main  # noqa: E402
from export.build import build  # noqa: E402
from export.precision import fp16_unavailable  # noqa: E402
from export.quantize import int8_unavailable  # noqa: E402
from icmoe.core import cli  # noqa: E402
from icmoe.core.extras import require  # noqa: E402
from icmoe.core.io import atomic_path  # noqa: E402
from icmoe.data.synthetic import synthetic_images  # noqa: E402
from icmoe.training import train  # noqa: E402


def _main(argv=None) -> int:
    p = cli.parser("python benchmarks/quickstart.py", __doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo recipe's)")
    p.add_argument("--run", type=Path, default=Path("runs/quickstart"), help="run folder")
    p.add_argument("--data-root", type=Path, default=Path("data/synthetic"))
    p.add_argument("--build", type=Path, default=Path("build/icmoe-tiny"))
    p.add_argument("--skip-train", action="store_true", help="reuse the run folder's checkpoint")
    p.add_argument("--iters", type=int, default=10, help="benchmark timed runs per batch size")
    p.add_argument("--images", type=Path, default=Path("quickstart"), help="folder for the predict example")
    args = p.parse_args(argv)
    cli.setup_logging(args.verbosity)
    # The FP16 and INT8 graphs, OpenVINO and the benchmark's plot need extras: say so now, not after training.
    for why in (fp16_unavailable(), int8_unavailable()):
        if why:
            raise cli.UsageError(why)
    require("matplotlib", "bench", "the quick start's benchmark plot")
    t0 = time.time()
    ckpt = args.run / "best"
    if not args.skip_train:
        print(f"[1/5] training tiny on the synthetic set ({args.data_root}) -> {args.run}", flush=True)
        train(dataset="synthetic", data_root=args.data_root, out=args.run, config="tiny", epochs=args.epochs,
              resume=(args.run / "last").is_dir(), device="cpu")
    if not (ckpt / "config.json").is_file():
        ckpt = args.run / "last"
    print(f"[2/5] exporting {ckpt} (FP32, FP16, INT8 calibrated on {args.data_root}'s training images) and "
          f"verifying parity -> {args.build}", flush=True)
    build(ckpt, precision="fp16,int8", out=args.build, backend="openvino", force=True, calibration=str(args.data_root))
    print(f"[3/5] benchmarking every engine of {args.build}", flush=True)
    bench = Path(__file__).resolve().parent / "latency.py"
    rc = subprocess.call([sys.executable, str(bench), "--build", str(args.build), "--iters", str(args.iters),
                          "--batch-sizes", "1,4,8"])
    rc = max(rc, segment_own_image(args.build, args.images))
    print(f"[5/5] full-size masks from the logits and nearest-resized ones, on {FULLSIZE_IMAGES} held-out images "
          f"drawn at {FULLSIZE}x{FULLSIZE}", flush=True)
    print(fullsize.markdown(fullsize.run(args.build, FULLSIZE, FULLSIZE_IMAGES)))
    print(f"quick start done in {time.time() - t0:.0f}s")
    return rc


FULLSIZE, FULLSIZE_IMAGES = 512, 32  # the held-out set of step 5: four times the model's side


def segment_own_image(build_dir: Path, folder: Path) -> int:
    """Write an image the model has never seen, at a size other than the model's, and segment it."""
    image, _ = synthetic_images(1, 240, seed=2026)  # float32 (1, 3, 240, 240), RGB 0..255
    picture = Image.fromarray(np.clip(image[0].transpose(1, 2, 0), 0, 255).astype(np.uint8)).resize((300, 240))
    path = folder / "images" / "lesion.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    cmd = [str(build_dir), str(path.parent), "--out", str(folder / "masks"), "--overlay"]
    print(f"[4/5] segmenting {path}: python -m engines.predict {' '.join(cmd)}", flush=True)
    return predict_main(cmd)


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
