"""Triton Inference Server model repository from a build directory (any model family).

Details: docs/triton.md.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from engines.base import EngineError
from icmoe.core.extras import missing
from icmoe.core.io import PathLike, atomic_write_bytes
from icmoe.core.manifest import (
    CLASS_NAME_SEPARATOR,
    LEGACY_FAMILY,
    ONNX_GRAPHS,
    OPENVINO_GRAPHS,
    PLAN_NAME,
    artifact_path,
    class_names,
    graph_precision,
    mask_kind,
    read_manifest,
)

log = logging.getLogger(__name__)
CONFIG_NAME = "config.pbtxt"
VERSION = "1"
KINDS = ("tensorrt", "onnxruntime", "python", "openvino")
PYTHON_MODEL_TEMPLATE = Path(__file__).with_name("python_model.py")
# Triton data types of the numpy dtypes the manifest names.
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "uint8": "TYPE_UINT8", "int32": "TYPE_INT32",
                 "int64": "TYPE_INT64", "bool": "TYPE_BOOL"}
INPUT_DTYPES = ("uint8",)  # what the image input can be sent as instead of the build's float type


class RepositoryError(EngineError):
    """A build that cannot be turned into a model repository, or an invalid config (one line)."""


@dataclass
class RepositoryOptions:
    name: Optional[str] = None  # model names are <name>_<kind>; default: the build's family
    instances: int = 1  # instance_group count per model (CPU instances: each runs its own session)
    max_queue_delay_us: int = 2000  # dynamic batching: how long a request may wait for others
    # type of the image input (the first input) clients send: None (the build's, FP32) or "uint8" (4x smaller
    # requests; the onnxruntime model's graph and the python model cast it to the build's type)
    input_dtype: Optional[str] = None
    # engine precision served by the onnxruntime/python/openvino models: "fp32", "fp16", "int8", or for
    # OpenVINO "bf16" / "int8-bf16" (BF16 arithmetic; the python model serves that graph's ONNX Runtime form)
    # (default: the build's, or that of the engine `pick_engine` chose)
    precision: Optional[str] = None


def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2  # lazy: optional dependency
    except ImportError as e:
        raise RepositoryError(missing("writing Triton model configs", "triton", e)) from None
    return model_config_pb2


def parse_config(path_or_text) -> Any:
    """Parse a config.pbtxt with Triton's model-config protobuf.

    Arguments:
      path_or_text: a config.pbtxt path, or its text.

    Returns:
      tritonclient.grpc.model_config_pb2.ModelConfig

    Raises:
      RepositoryError: not a valid Triton model config (one line with protobuf's reason).
    """
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    is_text = isinstance(path_or_text, str) and ("\n" in path_or_text or "{" in path_or_text)
    if not is_text and Path(path_or_text).is_file():
        text, where = Path(path_or_text).read_text(), str(path_or_text)
    else:
        text, where = str(path_or_text), "config text"
    try:
        return text_format.Parse(text, pb2.ModelConfig())
    except text_format.ParseError as e:
        raise RepositoryError(f"{where}: not a valid Triton model config ({e})") from None


def _io_entries(pb2, specs: Sequence[Dict[str, Any]], cls) -> list:
    entries = []
    for spec in specs:
        shape = list(spec["shape"])
        if shape[0] != "batch":
            raise RepositoryError(f"tensor {spec['name']!r}: expected a leading 'batch' axis, got shape {shape}")
        dtype = TRITON_DTYPES.get(spec["dtype"])
        if dtype is None:
            raise RepositoryError(f"tensor {spec['name']!r}: dtype {spec['dtype']!r} has no Triton type")
        dims = [int(d) for d in shape[1:]]
        entry = cls(name=spec["name"], data_type=pb2.DataType.Value(dtype), dims=dims or [1])
        if not dims:
            # A (B,) tensor: Triton needs non-empty dims, so expose (B, 1) and reshape to (B,) for the model.
            entry.reshape.SetInParent()
        entries.append(entry)
    return entries


def model_config(manifest: Dict[str, Any], kind: str, options: RepositoryOptions) -> Any:
    """The ModelConfig message of one kind of model for a build's manifest.

    Arguments:
      manifest: the build's manifest (`read_manifest`).
      kind: "tensorrt", "onnxruntime" or "python".
      options: names, instances, batching delay, precision, image input type.

    Returns:
      tritonclient.grpc.model_config_pb2.ModelConfig, with the mask kind and label names in `parameters`.

    Raises:
      RepositoryError: an unknown kind, a batch range not starting at 1, a tensor Triton cannot type.
    """
    pb2 = _model_config_pb2()
    if kind not in KINDS:
        raise RepositoryError(f"unknown model kind {kind!r} (choose from {', '.join(KINDS)})")
    bmin, bopt, bmax = (int(manifest["batch"][k]) for k in ("min", "opt", "max"))
    if bmin != 1:
        raise RepositoryError(f"Triton batches from 1, but this build's smallest batch is {bmin}")
    prefix = options.name or manifest["model"].get("family", LEGACY_FAMILY)
    cfg = pb2.ModelConfig(name=f"{prefix}_{kind}", max_batch_size=bmax)
    if kind == "tensorrt":
        cfg.backend, cfg.platform, cfg.default_model_filename = "tensorrt", "tensorrt_plan", "model.plan"
        group = pb2.ModelInstanceGroup.Kind.Value("KIND_GPU")
    elif kind == "onnxruntime":
        cfg.backend, cfg.platform, cfg.default_model_filename = "onnxruntime", "onnxruntime_onnx", "model.onnx"
        group = pb2.ModelInstanceGroup.Kind.Value("KIND_CPU")
    elif kind == "openvino":
        # Triton's OpenVINO backend reads an IR (model.xml + model.bin) or an ONNX graph; the CPU plugin's
        # properties travel as string parameters, as the engine sets them (engines/openvino.py).
        cfg.backend = "openvino"
        precision = options.precision or str(manifest["precision"])
        cfg.default_model_filename = openvino_model_file(graph_precision(precision))
        group = pb2.ModelInstanceGroup.Kind.Value("KIND_CPU")
        cfg.parameters["PERFORMANCE_HINT"].string_value = "LATENCY"
        cfg.parameters["INFERENCE_PRECISION_HINT"].string_value = "bf16" if precision.endswith("bf16") else "f32"
    else:
        cfg.backend = "python"
        group = pb2.ModelInstanceGroup.Kind.Value("KIND_CPU")
        cfg.parameters["precision"].string_value = graph_precision(options.precision or str(manifest["precision"]))
    cfg.input.extend(_io_entries(pb2, _client_inputs(manifest, kind, options), pb2.ModelInput))
    cfg.output.extend(_io_entries(pb2, manifest["outputs"], pb2.ModelOutput))
    # What the mask's values mean travels with the model, for every backend.
    cfg.parameters["mask_kind"].string_value = mask_kind(manifest)
    cfg.parameters["class_names"].string_value = CLASS_NAME_SEPARATOR.join(class_names(manifest) or [])
    preferred = sorted({b for b in (bopt, bmax) if 1 < b <= bmax})
    cfg.dynamic_batching.preferred_batch_size.extend(preferred)
    cfg.dynamic_batching.max_queue_delay_microseconds = int(options.max_queue_delay_us)
    cfg.instance_group.add(kind=group, count=int(options.instances))
    return cfg


# Engine backends Triton serves, by the kind of repository model that serves them.
SERVED = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}


def pick_engine(manifest: Dict[str, Any]) -> Optional[Tuple[str, str, str, float]]:
    """(kind, precision, label, batch-1 ms) of the fastest engine whose parity gates passed when the build was
    verified (`engines.select.passed_engines`) that a repository model serves; None without one."""
    from engines.select import passed_engines, split_label

    for label, ms in passed_engines(manifest):
        backend, precision = split_label(label)
        if backend in SERVED:
            return SERVED[backend], precision, label, ms
    return None


def openvino_model_file(precision: str) -> str:
    """The file Triton's OpenVINO backend loads for a precision: the INT8 IR, or the FP32 ONNX graph
    (OpenVINO runs an FP16 build's FP32 graph: its FP16 graph is for TensorRT)."""
    return "model.xml" if precision == "int8" else "model.onnx"


def _client_inputs(manifest: Dict[str, Any], kind: str, options: RepositoryOptions) -> List[Dict[str, Any]]:
    """The input specs clients see: the manifest's, with the image input (the first) as `options.input_dtype`."""
    specs = [dict(spec) for spec in manifest["inputs"]]
    if options.input_dtype in (None, specs[0]["dtype"]):
        return specs
    if options.input_dtype not in INPUT_DTYPES:
        raise RepositoryError(f"unknown input dtype {options.input_dtype!r} (choose {', '.join(INPUT_DTYPES)} "
                              f"or the build's {specs[0]['dtype']})")
    if kind == "tensorrt":
        raise RepositoryError(f"a TensorRT plan's input type is fixed when it is built: --input-dtype "
                              f"{options.input_dtype} is for the onnxruntime and python models")
    if specs[0]["dtype"] not in ("float32", "float16"):
        raise RepositoryError(f"input {specs[0]['name']!r} is {specs[0]['dtype']}, not a float image: "
                              f"it cannot be sent as {options.input_dtype}")
    specs[0]["dtype"] = options.input_dtype
    return specs


def _rename_input(graph, old: str, new: str) -> None:
    """Make every node that reads `old` read `new`, in subgraphs (If/Loop bodies) too."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _rename_input(sub, old, new)
    for out in graph.output:
        if out.name == old:
            raise RepositoryError(f"graph output {old!r} is the input itself: cannot cast it")


def write_uint8_input_graph(src: PathLike, dst: PathLike, input_name: str) -> Path:
    """Write a copy of ONNX graph `src` whose input `input_name` is UINT8, cast inside the graph to its own type.

    The first node becomes `Cast(to=<the input's old type>)`, so the rest of the graph is unchanged and
    integer-valued images give exactly the answers of the float graph. Checked with `onnx.checker`.

    Returns:
      Path of the graph written (atomically).
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    graph = model.graph
    inp = next((i for i in graph.input if i.name == input_name), None)
    if inp is None:
        raise RepositoryError(f"{Path(src).name}: no graph input {input_name!r}")
    float_type = inp.type.tensor_type.elem_type
    inner = f"{input_name}_as_{TensorProto.DataType.Name(float_type).lower()}"
    _rename_input(graph, input_name, inner)
    inp.type.tensor_type.elem_type = TensorProto.UINT8
    graph.node.insert(0, helper.make_node("Cast", [input_name], [inner], to=float_type, name=f"{input_name}_cast"))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise RepositoryError(f"{Path(src).name} with a uint8 input: {str(e).splitlines()[0]}") from None
    dst = Path(dst)
    atomic_write_bytes(dst, model.SerializeToString())
    return dst


def _place(src: Path, dst: Path) -> None:
    """Hard-link (no copy of big graphs) or copy `src` to `dst`, atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _write_model(out_dir: Path, cfg, files: Dict[str, Path], template: Optional[Path] = None) -> Path:
    from google.protobuf import text_format

    model_dir = out_dir / cfg.name
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True, exist_ok=True)
    for rel, src in files.items():
        dst = version_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        _place(src, dst)
    if template is not None:
        atomic_write_bytes(version_dir / "model.py", template.read_bytes())
    text = text_format.MessageToString(cfg)
    parse_config(text)  # what is written must read back
    atomic_write_bytes(model_dir / CONFIG_NAME, text.encode())
    return model_dir


def _openvino_files(build_dir: Path, manifest: Dict[str, Any], model_file: str) -> Dict[str, Path]:
    """The OpenVINO model's files: the INT8 IR as model.xml + model.bin (the .xml names its weights by its
    own stem), or the FP32 ONNX graph as model.onnx."""
    if model_file == "model.onnx":
        return {"model.onnx": artifact_path(build_dir, ONNX_GRAPHS["fp32"])}
    xml = OPENVINO_GRAPHS["int8"]
    if xml not in manifest.get("artifacts", {}):
        raise RepositoryError(f"{build_dir}: no {xml} in this build (build it with --precision int8)")
    return {"model.xml": artifact_path(build_dir, xml),
            "model.bin": artifact_path(build_dir, str(Path(xml).with_suffix(".bin")))}


def _default_kinds(manifest: Dict[str, Any], options: RepositoryOptions) -> Tuple[List[str], RepositoryOptions]:
    """The models written when none are named: the fastest engine that passed its gates (`pick_engine`) and,
    beside a CPU one, the python model; without verify results, the TensorRT plan, else onnxruntime + python."""
    picked = pick_engine(manifest) if options.precision is None else None
    if picked is None:
        kinds = ["tensorrt"] if PLAN_NAME in manifest.get("artifacts", {}) else ["onnxruntime", "python"]
        log.info(f"triton: writing {', '.join(kinds)} (no engine that passed its parity gates is recorded "
                 f"in the manifest)" if options.precision is None else f"triton: writing {', '.join(kinds)}")
        return kinds, options
    kind, precision, label, ms = picked
    log.info(f"triton: serving {label} ({ms:.1f} ms at batch 1 when verified): the fastest engine whose parity "
             f"gates passed that Triton serves")
    return [kind] + (["python"] if kind != "tensorrt" else []), dataclasses.replace(options, precision=precision)


def make_repository(
    build_dir: PathLike,
    out_dir: PathLike,
    *,
    kinds: Optional[Sequence[str]] = None,
    options: Optional[RepositoryOptions] = None,
) -> List[Path]:
    """Write a Triton model repository for a build directory.

    Arguments:
      build_dir: a build directory with manifest.json (`python -m export.build`).
      out_dir: the model repository (created; existing models of the same names are updated).
      kinds: which models to write; default: the model of the fastest engine whose parity gates passed
        when the build was verified (`pick_engine`) and the python model beside a CPU one; without
        verify results `tensorrt` if the build has model.plan, else `onnxruntime` and `python`.
      options: model names, instance count, batching delay, precision, image input type.

    Returns:
      The model directories written.

    The onnxruntime and python models serve the graph of `options.precision` (default: the build's, or the
    chosen engine's).

    Raises:
      RepositoryError / ManifestError: one line naming the problem (missing or damaged artifact, ...).
    """
    build_dir, out_dir = Path(build_dir), Path(out_dir)
    options = options or RepositoryOptions()
    manifest = read_manifest(build_dir)
    artifacts = manifest.get("artifacts", {})
    if kinds is None:
        kinds, options = _default_kinds(manifest, options)
    precision = graph_precision(options.precision or manifest["precision"])
    graph = ONNX_GRAPHS.get(precision)
    if graph is None:
        raise RepositoryError(f"unknown precision {precision!r} (choose {', '.join(ONNX_GRAPHS)})")
    written = []
    for kind in kinds:
        cfg = model_config(manifest, kind, options)
        if kind == "tensorrt":
            if PLAN_NAME not in artifacts:
                raise RepositoryError(f"{build_dir}: no {PLAN_NAME} in this build "
                                      f"(build it on a GPU host with TensorRT)")
            files = {PLAN_NAME: artifact_path(build_dir, PLAN_NAME)}
            written.append(_write_model(out_dir, cfg, files))
        elif kind == "onnxruntime":
            src = artifact_path(build_dir, graph)
            if options.input_dtype not in (None, manifest["inputs"][0]["dtype"]):  # the graph casts: written, not linked
                src = write_uint8_input_graph(src, out_dir / f".{cfg.name}.model.onnx.tmp", cfg.input[0].name)
            try:
                written.append(_write_model(out_dir, cfg, {"model.onnx": src}))
            finally:
                if src.parent == out_dir:
                    src.unlink(missing_ok=True)
        elif kind == "openvino":
            written.append(_write_model(out_dir, cfg, _openvino_files(build_dir, manifest, cfg.default_model_filename)))
        else:
            files = {f"build/{graph}": artifact_path(build_dir, graph)}
            files["build/manifest.json"] = build_dir / "manifest.json"
            written.append(_write_model(out_dir, cfg, files, template=PYTHON_MODEL_TEMPLATE))
        log.info(f"wrote {written[-1]} ({cfg.backend}, max_batch_size {cfg.max_batch_size})")
    return written
