"""A real Orthanc PACS (with its DICOMweb plugin) for the tests, unreachable from outside this process.

Orthanc 1.10 has no bind-address option: it listens on every interface. So it runs in a network namespace
of its own (`unshare --net`, loopback up), where nothing else on the machine or outside it can connect;
the test thread joins that namespace (setns) while a test talks to it, and leaves it afterwards. Inside a
fresh namespace every port is free, so the port is fixed. Started once per test run, stopped at the end
by its own PID. Skips, saying why, where Orthanc, its DICOMweb plugin or the permission to create network
namespaces (root) is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
HTTP_PORT = 8042  # inside Orthanc's own network namespace: always free
USER, PASSWORD = "cxrscreen-test", "orthanc-test-password"
_CLONE_NEWNET = 0x40000000


@dataclass
class OrthancServer:
    """A running Orthanc: `netns` is the path of its network namespace (/proc/PID/ns/net)."""

    pid: int
    netns: str
    root: Path

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{HTTP_PORT}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.rest_url}/dicom-web"

    @property
    def env(self) -> dict[str, str]:
        """Environment for `cxrscreen pacs` subprocesses: the credentials, never on the command line."""
        return {**os.environ, "CXRSCREEN_PACS_USER": USER, "CXRSCREEN_PACS_PASSWORD": PASSWORD}

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """Run the block (this thread, and processes it starts) in Orthanc's network namespace."""
        back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _setns(self.netns)
            yield
        finally:
            _setns_fd(back)
            os.close(back)


def _setns_fd(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _setns_fd(fd)
    finally:
        os.close(fd)


def missing_reason() -> str | None:
    """Why Orthanc cannot run here, or None."""
    if not Path(ORTHANC).is_file():
        return f"Orthanc is not installed ({ORTHANC}; Debian: apt-get install orthanc orthanc-dicomweb)"
    if not Path(DICOMWEB_PLUGIN).is_file():
        return f"Orthanc's DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}; Debian: orthanc-dicomweb)"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare and ip (util-linux, iproute2) are needed to isolate Orthanc's network"
    if os.geteuid() != 0:
        return "creating and joining a network namespace for Orthanc needs root"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot create a network namespace for Orthanc here ({probe.stderr.strip() or probe.returncode})"
    return None


def start_orthanc(root: Path, *, stable_age: int = 2) -> OrthancServer:
    """Start Orthanc with its storage under `root` in a new network namespace; wait until it answers."""
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "cxrscreen-test", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
        "Plugins": [DICOMWEB_PLUGIN], "HttpPort": HTTP_PORT, "DicomServerEnabled": False, "DicomPort": 4242,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "MainDicomTags"},
        "StableAge": stable_age, "HttpTimeout": 60, "ConcurrentJobs": 1,
    }
    cfg = root / "orthanc.json"
    cfg.write_text(json.dumps(config), encoding="utf-8")
    log = open(root / "orthanc.log", "w")  # noqa: SIM115 (kept open for the server's life)
    # unshare execs sh in the new namespace and sh execs Orthanc: the PID is Orthanc's own.
    proc = subprocess.Popen(["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {ORTHANC} '{cfg}'"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = OrthancServer(pid=proc.pid, netns=f"/proc/{proc.pid}/ns/net", root=root)
    server._proc = proc  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    import requests

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited ({proc.returncode}): {(root / 'orthanc.log').read_text()[-2000:]}")
        try:
            with server.inside():
                r = requests.get(f"{server.rest_url}/system", auth=(USER, PASSWORD), timeout=2)
            if r.status_code == 200:
                return server
        except (requests.ConnectionError, OSError):
            pass
        time.sleep(0.2)
    stop_orthanc(server)
    raise RuntimeError("Orthanc did not answer within 30 s")


def stop_orthanc(server: OrthancServer) -> None:
    """Stop Orthanc by its PID (SIGTERM, then SIGKILL after 10 s)."""
    proc = server._proc  # type: ignore[attr-defined]
    if proc.poll() is None:
        os.kill(server.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def orthanc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """One Orthanc for the test run (see the module docstring)."""
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        stop_orthanc(server)


@pytest.fixture()
def orthanc(orthanc_server: OrthancServer) -> Iterator[OrthancServer]:
    """The session's Orthanc, with this test's thread inside its network namespace."""
    with orthanc_server.inside():
        yield orthanc_server
