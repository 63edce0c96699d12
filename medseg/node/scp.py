"""The node's DICOM Storage SCP (pynetdicom): receives CT series into the spool and records them in the store.

**What is accepted, at association time** (DICOM PS3.7 / PS3.8): CT Image Storage and Verification
(C-ECHO), each only with a transfer syntax that :mod:`medseg.io.dicom` is tested to decode voxel for voxel
(:data:`TRANSFER_SYNTAXES`: implicit / explicit VR little endian, deflated explicit, RLE lossless, JPEG-LS
lossless). Any other SOP class is answered *abstract syntax not supported* and any other transfer syntax
*transfer syntaxes not supported* in the A-ASSOCIATE-AC's presentation context results (PS3.8 §9.3.3.2);
a calling AE title outside ``allow_ae`` is rejected (*calling AE title not recognised*), a peer address
outside ``allow_host`` is rejected (*no reason given*), and associations beyond ``max_associations`` are
rejected (*local limit exceeded*).

**Each C-STORE** (:meth:`StorageScp.handle_store`) is checked before anything touches the disk:

=========  ==========================================================================================
Status     When (PS3.4 Annex B.2.3 statuses)
=========  ==========================================================================================
0x0000     recorded (or an identical copy was already recorded)
0xA700     out of resources: the spool quota, the free disk space, or the series' instance cap
0xA900     the dataset's SOP Class UID is not CT Image Storage (the context it came on)
0xC000     cannot understand: the dataset does not decode, a UID is not a valid DICOM UID (PS3.5 §9.1),
           the SOP Instance UID differs from the command's Affected SOP Instance UID, no pixel data
0x0110     processing failure: an unexpected error (logged; the association goes on)
=========  ==========================================================================================

A refusal carries a one-line ErrorComment (at most 64 characters, PS3.7 C.4.2.1.4). Accepted instances
are written as received (``event.encoded_dataset()``: the peer's encoding, no re-encoding) to
``spool/<study>/<series>/<sop>.dcm`` (:mod:`medseg.node.spool`), then recorded
(:meth:`medseg.node.store.Store.record_instance`), then answered 0x0000. A bad peer only ever ends its own
association: every handler catches its exceptions.
"""

from __future__ import annotations

import logging
import queue
import shutil
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from medseg.node.spool import spool_path, valid_uid, write_instance
from medseg.node.store import Instance, Store

#: Transfer syntaxes accepted for CT Image Storage: those tests/io/test_dicom_series.py shows medseg reads.
TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGLSLossless,
)
SUCCESS, OUT_OF_RESOURCES, SOP_CLASS_MISMATCH, CANNOT_UNDERSTAND, PROCESSING_FAILURE = (
    0x0000, 0xA700, 0xA900, 0xC000, 0x0110,
)  # fmt: skip
#: Keep at least this much free on the spool's disk (the outputs and the database share it).
MIN_FREE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class ScpConfig:
    """How the SCP listens and what it accepts (``medseg node serve`` options).

    Attributes:
        ae_title: our AE title.
        host, port: where to listen (127.0.0.1 by default: expose it on purpose); port 0: any free port.
        allow_ae: calling AE titles allowed (empty: any).
        allow_host: peer IP addresses allowed (empty: any).
        max_associations: concurrent associations.
        quota_bytes: largest spool (recorded instances' bytes); None: no quota besides the free disk.
        max_series_instances: most instances of one series; None: no cap.
        min_free_bytes: refuse an instance that would leave less free disk than this.
        ssl_context: TLS (DICOM PS3.15 Annex B.9 "Basic TLS Secure Transport Connection Profile"); None: plain.
    """

    ae_title: str = "MEDSEG"
    host: str = "127.0.0.1"
    port: int = 11112
    allow_ae: tuple[str, ...] = ()
    allow_host: tuple[str, ...] = ()
    max_associations: int = 10
    quota_bytes: int | None = None
    max_series_instances: int | None = None
    min_free_bytes: int = MIN_FREE_BYTES
    ssl_context: ssl.SSLContext | None = None


