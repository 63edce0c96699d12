"""The DICOMweb pull client: find CT series by QIDO-RS, fetch them by WADO-RS, treating the server as untrusted.

* :func:`find_series` — QIDO-RS (DICOM PS3.18 10.6 Search Transaction): ``GET {root}/studies/{uid}/series``
  for one study, or ``GET {root}/studies?ModalitiesInStudy=CT&StudyDate=…`` then each study's series.
  Answers are ``application/dicom+json`` (PS3.18 F.2), read with a byte cap.
* :func:`retrieve_series` — WADO-RS (PS3.18 10.4 Retrieve Transaction): one
  ``GET {root}/studies/{study}/series/{series}`` with ``Accept: multipart/related; type="application/dicom";
  transfer-syntax=*`` (the instances as stored). The multipart/related body (RFC 2387, RFC 2046 5.1) is split
  *while it streams*: each part goes straight to a temporary file, so memory stays at one chunk whatever the
  server sends, and each instance is renamed into place as ``<folder>/<series_uid>/<sop_uid>.dcm`` only once
  its header has been checked.

What the server sends is checked before it is used (:class:`PullLimits` sets the caps):

* every UID is a DICOM UID (PS3.5 9.1: at most 64 characters, digits and dots, no empty component, no
  leading zero in a component) before it names a file or folder, so no path leaves ``folder``;
* at most ``instances`` parts, ``instance_bytes`` per part and ``series_bytes`` in all (counted on the
  decoded stream, so ``Content-Encoding: gzip`` cannot inflate past them); QIDO answers at most
  ``query_bytes``;
* each instance must be a DICOM Part 10 file of the requested study and series, and SOP Instance UIDs must
  not repeat.

Anything else is refused with one line (:class:`DicomwebError`, an :class:`~medseg.io.InputError`), and the
series folder is removed: a failed retrieval leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import requests

from medseg.io import InputError
from medseg.io.atomic import temp_prefix
from medseg.network.credentials import Credentials, session_for
from medseg.network.destinations import parse_dicomweb_url

GIB = 1024**3
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_MODALITY = re.compile(r"[A-Z0-9_ ]{1,16}")
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")  # RFC 2046 5.1.1
#: Bytes read from the network per step (the memory a retrieval takes, besides one instance's header).
CHUNK_BYTES = 1024 * 1024
_MAX_HEADER_BYTES = 16 * 1024
_MAX_PREAMBLE_BYTES = 64 * 1024
STUDY_UID, SERIES_UID, MODALITY_TAG = "0020000D", "0020000E", "00080060"
_SERIES_NUMBER, _SERIES_DESCRIPTION, _STUDY_DATE = "00200011", "0008103E", "00080020"


class DicomwebError(InputError):
    """The server cannot be used or sent something refused; one line naming the URL and the cause."""


def is_dicom_uid(text: object) -> bool:
    """A DICOM UID (PS3.5 9.1): ≤ 64 characters, dot-separated numbers without leading zeros."""
    return isinstance(text, str) and len(text) <= 64 and _UID.fullmatch(text) is not None


def check_uid(text: object, what: str, where: str) -> str:
    if not is_dicom_uid(text):
        shown = repr(text)[:80]
        raise DicomwebError(f"{where}: {what} {shown} is not a valid DICOM UID (PS3.5 9.1)")
    return str(text)


def check_study_date(text: str) -> str:
    """``YYYYMMDD`` or ``YYYYMMDD-YYYYMMDD`` (a QIDO-RS date range, PS3.18 8.3.4.6.1 / PS3.4 C.2.2.2.5)."""
    parts = text.split("-")
    try:
        days = [dt.datetime.strptime(p, "%Y%m%d").date() for p in parts if len(p) == 8 and p.isdigit()]
    except ValueError:
        days = []
    if len(parts) not in (1, 2) or len(days) != len(parts) or (len(days) == 2 and days[0] > days[1]):
        raise InputError(f"study date {text!r}: expected YYYYMMDD or YYYYMMDD-YYYYMMDD (first ≤ last)")
    return text


@dataclass(frozen=True)
class PullLimits:
    """Caps on what a server may send (defaults sized for CT: a 0.5 mm chest-abdomen series is ~1500 slices
    of 0.5 MB)."""

    instances: int = 5000
    instance_bytes: int = 1 * GIB
    series_bytes: int = 2 * GIB
    query_bytes: int = 16 * 1024 * 1024
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("instances", "instance_bytes", "series_bytes", "query_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(
                    f"pull limits: {name} must be a positive integer, got {getattr(self, name)!r}"
                )

    @classmethod
    def parse(cls, text: str | None) -> PullLimits:
        """``instances=5000,series-gb=2,instance-gb=1``; None or empty: the defaults."""
        if not text:
            return cls()
        keys = {
            "instances": ("instances", 1),
            "series-gb": ("series_bytes", GIB),
            "instance-gb": ("instance_bytes", GIB),
        }
        values = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            if key.strip() not in keys:
                raise InputError(f"pull limits {text!r}: unknown key {key.strip()!r}; use {', '.join(keys)}")
            name, scale = keys[key.strip()]
            try:
                values[name] = int(float(value) * scale)
            except ValueError:
                raise InputError(f"pull limits {text!r}: {key.strip()} needs a number") from None
        return cls(**values)


@dataclass(frozen=True)
class SeriesRef:
    """A series found by QIDO-RS (its UIDs checked; the other fields are the server's, for display)."""

    study_uid: str
    series_uid: str
    modality: str
    series_number: str = ""
    description: str = ""
    study_date: str = ""


def _value(item: object, tag: str) -> str:
    """First value of ``tag`` in a DICOM JSON object (PS3.18 F.2.2), as text; ``""`` when absent."""
    element = item.get(tag) if isinstance(item, dict) else None
    values = element.get("Value") if isinstance(element, dict) else None
    if isinstance(values, list) and values and isinstance(values[0], (str, int, float)):
        return str(values[0])[:256]
    return ""


def _request(
    session: requests.Session, url: str, *, params=None, accept: str, timeout: float
) -> requests.Response:
    """GET ``url`` streamed; one-line :class:`DicomwebError` for a network failure or a non-200 answer."""
    try:
        response = session.get(url, params=params, headers={"Accept": accept}, stream=True, timeout=timeout)
    except requests.RequestException as exc:
        cause = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
        raise DicomwebError(f"{url}: {cause.group(1) if cause else exc.__class__.__name__}") from None
    if response.status_code != 200:
        response.close()
        hint = {401: " (credentials missing or wrong)", 403: " (not allowed)", 404: " (not found)"}
        raise DicomwebError(
            f"{url}: HTTP {response.status_code} {response.reason or ''}{hint.get(response.status_code, '')}".strip()
        )
    return response


def _json(session: requests.Session, url: str, params: dict, limits: PullLimits) -> list:
    """A QIDO-RS answer: a JSON list of DICOM JSON objects, read with the ``query_bytes`` cap."""
    with contextlib.closing(
        _request(session, url, params=params, accept="application/dicom+json", timeout=limits.timeout_s)
    ) as rsp:
        data = bytearray()
        for chunk in rsp.iter_content(CHUNK_BYTES):
            data += chunk
            if len(data) > limits.query_bytes:
                raise DicomwebError(f"{url}: QIDO-RS answer larger than {limits.query_bytes} bytes; refused")
    if not data.strip():  # 204 No Content is filtered above; some servers answer 200 with nothing
        return []
    try:
        answer = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError):
        raise DicomwebError(f"{url}: QIDO-RS answer is not JSON") from None
    if not isinstance(answer, list) or not all(isinstance(a, dict) for a in answer):
        raise DicomwebError(f"{url}: QIDO-RS answer is not a list of DICOM JSON objects")
    return answer


