"""The components a MONAI Bundle's `configs/inference.json` instantiates (`python -m export.bundle` writes
the bundle; the `monai` extra): the build's engine as a MONAI network, and a predictor that runs predict's
reading, batching and writing with MONAI's inferer calling that network. docs/clinical.md.

    "network_def": {"_target_": "engines.predict.bundle.EngineNetwork", "build_dir": "@model_dir"},
    "inferer": {"_target_": "SimpleInferer"},
    "predictor": {"_target_": "engines.predict.bundle.BundlePredictor", "network": "@network_def", ...},
    "run": ["$@predictor.run()"]
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from engines.predict.files import PredictOptions, engine_precision, open_engine, predict_files
from engines.predict.pipeline import engine_contract, ready
from icmoe.core.io import atomic_write_json

log = logging.getLogger("engines.predict")

REPORT_NAME = "predict_report.json"


class EngineNetwork(torch.nn.Module):
    """A build's engine (ONNX Runtime, OpenVINO, TensorRT or eager) as a torch module for MONAI's inferers.

    forward(images float32 (B, 3, S, S) RGB 0..255) -> {output name: tensor} as the manifest declares them.
    It holds no torch parameters: the weights are the build's artifacts in `build_dir`.
    """

    def __init__(self, build_dir: str, backend: str = "auto", precision: Optional[str] = None,
                 threads: Optional[int] = None) -> None:
        super().__init__()
        self.engine = open_engine(Path(build_dir), backend, precision, threads)[0].activate()

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = self.engine.infer(images.detach().cpu().numpy().astype(np.float32, copy=False))
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}

    def close(self) -> None:
        self.engine.deactivate()


class InfererRunner:
    """The predict pipeline's runner interface over a MONAI inferer and network (one batch at a time)."""

    concurrency = 1

    def __init__(self, network: EngineNetwork, inferer: Any) -> None:
        self.network, self.inferer = network, inferer
        self.label = f"monai-{type(inferer).__name__}-{network.engine.name}"

    def submit(self, images: "np.ndarray | Future[np.ndarray]",
               whole: bool) -> "Future[Tuple[Dict[str, np.ndarray], float]]":
        x = ready(images)  # the pipeline prepares batches in its pool
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.inferer(torch.from_numpy(x), self.network)
        done: Future = Future()
        done.set_result(({k: v.numpy() for k, v in out.items()}, time.perf_counter() - t0))
        return done

    def check_batch(self, batch_size: int) -> None:
        """The engine checks every batch itself."""

    def close(self) -> None:
        self.network.close()


class BundlePredictor:
    """Segments every image, volume and DICOM series under `dataset_dir` into `output_dir`, as
    `python -m engines.predict MODEL_DIR DATASET_DIR --out OUTPUT_DIR` does, through MONAI's `inferer`.

    Arguments:
      network: an EngineNetwork; inferer: a MONAI inferer (e.g. SimpleInferer).
      model_dir: the bundle's models/ folder (the build: manifest and artifacts).
      fmt, seg_type, window, batch_size, skip_bad: as predict's --format, --seg-type, --window, --batch-size,
        --skip-bad.
    """

    def __init__(self, network: EngineNetwork, inferer: Any, model_dir: str, dataset_dir: str, output_dir: str,
                 fmt: str = "auto", seg_type: str = "binary", window: Optional[Sequence[float]] = None,
                 batch_size: Optional[int] = None, skip_bad: bool = False, progress: bool = True) -> None:
        self.network, self.inferer = network, inferer
        self.model_dir, self.dataset_dir, self.output_dir = Path(model_dir), str(dataset_dir), Path(output_dir)
        low_high = None if window is None else (float(window[0]), float(window[1]))
        self.options = PredictOptions(out=self.output_dir, batch_size=batch_size, skip_bad=skip_bad, window=low_high,
                                      progress=progress, fmt=fmt, seg_type=seg_type)

    def run(self) -> Dict[str, Any]:
        """Predict and write; the report goes to `output_dir/predict_report.json` too."""
        runner = InfererRunner(self.network, self.inferer)
        header = {"engine": runner.label, "server": None, "precision": engine_precision(self.network.engine)}
        report = predict_files(self.model_dir, [self.dataset_dir], self.options,
                               runner=(runner, engine_contract(self.network.engine), header))
        atomic_write_json(self.output_dir / REPORT_NAME, json.loads(json.dumps(report, default=str)))
        t = report["totals"]
        log.info(f"{t['images']} images from {t['files']} inputs in {t['seconds']:.2f} s; outputs in {self.output_dir}")
        return report
