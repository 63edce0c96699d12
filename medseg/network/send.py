"""Send DICOM files to a destination: C-STORE to a Storage SCP, or STOW-RS to a DICOMweb server, with retries.

:func:`send_files` reads only the headers of the files first (SOP Class, SOP Instance, transfer syntax),
then makes up to ``policy.attempts`` attempts. Each attempt sends the files not yet delivered:

* **DIMSE** (``dimse://AE@HOST:PORT``; DICOM PS3.4 Annex B Storage Service Class, PS3.7 9.1.1 C-STORE,
  PS3.8 association negotiation): one association per attempt, proposing one presentation context for each
  (SOP Class, transfer syntax) pair among the files — e.g. Segmentation Storage ``1.2.840.10008.5.1.4.1.1.66.4``,
  Label Map Segmentation Storage ``1.2.840.10008.5.1.4.1.1.66.7``, RT Structure Set Storage
  ``1.2.840.10008.5.1.4.1.1.481.3`` — and nothing else. Every C-STORE response status is checked.
* **DICOMweb** (``http(s)://…``; PS3.18 10.5 Store Transaction): ``dicomweb_client.DICOMwebClient.store_instances``
  in batches of at most :data:`STOW_BATCH_BYTES`; the response's Failed SOP Sequence (0008,1198) and
  Referenced SOP Sequence (0008,1199) say which instances were stored.

**What is retried** (transient; after ``backoff_s * 2**(attempt-1)`` seconds, at most ``max_backoff_s``,
with optional jitter): the peer cannot be reached (connection refused, reset, timeout), the association is
rejected-transient (PS3.8 9.3.4 result 2) or aborted, no C-STORE response arrives, C-STORE statuses
``0xA7xx`` (out of resources) and ``0x0110`` (processing failure), HTTP 5xx, 408 and 429, STOW-RS failure
reasons ``0xA7xx`` / ``0x0110``.

**What is permanent** (fails at once, whatever ``attempts`` is): the association is rejected-permanent (result
1: the peer does not know the called or calling AE title, or refuses without reason — a configuration
problem no retry fixes), the peer accepts no presentation context for a file's SOP class / transfer syntax,
any other C-STORE failure status (``0xA9xx`` data set does not match SOP class, ``0xCxxx`` cannot
understand, ``0x0122`` SOP class not supported, ``0x0124`` not authorised, …), HTTP 4xx other than 408/429
(401/403: credentials; 404: wrong root; 409: instances refused), other STOW-RS failure reasons.

Warnings (C-STORE ``0x0001``/``0xBxxx`` such as ``0xB000`` coercion of data elements, ``0xB006`` elements
discarded, ``0xB007`` data set does not match SOP class; STOW-RS Warning Reason (0008,1196)) count as
delivered and are listed in :attr:`SendResult.warnings`.

A caller with its own durable retry schedule (the DICOM node) uses ``SendPolicy(attempts=1)`` and reads
:attr:`SendError.permanent` to decide whether to try again later; :attr:`SendError.delivered` lists what
arrived before the failure.
"""

from __future__ import annotations

import math
import os
import random
import re
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from medseg.io import InputError
from medseg.network.credentials import Credentials, session_for
from medseg.network.destinations import Destination, check_ae_title, parse_destination

#: Largest sum of file sizes posted in one STOW-RS request (memory: the request is built in memory).
STOW_BATCH_BYTES = 64 * 1024 * 1024
#: C-STORE failure statuses that may clear by themselves (PS3.4 B.2.3; PS3.7 C.4.1.1.4).
_TRANSIENT_STATUS = (range(0xA700, 0xA800), range(0x0110, 0x0111))
_STATUS_NAMES = {
    0x0001: "warning",
    0x0110: "processing failure",
    0x0117: "invalid SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0x0210: "duplicate invocation",
    0x0211: "unrecognized operation",
    0x0212: "mistyped argument",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}


