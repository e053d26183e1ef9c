"""A MONAI Bundle of a build: `python -m export.bundle BUILD --out DIR` (the `monai` extra).

    DIR/configs/metadata.json    version, network_data_format (the manifest's inputs and outputs), classes,
                                 segment codes, the icmoe version
    DIR/configs/inference.json   MONAI bundle config: the build's engine as the network, MONAI's
                                 SimpleInferer, predict's readers and writers (engines.predict.bundle)
    DIR/models/                  the build (manifest and artifacts; model.pt: the network's empty state dict)
    DIR/docs/README.md           how to run it, and how MONAI Label serves it

Run it with `python -m monai.bundle run --config_file configs/inference.json --dataset_dir IN --output_dir OUT`
from DIR. docs/clinical.md.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from icmoe.core import cli
from icmoe.core.errors import IcmoeError
from icmoe.core.extras import require
from icmoe.core.io import give_default_mode, sha256_file
from icmoe.core.manifest import MANIFEST_NAME, PRECISIONS, class_names, read_manifest, segment_codes
from icmoe.core.specs import BATCH

log = logging.getLogger(__name__)

BUNDLE_VERSION = "0.1.0"
# MONAI's metadata schema the file follows (a URL MONAI's verify_metadata would fetch; nothing here does).
METADATA_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt", "eager")


class BundleError(IcmoeError):
    """A bundle that cannot be written; one line."""


def _version(dist: str) -> Optional[str]:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _tensor_format(spec: Dict[str, Any], manifest: Dict[str, Any], is_input: bool) -> Dict[str, Any]:
    """One input or output of the manifest as MONAI's network_data_format describes it."""
    shape = [d for d in spec["shape"] if d != BATCH]
    names = class_names(manifest)
    out: Dict[str, Any] = {"dtype": spec["dtype"], "is_patch_data": False, "description": spec.get("doc", "")}
    if len(shape) != 3:  # one value per image (e.g. a chosen candidate)
        return {**out, "type": "number", "format": "index", "num_channels": 1, "spatial_shape": shape}
    out.update(type="image", num_channels=shape[0], spatial_shape=shape[1:])
    if is_input:
        return {**out, "format": "magnitude", "modality": "any", "value_range": [0, 255],
                "channel_def": {"0": "R", "1": "G", "2": "B"} if shape[0] == 3 else {}}
    if spec["name"] == "mask":
        labels = names or ["background", "foreground"]
        return {**out, "format": "segmentation", "value_range": [0, len(labels) - 1],
                "channel_def": {str(v): n for v, n in enumerate(labels)}}
    return {**out, "format": "logits", "value_range": []}


def metadata(manifest: Dict[str, Any], build: Path) -> Dict[str, Any]:
    """configs/metadata.json of a build."""
    model = manifest["model"]
    names = class_names(manifest) or ["background", "foreground"]
    monai_version, torch_version, numpy_version = _version("monai"), _version("torch"), _version("numpy")
    return {
        "schema": METADATA_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by icmoe {_version('icmoe')} from build {build.name}"},
        "monai_version": monai_version, "pytorch_version": torch_version, "numpy_version": numpy_version,
        "required_packages_version": {d: v for d in ("icmoe", "onnxruntime", "pydicom", "highdicom")
                                      if (v := _version(d))},
        "name": f"icmoe {model['family']}/{model['name']} ({manifest['precision']})",
        "task": "2-D segmentation of medical images, volumes and DICOM series",
        "description": f"The icmoe build of {model['family']}/{model['name']} ({manifest['precision']}) run by its "
                       "engine through MONAI's bundle workflow; masks as `python -m engines.predict` writes them "
                       "(PNG, NIfTI, DICOM SEG).",
        "authors": "icmoe", "copyright": "see the icmoe project", "intended_use": "Research use only; not for "
                                                                                  "diagnosis or treatment.",
        "data_source": "your own images", "data_type": "png, jpeg, bmp, tiff, dicom, nifti",
        "image_classes": "RGB 0..255 (gray repeated), resized to the model's input",
        "label_classes": ", ".join(f"{v}: {n}" for v, n in enumerate(names)),
        "pred_classes": ", ".join(f"{v}: {n}" for v, n in enumerate(names)),
        "network_data_format": {
            "inputs": {s["name"]: _tensor_format(s, manifest, True) for s in manifest["inputs"]},
            "outputs": {s["name"]: _tensor_format(s, manifest, False) for s in manifest["outputs"]},
        },
        "icmoe": {"family": model["family"], "config": model["name"], "precision": manifest["precision"],
                  "classes": names, "segment_codes": segment_codes(manifest), "version": _version("icmoe"),
                  "build_sha256": sha256_file(build / MANIFEST_NAME), "manifest": f"models/{MANIFEST_NAME}"},
    }


