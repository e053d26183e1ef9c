"""The build directory's manifest: what was built, from what, and the hashes that prove it.

Details: docs/export.md.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from icmoe.core.codes import check_codes, generic_codes
from icmoe.core.errors import DataError, IcmoeError
from icmoe.core.io import PathLike, atomic_write_json, read_versioned_json, sha256_file
from icmoe.core.specs import TensorSpec, specs_from_dicts, specs_to_dicts

MANIFEST_NAME = "manifest.json"
FORMAT = "icmoe-build"
VERSION = 2
READABLE_VERSIONS = (1, 2)
LEGACY_FAMILY = "icmoe"  # version 1 manifests and checkpoints predate families: all are IC-MoE
PRECISIONS = ("fp32", "fp16", "int8")  # the graphs a build can hold
# What an engine computes in: a graph's precision, or (OpenVINO) a graph run with BF16 for its floating-point
# operations: "bf16" runs the FP32 graph, "int8-bf16" the INT8 graph with BF16 for what stayed in floating point.
BF16_VARIANTS = {"bf16": "fp32", "int8-bf16": "int8"}
RUNTIME_PRECISIONS = PRECISIONS + tuple(BF16_VARIANTS)
# Artifact file names, shared by the build, the engines and the deployment writers.
ONNX_GRAPHS = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
# OpenVINO reads the FP32 ONNX graph itself; INT8 is NNCF's IR (the .xml names its .bin weights).
OPENVINO_GRAPHS = {"fp32": "model.onnx", "int8": "model.int8.xml"}
OPENVINO_CACHE = "openvino-{precision}.blob"
PLAN_NAME = "model.plan"
TORCH_TENSORRT_NAME = "model.trt.ts"
CHECKPOINT_DIR = "checkpoint"
LOG_NAME = "build.log"
# Keys every manifest must have (the others are informative).
REQUIRED_KEYS = ("format", "version", "model", "precision", "image_size", "batch", "inputs", "outputs", "artifacts")
# What `mask` holds: 0/1 (binary), or label values 0..C whose names `model.classes` lists.
MASK_KINDS = ("binary", "labels")
# How `mask` follows from `logits` (model.mask_rule): "threshold" (one channel, mask = logits > 0) or "argmax"
# (one channel per label value, mask = the channel of the largest logit). A mask at another size than the
# model's is then made from the logits resized bilinearly (as SAM's post-processing does), not from the mask.
MASK_RULES = ("threshold", "argmax")
# Label names travel comma-joined (AOTInductor metadata, Triton parameters, icmoe_trt --classes).
CLASS_NAME_SEPARATOR = ","
MAX_LABELS = 256  # the mask is uint8


class ManifestError(IcmoeError, ValueError):
    """A build directory or artifact that cannot be used; the message is one line."""


def graph_precision(precision: str) -> str:
    """The precision of the graph an engine of `precision` runs ("bf16" -> "fp32", "int8-bf16" -> "int8")."""
    return BF16_VARIANTS.get(precision, precision)


def gate_precision(precision: str) -> str:
    """Whose parity gates an engine of `precision` must pass: its own, except INT8 with BF16 for the
    floating-point remainder, which is an INT8 engine (the INT8 gates)."""
    return "int8" if precision == "int8-bf16" else precision


def build_precisions(manifest: Dict[str, Any]) -> List[str]:
    """The graph precisions a build holds beside FP32, in the order they were asked for (the first is the
    build's `precision`); manifests written before builds held several list only `precision`."""
    return list(manifest.get("precisions") or [manifest["precision"]])


def library_versions() -> Dict[str, str]:
    """Versions of the libraries that shape the artifacts (missing ones are left out)."""
    import importlib.metadata as md

    out = {}
    for dist in ("icmoe", "torch", "onnx", "onnxruntime", "onnxscript", "onnx-graphsurgeon", "onnxconverter-common",
                 "polygraphy", "segment-anything", "tensorrt", "openvino", "nncf", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def new_manifest(
    *,
    family: str,
    config: Dict[str, Any],
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    precision: str,
    opset: int,
    batch: Sequence[int],
    checkpoint: Optional[Dict[str, Any]] = None,
    class_names: Optional[Sequence[str]] = None,
    segment_codes: Optional[Sequence[Dict[str, Any]]] = None,
    precisions: Optional[Sequence[str]] = None,
    mask_rule: Optional[str] = None,
) -> Dict[str, Any]:
    """A fresh manifest dict (no artifacts yet).

    Arguments:
      family: the model family's registry name.
      config: the model config as a dict (its `name` is the size variant).
      inputs, outputs: the graph's tensor specs (from the family).
      precision: "fp32", "fp16" or "int8".
      opset: ONNX opset of the graphs.
      batch: (min, opt, max) dynamic batch range.
      checkpoint: {path (relative to the build), sha256, random_init, ...}.
      class_names: the family's `class_names(config)`: label names of the `mask` output (index =
        value, 0 = background), or None for a binary mask.
      segment_codes: the family's `segment_codes(config)`: a coded concept per foreground label
        (`icmoe.core.codes`); None: the generic one for each.
      precisions: every graph precision the build will hold (default: `precision` alone); `precision`
        is the first of them.
      mask_rule: how `mask` follows from `logits` (`MASK_RULES`: "threshold" or "argmax"), or None where
        it does not (a mask at another size then comes from resizing `mask` itself).

    Raises:
      ManifestError: an unknown precision or mask rule, label names that `check_class_names` refuses, or
        segment codes that do not fit the labels.
    """
    precisions = list(precisions or [precision])
    for p in precisions:
        if p not in PRECISIONS:
            raise ManifestError(f"precision must be one of {', '.join(PRECISIONS)}, got {p!r}")
    if precisions[0] != precision or len(set(precisions)) != len(precisions):
        raise ManifestError(f"precisions {precisions} must start with the build's precision {precision!r}, each once")
    bmin, bopt, bmax = (int(b) for b in batch)
    classes = None if class_names is None else check_class_names(class_names, f"model family {family!r}")
    check_label_outputs(classes, specs_to_dicts(outputs), f"model family {family!r}")
    n = foreground_labels(classes)
    where = f"model family {family!r}"
    codes = generic_codes(n) if segment_codes is None else _checked_codes(list(segment_codes), n, where)
    check_mask_rule(mask_rule, classes, specs_to_dicts(outputs), where)
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": {"family": family, "name": config["name"], "config": config, "classes": classes,
                  "segment_codes": codes, "mask_rule": mask_rule},
        "checkpoint": checkpoint or {"path": None, "sha256": None, "random_init": True},
        "precision": precision,
        "precisions": precisions,
        "opset": opset,
        "image_size": int(config["image_size"]),
        "batch": {"min": bmin, "opt": bopt, "max": bmax},
        "inputs": specs_to_dicts(inputs),
        "outputs": specs_to_dicts(outputs),
        "artifacts": {},
        "versions": library_versions(),
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_manifest(build_dir: PathLike, manifest: Dict[str, Any]) -> Path:
    """Write manifest.json atomically; returns its path."""
    path = Path(build_dir) / MANIFEST_NAME
    atomic_write_json(path, manifest)
    return path


def read_manifest(build_dir: PathLike) -> Dict[str, Any]:
    """Read and validate `build_dir/manifest.json` (version 1 is upgraded in memory).

    Raises:
      ManifestError: no manifest, damaged JSON, another format or version, missing keys,
        or a top-level precision its artifacts contradict.
    """
    build_dir = Path(build_dir)
    path = build_dir / MANIFEST_NAME
    if not build_dir.is_dir():
        raise ManifestError(f"{build_dir}: no such build directory (run `python -m export.build` first)")
    if not path.is_file():
        raise ManifestError(f"{build_dir}: not a build directory (no {MANIFEST_NAME})")
    manifest = read_versioned_json(
        path, fmt=FORMAT, version=READABLE_VERSIONS, kind="icmoe build manifest", label="manifest",
        error=ManifestError,
    )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ManifestError(f"{path}: manifest lacks {', '.join(missing)}")
    manifest["model"].setdefault("family", LEGACY_FAMILY)
    manifest["model"].setdefault("classes", None)  # written before label models existed: binary
    manifest["model"].setdefault("mask_rule", None)  # written before mask rules were recorded: resize the mask
    check_precision(manifest, path)
    check_sizes(manifest, path)
    check_classes(manifest, path)
    model = manifest["model"]
    n = foreground_labels(model["classes"])
    if model.get("segment_codes") is None:  # written before segment codes existed: the generic code
        model["segment_codes"] = generic_codes(n)
    model["segment_codes"] = _checked_codes(model["segment_codes"], n, path)
    return manifest


def foreground_labels(classes: Optional[Sequence[str]]) -> int:
    """How many foreground label values a mask holds: 1 (binary) or len(classes) - 1."""
    return 1 if classes is None else len(classes) - 1


def _checked_codes(codes: Any, n: int, where: Any) -> List[Dict[str, Any]]:
    try:
        return check_codes(codes, n, where)
    except DataError as e:
        raise ManifestError(str(e)) from None


def segment_codes(manifest: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The coded concept of each foreground label (1..K) of a build's mask (`icmoe.core.codes`)."""
    return [dict(c) for c in manifest["model"]["segment_codes"]]


def check_sizes(manifest: Dict[str, Any], where: PathLike) -> None:
    """image_size, the model config and the input spec must agree (an edited manifest would not)."""
    size = manifest["image_size"]
    config = manifest["model"].get("config", {}).get("image_size", size)
    spec = manifest["inputs"][0]["shape"][-1] if manifest["inputs"] else size
    if not size == config == spec:
        raise ManifestError(f"{where}: image_size {size} disagrees with the model config ({config}) "
                            f"or the input spec ({spec})")


def check_precision(manifest: Dict[str, Any], where: PathLike) -> None:
    """The top-level precision must be what the artifacts say: its ONNX graph is listed with that
    precision, and no artifact is of another precision than FP32 or one the build holds (`precisions`)."""
    precision = manifest["precision"]
    held = build_precisions(manifest)
    for p in [precision, *held]:
        if p not in PRECISIONS:
            raise ManifestError(f"{where}: unknown precision {p!r}")
    if held[0] != precision:
        raise ManifestError(f"{where}: precision {precision!r}, but precisions starts with {held[0]!r}")
    artifacts = manifest["artifacts"]
    graph = artifacts.get(ONNX_GRAPHS[precision])
    if artifacts and (graph is None or graph.get("precision") != precision):
        raise ManifestError(f"{where}: precision {precision!r}, but {ONNX_GRAPHS[precision]} is not listed as a "
                            f"{precision} graph")
    foreign = sorted(n for n, a in artifacts.items() if a.get("precision") not in ("fp32", *held))
    if foreign:
        raise ManifestError(f"{where}: precision {'+'.join(held)!r}, but lists {', '.join(foreign)} of another "
                            f"precision")


def check_class_names(names: Any, where: Any) -> List[str]:
    """Label names as a list of strings, or a one-line error naming `where`.

    Arguments:
      names: the label names, index = label value (index 0 is the background).
      where: what to name in the message (a manifest path, a family, a package).

    Returns:
      list[str]: the names.

    Raises:
      ManifestError: not a list of 2..256 distinct, non-empty strings without commas or line breaks.
    """
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ManifestError(f"{where}: class names must be a list of strings, got {type(names).__name__}")
    if not 2 <= len(names) <= MAX_LABELS:
        raise ManifestError(f"{where}: a label mask needs 2..{MAX_LABELS} class names (background first), "
                            f"got {len(names)}")
    for name in names:
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ManifestError(f"{where}: class name {name!r} is not a non-empty string without outer spaces")
        if CLASS_NAME_SEPARATOR in name or "\n" in name or "\r" in name:
            raise ManifestError(f"{where}: class name {name!r} contains a comma or a line break")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ManifestError(f"{where}: class name {twice[0]!r} given twice")
    return list(names)


def check_label_outputs(classes: Optional[List[str]], outputs: Sequence[Dict[str, Any]], where: Any) -> None:
    """A label model's `mask` must be uint8, and a (B, K, S, S) `logits` output must have K = len(classes).

    Raises:
      ManifestError: the outputs contradict the label names.
    """
    if classes is None:
        return
    specs = {o["name"]: o for o in outputs}
    mask = specs.get("mask")
    if mask is None or mask["dtype"] != "uint8":
        have = "no output named mask" if mask is None else f"mask is {mask['dtype']}"
        raise ManifestError(f"{where}: class names need a uint8 output named mask ({have})")
    logits = specs.get("logits")
    if logits is not None and len(logits["shape"]) == 4 and logits["shape"][1] != len(classes):
        raise ManifestError(f"{where}: {len(classes)} class names, but logits has {logits['shape'][1]} channels")


def check_classes(manifest: Dict[str, Any], where: PathLike) -> None:
    """`model.classes` is null or label names consistent with the outputs (an edited manifest may not be)."""
    classes = manifest["model"]["classes"]
    if classes is not None:
        check_label_outputs(check_class_names(classes, where), manifest["outputs"], where)
    check_mask_rule(manifest["model"]["mask_rule"], classes, manifest["outputs"], where)


def check_mask_rule(rule: Optional[str], classes: Optional[Sequence[str]], outputs: Sequence[Dict[str, Any]],
                    where: Any) -> None:
    """A mask rule needs a (B, K, S, S) float `logits` output: K = 1 and a binary mask for "threshold",
    K = the number of label names for "argmax".

    Raises:
      ManifestError: an unknown rule, or outputs that contradict it.
    """
    if rule is None:
        return
    if rule not in MASK_RULES:
        raise ManifestError(f"{where}: unknown mask rule {rule!r} (known: {', '.join(MASK_RULES)})")
    logits = {o["name"]: o for o in outputs}.get("logits")
    if logits is None or len(logits["shape"]) != 4 or not str(logits["dtype"]).startswith("float"):
        raise ManifestError(f"{where}: mask rule {rule!r} needs a (batch, K, S, S) float output named logits")
    want = 1 if rule == "threshold" else len(classes or ())
    if (rule == "threshold") != (classes is None) or logits["shape"][1] != want:
        raise ManifestError(f"{where}: mask rule {rule!r} does not fit a {'binary' if classes is None else 'label'} "
                            f"mask with logits of {logits['shape'][1]} channels")


def class_names(manifest: Dict[str, Any]) -> Optional[List[str]]:
    """The label names of a build's `mask` output (index = value, 0 = background), or None for a binary
    mask (also for manifests written before label models existed)."""
    classes = manifest["model"].get("classes")
    return None if classes is None else list(classes)


def mask_kind_of(names: Optional[Sequence[str]]) -> str:
    """"binary" for no label names (the mask holds 0/1), "labels" for label names (it holds label values)."""
    return MASK_KINDS[0] if names is None else MASK_KINDS[1]


def mask_kind(manifest: Dict[str, Any]) -> str:
    """"binary" (mask holds 0/1) or "labels" (mask holds label values, see `class_names`)."""
    return mask_kind_of(class_names(manifest))


def mask_rule(manifest: Dict[str, Any]) -> Optional[str]:
    """How the build's `mask` follows from its `logits` (`MASK_RULES`), or None where it does not (or older builds)."""
    return manifest["model"].get("mask_rule")


def family_of(manifest: Dict[str, Any]) -> str:
    return str(manifest["model"].get("family", LEGACY_FAMILY))


def model_label(manifest: Dict[str, Any]) -> str:
    """"family/config", e.g. "icmoe/tiny": how messages name a build's model."""
    return f"{family_of(manifest)}/{manifest['model']['name']}"


def io_specs(manifest: Dict[str, Any]) -> Dict[str, List[TensorSpec]]:
    """The build's graph inputs and outputs as TensorSpecs."""
    return {"inputs": specs_from_dicts(manifest["inputs"]), "outputs": specs_from_dicts(manifest["outputs"])}


def checkpoint_path(build_dir: PathLike, manifest: Dict[str, Any]) -> Optional[Path]:
    """The checkpoint folder a build was exported from (relative paths are relative to the build)."""
    path = (manifest.get("checkpoint") or {}).get("path")
    if not path:
        return None
    path = Path(path)
    return path if path.is_absolute() else Path(build_dir) / path


def artifact_path(build_dir: PathLike, name: str, *, verify: bool = True) -> Path:
    """Path of a registered artifact, checked against the manifest.

    Arguments:
      build_dir: the build directory.
      name: the artifact's file name (e.g. "model.onnx").
      verify: also compare size and sha256 with the manifest.

    Returns:
      Path: the artifact.

    Raises:
      ManifestError: not registered, missing, truncated (size differs) or damaged (sha256 differs).
    """
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    info = manifest["artifacts"].get(name)
    path = build_dir / name
    if info is None:
        have = ", ".join(sorted(manifest["artifacts"])) or "none"
        raise ManifestError(f"{build_dir}: no artifact {name!r} in {MANIFEST_NAME} (has: {have})")
    if not path.is_file():
        raise ManifestError(f"{path}: missing (listed in {MANIFEST_NAME})")
    if verify:
        size = path.stat().st_size
        if size != info.get("bytes"):
            raise ManifestError(f"{path}: truncated or damaged ({size} bytes, "
                                f"{MANIFEST_NAME} says {info.get('bytes')})")
        if sha256_file(path) != info.get("sha256"):
            raise ManifestError(f"{path}: damaged (sha256 differs from {MANIFEST_NAME})")
    return path


def add_artifact(build_dir: PathLike, name: str, *, kind: str, precision: str, **info: Any) -> Dict[str, Any]:
    """Hash `build_dir/name` and record it in manifest.json (written atomically).

    Arguments:
      build_dir: the build directory (its manifest must exist).
      name: file name inside the build directory.
      kind: "onnx", "tensorrt", "torch_tensorrt", "openvino_ir", "openvino_cache", ...
      precision: "fp32", "fp16" or "int8" (of this artifact).
      info: more JSON-serialisable facts (e.g. initializer bytes).

    Returns:
      dict: the artifact's entry.
    """
    build_dir = Path(build_dir)
    path = build_dir / name
    if not path.is_file():
        raise ManifestError(f"{path}: cannot register a missing artifact")
    manifest = read_versioned_json(build_dir / MANIFEST_NAME, fmt=FORMAT, version=READABLE_VERSIONS,
                                   kind="icmoe build manifest", label="manifest", error=ManifestError)
    entry = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "kind": kind, "precision": precision, **info}
    manifest["artifacts"][name] = entry
    write_manifest(build_dir, manifest)
    return entry
