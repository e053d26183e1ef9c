"""Pinned wheels the toolkit downloads on demand: one place, pinned versions, sha256-verified, cached.

README.md has the commands.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from icmoe.core import cli
from icmoe.core.errors import IcmoeError
from icmoe.core.io import give_default_mode, sha256_file

log = logging.getLogger(__name__)
MARKER = ".wheel-sha256"  # in an unpacked folder: the sha256 of the wheel it came from


class FetchError(IcmoeError):
    """A pinned wheel that is neither cached nor downloadable, or whose sha256 is wrong (one line)."""


@dataclass(frozen=True)
class Pin:
    """A wheel pinned by version and by the sha256 of each platform's file."""

    name: str
    version: str
    sha256: Dict[str, str]  # wheel file name -> sha256 (PyPI's files)
    size: str  # for the log line before a download

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    def fits(self, filename: str) -> bool:
        """Whether a pinned file is for this machine (pure wheels fit everywhere)."""
        return filename.endswith("-any.whl") or filename.endswith(f"_{platform.machine()}.whl")


PINS: Dict[str, Pin] = {
    "nvidia-pytriton": Pin("nvidia-pytriton", "0.7.0", {
        "nvidia_pytriton-0.7.0-py3-none-manylinux_2_35_x86_64.whl":
            "21f063ff93bb426d0c06b7a55e7eb9efcfe62c0dddd9a908e9877e18710128df",
        "nvidia_pytriton-0.7.0-py3-none-manylinux_2_35_aarch64.whl":
            "f99e07ee56fe065337453956afba17d2673e02ec6a632c3de26ce6e7b32a0898",
    }, size="55 MB"),
    "tensorrt-stubs": Pin("tensorrt-stubs", "10.13.0.35.1", {
        "tensorrt_stubs-10.13.0.35.1-py3-none-any.whl":
            "749a36a1f825db0800a82d0dabbf7ef49f3a9edc1e794c9545fb94a551613fea",
    }, size="0.1 MB"),
}


def cache_root() -> Path:
    """The toolkit's cache folder: $ICMOE_CACHE_DIR, else $XDG_CACHE_HOME/icmoe, else ~/.cache/icmoe."""
    if os.environ.get("ICMOE_CACHE_DIR"):
        return Path(os.environ["ICMOE_CACHE_DIR"])
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "icmoe"


def _pin(name: str) -> Pin:
    if name not in PINS:
        raise FetchError(f"no pinned wheel named {name!r} (known: {', '.join(sorted(PINS))})")
    return PINS[name]


def _verified(pin: Pin, path: Path) -> bool:
    """Whether `path` is one of the pin's files for this machine, with the pinned sha256."""
    want = pin.sha256.get(path.name)
    return want is not None and pin.fits(path.name) and path.is_file() and sha256_file(path) == want


def cached_wheel(name: str) -> Optional[Path]:
    """The verified cached wheel of a pin for this machine, or None (a damaged file is removed)."""
    pin = _pin(name)
    for filename in sorted(pin.sha256):
        path = cache_root() / "wheels" / filename
        if path.is_file():
            if _verified(pin, path):
                return path
            log.warning(f"{path}: sha256 differs from the pin; removing it")
            path.unlink()
    return None


def _pip_download(pin: Pin, dest: Path) -> None:
    """`pip download` the pinned wheel into `dest`, pip checking the hashes as it downloads."""
    hashes = " ".join(f"--hash=sha256:{h}" for h in sorted(set(pin.sha256.values())))
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{pin.requirement} {hashes}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
           "--disable-pip-version-check", "--retries", "1", "--timeout", "30", "--quiet",
           "--dest", str(dest), "-r", str(requirements)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise FetchError(f"could not download {pin.requirement}: pip took more than 900 s") from None
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or proc.stderr.splitlines()
        last = (errors or ["no output"])[-1].removeprefix("ERROR:").strip()
        raise FetchError(f"could not download {pin.requirement} with pip (no network or no package index?): {last}")


def fetch_wheel(name: str) -> Path:
    """The pinned wheel `name` for this machine: from the cache, else downloaded into it.

    Returns:
      Path of the wheel in the cache, its sha256 checked against the pin.

    Raises:
      FetchError: not cached and not downloadable (no network, no index), or a wrong sha256.
    """
    pin = _pin(name)
    found = cached_wheel(name)
    if found is not None:
        return found
    wheels = cache_root() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    log.info(f"downloading {pin.requirement} ({pin.size}) with pip into {wheels} ...")
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        _pip_download(pin, Path(tmp))
        got = [p for p in Path(tmp).glob("*.whl") if _verified(pin, p)]
        if not got:
            raise FetchError(f"pip downloaded no {pin.requirement} wheel for {platform.machine()} with a pinned sha256")
        os.replace(got[0], wheels / got[0].name)  # atomic: a half-written wheel is never found
    return wheels / got[0].name


def unpacked(name: str, extract: Callable[[Path, Path], None], *, tag: str = "") -> Path:
    """A folder unpacked from the pinned wheel by `extract(wheel, folder)`, cached next to the wheel.

    The folder, `<cache>/<name>-<version>/`, records the sha256 of the wheel it came from (and `tag`,
    which names the way `extract` unpacks) and is rebuilt when either differs (a new pin, a changed
    `extract`, a damaged or foreign folder). It is replaced atomically.
    """
    pin = _pin(name)
    wheel = fetch_wheel(name)
    digest = pin.sha256[wheel.name] + (f" {tag}" if tag else "")
    dest = cache_root() / f"{name}-{pin.version}"
    marker = dest / MARKER
    if marker.is_file() and marker.read_text().strip() == digest:
        return dest
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        extract(wheel, staging)
        (staging / MARKER).write_text(digest + "\n")
        give_default_mode(staging)  # mkdtemp made it 0700
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        if dest.exists():
            os.replace(dest, old)
        os.replace(staging, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _main(argv=None) -> int:
    p = cli.parser("python -m icmoe.core.fetch",
                   "Download the pinned wheels (nvidia-pytriton's server, tensorrt-stubs) into the cache and "
                   "check their sha256.")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"pins to fetch (default: all; {', '.join(PINS)})")
    p.add_argument("--check", action="store_true", help="only report what the cache holds; download nothing")
    args = p.parse_args(argv)
    cli.setup_logging(args.verbosity)
    names: List[str] = args.names or sorted(PINS)
    for name in names:
        path = cached_wheel(name) if args.check else fetch_wheel(name)
        print(f"{_pin(name).requirement}: {path if path else 'not cached'}")
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