def status_text(code: int) -> str:
    """``0xA700 (out of resources)``: a C-STORE / STOW-RS status with its PS3.4 B.2.3 meaning."""
    name = _STATUS_NAMES.get(code)
    if name is None:
        name = {0xA7: "out of resources", 0xA9: "data set does not match SOP class"}.get(code >> 8)
    if name is None and 0xC000 <= code <= 0xCFFF:
        name = "cannot understand"
    return f"0x{code:04X}" + (f" ({name})" if name else "")


def _transient_status(code: int) -> bool:
    return any(code in r for r in _TRANSIENT_STATUS)


@dataclass(frozen=True)
class SendPolicy:
    """How hard to try.

    Attributes:
        attempts: tries in all (1: no retry — for callers with their own schedule).
        backoff_s: wait after the first failed attempt; doubled after each further one.
        max_backoff_s: the longest wait between attempts.
        timeout_s: TCP connect, association, DIMSE and HTTP timeouts.
        calling_ae: our AE title in associations (PS3.5 AE rules).
        jitter: wait a random 50-100 % of the backoff (spreads many senders retrying one peer).
    """

    attempts: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    timeout_s: float = 30.0
    calling_ae: str = "MEDSEG"
    jitter: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"attempts must be an integer >= 1, got {self.attempts!r}")
        for name in ("backoff_s", "max_backoff_s", "timeout_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "timeout_s" and value == 0):
                raise ValueError(f"{name} must be a finite number >= 0 (timeout_s > 0), got {value!r}")
        object.__setattr__(self, "calling_ae", check_ae_title(self.calling_ae, "calling AE title"))

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_backoff_s, self.backoff_s * 2.0 ** (attempt - 1))
        return base * random.uniform(0.5, 1.0) if self.jitter else base


@dataclass(frozen=True)
class SendResult:
    """A finished delivery: the destination, the SOP Instance UIDs it acknowledged, the attempts it took and
    the warnings the peer gave (one line each, naming the instance)."""

    destination: Destination
    delivered: tuple[str, ...]
    attempts: int
    warnings: tuple[str, ...] = ()


class SendError(RuntimeError):
    """Delivery failed: one line naming the destination and the cause.

    Attributes:
        destination: where it went.
        permanent: True when retrying cannot help (see the module docstring).
        attempts: attempts made.
        delivered: SOP Instance UIDs the peer did acknowledge before the failure.
        warnings: warnings given for those.
    """

    def __init__(
        self,
        message: str,
        *,
        destination: Destination,
        permanent: bool,
        attempts: int,
        delivered: Sequence[str] = (),
        warnings: Sequence[str] = (),
    ) -> None:
        super().__init__(" ".join(str(message).split()))
        self.destination = destination
        self.permanent = permanent
        self.attempts = attempts
        self.delivered = tuple(delivered)
        self.warnings = tuple(warnings)


@dataclass(frozen=True)
class _Item:
    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    size: int


@dataclass
class _Attempt:
    """What one attempt achieved; ``failure`` (message, permanent) when it stopped short."""

    delivered: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    failure: tuple[str, bool] | None = None


def read_items(paths: Iterable[str | os.PathLike]) -> list[_Item]:
    """Header of each file (Part 10 file meta and SOP UIDs); :class:`InputError` for a file that is not one."""
    items, seen = [], set()
    for path in map(Path, paths):
        try:
            ds = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"]
            )
            item = _Item(
                path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID),
                path.stat().st_size,
            )  # fmt: skip
        except (OSError, AttributeError, pydicom.errors.InvalidDicomError) as exc:
            cause = getattr(exc, "strerror", None) or "not a DICOM Part 10 file with SOP Class/Instance UIDs"
            raise InputError(f"{path}: cannot send ({cause})") from None
        if item.sop_instance not in seen:
            seen.add(item.sop_instance)
            items.append(item)
    if not items:
        raise InputError("nothing to send: no files given")
    return items


