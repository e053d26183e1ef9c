"""Pinned downloads: sha256-checked cache, one-line errors without a network, the fetch command."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile

import pytest

from icmoe.core import fetch
from icmoe.core.fetch import FetchError, Pin
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty cache and a pip that reaches no index (the way a host without network behaves)."""
    monkeypatch.setenv("ICMOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-links"))
    (tmp_path / "no-links").mkdir()
    return tmp_path / "cache"


@pytest.fixture
def toy_pin(monkeypatch, tmp_path):
    """A pin whose wheel the test makes itself, registered for this test only."""
    wheel = tmp_path / "toy-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("toy/data.txt", "hello")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setitem(fetch.PINS, "toy", Pin("toy", "1.0", {wheel.name: digest}, size="1 kB"))
    return wheel


def test_offline_fetch_is_one_line(offline):
    with pytest.raises(FetchError) as err:
        fetch.fetch_wheel("tensorrt-stubs")
    message = str(err.value)
    assert "\n" not in message and message.startswith("could not download tensorrt-stubs==10.13.0.35.1 with pip")
    assert not list((offline / "wheels").glob("*.whl"))


def test_cached_wheel_is_verified(offline, toy_pin):
    wheels = offline / "wheels"
    wheels.mkdir(parents=True)
    (wheels / toy_pin.name).write_bytes(toy_pin.read_bytes())
    assert fetch.fetch_wheel("toy") == wheels / toy_pin.name  # from the cache: no pip, no network
    (wheels / toy_pin.name).write_bytes(b"damaged")
    assert fetch.cached_wheel("toy") is None and not (wheels / toy_pin.name).exists()  # a bad file goes
    with pytest.raises(FetchError, match="could not download toy==1.0"):
        fetch.fetch_wheel("toy")


def test_unpacked_folder_follows_the_wheel(offline, toy_pin):
    (offline / "wheels").mkdir(parents=True)
    (offline / "wheels" / toy_pin.name).write_bytes(toy_pin.read_bytes())
    calls = []

    def extract(wheel, dest):
        calls.append(wheel)
        zipfile.ZipFile(wheel).extractall(dest)

    folder = fetch.unpacked("toy", extract)
    assert (folder / "toy/data.txt").read_text() == "hello" and folder == offline / "toy-1.0"
    assert fetch.unpacked("toy", extract) == folder and len(calls) == 1  # reused
    fetch.unpacked("toy", extract, tag="other rules")
    assert len(calls) == 2  # another way of unpacking: unpacked again
    assert oct(folder.stat().st_mode & 0o777) != oct(0o700)


def test_unknown_pin():
    with pytest.raises(FetchError, match="no pinned wheel named 'nope'"):
        fetch.fetch_wheel("nope")


def test_every_pin_has_a_sha256_per_file():
    for pin in fetch.PINS.values():
        assert pin.sha256 and all(len(h) == 64 and int(h, 16) >= 0 for h in pin.sha256.values())
        assert all(name.endswith(".whl") and pin.version in name for name in pin.sha256)


def test_cli_check_and_offline_error(offline):
    run = lambda *a: subprocess.run([sys.executable, "-m", "icmoe.core.fetch", *a],  # noqa: E731
                                    capture_output=True, text=True, cwd=ROOT, timeout=120)
    proc = run("--check")
    assert proc.returncode == 0 and "nvidia-pytriton==0.7.0: not cached" in proc.stdout, proc.stderr
    proc = run("tensorrt-stubs")
    lines = proc.stderr.strip().splitlines()  # "downloading ...", then the one-line error
    assert proc.returncode == 2 and lines[-1].startswith("error: could not download tensorrt-stubs"), proc.stderr
    assert "Traceback" not in proc.stderr
