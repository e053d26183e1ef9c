"""A real Triton server (the tritonserver binary of the nvidia-pytriton wheel) on 127.0.0.1.

The repository is generated from the shared tiny build (FP32 graph), the server loads its python-backend
model (the project's ONNX Runtime engine), and tritonclient talks to it over HTTP and gRPC. Outputs are
compared with eager PyTorch on the same checkpoint. The server binary comes from the pinned nvidia-pytriton
wheel (`icmoe.core.fetch`, sha256-checked, cached); where it is neither cached nor downloadable the tests
skip with the reason. The repository is written in one folder and served from a copy in another (its
configs name no path), and it also holds a model that takes UINT8 images (`--input-dtype uint8`).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

tritonclient_http = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (the test extra)")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (the test extra)")
from tritonclient.utils import InferenceServerException, np_to_triton_dtype  # noqa: E402

from engines.triton import RepositoryOptions, make_repository  # noqa: E402
from engines.triton.server import PYTHONPATH_ENV, ServerError, TritonServer, fetch_server  # noqa: E402

MODEL = "icmoe_python"
UINT8_MODEL = "icmoe_uint8_python"  # the same build, image input UINT8
N_IMAGES = 8
LOAD_REQUESTS = 504  # >= 500, a multiple of the concurrency
CONCURRENCY = 8
LOGIT_ATOL = 1e-3


@pytest.fixture(scope="module")
def images():
    from icmoe.data.synthetic import synthetic_images

    x, _ = synthetic_images(N_IMAGES, 128, 7)
    return np.ascontiguousarray(x, dtype=np.float32)


@pytest.fixture(scope="module")
def eager(tiny_checkpoint, images):
    import icmoe

    model = icmoe.load(tiny_checkpoint)
    with torch.no_grad():
        vote = model(torch.from_numpy(images))
    return {"logits": vote.logits.numpy(), "mask": vote.mask.numpy(), "expert": vote.expert.numpy()}


def server_root():
    """The Triton server of the pinned nvidia-pytriton wheel, or a skip saying why there is none."""
    try:
        return fetch_server()
    except ServerError as e:
        pytest.skip(f"needs the Triton server of the nvidia-pytriton wheel: {e}")


@contextlib.contextmanager
def serving(build, repo, model, *, extra=()):
    """A started server on the python model `model` of a repository written for `build` (FP32 graph), and on
    the python models of `extra` (RepositoryOptions with their own names). The repository is written in a
    sibling folder and served from a copy at `repo`: its configs name no path of the writer, so it moves."""
    root = server_root()
    written = repo.with_name(repo.name + ".written")
    make_repository(build, written, kinds=["python"], options=RepositoryOptions(precision="fp32"))
    for options in extra:
        make_repository(build, written, kinds=["python"], options=options)
    shutil.copytree(written, repo)
    shutil.rmtree(written)
    models = [model] + [f"{options.name}_python" for options in extra]
    srv = TritonServer(repo, models=models, root=root, startup_timeout=180)
    t0 = time.monotonic()
    srv.start()
    print(f"\ntritonserver ready in {time.monotonic() - t0:.1f} s (HTTP {srv.http_url}, gRPC {srv.grpc_url})")
    try:
        yield srv
    finally:  # always stop it, whatever happened in the tests
        srv.stop()
        srv.cleanup()


@pytest.fixture(scope="module")
def server(tiny_build, tmp_path_factory):
    uint8 = RepositoryOptions(name=UINT8_MODEL[: -len("_python")], precision="fp32", input_dtype="uint8")
    with serving(tiny_build, tmp_path_factory.mktemp("triton") / "model_repository", MODEL, extra=[uint8]) as srv:
        yield srv


def _inputs(module, x):
    inp = module.InferInput("image", list(x.shape), np_to_triton_dtype(x.dtype))
    inp.set_data_from_numpy(x)
    return [inp]


def _check(out, ref, idx):
    """Server outputs for images `idx` against eager: logits within LOGIT_ATOL, same expert, same mask."""
    logits, mask, expert = out
    assert logits.dtype == np.float32 and mask.dtype == np.uint8 and expert.dtype == np.int32
    assert logits.shape == (len(idx), 1, 128, 128) and mask.shape == (len(idx), 1, 128, 128)
    assert expert.shape == (len(idx), 1)  # (B,) exposed as (B, 1) by the config's reshape
    diff = float(np.abs(logits - ref["logits"][idx]).max())
    assert diff <= LOGIT_ATOL, f"max |logit diff| {diff:.3g} > {LOGIT_ATOL}"
    np.testing.assert_array_equal(expert[:, 0], ref["expert"][idx])
    # Same mask, except (never seen in practice) pixels whose eager logit is within the tolerance of 0.
    differ = mask != ref["mask"][idx]
    assert not (differ & (np.abs(ref["logits"][idx]) > LOGIT_ATOL)).any()
    return diff


def _result(res):
    return res.as_numpy("logits"), res.as_numpy("mask"), res.as_numpy("expert")


def test_metadata(server):
    client = tritonclient_http.InferenceServerClient(server.http_url)
    meta = client.get_model_metadata(MODEL)
    assert [i["name"] for i in meta["inputs"]] == ["image"]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {"logits": "FP32", "mask": "UINT8", "expert": "INT32"}
    config = client.get_model_config(MODEL)
    assert config["max_batch_size"] == 4 and "dynamic_batching" in config
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert (params["mask_kind"], params["class_names"]) == ("binary", "")  # the server keeps what it ignores
    client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_parity_with_eager(server, images, eager, protocol):
    module = tritonclient_http if protocol == "http" else tritonclient_grpc
    client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    worst = 0.0
    for idx in ([0], [1, 2], [3, 4, 5, 6], [7]):  # batch 1, 2 and the build's largest (4)
        worst = max(worst, _check(_result(client.infer(MODEL, _inputs(module, images[idx]))), eager, idx))
    print(f"\n{protocol}: max |logit diff| vs eager {worst:.3g} over {N_IMAGES} images; experts "
          f"{eager['expert'].tolist()}; masks equal")
    client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_uint8_input_answers_equal_fp32(server, images, protocol):
    """The UINT8-input model answers integer-valued images exactly as the FP32 model does, from 1/4 of the bytes."""
    module = tritonclient_http if protocol == "http" else tritonclient_grpc
    client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    as_uint8 = np.rint(images).clip(0, 255).astype(np.uint8)
    as_float = as_uint8.astype(np.float32)
    for idx in ([0], [1, 2, 3, 4]):
        want = _result(client.infer(MODEL, _inputs(module, as_float[idx])))
        got = _result(client.infer(UINT8_MODEL, _inputs(module, as_uint8[idx])))
        for name, a, b in zip(("logits", "mask", "expert"), got, want):
            np.testing.assert_array_equal(a, b, err_msg=name)
    meta = client.get_model_metadata(UINT8_MODEL)
    datatype = meta["inputs"][0]["datatype"] if protocol == "http" else meta.inputs[0].datatype
    assert datatype == "UINT8"
    client.close()


def test_stub_took_the_packages_from_the_environment(server):
    """The python model's stub added the folders the launcher passed in ICMOE_TRITON_PYTHONPATH (its log says so)."""
    import engines

    lines = [ln for ln in server.log_path.read_text(errors="replace").splitlines() if PYTHONPATH_ENV in ln]
    assert lines, server.log_tail(5)
    assert str(Path(engines.__file__).resolve().parents[1]) in lines[0]