def _connect_error(host: str, port: int, timeout_s: float) -> str:
    """Why a TCP connection to host:port fails (probed again to name the cause)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return "the connection closed before the association was negotiated"
    except OSError as exc:
        return f"cannot connect ({exc.strerror or exc})"


def _associate(items: Sequence[_Item], dest: Destination, policy: SendPolicy):
    """An established association, or ``(message, permanent)`` saying why not."""
    from pynetdicom import AE, evt

    ae = AE(ae_title=policy.calling_ae)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = policy.timeout_s
    for pair in sorted({(i.sop_class, i.transfer_syntax) for i in items}):
        ae.add_requested_context(pair[0], [pair[1]])
    opened: list[bool] = []
    assoc = ae.associate(
        dest.host,
        dest.port,
        ae_title=dest.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: opened.append(True))],
    )
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        kind = "permanently" if rj.result == 0x01 else "transiently"
        return f"association rejected {kind} by the {rj.source_str}: {rj.reason_str}", rj.result == 0x01
    if not opened:
        return _connect_error(dest.host, dest.port, policy.timeout_s), False
    if assoc.is_aborted and assoc.acceptor.primitive is not None and not assoc.accepted_contexts:
        rejected = ", ".join(sorted({cx.abstract_syntax.name for cx in assoc.rejected_contexts})) or "all"
        return f"the peer accepts no presentation context for {rejected}", True
    return "association aborted or timed out during negotiation", False


def _store_dimse(items: Sequence[_Item], dest: Destination, policy: SendPolicy, done: _Attempt) -> None:
    """One association; C-STORE each item; record what was delivered and the first failure."""
    assoc = _associate(items, dest, policy)
    if isinstance(assoc, tuple):
        done.failure = assoc
        return
    try:
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        for item in items:
            if (item.sop_class, item.transfer_syntax) not in accepted:
                name = pydicom.uid.UID(item.sop_class).name
                done.failure = (
                    f"the peer refused {name} in {pydicom.uid.UID(item.transfer_syntax).name}",
                    True,
                )
                return
            status = assoc.send_c_store(item.path)
            if "Status" not in status:
                done.failure = (
                    f"{item.path.name}: no C-STORE response (association lost or timed out)",
                    False,
                )
                return
            code = int(status.Status)
            if code == 0x0000:
                done.delivered.append(item.sop_instance)
            elif code == 0x0001 or 0xB000 <= code <= 0xBFFF:
                done.delivered.append(item.sop_instance)
                done.warnings.append(f"{item.sop_instance}: C-STORE warning {status_text(code)}")
            else:
                comment = str(status.get("ErrorComment", "")).strip()
                text = f"{item.path.name}: C-STORE failed with status {status_text(code)}"
                done.failure = (text + (f": {comment}" if comment else ""), not _transient_status(code))
                return
    finally:
        if assoc.is_established:
            assoc.release()


def _stow_failure(response) -> tuple[str, bool] | None:
    """(message, permanent) from a STOW-RS response whose Failed SOP Sequence is not empty."""
    failed = list(response.get("FailedSOPSequence", []))
    if not failed:
        return None
    reasons = [int(item.get("FailureReason", 0x0110)) for item in failed]
    uids = [str(item.get("ReferencedSOPInstanceUID", "?")) for item in failed]
    text = f"STOW-RS refused {len(failed)} instance(s), e.g. {uids[0]}: {status_text(reasons[0])}"
    return text, not all(_transient_status(r) for r in reasons)


def _http_failure(exc: Exception) -> tuple[str, bool]:
    import requests

    response = getattr(exc, "response", None)
    if isinstance(exc, requests.HTTPError) and response is not None:
        code = response.status_code
        permanent = 400 <= code < 500 and code not in (408, 429)
        detail = ""
        if response.headers.get("Content-Type", "").startswith(
            ("application/dicom+json", "application/json")
        ):
            try:
                detail = (_stow_failure(pydicom.Dataset.from_json(response.content)) or ("", True))[0]
            except Exception:
                detail = ""
        reason = response.reason or ""
        return f"HTTP {code} {reason}".strip() + (f"; {detail}" if detail else ""), permanent
    cause = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    cause = cause.group(1).strip() if cause else exc.__class__.__name__
    if isinstance(exc, requests.Timeout):
        return f"timed out ({cause})", False
    return f"cannot connect ({cause})", False


def _batches(items: Sequence[_Item], max_bytes: int) -> Iterable[list[_Item]]:
    batch: list[_Item] = []
    for item in items:
        if batch and sum(i.size for i in batch) + item.size > max_bytes:
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _store_dicomweb(
    items: Sequence[_Item],
    dest: Destination,
    policy: SendPolicy,
    credentials: Credentials | None,
    done: _Attempt,
) -> None:
    """STOW-RS in batches; record what was delivered and the first failure."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = session_for(credentials)
    client = DICOMwebClient(dest.url, session=session, timeout=policy.timeout_s)
    client.set_http_retry_params(retry=False)
    try:
        for batch in _batches(items, STOW_BATCH_BYTES):
            try:
                response = client.store_instances([pydicom.dcmread(i.path) for i in batch])
            except (requests.RequestException, ValueError) as exc:
                done.failure = _http_failure(exc) if isinstance(exc, requests.RequestException) else (
                    f"unreadable STOW-RS response ({exc})", True
                )  # fmt: skip
                return
            referenced = {
                str(r.get("ReferencedSOPInstanceUID", "")): r
                for r in response.get("ReferencedSOPSequence", [])
            }
            failure = _stow_failure(response)
            for item in batch:
                ref = referenced.get(item.sop_instance)
                if ref is not None or (not referenced and failure is None):
                    done.delivered.append(item.sop_instance)
                if ref is not None and "WarningReason" in ref:
                    done.warnings.append(
                        f"{item.sop_instance}: STOW-RS warning {status_text(int(ref.WarningReason))}"
                    )
            if failure is not None:
                done.failure = failure
                return
    finally:
        session.close()