def find_series(
    base_url: str,
    *,
    study_uid: str | None = None,
    modality: str = "CT",
    study_date: str | None = None,
    credentials: Credentials | None = None,
    limit: int = 1000,
) -> list[SeriesRef]:
    """Series of ``modality`` in one study (``study_uid``) or in the studies of ``study_date`` (QIDO-RS).

    Args:
        base_url: the DICOMweb root, ``http(s)://host[:port]/path``.
        study_uid: one study; None: search studies by ``study_date`` (all studies when that is None too).
        modality: the series' Modality (0008,0060), also used as ModalitiesInStudy for the study search.
        study_date: ``YYYYMMDD`` or ``YYYYMMDD-YYYYMMDD`` (only without ``study_uid``).
        credentials: for the server (:mod:`medseg.network.credentials`).
        limit: at most this many studies and series per study are asked for (QIDO ``limit``).

    Raises:
        DicomwebError: unreachable server, an HTTP error, an answer that is too large, not DICOM JSON, or
            holds a UID that is not one (named in one line).
    """
    url, _, _ = parse_dicomweb_url(base_url)
    if not _MODALITY.fullmatch(modality):
        raise InputError(f"modality {modality!r}: expected a DICOM code string such as CT")
    limits = PullLimits()
    with contextlib.closing(session_for(credentials)) as session:
        if study_uid is not None:
            studies = [check_uid(study_uid, "Study Instance UID", url)]
        else:
            params = {"ModalitiesInStudy": modality, "limit": str(limit)}
            if study_date:
                params["StudyDate"] = check_study_date(study_date)
            found = _json(session, f"{url}/studies", params, limits)
            studies = list(
                dict.fromkeys(
                    check_uid(_value(s, STUDY_UID), "Study Instance UID", f"{url}/studies") for s in found
                )
            )
        series = []
        for study in studies[:limit]:
            where = f"{url}/studies/{study}/series"
            for item in _json(session, where, {"Modality": modality, "limit": str(limit)}, limits)[:limit]:
                uid = check_uid(_value(item, SERIES_UID), "Series Instance UID", where)
                answered_study = _value(item, STUDY_UID)
                if answered_study and answered_study != study:
                    raise DicomwebError(
                        f"{where}: series {uid} belongs to study {answered_study[:64]!r}; refused"
                    )
                if _value(item, MODALITY_TAG) not in ("", modality):
                    continue  # the server ignored the Modality filter
                series.append(
                    SeriesRef(study, uid, modality, _value(item, _SERIES_NUMBER), _value(item, _SERIES_DESCRIPTION),
                              _value(item, _STUDY_DATE))
                )  # fmt: skip
    return list({(s.study_uid, s.series_uid): s for s in series}.values())


