"""Shared parts of the node tests: phantom CT series, a real pynetdicom SCU, a recording Storage SCP (the
"PACS" a node sends to), and ``medseg node`` run as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    RTStructureSetStorage,
    SegmentationStorage,
    Verification,
)

from medseg.node.scp import ScpConfig, StorageScp
from medseg.node.store import Store
from medseg.testing.dicom_series import write_ct_series

ROOT = Path(__file__).resolve().parents[2]
#: How the tests start the node. Until ``node_app`` is added to pipelines/cli.py this imports pipelines.node
#: directly; afterwards it becomes ``[sys.executable, "-m", "pipelines.cli", "node"]``.
NODE_CMD = [sys.executable, "-m", "pipelines.cli", "node"]


def small_ct(folder: Path, shape=(24, 24, 8), **tags):
    """A small CT series (a bright block in air) written as DICOM; returns the WrittenSeries."""
    volume = np.full(shape, -1000, np.int16)
    volume[6:18, 6:18, 1:-1] = 40
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    return write_ct_series(volume, affine, folder, **tags)


def phantom_ct(dataset: Path, folder: Path, **tags):
    """The first test phantom of the tiny dataset (what ``segmenting_run`` segments) as a DICOM series."""
    import nibabel as nib

    image = sorted((dataset / "imagesTs").glob("*.nii.gz"))[0]
    img = nib.load(image)
    return write_ct_series(np.asarray(img.dataobj).round().astype(np.int16), img.affine, folder, **tags)


def send(port: int, files, calling_ae: str = "SCU", context=CTImageStorage, ts=None) -> list[int]:
    """C-STORE each file on one association; the statuses (an empty list when the association failed)."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(context, ts) if ts else ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDSEG")
    if not assoc.is_established:
        return []
    try:
        return [
            int(assoc.send_c_store(f if isinstance(f, pydicom.Dataset) else Path(f)).Status) for f in files
        ]
    finally:
        assoc.release()


class RecordingScp:
    """A Storage SCP standing for a PACS: keeps SEG / RTSTRUCT instances by SOP Instance UID (a second copy
    replaces the first, as a PACS does) and counts how often each arrived; ``delay_s`` holds every response."""

    def __init__(self, folder: Path, port: int = 0, delay_s: float = 0.0) -> None:
        self.folder, self.delay_s = folder, delay_s
        folder.mkdir(parents=True, exist_ok=True)
        self.arrivals: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.ae = AE(ae_title="PACS")
        for context in (SegmentationStorage, RTStructureSetStorage, CTImageStorage, Verification):
            self.ae.add_supported_context(context)
        self.server = self.ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        self.port = self.server.server_address[1]
        self.url = f"dimse://PACS@127.0.0.1:{self.port}"

    def _store(self, event):
        ds = event.dataset
        with self.lock:
            self.arrivals[ds.SOPInstanceUID] += 1
            (self.folder / f"{ds.SOPInstanceUID}.dcm").write_bytes(event.encoded_dataset())
        time.sleep(self.delay_s)
        return 0x0000

    def stored(self) -> set[str]:
        return {p.stem for p in self.folder.glob("*.dcm")}

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def pacs(tmp_path):
    scp = RecordingScp(tmp_path / "pacs")
    yield scp
    scp.stop()


@pytest.fixture
def node(tmp_path):
    """An in-process SCP factory: ``node(**ScpConfig fields)`` → a started StorageScp (stopped after the test)."""
    started = []

    def make(**fields) -> StorageScp:
        Store(tmp_path / "node.sqlite").close()
        scp = StorageScp(
            tmp_path / "spool", tmp_path / "node.sqlite", ScpConfig(port=0, **fields), lambda e: None
        )
        scp.port = scp.start()
        scp.store = Store(tmp_path / "node.sqlite")
        started.append(scp)
        return scp

    yield make
    for scp in started:
        scp.store.close()
        scp.stop()


def events(workdir: Path) -> list[dict]:
    path = workdir / "logs" / "node.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class NodeProcess:
    """``medseg node serve`` in a subprocess (stdout/stderr to files in ``workdir``'s parent), stopped by PID."""

    def __init__(self, workdir: Path, model: Path, *args: str) -> None:
        self.workdir = workdir
        self.out = workdir.parent / f"{workdir.name}.out"
        self.err = workdir.parent / f"{workdir.name}.err"
        cmd = [*NODE_CMD, "serve", "-m", str(model), "--workdir", str(workdir), "--port", "0", *args]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.started = len([e for e in events(workdir) if e["event"] == "listening"])
        with open(self.out, "a") as out, open(self.err, "a") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=env)
        self.port = self._wait_listening()

    def _wait_listening(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listening = [e for e in events(self.workdir) if e["event"] == "listening"]
            if len(listening) > self.started:
                return int(listening[-1]["port"])
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited {self.proc.returncode}: {self.err.read_text()}")
            time.sleep(0.1)
        raise AssertionError("node did not start listening")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=120)

    def wait(self, timeout: float = 120.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def job_states(workdir: Path) -> list[tuple[int, str]]:
    """``(job id, state)`` of every job, read from the node's database (a reader beside the node)."""
    import sqlite3

    db = sqlite3.connect(workdir / "node.sqlite", timeout=30)
    try:
        return [(r[0], r[1]) for r in db.execute("SELECT id, state FROM jobs ORDER BY id")]
    finally:
        db.close()


def delivery_states(workdir: Path) -> list[str]:
    import sqlite3

    db = sqlite3.connect(workdir / "node.sqlite", timeout=30)
    try:
        return [r[0] for r in db.execute("SELECT state FROM deliveries")]
    finally:
        db.close()


def no_temps(*folders: Path) -> list[Path]:
    """Temporary files (``.tmp-*``) anywhere below ``folders``."""
    return [p for folder in folders for p in folder.rglob(".tmp-*")]
