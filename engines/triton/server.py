"""Run the `tritonserver` that ships in the nvidia-pytriton wheel on a model repository.

Details: docs/triton.md.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from engines.base import EngineError
from icmoe.core import cli
from icmoe.core.extras import missing
from icmoe.core.fetch import MARKER, PINS, FetchError, cache_root, unpacked
from icmoe.core.io import PathLike

PYTRITON = "nvidia-pytriton"
PYTRITON_VERSION = PINS[PYTRITON].version
PYTHONPATH_ENV = "ICMOE_TRITON_PYTHONPATH"  # read by python_model.py in the stub
WHEEL_PARTS = ("pytriton/tritonserver/", "nvidia_pytriton.libs/")


log = logging.getLogger(__name__)


class ServerError(EngineError):
    """The Triton server cannot be found, started or stopped (one line)."""


def cache_dir() -> Path:
    """The unpacked server in the toolkit's cache (see `icmoe.core.fetch`)."""
    return cache_root() / f"{PYTRITON}-{PYTRITON_VERSION}"


def _is_server_root(root: Path) -> bool:
    return (root / "pytriton/tritonserver/bin/tritonserver").is_file() and (root / "nvidia_pytriton.libs").is_dir()


def _cached_root() -> Optional[Path]:
    """The cached server, if it was unpacked from the pinned wheel (its recorded sha256 is a pinned one)."""
    marker = cache_dir() / MARKER
    if not marker.is_file() or marker.read_text().strip() not in PINS[PYTRITON].sha256.values():
        return None
    return cache_dir() if _is_server_root(cache_dir()) else None


def find_server() -> Optional[Path]:
    """The root holding `pytriton/tritonserver/` and `nvidia_pytriton.libs/`, or None.

    Looks at $ICMOE_PYTRITON_ROOT, an installed `pytriton` package (found without importing it) and the cache.
    """
    import importlib.util

    if os.environ.get("ICMOE_PYTRITON_ROOT"):
        root = Path(os.environ["ICMOE_PYTRITON_ROOT"])
        if not _is_server_root(root):
            raise ServerError(f"ICMOE_PYTRITON_ROOT={root} holds no pytriton/tritonserver/bin/tritonserver")
        return root
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]).parent
        if _is_server_root(root):
            return root
    return _cached_root()


def _extract_server(wheel: Path, dest: Path) -> None:
    """Unpack the server's parts of the wheel (binary, backends, stubs, shared libraries), modes kept."""
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.filename.startswith(WHEEL_PARTS):
                zf.extract(info, dest)
                mode = info.external_attr >> 16
                if mode:
                    os.chmod(dest / info.filename, mode & 0o7777)
    if not _is_server_root(dest):
        raise ServerError(f"{wheel.name}: no pytriton/tritonserver/bin/tritonserver inside")


def fetch_server() -> Path:
    """The server root: one already there (`find_server`), else unpacked from the pinned wheel into the cache.

    Raises:
      ServerError: no server here and the wheel cannot be fetched (no network); one line.
    """
    found = find_server()
    if found is not None:
        return found
    try:
        root = unpacked(PYTRITON, _extract_server)
    except FetchError as e:
        raise ServerError(f"no Triton server here, and {e} (or set ICMOE_PYTRITON_ROOT to an unpacked "
                          f"nvidia-pytriton wheel)") from None
    log.info(f"Triton server unpacked to {root}")
    return root


def stub_python_path() -> List[str]:
    """What the python backend's stub needs on sys.path to import this project and its dependencies.

    The stub embeds the system's libpython, not this environment's interpreter, so it does not see
    this environment's packages by itself. The server passes these folders to it in the environment
    (`ICMOE_TRITON_PYTHONPATH`; the model adds them as site dirs, so editable installs work), never in
    the model's config: this environment's site-packages and the folder that holds the `engines` package.
    """
    paths = [p for p in site.getsitepackages() if os.path.isdir(p)]
    project_root = str(Path(__file__).resolve().parents[2])
    return list(dict.fromkeys([project_root, *paths]))