def _boundary(response: requests.Response, url: str) -> bytes:
    """The boundary parameter of a ``multipart/related`` Content-Type (RFC 2046 5.1.1)."""
    content_type = response.headers.get("Content-Type", "")
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/related":
        raise DicomwebError(f"{url}: expected a multipart/related answer, got {content_type[:80]!r}")
    match = re.search(r'boundary\s*=\s*(?:"([^"]*)"|([^;\s]+))', params, re.IGNORECASE)
    boundary = (match.group(1) or match.group(2)) if match else ""
    if not _BOUNDARY.fullmatch(boundary or ""):
        raise DicomwebError(f"{url}: the multipart answer has no valid boundary")
    return boundary.encode("ascii")


class _Stream:
    """The decoded body in chunks, counted against the series cap."""

    def __init__(self, response: requests.Response, cap: int, where: str) -> None:
        self.chunks = response.iter_content(CHUNK_BYTES)
        self.buf = bytearray(b"\r\n")  # so that a delimiter at the very start matches CRLF--boundary
        self.total, self.cap, self.where = 0, cap, where

    def more(self) -> None:
        chunk = next(self.chunks, None)
        if chunk is None:
            raise DicomwebError(f"{self.where}: the multipart answer ends before its closing boundary")
        self.total += len(chunk)
        if self.total > self.cap:
            raise DicomwebError(f"{self.where}: the series is larger than {self.cap} bytes; refused")
        self.buf += chunk


