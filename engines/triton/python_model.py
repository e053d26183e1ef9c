"""Triton python-backend model: a build's ONNX graph through the project's ONNX Runtime engine.

Details: docs/triton.md.
"""

import json
import os
import site
import sys

import triton_python_backend_utils as pb_utils

PYTHONPATH_ENV = "ICMOE_TRITON_PYTHONPATH"  # folders the stub adds as site dirs (set by engines.triton.server)


def _quiet_capsule_destructor(unraisable, _previous=sys.unraisablehook):
    # The stub renames the DLPack capsules it consumes with a name NumPy's capsule destructor does
    # not know, which then reports a harmless "PyCapsule_GetPointer called with incorrect name"
    # for every output. Ownership is the stub's, so nothing leaks; only that message is dropped.
    if isinstance(unraisable.exc_value, ValueError) and "PyCapsule_GetPointer" in str(unraisable.exc_value):
        return
    _previous(unraisable)


def _add_site_dirs():
    """Put the folders of ICMOE_TRITON_PYTHONPATH first on sys.path, as site dirs (.pth files processed)."""
    folders = [p for p in os.environ.get(PYTHONPATH_ENV, "").split(os.pathsep) if p]
    for path in reversed(folders):
        site.addsitedir(path)
        if path in sys.path:  # addsitedir appends: put the environment first
            sys.path.remove(path)
        sys.path.insert(0, path)
    if folders:  # in the server's log: where this model's packages came from
        print(f"icmoe python model: site dirs from {PYTHONPATH_ENV}: {os.pathsep.join(folders)}", flush=True)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        _add_site_dirs()
        sys.unraisablehook = _quiet_capsule_destructor

        import numpy as np

        from engines.onnxruntime import OnnxRuntimeEngine

        self.np = np
        self.max_batch = max(1, int(config.get("max_batch_size", 1)))
        build_dir = os.path.join(args["model_repository"], args["model_version"], "build")
        precision = params.get("precision") or None
        self.engine = OnnxRuntimeEngine.from_build(build_dir, precision=precision)
        self.engine.activate()
        self.output_names = [o["name"] for o in config["output"]]
        self.input_name = config["input"][0]["name"]
        # The engine takes the build's input type; a UINT8 input (0..255) is cast to it exactly.
        self.input_dtype = np.dtype(self.engine.inputs[0].np_dtype)

    def execute(self, requests):
        np = self.np
        images, errors = [], {}
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
            if tensor is None:  # Triton checks inputs first; this is a second line of defence
                errors[i] = f"missing input {self.input_name!r}"
                continue
            image = np.from_dlpack(tensor)
            images.append((i, image if image.dtype == self.input_dtype else image.astype(self.input_dtype)))
        responses = [None] * len(requests)
        for i, message in errors.items():
            responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
        # Stack requests in chunks of at most max_batch images (dynamic batching never sends more
        # in total, but a chunked loop keeps that an assumption we do not rely on).
        chunks, current, count = [], [], 0
        for item in images:
            n = item[1].shape[0]
            if current and count + n > self.max_batch:
                chunks.append(current)
                current, count = [], 0
            current.append(item)
            count += n
        if current:
            chunks.append(current)
        for chunk in chunks:
            self._run(chunk, responses)
        return responses

    def _run(self, chunk, responses):
        np = self.np
        try:
            batch = np.concatenate([x for _, x in chunk], axis=0) if len(chunk) > 1 else chunk[0][1]
            out = self.engine.infer(batch)  # {output name: (B, ...) array}, names from the build's manifest
        except Exception as e:  # one line per failed request; the model keeps serving
            message = f"{type(e).__name__}: {e}".splitlines()[0]
            for i, _ in chunk:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
            return
        start = 0
        for i, x in chunk:
            stop = start + x.shape[0]
            tensors = []
            for name in self.output_names:
                value = out[name][start:stop]
                if value.ndim == 1:  # (b,) -> (b, 1): the config exposes batch-only tensors with dims [1]
                    value = value.reshape(-1, 1)
                tensors.append(pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(value)))
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            start = stop

    def finalize(self):
        self.engine.deactivate()