def inference_config(backend: str, precision: Optional[str]) -> Dict[str, Any]:
    """configs/inference.json: MONAI bundle config syntax (`@` references, `$` expressions, `_target_`)."""
    return {
        "imports": ["$import engines.predict.bundle"],
        "bundle_root": ".",
        "device": "cpu",
        "model_dir": "$@bundle_root + '/models'",
        "dataset_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/eval'",
        "backend": backend,
        "precision": precision,
        "format": "auto",
        "seg_type": "binary",
        "window": None,
        "batch_size": None,
        "network_def": {"_target_": "engines.predict.bundle.EngineNetwork", "build_dir": "@model_dir",
                        "backend": "@backend", "precision": "@precision"},
        "network": "@network_def",
        "inferer": {"_target_": "SimpleInferer"},
        "predictor": {"_target_": "engines.predict.bundle.BundlePredictor", "network": "@network",
                      "inferer": "@inferer", "model_dir": "@model_dir", "dataset_dir": "@dataset_dir",
                      "output_dir": "@output_dir", "fmt": "@format", "seg_type": "@seg_type", "window": "@window",
                      "batch_size": "@batch_size", "progress": False},
        "initialize": [],
        "run": ["$@predictor.run()"],
        "finalize": ["$@network.close()"],
    }


def readme(meta: Dict[str, Any]) -> str:
    """docs/README.md of the bundle."""
    fmt = meta["network_data_format"]
    ins = ", ".join(f"`{k}` {v['dtype']} {v['num_channels']}x{'x'.join(map(str, v['spatial_shape']))}"
                    for k, v in fmt["inputs"].items())
    outs = ", ".join(f"`{k}` {v['dtype']}" for k, v in fmt["outputs"].items())
    return f"""# {meta['name']}

{meta['description']}

**Research use only**: not validated for diagnosis or treatment; every DICOM SEG it writes says so in its
series description.

- input: {ins} (each picture resized as training resized it)
- outputs: {outs}
- labels: {meta['label_classes']}
- made by icmoe {meta['icmoe']['version']}; the build's manifest is `models/{MANIFEST_NAME}`

## Run

From this folder, with `pip install 'icmoe[monai,dicom]'` (offline; nothing is downloaded):

```bash
python -m monai.bundle run --config_file configs/inference.json --dataset_dir IN --output_dir OUT
```

`IN` is a folder of pictures, NIfTI volumes and DICOM series; `OUT` gets what
`python -m engines.predict models IN --out OUT` writes: a DICOM SEG per series, a NIfTI label volume per
NIfTI file, a PNG per picture, and `predict_report.json`. Other keys override the same way:
`--backend eager` (or `openvino`, `tensorrt`), `--format png`, `--seg_type fractional`, `--window "[-150, 500]"`.

## MONAI Label, 3D Slicer and OHIF

MONAI Label's `monaibundle` app serves bundles from its model folder to 3D Slicer's MONAI Label module and
to OHIF: copy this folder to `apps/monaibundle/model/<name>` and start
`monailabel start_server --app apps/monaibundle --studies <DICOMweb URL of the PACS> --conf models <name>`.
Its bundle infer task instantiates `network_def` and loads `models/model.pt` into it (an empty state
dict here: the weights are the build's artifacts), but runs its own `preprocessing` and `postprocessing`,
which this bundle does not define; serving it through MONAI Label is not validated by icmoe. The path
icmoe validates is `monai.bundle run` above, and for a PACS `python -m engines.predict --dicomweb`.
"""


def _place(build: Path, models: Path) -> None:
    """The build's files under models/ (hard links where the filesystem allows, else copies)."""
    for src in sorted(build.rglob("*")):
        if src.is_dir() or src.name.startswith("."):
            continue
        dst = models / src.relative_to(build)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def write_bundle(build: Path, out: Path, *, backend: str = "auto", precision: Optional[str] = None) -> Path:
    """Write the MONAI Bundle of a build into `out` (a new folder, made whole or not at all).

    Raises:
      BundleError: `out` exists; ManifestError: not a build; MissingExtra: no MONAI.
    """
    require("monai.bundle", "monai", "a MONAI Bundle")
    import torch

    build, out = Path(build), Path(out)
    manifest = read_manifest(build)
    if out.exists():
        raise BundleError(f"{out} exists; choose a new --out folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        meta = metadata(manifest, build)
        (staging / "configs").mkdir()
        (staging / "docs").mkdir()
        _place(build, staging / "models")
        torch.save({}, staging / "models" / "model.pt")  # the network's state dict: its weights are the artifacts
        (staging / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        (staging / "configs" / "inference.json").write_text(json.dumps(inference_config(backend, precision),
                                                                       indent=2) + "\n")
        (staging / "docs" / "README.md").write_text(readme(meta))
        give_default_mode(staging)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info(f"bundle: {out} ({meta['name']})")
    return out


def _parser() -> Any:
    p = cli.parser("python -m export.bundle", "Write a MONAI Bundle of a build (configs/, models/, docs/).")
    p.add_argument("build", type=Path, metavar="BUILD", help="a build directory (python -m export.build)")
    p.add_argument("--out", type=Path, required=True, help="the bundle folder to make (must not exist)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="the engine inference.json runs (default auto: TensorRT where possible, else ONNX Runtime)")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="graph precision (default: the build's)")
    return p


def _main(argv: Optional[Sequence[str]] = None) -> int:
    a = _parser().parse_args(argv)
    cli.setup_logging(a.verbosity)
    print(f"bundle: {write_bundle(a.build, a.out, backend=a.backend, precision=a.precision)}")
    return cli.EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())


__all__: List[str] = ["write_bundle", "metadata", "inference_config", "BundleError", "main"]