def _parts(stream: _Stream, boundary: bytes, limits: PullLimits, folder: Path) -> Iterator[Path]:
    """Split a multipart/related body into one temporary file per part (in ``folder``), yielded in turn."""
    sep = b"\r\n--" + boundary
    buf, where = stream.buf, stream.where
    while (pos := buf.find(sep)) < 0:  # preamble
        if len(buf) > _MAX_PREAMBLE_BYTES:
            raise DicomwebError(f"{where}: no multipart boundary in the first {_MAX_PREAMBLE_BYTES} bytes")
        stream.more()
    del buf[: pos + len(sep)]
    count = 0
    while True:
        while len(buf) < 2:
            stream.more()
        if buf[:2] == b"--":
            return  # close delimiter; the epilogue is not read
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > _MAX_HEADER_BYTES:
                raise DicomwebError(f"{where}: a multipart header is longer than {_MAX_HEADER_BYTES} bytes")
            stream.more()
        headers = bytes(buf[:end]).decode("latin-1").split("\r\n")[1:]
        del buf[: end + 4]
        types = [
            h.partition(":")[2].strip().lower() for h in headers if h.lower().startswith("content-type:")
        ]
        if not types or types[0].split(";")[0].strip() != "application/dicom":
            raise DicomwebError(
                f"{where}: a part is {(types or ['untyped'])[0][:60]!r}, not application/dicom"
            )
        count += 1
        if count > limits.instances:
            raise DicomwebError(f"{where}: more than {limits.instances} instances in the series; refused")
        fd, name = tempfile.mkstemp(prefix=temp_prefix(folder / "instance.dcm"), suffix=".dcm", dir=folder)
        size = 0
        with os.fdopen(fd, "wb") as out:
            while (pos := buf.find(sep)) < 0:
                keep = len(sep) - 1
                if len(buf) > keep:
                    out.write(buf[:-keep])
                    size += len(buf) - keep
                    del buf[:-keep]
                if size > limits.instance_bytes:
                    raise DicomwebError(
                        f"{where}: an instance is larger than {limits.instance_bytes} bytes; refused"
                    )
                stream.more()
            out.write(buf[:pos])
            size += pos
            del buf[: pos + len(sep)]
        if size > limits.instance_bytes:
            raise DicomwebError(f"{where}: an instance is larger than {limits.instance_bytes} bytes; refused")
        yield Path(name)


def _place(part: Path, study_uid: str, series_uid: str, series_dir: Path, where: str) -> str:
    """Check a received part's header; rename it to ``<sop_uid>.dcm``; return the SOP Instance UID."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's complaints about bad values: the checks below decide
            ds = pydicom.dcmread(part, stop_before_pixels=True, defer_size=1024,
                                 specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])  # fmt: skip
            ds.file_meta.TransferSyntaxUID  # noqa: B018 - a Part 10 file has file meta information
            got = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    except Exception:
        raise DicomwebError(
            f"{where}: a part is not a DICOM Part 10 file with study, series and SOP UIDs"
        ) from None
    sop = check_uid(got[2], "SOP Instance UID", where)
    if got[:2] != (study_uid, series_uid):
        raise DicomwebError(
            f"{where}: instance {sop} belongs to study {got[0][:64]} series {got[1][:64]}, not the one asked for; refused"
        )
    target = series_dir / f"{sop}.dcm"
    if target.exists():
        raise DicomwebError(f"{where}: instance {sop} was sent twice; refused")
    os.replace(part, target)
    return sop


def retrieve_series(
    base_url: str,
    study_uid: str,
    series_uid: str,
    folder: str | os.PathLike,
    *,
    credentials: Credentials | None = None,
    limits: PullLimits = PullLimits(),
) -> Path:
    """Fetch one series by WADO-RS into ``<folder>/<series_uid>/<sop_uid>.dcm`` (see the module docstring).

    Returns:
        The series folder.

    Raises:
        DicomwebError: the server is unreachable or answers with an error, or sends something refused;
            the series folder is removed.
        InputError: ``<folder>/<series_uid>`` exists already.
    """
    url, _, _ = parse_dicomweb_url(base_url)
    study_uid = check_uid(study_uid, "Study Instance UID", url)
    series_uid = check_uid(series_uid, "Series Instance UID", url)
    where = f"{url}/studies/{study_uid}/series/{series_uid}"
    series_dir = Path(folder) / series_uid
    Path(folder).mkdir(parents=True, exist_ok=True)
    try:
        series_dir.mkdir()
    except FileExistsError:
        raise InputError(f"{series_dir}: exists already; remove it or retrieve into another folder") from None
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    try:
        with contextlib.closing(session_for(credentials)) as session:
            response = _request(session, where, accept=accept, timeout=limits.timeout_s)
            with contextlib.closing(response):
                stream = _Stream(response, limits.series_bytes, where)
                sops = [_place(p, study_uid, series_uid, series_dir, where)
                        for p in _parts(stream, _boundary(response, where), limits, series_dir)]  # fmt: skip
        if not sops:
            raise DicomwebError(f"{where}: the server sent no instance")
    except requests.RequestException as exc:
        shutil.rmtree(series_dir, ignore_errors=True)
        raise DicomwebError(f"{where}: the transfer broke off ({exc.__class__.__name__})") from None
    except BaseException:
        shutil.rmtree(series_dir, ignore_errors=True)
        raise
    return series_dir
