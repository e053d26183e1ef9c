"""Soak test of the Triton server: a real `tritonserver` (engines/triton/server.py) on a build's python model,
driven for a set time by concurrent clients that mix malformed requests in with good ones.

Every good request (HTTP or gRPC, 1 to max_batch images from a fixed pool) is checked against the local
ONNX Runtime engine on the same graph; every malformed one (wrong dtype, wrong shape, a batch above the
limit, a truncated HTTP body) must be refused. The resident memory of the server and its python-backend
stubs (the server's process group) is sampled throughout; its growth after the warm-up must stay under
`--max-growth`. Exit 1 when any check fails. Details: docs/reliability.md.

    python benchmarks/soak.py build/icmoe-tiny-fp16                      # 10 minutes, concurrency 16, 5% bad
    python benchmarks/soak.py build/icmoe-tiny-fp16 --duration 60 --json soak.json
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from engines.base import BuildInfo
from engines.onnxruntime import OnnxRuntimeEngine
from engines.triton import RepositoryOptions, make_repository
from engines.triton.server import TritonServer
from icmoe.core import cli
from icmoe.core.extras import require
from icmoe.data.synthetic import synthetic_images

BAD_KINDS = ("wrong_dtype", "wrong_shape", "batch_above_limit", "truncated_body")
POOL = 16  # distinct images the good requests draw from
LOGIT_ATOL = 1e-3  # float outputs (same graph, same runtime: only the batch composition differs)


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown CPU")


def group_rss_mib(pgid: int) -> Dict[int, float]:
    """Resident memory (MiB) of each process of a process group: the server and the stubs it started."""
    rss = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:  # field 5: the process group
                continue
            status = (entry / "status").read_text()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        kib = next((int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS:")), 0)
        rss[int(entry.name)] = kib / 1024
    return rss


@dataclass
class Model:
    """What the clients need to know of the served model, and the local engine's answers for the pool."""

    name: str
    input_name: str
    size: int
    max_batch: int
    outputs: List[str]
    pool: np.ndarray  # (POOL, 3, S, S) float32
    expected: List[Dict[str, np.ndarray]]  # per image: output name -> (1, ...) array


def reference(build: Path, pool: np.ndarray) -> List[Dict[str, np.ndarray]]:
    """The local ONNX Runtime engine's outputs for each pool image alone (FP32 graph)."""
    with OnnxRuntimeEngine.from_build(build, precision="fp32", threads=1) as engine:
        return [engine.infer(pool[i:i + 1]) for i in range(len(pool))]


def check_answer(model: Model, idx: List[int], got: Dict[str, np.ndarray]) -> Optional[str]:
    """None when a good request's outputs match the local engine's, else what differs (one line)."""
    for name in model.outputs:
        want = np.concatenate([model.expected[i][name] for i in idx])
        have = np.asarray(got[name]).reshape(want.shape)
        if want.dtype.kind == "f":
            diff = float(np.abs(have - want).max())
            if diff > LOGIT_ATOL:
                return f"{name}: max |diff| {diff:.3g} > {LOGIT_ATOL}"
        elif not np.array_equal(have, want):
            if name == "mask" and "logits" in model.outputs and _only_at_ties(have, want, idx, model):
                continue
            return f"{name}: {int((have != want).sum())} values differ"
    return None


def _only_at_ties(have: np.ndarray, want: np.ndarray, idx: List[int], model: Model) -> bool:
    """Mask pixels that differ only where the reference logits are a tie within LOGIT_ATOL."""
    logits = np.concatenate([model.expected[i]["logits"] for i in idx]).astype(np.float64)
    if logits.shape[1] == 1:
        tie = np.abs(logits[:, 0]) <= LOGIT_ATOL
    else:
        top = np.sort(logits, axis=1)
        tie = top[:, -1] - top[:, -2] <= 2 * LOGIT_ATOL
    return not ((have != want).reshape(tie.shape) & ~tie).any()


@dataclass
class Tally:
    """Counts shared by the worker threads (under `lock`)."""

    good: int = 0
    correct: int = 0
    bad: Dict[str, int] = field(default_factory=lambda: {k: 0 for k in BAD_KINDS})
    refused: Dict[str, int] = field(default_factory=lambda: {k: 0 for k in BAD_KINDS})
    problems: List[str] = field(default_factory=list)  # wrong answers, unexpected errors, bad requests accepted
    latencies_ms: List[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


class Worker:
    """One client thread: good requests, and a malformed one with probability `bad_fraction`."""

    def __init__(self, k: int, server: TritonServer, model: Model, tally: Tally, bad_fraction: float,
                 protocol: str) -> None:
        self.rng, self.server, self.model, self.tally = np.random.default_rng(1000 + k), server, model, tally
        self.bad_fraction, self.protocol = bad_fraction, protocol
        self.bad_count = k  # malformed kinds in turn, each thread starting at another one
        self.module = require(f"tritonclient.{protocol}", "triton", "the soak benchmark")
        if protocol == "http":  # timeouts: the HTTP client's are the connection's, the gRPC client's per call
            self.client = self.module.InferenceServerClient(server.http_url, connection_timeout=120.0,
                                                            network_timeout=120.0)
            self.timeout: Dict[str, Any] = {}
        else:
            self.client = self.module.InferenceServerClient(server.grpc_url)
            self.timeout = {"client_timeout": 120}

    def run(self, deadline: float) -> None:
        try:
            while time.monotonic() < deadline:
                if self.rng.random() < self.bad_fraction:
                    self.bad(BAD_KINDS[self.bad_count % len(BAD_KINDS)])
                    self.bad_count += 1
                else:
                    self.good()
        finally:
            self.client.close()

    def _inputs(self, x: np.ndarray, datatype: Optional[str] = None) -> list:
        from tritonclient.utils import np_to_triton_dtype

        inp = self.module.InferInput(self.model.input_name, list(x.shape), datatype or np_to_triton_dtype(x.dtype))
        inp.set_data_from_numpy(x)
        return [inp]

    def good(self) -> None:
        idx = [int(i) for i in self.rng.integers(0, POOL, int(self.rng.integers(1, self.model.max_batch + 1)))]
        t0 = time.perf_counter()
        try:
            res = self.client.infer(self.model.name, self._inputs(self.model.pool[idx]), **self.timeout)
        except Exception as e:  # every good request must be answered
            self.tally.problem(f"good request ({len(idx)} images, {self.protocol}) failed: {str(e).splitlines()[0]}")
            return
        ms = 1e3 * (time.perf_counter() - t0)
        wrong = check_answer(self.model, idx, {n: res.as_numpy(n) for n in self.model.outputs})
        with self.tally.lock:
            self.tally.good += 1
            self.tally.correct += wrong is None
            self.tally.latencies_ms.append(ms)
        if wrong:
            self.tally.problem(f"wrong answer for images {idx} ({self.protocol}): {wrong}")

    def bad(self, kind: str) -> None:
        with self.tally.lock:
            self.tally.bad[kind] += 1
        if kind == "truncated_body":
            refused = self._truncated_body()
        else:
            refused = self._malformed(kind)
        if refused:
            with self.tally.lock:
                self.tally.refused[kind] += 1
        else:
            self.tally.problem(f"malformed request accepted: {kind} ({self.protocol})")

    def _malformed(self, kind: str) -> bool:
        m, s = self.model, self.model.size
        if kind == "wrong_dtype":
            inputs = self._inputs(np.zeros((1, 3, s, s), np.uint8), "UINT8")
        elif kind == "wrong_shape":
            inputs = self._inputs(np.zeros((1, 3, s // 2, s // 2), np.float32))
        else:
            inputs = self._inputs(np.repeat(m.pool[:1], m.max_batch + 1, axis=0))
        try:
            self.client.infer(m.name, inputs, **self.timeout)
        except Exception as e:
            return bool(str(e).strip())  # refused, with a message
        return False

    def _truncated_body(self) -> bool:
        """An HTTP request whose binary image data stops halfway (Content-Length matching what is sent)."""
        m = self.model
        data = m.pool[:1].tobytes()
        header = json.dumps({"inputs": [{"name": m.input_name, "shape": [1, 3, m.size, m.size], "datatype": "FP32",
                                         "parameters": {"binary_data_size": len(data)}}]}).encode()
        host, port = self.server.http_url.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        try:
            conn.request("POST", f"/v2/models/{m.name}/infer", body=header + data[:len(data) // 2],
                         headers={"Inference-Header-Content-Length": str(len(header)),
                                  "Content-Type": "application/octet-stream"})
            response = conn.getresponse()
            response.read()
            return response.status >= 400
        except (OSError, http.client.HTTPException):
            return True  # the server closed the connection: refused too
        finally:
            conn.close()


def sample_rss(server: TritonServer, stop: threading.Event, interval: float, t0: float, out: List[Dict]) -> None:
    """Every `interval` s: the server group's RSS, the server's own and its stubs' (MiB)."""
    pid = server.process.pid
    while not stop.wait(interval):
        rss = group_rss_mib(pid)
        total, own = sum(rss.values()), rss.get(pid, 0.0)
        out.append({"t": round(time.monotonic() - t0, 1), "rss_mib": round(total, 1), "server_mib": round(own, 1),
                    "stubs_mib": round(total - own, 1)})


def serve_model(build: Path, repo: Path) -> Model:
    """The python-backend model of `build` written into `repo`, and the pool with its reference answers."""
    info = BuildInfo(build)
    (written,) = make_repository(build, repo, kinds=["python"], options=RepositoryOptions(precision="fp32"))
    size = int(info.inputs[0].shape[-1])
    pool, _ = synthetic_images(POOL, size, 11)
    pool = np.ascontiguousarray(pool, dtype=np.float32)
    max_batch = info.batch_range[1] if info.batch_range and info.batch_range[1] else 8
    return Model(written.name, info.inputs[0].name, size, int(max_batch), [o.name for o in info.outputs], pool,
                 reference(build, pool))


def run_soak(build: Path, *, duration: float, warmup: float, concurrency: int, bad_fraction: float,
             protocols: List[str], interval: float) -> Dict[str, Any]:
    """Serve, drive, sample; returns the figures (see `summarize`)."""
    with tempfile.TemporaryDirectory(prefix="icmoe-soak-") as tmp:
        model = serve_model(build, Path(tmp) / "repo")
        tally, samples, stop = Tally(), [], threading.Event()
        with TritonServer(Path(tmp) / "repo", models=[model.name], startup_timeout=300) as server:
            t0 = time.monotonic()
            workers = [Worker(k, server, model, tally, bad_fraction, protocols[k % len(protocols)])
                       for k in range(concurrency)]
            threads = [threading.Thread(target=w.run, args=(t0 + duration,)) for w in workers]
            sampler = threading.Thread(target=sample_rss, args=(server, stop, interval, t0, samples))
            for t in [sampler, *threads]:
                t.start()
            for t in threads:
                t.join()
            stop.set()
            sampler.join()
            alive = server.process.poll() is None
            exit_code = server.stop()
    return summarize(tally, samples, warmup=warmup, duration=duration, alive=alive, exit_code=exit_code,
                     model=model, concurrency=concurrency, bad_fraction=bad_fraction, protocols=protocols)


def summarize(tally: Tally, samples: List[Dict], *, warmup: float, duration: float, **facts: Any) -> Dict[str, Any]:
    after = [s for s in samples if s["t"] >= warmup]
    base = after[0]["rss_mib"] if after else None
    top = max((s["rss_mib"] for s in after), default=None)
    lat = np.array(tally.latencies_ms) if tally.latencies_ms else np.array([np.nan])
    model = facts.pop("model")
    return {"duration_s": duration, "warmup_s": warmup, **facts, "model": model.name, "max_batch": model.max_batch,
            "good_requests": tally.good, "good_correct": tally.correct, "bad_requests": tally.bad,
            "bad_refused": tally.refused, "problems": tally.problems[:50], "n_problems": len(tally.problems),
            "requests_per_s": round((tally.good + sum(tally.bad.values())) / duration, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "rss_after_warmup_mib": base, "max_rss_after_mib": top,
            "final_rss_mib": after[-1]["rss_mib"] if after else None,
            "rss_growth": round(top / base - 1, 4) if base else None, "rss_samples": samples,
            "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d")}


def failures(r: Dict[str, Any], max_growth: float) -> List[str]:
    """What the soak's checks found wrong (empty: passed)."""
    out = []
    if r["n_problems"]:
        out.append(f"{r['n_problems']} problems, e.g. {r['problems'][0]}")
    if r["good_requests"] == 0 or r["good_correct"] != r["good_requests"]:
        out.append(f"{r['good_correct']} of {r['good_requests']} good requests correct")
    if r["bad_refused"] != r["bad_requests"]:
        out.append(f"malformed requests refused {r['bad_refused']} of {r['bad_requests']}")
    if r["rss_growth"] is None or r["rss_growth"] > max_growth:
        out.append(f"server RSS growth after the warm-up {r['rss_growth']} (bound {max_growth})")
    if not r["alive"] or r["exit_code"] != 0:
        out.append(f"server alive at the end: {r['alive']}, exit code {r['exit_code']}")
    return out


def _parser():
    p = cli.parser("python benchmarks/soak.py", __doc__.splitlines()[0])
    p.add_argument("build", type=Path, help="a build directory (its FP32 graph is served by the python model)")
    p.add_argument("--duration", type=float, default=600, help="seconds of load (default 600: 10 minutes)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds before the RSS baseline (default 0.4 x --duration: the server's RSS rises for its "
                        "first minutes, then stays flat; docs/reliability.md)")
    p.add_argument("--concurrency", type=int, default=16, help="client threads (default 16)")
    p.add_argument("--bad-fraction", type=float, default=0.05, help="share of malformed requests (default 0.05)")
    p.add_argument("--protocol", choices=["http", "grpc", "both"], default="both",
                   help="the good requests' protocol (both: alternate by thread)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between RSS samples")
    p.add_argument("--max-growth", type=float, default=0.05, help="RSS growth after the warm-up that fails (0.05)")
    cli.add_json(p)
    return p


def _main(argv=None) -> int:
    a = _parser().parse_args(argv)
    cli.setup_logging(a.verbosity)
    a.warmup = 0.4 * a.duration if a.warmup is None else a.warmup
    if not 0 <= a.bad_fraction < 1 or a.concurrency < 1 or not 0 <= a.warmup < a.duration:
        raise cli.UsageError("need 0 <= --bad-fraction < 1, --concurrency >= 1 and 0 <= --warmup < --duration")
    protocols = ["http", "grpc"] if a.protocol == "both" else [a.protocol]
    r = run_soak(a.build, duration=a.duration, warmup=a.warmup, concurrency=a.concurrency,
                 bad_fraction=a.bad_fraction, protocols=protocols, interval=a.interval)
    print(f"soak {r['duration_s']:.0f} s, concurrency {r['concurrency']}, {r['requests_per_s']} req/s: "
          f"{r['good_correct']}/{r['good_requests']} good requests correct "
          f"(p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms), "
          f"malformed refused {sum(r['bad_refused'].values())}/{sum(r['bad_requests'].values())} {r['bad_refused']}; "
          f"server RSS {r['rss_after_warmup_mib']} MiB after {r['warmup_s']:.0f} s warm-up, at most "
          f"{r['max_rss_after_mib']} MiB after, growth {100 * (r['rss_growth'] or 0):+.2f}%; "
          f"exit code {r['exit_code']}")
    cli.write_json(r, a.json)
    failed = failures(r, a.max_growth)
    if failed:
        raise cli.CheckFailed("soak failed: " + "; ".join(failed))
    return cli.EXIT_OK


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