def test_server_passes_the_environment_not_the_config(tmp_path, monkeypatch):
    """The stubs learn where the packages are from the server's environment (a caller's value wins)."""
    import engines

    monkeypatch.delenv(PYTHONPATH_ENV, raising=False)
    env = TritonServer(tmp_path, root=tmp_path).environment()
    assert str(Path(engines.__file__).resolve().parents[1]) in env[PYTHONPATH_ENV].split(os.pathsep)
    monkeypatch.setenv(PYTHONPATH_ENV, "/opt/elsewhere")
    assert TritonServer(tmp_path, root=tmp_path).environment()[PYTHONPATH_ENV] == "/opt/elsewhere"


def run_load(server, model, images, check, *, requests, concurrency):
    """`requests` single-image gRPC requests from `concurrency` threads; `check(outputs, [i])` checks each answer.

    Returns:
      dict: requests, wall_s, req_per_s, p50_ms, p99_ms, errors (messages), inferences and executions
      (the server's statistics over the run: dynamic batching makes executions < inferences).
    """
    rng = np.random.default_rng(0)
    per_worker = np.array_split(rng.integers(0, len(images), requests), concurrency)

    def worker(indices):
        client = tritonclient_grpc.InferenceServerClient(server.grpc_url)
        latencies, errors = [], []
        try:
            for i in indices:
                t0 = time.perf_counter()
                try:
                    res = client.infer(model, _inputs(tritonclient_grpc, images[i:i + 1]), client_timeout=60)
                    latencies.append(time.perf_counter() - t0)
                    check(res, [int(i)])
                except Exception as e:  # counted, reported by the caller
                    errors.append(f"image {i}: {e}")
        finally:
            client.close()
        return latencies, errors

    # Earlier tests' last requests may not be counted yet: start from settled statistics.
    before = _settled_stats(server, model)
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(worker, per_worker))
    wall = time.perf_counter() - t0
    latencies = np.array([lat for r in results for lat in r[0]]) * 1e3
    # The server updates its statistics just after answering: wait (bounded) for the last ones.
    deadline = time.monotonic() + 10
    after = _batch_stats(server, model)
    while after[0] - before[0] < requests and time.monotonic() < deadline:
        time.sleep(0.1)
        after = _batch_stats(server, model)
    return {"requests": requests, "answered": len(latencies), "wall_s": wall, "req_per_s": requests / wall,
            "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else None,
            "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else None,
            "errors": [e for r in results for e in r[1]],
            "inferences": after[0] - before[0], "executions": after[1] - before[1]}


def report_load(load, concurrency) -> str:
    return (f"{load['requests']} requests, concurrency {concurrency}: {load['req_per_s']:.1f} req/s, "
            f"p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms, {load['inferences']} inferences in "
            f"{load['executions']} executions (mean batch {load['inferences'] / max(load['executions'], 1):.2f}), "
            f"{len(load['errors'])} errors (2 shared CPU cores: noisy)")


def test_load_dynamic_batching(server, images, eager):
    """LOAD_REQUESTS single-image requests from CONCURRENCY threads (gRPC); every answer checked."""
    load = run_load(server, MODEL, images, lambda res, idx: _check(_result(res), eager, idx),
                    requests=LOAD_REQUESTS, concurrency=CONCURRENCY)
    print(f"\nload: {report_load(load, CONCURRENCY)}")
    assert not load["errors"], load["errors"][:3]
    assert load["answered"] == LOAD_REQUESTS
    assert load["inferences"] == LOAD_REQUESTS
    assert load["executions"] < load["inferences"], "dynamic batching never combined requests"


def _settled_stats(server, model=MODEL, quiet_s=0.5, timeout_s=10.0):
    """Statistics once they stop changing (bounded wait)."""
    deadline = time.monotonic() + timeout_s
    last = _batch_stats(server, model)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = _batch_stats(server, model)
        if now == last:
            break
        last = now
    return last


def _batch_stats(server, model=MODEL):
    client = tritonclient_http.InferenceServerClient(server.http_url)
    stats = client.get_inference_statistics(model)["model_stats"][0]
    client.close()
    return int(stats["inference_count"]), int(stats["execution_count"])


@pytest.mark.parametrize("case", ["wrong_shape", "wrong_dtype", "missing_input", "batch_too_large", "unknown_model"])
def test_malformed_requests_refused(server, images, eager, case):
    client = tritonclient_http.InferenceServerClient(server.http_url)
    model = MODEL
    if case == "wrong_shape":
        inp = tritonclient_http.InferInput("image", [1, 3, 64, 64], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 3, 64, 64), np.float32))
        inputs = [inp]
    elif case == "wrong_dtype":
        inp = tritonclient_http.InferInput("image", [1, 3, 128, 128], "UINT8")
        inp.set_data_from_numpy(np.zeros((1, 3, 128, 128), np.uint8))
        inputs = [inp]
    elif case == "missing_input":
        inp = tritonclient_http.InferInput("pixels", [1, 3, 128, 128], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 3, 128, 128), np.float32))
        inputs = [inp]
    elif case == "batch_too_large":
        inputs = _inputs(tritonclient_http, np.concatenate([images[:4], images[:1]]))  # 5 > max_batch_size 4
    else:
        model, inputs = "no_such_model", _inputs(tritonclient_http, images[:1])
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, inputs)
    assert str(err.value).strip(), "error without a message"
    # The server keeps serving correct answers.
    assert client.is_server_live() and client.is_model_ready(MODEL)
    _check(_result(client.infer(MODEL, _inputs(tritonclient_http, images[:1]))), eager, [0])
    client.close()


def test_nan_image_refused_by_engine(server, images):
    """An input Triton accepts but the engine refuses (NaN) comes back as an error naming the problem."""
    client = tritonclient_grpc.InferenceServerClient(server.grpc_url)
    x = images[:1].copy()
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(InferenceServerException, match="NaN"):
        client.infer(MODEL, _inputs(tritonclient_grpc, x))
    assert client.is_model_ready(MODEL)
    client.close()


def test_clean_shutdown(server):
    """Runs last in this module: SIGTERM, the server drains and exits 0, the ports close."""
    import socket

    process = server.process
    code = server.stop()
    assert code == 0, f"tritonserver exited with {code}: {server.log_tail(5)}"
    assert process.poll() == 0
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", server.http_port)) != 0, "HTTP port still open after shutdown"
    log = server.log_path.read_text(errors="replace")
    assert "successfully unloaded" in log
