"""A real Orthanc PACS with its DICOMweb plugin, started by the tests on a free loopback port with a
temporary configuration and storage, authentication on, and stopped after them.

Debian's packages `orthanc` and `orthanc-dicomweb` provide it (`.ci/run` installs them when missing);
`orthanc_missing()` says why it cannot run here.
"""

from __future__ import annotations

import contextlib
import glob
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path
from typing import Iterator, Optional

USER, PASSWORD = "radiologist", "s3cret-pass"
START_TIMEOUT_S = 60.0
PLUGIN_GLOBS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so*",
                "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so")
# A Lua filter that refuses every SEG: a PACS that will not take the results
REFUSE_SEG = """function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.Modality ~= 'SEG'
end
"""


def _plugin() -> Optional[str]:
    try:  # where the package put it
        listed = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=30).stdout
        found = [ln for ln in listed.splitlines() if ln.endswith(".so") and "DicomWeb" in ln]
        if found:
            return found[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return next((p for pattern in PLUGIN_GLOBS for p in sorted(glob.glob(pattern))), None)


def _binary() -> Optional[str]:
    """The Orthanc server (Debian installs it in /usr/sbin, which a user's PATH may lack)."""
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/local/sbin/Orthanc")
                                             if Path(p).is_file()), None)


def orthanc_missing() -> Optional[str]:
    """Why Orthanc with DICOMweb cannot run here, or None."""
    if _binary() is None:
        return "needs the Orthanc server (Debian: apt-get install orthanc orthanc-dicomweb)"
    if _plugin() is None:
        return "needs Orthanc's DICOMweb plugin (Debian: apt-get install orthanc-dicomweb)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(url: str, deadline: float, proc: subprocess.Popen) -> None:
    auth = "Basic " + b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{url}/dicom-web/studies",
                                                               headers={"Authorization": auth}), timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"Orthanc did not answer at {url} within {START_TIMEOUT_S:.0f} s")


@contextlib.contextmanager
def orthanc(folder: Path, *, lua: Optional[str] = None) -> Iterator[str]:
    """Run Orthanc with DICOMweb on 127.0.0.1 (storage and configuration in `folder`); yields its DICOMweb root
    (http://127.0.0.1:PORT/dicom-web). Users: USER / PASSWORD only; `lua`: a Lua script it runs."""
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = {"Name": "icmoe-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
              "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}, "Plugins": [_plugin()],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "HttpTimeout": 30, "StableAge": 1}
    if lua is not None:
        (folder / "filter.lua").write_text(lua)
        config["LuaScripts"] = [str(folder / "filter.lua")]
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")
    proc = subprocess.Popen([str(_binary()), str(folder / "orthanc.json")], cwd=folder, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        _ready(f"http://127.0.0.1:{port}", time.monotonic() + START_TIMEOUT_S, proc)
        yield f"http://127.0.0.1:{port}/dicom-web"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