def send_files(
    paths: Iterable[str | os.PathLike],
    destination: Destination | str,
    policy: SendPolicy = SendPolicy(),
    *,
    credentials: Credentials | None = None,
    log: Callable[[str], object] = print,
) -> SendResult:
    """Deliver the DICOM files ``paths`` to ``destination`` (see the module docstring for what is retried).

    Args:
        paths: DICOM Part 10 files (SEG, RTSTRUCT, …); the same SOP Instance UID twice is sent once.
        destination: a :class:`Destination` or its text (:func:`parse_destination`).
        policy: attempts, backoff and timeouts (:class:`SendPolicy`).
        credentials: for a DICOMweb destination (:func:`medseg.network.credentials.load_credentials`).
        log: receives one line per failed attempt that will be retried.

    Returns:
        :class:`SendResult` — every instance was acknowledged.

    Raises:
        InputError: a file that is not DICOM, or a malformed destination text.
        SendError: not every instance was delivered after the attempts (or a permanent failure).
    """
    dest = parse_destination(destination) if isinstance(destination, str) else destination
    items = read_items(paths)
    delivered: list[str] = []
    warnings: list[str] = []
    for attempt in range(1, policy.attempts + 1):
        pending = [i for i in items if i.sop_instance not in set(delivered)]  # retry only what is missing
        done = _Attempt()
        if dest.kind == "dimse":
            _store_dimse(pending, dest, policy, done)
        else:
            _store_dicomweb(pending, dest, policy, credentials, done)
        delivered += done.delivered
        warnings += done.warnings
        if done.failure is None:
            return SendResult(dest, tuple(delivered), attempt, tuple(warnings))
        message, permanent = done.failure
        if permanent or attempt == policy.attempts:
            tries = "" if policy.attempts == 1 else f" after {attempt} attempt(s)"
            kind = " (permanent)" if permanent else ""
            raise SendError(
                f"{dest}: {message}{kind}{tries}; {len(delivered)} of {len(items)} instance(s) delivered",
                destination=dest,
                permanent=permanent,
                attempts=attempt,
                delivered=delivered,
                warnings=warnings,
            )
        wait = policy.delay(attempt)
        log(f"{dest}: attempt {attempt} of {policy.attempts} failed ({message}); retrying in {wait:.1f} s")
        time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover
