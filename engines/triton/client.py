"""A client that sends image batches to a Triton Inference Server, several requests in flight.

`TritonRunner` is what `python -m engines.predict --server URL` runs batches on instead of a local
engine: the same `submit(images, whole) -> Future` interface, answered by the repository model
`python -m engines.triton` wrote for the build (any of its kinds). tritonclient (the [triton]
extra) is imported when a runner is made, never before.

Only the outputs prediction needs are requested: the logits where the build has a mask rule (the
masks at the pictures' sizes are made from them, resized bilinearly, as for a local engine), else the
mask, and the per-image outputs. A repository written with a uint8 image input gets uint8 requests (4x smaller): pictures
from 8-bit files are whole numbers after resizing, so the answer is the same; DICOM/NIfTI
pictures are rounded (a warning says so).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from engines.base import BuildInfo, EngineError
from icmoe.core import cli
from icmoe.core.errors import first_line
from icmoe.core.extras import require

log = logging.getLogger("engines.triton.client")

MASK_OUTPUT = "mask"
# preferred repository model of the build's family (the writer writes openvino only where it was the fastest)
SERVER_KINDS = ("tensorrt", "openvino", "onnxruntime", "python")


def parse_server(url: str, protocol: Optional[str] = None) -> Tuple[str, str, bool]:
    """(protocol, "host:port", ssl) of a server URL: `--protocol`, else the scheme (http, https, grpc,
    grpcs), else port 8001 means gRPC and anything else HTTP."""
    scheme, sep, rest = url.partition("://")
    address = rest if sep else url
    address = address.rstrip("/")
    if sep and scheme not in ("http", "https", "grpc", "grpcs"):
        raise cli.UsageError(f"--server {url}: unknown scheme {scheme!r} (http, https, grpc, grpcs)")
    ssl = scheme in ("https", "grpcs")
    if protocol is None:
        protocol = ("grpc" if scheme.startswith("grpc") else "http") if sep else \
            ("grpc" if address.rsplit(":", 1)[-1] == "8001" else "http")
    return protocol, address, ssl


class TritonRunner:
    """Sends batches to a Triton Inference Server, `concurrency` requests in flight (one client per thread).

    Arguments:
      url: the server ("host:port", or with a scheme); see `parse_server`.
      info: the build's manifest (`BuildInfo`): output names and dtypes, family for the model's name.
      protocol: "http" or "grpc" (default: from the URL).
      model_name: the repository model (default: the server's ready model `<family>_<kind>`, kinds in
        SERVER_KINDS order, or its only ready model).
      concurrency: requests in flight.
      outputs: the output names to request (the logits or the mask, and the per-image outputs).
    """

    def __init__(self, url: str, info: BuildInfo, *, protocol: Optional[str] = None, model_name: Optional[str] = None,
                 concurrency: int = 1, outputs: Sequence[str] = (MASK_OUTPUT,)) -> None:
        self.protocol, self.address, self.ssl = parse_server(url, protocol)
        self.url = url
        self.module = self._client_module(self.protocol)
        self.concurrency = max(1, int(concurrency))
        self.specs = {o.name: o for o in info.outputs if o.name in outputs}
        self._clients: List[Any] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._warned = False
        try:
            self._connect(info, model_name)
        except BaseException:
            self._close_clients()
            raise
        self.pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="triton")

    def _connect(self, info: BuildInfo, model_name: Optional[str]) -> None:
        """Check the server, pick the model and read its batch limit and image input."""
        client = self._client()
        self._call(client.is_server_ready, "is not ready")
        self.model = model_name or self._pick_model(client, info.manifest["model"]["family"])
        self.label = f"triton:{self.model}"
        meta = self._json(self._call(lambda: client.get_model_metadata(self.model, **self._as_json), "has no model"))
        config = self._json(self._call(lambda: client.get_model_config(self.model, **self._as_json), "has no model"))
        config = config.get("config", config)  # gRPC's JSON wraps it
        self.max_batch = int(config.get("max_batch_size", 0) or 0) or None
        self.input_name, self.input_type = self._pick_inputs(meta.get("inputs", []), info.inputs[0].name)

    @staticmethod
    def _client_module(protocol: str) -> Any:
        if protocol not in ("http", "grpc"):
            raise cli.UsageError(f"--protocol must be http or grpc, got {protocol!r}")
        return require(f"tritonclient.{protocol}", "triton", "--server")  # optional: only --server needs it

    @property
    def _as_json(self) -> Dict[str, Any]:
        return {"as_json": True} if self.protocol == "grpc" else {}

    @staticmethod
    def _json(doc: Any) -> Dict[str, Any]:
        return doc if isinstance(doc, dict) else {}

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self.module.InferenceServerClient(self.address, ssl=self.ssl)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _call(self, fn: Any, what: str) -> Any:
        try:
            return fn()
        except Exception as e:  # tritonclient raises its own exception, gevent/grpc ones and OSError
            raise EngineError(f"Triton server {self.url} ({self.protocol}): {what}: {first_line(e)}") from None

    def _pick_model(self, client: Any, family: str) -> str:
        index = self._call(lambda: client.get_model_repository_index(**self._as_json), "no repository index")
        models = index.get("models", []) if isinstance(index, dict) else index
        ready = [m["name"] for m in models if m.get("state", "READY") == "READY"]
        for kind in SERVER_KINDS:
            if f"{family}_{kind}" in ready:
                return f"{family}_{kind}"
        if len(ready) == 1:
            return ready[0]
        raise EngineError(f"Triton server {self.url}: no ready model {family}_<kind> "
                          f"(ready: {', '.join(ready) or 'none'}); name one with --model-name")

    def _pick_inputs(self, inputs: List[Dict[str, Any]], name: str) -> Tuple[str, str]:
        """(name, Triton datatype) of the server model's image input: the build's input, or its only one."""
        types = {i["name"]: i.get("datatype", "FP32") for i in inputs}
        if name not in types and len(types) != 1:
            raise EngineError(f"Triton model {self.model}: no input {name!r} (has: {', '.join(types)})")
        chosen = name if name in types else next(iter(types))
        if types[chosen] not in ("FP32", "UINT8"):
            raise EngineError(f"Triton model {self.model}: input {chosen!r} is {types[chosen]}, not FP32 or UINT8")
        return chosen, types[chosen]

    def check_batch(self, batch_size: int) -> None:
        if self.max_batch is not None and batch_size > self.max_batch:
            raise cli.UsageError(f"--batch-size {batch_size} exceeds the server model's max_batch_size {self.max_batch}")

    def submit(self, images: "np.ndarray | Future[np.ndarray]",
               whole: bool) -> "Future[Tuple[Dict[str, np.ndarray], float]]":
        return self.pool.submit(self._infer, images, whole)

    def _infer(self, images: "np.ndarray | Future[np.ndarray]", whole: bool) -> Tuple[Dict[str, np.ndarray], float]:
        images = images.result() if isinstance(images, Future) else images  # prepared in the pipeline's pool
        m = self.module
        if self.input_type == "UINT8":  # a repository written with a uint8 image input (4x smaller requests)
            if not whole and not self._warned:
                self._warned = True
                log.warning(f"{self.model} takes uint8 images: DICOM/NIfTI pictures are rounded to whole numbers "
                            "(the local engine takes them unrounded)")
            data = np.rint(images).astype(np.uint8)
        else:
            data = np.ascontiguousarray(images, dtype=np.float32)
        inp = m.InferInput(self.input_name, list(data.shape), self.input_type)
        inp.set_data_from_numpy(data)
        wanted = [m.InferRequestedOutput(n) for n in self.specs]
        t0 = time.perf_counter()
        res = self._call(lambda: self._client().infer(self.model, [inp], outputs=wanted), "inference failed")
        seconds = time.perf_counter() - t0
        b = images.shape[0]
        return {n: res.as_numpy(n).reshape(s.concrete(b)).astype(s.np_dtype, copy=False)  # (B,) came as (B, 1)
                for n, s in self.specs.items()}, seconds

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self._close_clients()

    def _close_clients(self) -> None:
        for client in self._clients:
            try:
                client.close()
            except Exception:  # closing is best effort
                pass