def _http_client_module():
    try:
        import tritonclient.http as httpclient  # lazy: optional dependency
    except ImportError as e:
        raise ServerError(missing("the Triton server's readiness check", "triton", e)) from None
    return httpclient


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend_dir(root: Path, dest: Path) -> Path:
    """A copy of the wheel's backends/ with the python stub for this interpreter."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "pytriton/tritonserver/python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the nvidia-pytriton {PYTRITON_VERSION} wheel has no python backend stub "
                          f"for Python {version}")
    shutil.copytree(root / "pytriton/tritonserver/backends", dest)
    shutil.copy2(stub, dest / "python" / stub.name)
    for exe in (dest / "python" / stub.name, root / "pytriton/tritonserver/bin/tritonserver"):
        exe.chmod(exe.stat().st_mode | 0o111)
    return dest


class TritonServer:
    """The wheel's tritonserver on 127.0.0.1, as a context manager.

    Arguments:
      repository: the model repository.
      models: models to load (explicit model control); None loads all.
      http_port, grpc_port, metrics_port: 0 picks free ports.
      root: the server root (default: `fetch_server()`).
      startup_timeout: seconds to wait for readiness.
      log_path: server log file (default: inside the server's temporary folder).
    """

    def __init__(
        self,
        repository: PathLike,
        *,
        models: Optional[Sequence[str]] = None,
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        root: Optional[PathLike] = None,
        startup_timeout: float = 120.0,
        log_path: Optional[PathLike] = None,
    ) -> None:
        self.repository = Path(repository).resolve()
        self.models = list(models) if models is not None else None
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.root = Path(root) if root is not None else None
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path is not None else None
        self.process: Optional[subprocess.Popen] = None
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self._log_file = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self, backend_dir: Path) -> List[str]:
        root = self.root or fetch_server()
        cmd = [
            str(root / "pytriton/tritonserver/bin/tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir}",
            "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--exit-timeout-secs=20",
        ]
        if self.models is not None:
            cmd.append("--model-control-mode=explicit")
            cmd += [f"--load-model={m}" for m in self.models]
        return cmd

    def environment(self) -> Dict[str, str]:
        """The server's environment: its libraries, and this environment's packages for the python stubs."""
        root = self.root or fetch_server()
        env = dict(os.environ)
        env.setdefault(PYTHONPATH_ENV, os.pathsep.join(stub_python_path()))  # a caller's own value wins
        libs = [str(root / "nvidia_pytriton.libs")]
        if sysconfig.get_config_var("Py_ENABLE_SHARED"):  # the stub then loads this interpreter's libpython
            libs.insert(0, str(sysconfig.get_config_var("LIBDIR")))
        inherited = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + inherited)
        return env

    def start(self) -> "TritonServer":
        if self.process is not None:
            return self
        _http_client_module()  # before launching anything: the readiness check needs tritonclient
        self.root = Path(self.root) if self.root is not None else fetch_server()
        self._tmp = tempfile.TemporaryDirectory(prefix="icmoe-triton-")
        backend_dir = _backend_dir(self.root, Path(self._tmp.name) / "backends")
        if self.log_path is None:
            self.log_path = Path(self._tmp.name) / "tritonserver.log"
        self._log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command(backend_dir), env=self.environment(), stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches the stubs it spawned too
        )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self) -> None:
        """Poll the HTTP readiness endpoint until the server and its models are ready."""
        httpclient = _http_client_module()
        deadline = time.monotonic() + self.startup_timeout
        client = httpclient.InferenceServerClient(self.http_url, connection_timeout=2.0, network_timeout=2.0)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting; "
                                      f"log {self.log_path}: {self.log_tail(1)}")
                try:
                    if client.is_server_ready() and all(client.is_model_ready(m) for m in (self.models or [])):
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.25)
        finally:
            client.close()
        raise ServerError(f"tritonserver not ready after {self.startup_timeout:.0f} s; log {self.log_path}")

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """SIGTERM, wait, then SIGKILL the process group if it hangs. Returns the exit code."""
        if self.process is None:
            return None
        code = self.process.poll()
        if code is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                code = self.process.wait(timeout=10)
        try:  # stubs left behind by a crashed server
            os.killpg(self.process.pid, signal.SIGKILL)
        except OSError:  # none left (the usual case)
            pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.exit_code = code
        self.process = None
        return code

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.cleanup()


def _main(argv=None) -> int:
    p = cli.parser("python -m engines.triton.server",
                   "Serve a model repository with the tritonserver of the nvidia-pytriton wheel.")
    p.add_argument("repository", help="model repository (python -m engines.triton BUILD_DIR --out DIR)")
    p.add_argument("--load", action="append", metavar="MODEL",
                   help="Triton model to load (repeatable; default: every *_python model)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--fetch-only", action="store_true", help="only download and unpack the server, print its root")
    args = p.parse_args(argv)
    cli.setup_logging(args.verbosity)
    root = fetch_server()
    if args.fetch_only:
        print(root)
        return 0
    models = args.load or sorted(q.name for q in Path(args.repository).iterdir() if q.name.endswith("_python"))
    server = TritonServer(args.repository, models=models, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, root=root)

    def interrupt(*_):
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM both stop the server cleanly (even where SIGINT was inherited as ignored).
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    with server:
        print(f"serving {', '.join(models)}: HTTP {server.http_url}, gRPC {server.grpc_url} (Ctrl-C stops)", flush=True)
        try:
            while server.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
            print("stopping ...", flush=True)
        code = server.stop()
    print(f"tritonserver exited with code {code}", flush=True)
    if code != 0:
        raise ServerError(f"tritonserver exited with code {code}")
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