def tls_context(cert: Path, key: Path, ca: Path | None) -> ssl.SSLContext:
    """A server TLS context from a certificate and key; with ``ca``, peers must show a certificate it signed
    (mutual TLS, how DICOM TLS usually authenticates the PACS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    if ca is not None:
        context.load_verify_locations(cafile=str(ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class Refused(Exception):
    """A C-STORE refused with ``status`` and a one-line ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class StorageScp:
    """The Storage SCP of one node (module docstring).

    Args:
        spool: the spool folder.
        db_path: the job store file (each association thread borrows a connection from a pool).
        config: :class:`ScpConfig`.
        log_event: receives one dict per association refused and instance refused or recorded.
    """

    def __init__(
        self, spool: Path, db_path: Path, config: ScpConfig, log_event: Callable[[dict], object]
    ) -> None:
        self.spool, self.db_path, self.config, self.log_event = Path(spool), Path(db_path), config, log_event
        self.spool.mkdir(parents=True, exist_ok=True)
        self._stores: queue.SimpleQueue[Store] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._reserved_bytes = 0
        self._reserved_series: Counter[str] = Counter()
        self.last_activity = time.monotonic()
        self.received = 0
        self.associations = 0
        self.server = None
        self.ae = AE(ae_title=config.ae_title)
        self.ae.maximum_associations = config.max_associations
        self.ae.require_calling_aet = list(config.allow_ae)
        self.ae.add_supported_context(CTImageStorage, list(TRANSFER_SYNTAXES))
        self.ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)

    # ------------------------------------------------------------------ server

    def start(self) -> int:
        """Listen (non-blocking); return the port bound."""
        handlers = [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_association),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        address = (self.config.host, self.config.port)
        self.server = self.ae.start_server(
            address, block=False, evt_handlers=handlers, ssl_context=self.config.ssl_context
        )
        self._touch()
        return int(self.server.server_address[1])

    def stop(self) -> None:
        """Stop accepting associations and end the open ones (their unanswered C-STOREs are not recorded)."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        while not self._stores.empty():
            self._stores.get().close()

    @property
    def active_associations(self) -> int:
        return len([a for a in self.ae.active_associations if a.is_acceptor])

    @contextmanager
    def _store(self) -> Iterator[Store]:
        try:
            store = self._stores.get_nowait()
        except queue.Empty:
            store = Store(self.db_path, log_event=self.log_event, shared=True)
        try:
            yield store
        finally:
            self._stores.put(store)

    def _touch(self) -> None:
        self.last_activity = time.monotonic()

    # ------------------------------------------------------------------ association events

    def _on_requested(self, event: evt.Event) -> None:
        self._touch()
        peer = event.assoc.requestor.address
        if self.config.allow_host and peer not in self.config.allow_host:
            ae_title = event.assoc.requestor.primitive.calling_ae_title
            event.assoc.acse.send_reject(0x01, 0x01, 0x01)  # rejected permanent, service user, no reason
            event.assoc.kill()  # as pynetdicom's own rejections do: lets the DUL send the A-ASSOCIATE-RJ first
            self.log_event({"event": "association-rejected", "peer": peer, "calling_ae": ae_title,
                            "reason": f"peer address {peer} not in --allow-host"})  # fmt: skip

    def _on_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        if self.config.allow_ae and requestor.ae_title.strip() not in self.config.allow_ae:
            reason = f"calling AE title {requestor.ae_title.strip()!r} not in --allow-ae"
        else:
            reason = f"more than {self.config.max_associations} associations (--max-associations)"
        entry = {"event": "association-rejected", "peer": requestor.address, "calling_ae": requestor.ae_title}
        self.log_event({**entry, "reason": reason})

    def _on_association(self, event: evt.Event) -> None:
        self._touch()
        self.associations += 1
        requestor = event.assoc.requestor
        refused = [cx.abstract_syntax for cx in event.assoc.rejected_contexts]
        entry = {"event": "association", "peer": requestor.address, "calling_ae": requestor.ae_title}
        self.log_event({**entry, "rejected_contexts": refused} if refused else entry)

    def _on_echo(self, event: evt.Event) -> int:
        self._touch()
        return SUCCESS

    # ------------------------------------------------------------------ C-STORE

    def handle_store(self, event: evt.Event) -> Dataset | int:
        """Check, spool, record, answer (module docstring); never raises."""
        self._touch()
        requestor = event.assoc.requestor
        where = {"calling_ae": requestor.ae_title, "peer": requestor.address}
        try:
            self._receive(event, where)
        except Refused as exc:
            self.log_event({"event": "instance-refused", **where, "status": f"0x{exc.status:04X}",
                            "reason": exc.reason})  # fmt: skip
            return _status(exc.status, exc.reason)
        except Exception as exc:  # a bug or a broken disk: this instance fails, the node serves on
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            self.log_event({"event": "instance-error", **where, "reason": reason})
            return _status(PROCESSING_FAILURE, reason)
        finally:
            self._touch()
        self.received += 1  # one log line per job state change, not per instance (500 per series)
        return SUCCESS

    def _receive(self, event: evt.Event, where: dict) -> Instance:
        request = event.request
        size = len(request.DataSet.getvalue())
        ds = _decoded(event)
        uids = {
            k: ds.get(k) for k in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
        }
        for keyword, value in uids.items():
            if not valid_uid(value if isinstance(value, str) else None):
                raise Refused(CANNOT_UNDERSTAND, f"{keyword} {str(value)[:30]!r} is not a valid UID")
        if uids["SOPClassUID"] != CTImageStorage:
            raise Refused(SOP_CLASS_MISMATCH, f"SOP class {uids['SOPClassUID']} is not CT Image Storage")
        if uids["SOPInstanceUID"] != request.AffectedSOPInstanceUID:
            raise Refused(CANNOT_UNDERSTAND, "SOP Instance UID differs from the command's")
        if "PixelData" not in ds:
            raise Refused(CANNOT_UNDERSTAND, "CT image without pixel data")
        sop, series, study = uids["SOPInstanceUID"], uids["SeriesInstanceUID"], uids["StudyInstanceUID"]
        with self._reservation(series, sop, size):
            path = spool_path(self.spool, study, series, sop)
            data = event.encoded_dataset()
            sha = write_instance(path, data)
            inst = Instance(sop, series, study, uids["SOPClassUID"], str(path), len(data), sha, **where)
            with self._store() as store:
                store.record_instance(inst)
        return inst

    @contextmanager
    def _reservation(self, series: str, sop: str, size: int) -> Iterator[None]:
        """Check the quota, free space and series cap counting the instances being written right now, and
        hold this one's share until it is recorded."""
        config = self.config
        with self._lock, self._store() as store:
            used = store.spool_bytes() + self._reserved_bytes
            if config.quota_bytes is not None and used + size > config.quota_bytes:
                raise Refused(OUT_OF_RESOURCES, f"spool quota {config.quota_bytes / 1e9:g} GB reached")
            free = shutil.disk_usage(self.spool).free
            if free - size < config.min_free_bytes:
                raise Refused(OUT_OF_RESOURCES, f"disk nearly full ({free / 2**20:.0f} MiB free)")
            cap = config.max_series_instances
            if cap is not None and not store.has_instance(sop):
                count = store.series_instances(series) + self._reserved_series[series]
                if count >= cap:
                    reason = f"series has more than {cap} instances (--max-series-instances)"
                    store.refuse_series(series, f"too big: {reason}")
                    raise Refused(OUT_OF_RESOURCES, reason)
            self._reserved_bytes += size
            self._reserved_series[series] += 1
        try:
            yield
        finally:
            with self._lock:
                self._reserved_bytes -= size
                self._reserved_series[series] -= 1


def _decoded(event: evt.Event) -> Dataset:
    """The request's dataset, every element decoded (so a broken encoding fails here, not in a worker)."""
    try:
        ds = event.dataset
        ds.walk(lambda _ds, _elem: None)
    except Exception as exc:
        raise Refused(CANNOT_UNDERSTAND, f"dataset does not decode ({type(exc).__name__})") from None
    return ds
