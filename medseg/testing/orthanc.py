"""A real Orthanc PACS for tests: started from the Debian binary with its own config, ports and storage.

:func:`start_orthanc` writes a JSON configuration into a folder of its own (storage, index, log), picks
free localhost ports for HTTP and DICOM, starts ``/usr/sbin/Orthanc <config>`` as a child process, loads the
DICOMweb plugin (QIDO-RS / WADO-RS / STOW-RS under ``/dicom-web/``, DICOM PS3.18) and waits until the REST
API answers ``GET /system``. The Debian package's own service, configuration (``/etc/orthanc``) and database
(``/var/lib/orthanc``) are never read or touched. :class:`OrthancServer` is the handle: URLs, ports, a few
REST helpers (upload, C-STORE to a modality, list instances, declare a modality) and :meth:`~OrthancServer.stop`,
which ends the process by its PID (SIGTERM, then SIGKILL after a timeout).

Network exposure. Orthanc 1.10 has no option to bind its listeners to one address: both the HTTP and the
DICOM ports listen on all interfaces. HTTP requests from other hosts are refused by
``"RemoteAccessAllowed": false``. The DICOM port cannot be restricted to 127.0.0.1, so the configuration
narrows who may talk to it instead: the called AE title must be Orthanc's (``DicomCheckCalledAet``),
C-ECHO / C-STORE are accepted only from declared modalities (``DicomAlwaysAllowStore``/``Echo`` false) and
only from the host they are declared with (``DicomCheckModalityHost``), and C-FIND/C-GET/C-MOVE from
nobody undeclared. The calling AE titles in ``store_from`` (default ``MEDSEG``) are declared at 127.0.0.1.

Example::

    with start_orthanc(tmp_path / "orthanc", modalities={"node": ("NODE", "127.0.0.1", 11112)}) as pacs:
        ids = pacs.upload(series_files)
        pacs.store_to("node", ids)          # C-STORE from Orthanc to the node
        print(pacs.dicomweb_url)            # http://127.0.0.1:<port>/dicom-web
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import requests

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
#: Seconds to wait for ``GET /system`` to answer after the process starts.
START_TIMEOUT_S = 30.0
#: Seconds between SIGTERM and SIGKILL on stop.
STOP_TIMEOUT_S = 10.0


class OrthancError(RuntimeError):
    """Orthanc could not be started or a REST call failed; the message carries the log tail."""


def orthanc_available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else the reason (for ``pytest.skip``)."""
    if not ORTHANC_BINARY.is_file() or not os.access(ORTHANC_BINARY, os.X_OK):
        return f"Orthanc not installed ({ORTHANC_BINARY} missing; apt-get install orthanc orthanc-dicomweb)"
    if not DICOMWEB_PLUGIN.is_file():
        return f"Orthanc DICOMweb plugin missing ({DICOMWEB_PLUGIN}; apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel's choice; a race with other processes is possible,
    which :func:`start_orthanc` handles by retrying with new ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:``port`` (a bind succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def orthanc_config(
    folder: Path,
    *,
    http_port: int,
    dicom_port: int,
    aet: str,
    modalities: Mapping[str, tuple[str, str, int]],
    store_from: Sequence[str],
) -> dict[str, Any]:
    """The JSON configuration (Orthanc Book, "Configuration of Orthanc"; options of Orthanc 1.10)."""
    declared = {name: [a, h, int(p)] for name, (a, h, p) in modalities.items()}
    for i, calling in enumerate(store_from):
        # Port 104 is never dialled: these entries only allow the AE to associate from 127.0.0.1.
        declared.setdefault(f"store-from-{i}", [calling, "127.0.0.1", 104])
    return {
        "Name": f"medseg-test-{aet}",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "TemporaryDirectory": str(folder / "tmp"),
        "StorageCompression": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False},
        "LuaScripts": [],
        "ExecuteLuaEnabled": False,
        "RestApiWriteToFileSystemEnabled": False,
        "WebDavEnabled": False,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "HttpDescribeErrors": True,
        "DicomServerEnabled": True,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowFindWorklist": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": declared,
        "DicomModalitiesInDatabase": False,
        "DicomAssociationCloseDelay": 0,
        "DicomScuTimeout": 10,
        "DicomScpTimeout": 30,
        "UnknownSopClassAccepted": True,
        "OrthancPeers": {},
        "StableAge": 1,
        "SaveJobs": False,
        "ConcurrentJobs": 1,
        "OverwriteInstances": True,
        "HttpTimeout": 30,
    }


class OrthancServer:
    """A running Orthanc started by :func:`start_orthanc`; a context manager that stops it on exit."""

    def __init__(
        self, folder: Path, process: subprocess.Popen, *, http_port: int, dicom_port: int, aet: str
    ) -> None:
        self.folder = folder
        self.process = process
        self.http_port = http_port
        self.dicom_port = dicom_port
        self.aet = aet
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.dicomweb_url = f"{self.http_url}/dicom-web"
        self.log_path = folder / "orthanc.log"
        self._http = requests.Session()

    @property
    def pid(self) -> int:
        return self.process.pid

    def __enter__(self) -> OrthancServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"OrthancServer({self.aet}@127.0.0.1:{self.dicom_port}, {self.http_url}, pid {self.pid})"

    # -- process -------------------------------------------------------------------------------------------
    def log_tail(self, lines: int = 30) -> str:
        """The last lines of Orthanc's log (stdout and stderr of the process)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the process (by PID), SIGKILL it after ``timeout_s``; returns its exit status."""
        self._http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        return self.process.returncode

    # -- REST ----------------------------------------------------------------------------------------------
    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        url = f"{self.http_url}{path}"
        try:
            response = self._http.request(method, url, timeout=60, **kwargs)
        except requests.RequestException as exc:
            raise OrthancError(f"{method} {url}: {exc}\n{self.log_tail()}") from None
        if response.status_code >= 400:
            raise OrthancError(
                f"{method} {url}: HTTP {response.status_code} {response.text[:500]}\n{self.log_tail()}"
            )
        return response.json() if response.content else None

    def system(self) -> dict[str, Any]:
        return self._call("GET", "/system")

    def upload(self, paths: Iterable[str | os.PathLike]) -> list[str]:
        """POST each DICOM file to ``/instances``; returns the Orthanc instance IDs."""
        ids = []
        for path in paths:
            answer = self._call("POST", "/instances", data=Path(path).read_bytes())
            ids.append(answer["ID"])
        return ids

    def instances(self, expand: bool = False) -> list[Any]:
        """Orthanc IDs of every stored instance (or their JSON descriptions with ``expand``)."""
        return self._call("GET", "/instances" + ("?expand" if expand else ""))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """``GET /instances/{id}/simplified-tags``."""
        return self._call("GET", f"/instances/{instance_id}/simplified-tags")

    def sop_instance_uids(self) -> set[str]:
        """SOP Instance UIDs of every stored instance."""
        return {item["MainDicomTags"]["SOPInstanceUID"] for item in self.instances(expand=True)}

    def find_study(self, study_uid: str) -> str:
        """The Orthanc ID of a study given its Study Instance UID (``POST /tools/lookup``)."""
        for hit in self._call("POST", "/tools/lookup", data=study_uid):
            if hit["Type"] == "Study":
                return hit["ID"]
        raise OrthancError(f"{self.http_url}: no study {study_uid}")

    def store_to(self, modality: str, resources: str | Sequence[str]) -> dict[str, Any]:
        """C-STORE from Orthanc to a declared modality, synchronously (``POST /modalities/{id}/store``).

        ``resources`` is a list of Orthanc IDs (instances, series or studies) or one Study Instance UID.
        """
        if isinstance(resources, str):
            resources = [self.find_study(resources)]
        body = {"Resources": list(resources), "Synchronous": True}
        return self._call("POST", f"/modalities/{modality}/store", json=body)

    def add_modality(self, name: str, aet: str, host: str, port: int, **options: Any) -> None:
        """Declare (or replace) a DICOM modality at run time (``PUT /modalities/{name}``)."""
        self._call(
            "PUT", f"/modalities/{name}", json={"AET": aet, "Host": host, "Port": int(port), **options}
        )

    def modalities(self) -> list[str]:
        return self._call("GET", "/modalities")


def _start_once(
    folder: Path, *, modalities: Mapping[str, tuple[str, str, int]], aet: str, store_from: Sequence[str]
) -> OrthancServer:
    http_port, dicom_port = free_port(), free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    for sub in ("storage", "index", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    config = orthanc_config(
        folder,
        http_port=http_port,
        dicom_port=dicom_port,
        aet=aet,
        modalities=modalities,
        store_from=store_from,
    )
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    with open(folder / "orthanc.log", "wb") as log:
        process = subprocess.Popen(
            [str(ORTHANC_BINARY), str(config_path)],
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the test runner does not reach it; stop() does
        )
    server = OrthancServer(folder, process, http_port=http_port, dicom_port=dicom_port, aet=aet)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise OrthancError(f"Orthanc exited with status {process.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(f"{server.http_url}/system", timeout=1).ok:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.1)
    server.stop()
    raise OrthancError(
        f"Orthanc did not answer {server.http_url}/system in {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}"
    )


def start_orthanc(
    workdir: str | os.PathLike,
    *,
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
    aet: str = "ORTHANC",
    store_from: Sequence[str] = ("MEDSEG",),
) -> OrthancServer:
    """Start Orthanc with its config, storage, index and log in ``workdir``; return the running server.

    ``modalities`` maps Orthanc's name for a peer to ``(AE title, host, port)`` (it may C-STORE to them and
    accept C-ECHO/C-STORE from them); ``store_from`` lists further calling AE titles allowed to C-STORE in
    from 127.0.0.1. Raises :class:`OrthancError` (with the log tail) when it does not come up; a port taken
    between choosing and binding is retried with new ports.
    """
    reason = orthanc_available()
    if reason:
        raise OrthancError(reason)
    folder = Path(workdir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    error: OrthancError | None = None
    for _ in range(3):
        try:
            return _start_once(folder, modalities=dict(modalities or {}), aet=aet, store_from=store_from)
        except OrthancError as exc:
            error = exc
            if "address already in use" not in str(exc).lower() and "bind" not in str(exc).lower():
                break
    assert error is not None
    raise error
