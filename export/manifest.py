"""The build directory's manifest: what was built, from what, and the hashes that prove it.

A build directory (default `build/<model-name>-<precision>/`) holds

    model.onnx         FP32 portable graph (always)
    model.fp16.onnx    strongly typed FP16 graph (--precision fp16)
    model.plan         TensorRT engine (GPU hosts)
    manifest.json      this file's format, written atomically
    build.log          what the build printed

`manifest.json` keys: format="icmoe-build", version=1, model{name, config},
checkpoint{path, sha256, random_init}, precision, opset, image_size,
batch{min, opt, max}, inputs/outputs [{name, dtype, shape}],
artifacts{filename: {sha256, bytes, kind, precision, ...}}, versions{...}, built_at.

Every reader goes through `read_manifest` and `artifact_path`, so a missing,
truncated or foreign artifact is refused with one line naming the file.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Dict, List, Optional

from icmoe.io import PathLike, atomic_write_json, read_versioned_json, sha256_file

MANIFEST_NAME = "manifest.json"
FORMAT = "icmoe-build"
VERSION = 1
PRECISIONS = ("fp32", "fp16")
# Keys every manifest must have (the others are informative).
REQUIRED_KEYS = ("format", "version", "model", "precision", "image_size", "batch", "inputs", "outputs", "artifacts")


class ManifestError(ValueError):
    """A build directory or artifact that cannot be used; the message is one line."""


def io_spec(image_size: int) -> Dict[str, List[Dict[str, Any]]]:
    """Input and output names, dtypes and shapes of every IC-MoE graph ("batch" is the dynamic axis)."""
    s = image_size
    return {
        "inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 3, s, s]}],
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": ["batch", 1, s, s]},
            {"name": "mask", "dtype": "uint8", "shape": ["batch", 1, s, s]},
            {"name": "expert", "dtype": "int32", "shape": ["batch"]},
        ],
    }


def library_versions() -> Dict[str, str]:
    """Versions of the libraries that shape the artifacts (missing ones are left out)."""
    import importlib.metadata as md

    out = {}
    for dist in ("icmoe", "torch", "onnx", "onnxruntime", "onnxscript", "onnx-graphsurgeon", "onnxconverter-common",
                 "polygraphy", "segment-anything", "tensorrt", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def new_manifest(
    *,
    config: Dict[str, Any],
    precision: str,
    opset: int,
    batch: tuple,
    checkpoint: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """A fresh manifest dict (no artifacts yet).

    Arguments:
      config: the model config as a dict (`ICMoEConfig.to_dict()`).
      precision: "fp32" or "fp16".
      opset: ONNX opset of the graphs.
      batch: (min, opt, max) dynamic batch range.
      checkpoint: {path, sha256, random_init}.
    """
    if precision not in PRECISIONS:
        raise ManifestError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    bmin, bopt, bmax = (int(b) for b in batch)
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": {"name": config["name"], "config": config},
        "checkpoint": checkpoint or {"path": None, "sha256": None, "random_init": True},
        "precision": precision,
        "opset": opset,
        "image_size": int(config["image_size"]),
        "batch": {"min": bmin, "opt": bopt, "max": bmax},
        **io_spec(int(config["image_size"])),
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
    """Read and validate `build_dir/manifest.json`.

    Raises:
      ManifestError: no manifest, damaged JSON, another format or version, missing keys.
    """
    build_dir = Path(build_dir)
    path = build_dir / MANIFEST_NAME
    if not build_dir.is_dir():
        raise ManifestError(f"{build_dir}: no such build directory (run `python -m export.build` first)")
    if not path.is_file():
        raise ManifestError(f"{build_dir}: not a build directory (no {MANIFEST_NAME})")
    manifest = read_versioned_json(
        path, fmt=FORMAT, version=VERSION, kind="IC-MoE build manifest", label="manifest", error=ManifestError
    )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ManifestError(f"{path}: manifest lacks {', '.join(missing)}")
    if manifest["precision"] not in PRECISIONS:
        raise ManifestError(f"{path}: unknown precision {manifest['precision']!r}")
    return manifest


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
            raise ManifestError(f"{path}: truncated or damaged ({size} bytes, {MANIFEST_NAME} says {info.get('bytes')})")
        if sha256_file(path) != info.get("sha256"):
            raise ManifestError(f"{path}: damaged (sha256 differs from {MANIFEST_NAME})")
    return path


def add_artifact(build_dir: PathLike, name: str, *, kind: str, precision: str, **info: Any) -> Dict[str, Any]:
    """Hash `build_dir/name` and record it in manifest.json (written atomically).

    Arguments:
      build_dir: the build directory (its manifest must exist).
      name: file name inside the build directory.
      kind: "onnx", "tensorrt", "torch_tensorrt", ...
      precision: "fp32" or "fp16" (of this artifact).
      info: more JSON-serialisable facts (e.g. initializer bytes).

    Returns:
      dict: the artifact's entry.
    """
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    path = build_dir / name
    if not path.is_file():
        raise ManifestError(f"{path}: cannot register a missing artifact")
    entry = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "kind": kind, "precision": precision, **info}
    manifest["artifacts"][name] = entry
    write_manifest(build_dir, manifest)
    return entry


def same_model(manifest: Dict[str, Any], config: Dict[str, Any]) -> bool:
    """Whether a manifest describes a model with exactly this config."""
    return manifest.get("model", {}).get("config") == config
