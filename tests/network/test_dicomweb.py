"""The DICOMweb pull client against a real Orthanc (QIDO by study and by date range, WADO-RS byte for byte)
and against a hostile server: bad UIDs, foreign instances, oversized or malformed answers are refused in one
line and leave nothing behind."""

from __future__ import annotations

import filecmp
import json

import numpy as np
import pydicom
import pytest

from medseg.io import InputError
from medseg.network.credentials import Credentials
from medseg.network.dicomweb import DicomwebError, PullLimits, find_series, is_dicom_uid, retrieve_series
from medseg.network.pull import PullQuery, pulled_series
from medseg.testing.dicom_series import write_ct_series

from .fake_server import FakeServer, multipart

STUDY, SERIES = "1.2.3.4", "1.2.3.4.5"


@pytest.mark.parametrize(
    ("uid", "ok"),
    [("1.2.840.10008.1.2", True), ("0.1", True), ("1.02.3", False), ("1..2", False), ("1.2.", False),
     ("1.2.a", False), ("../../etc", False), ("1." + "2" * 63, False), ("", False), (12, False)],
)  # fmt: skip
def test_dicom_uid_rules(uid, ok):
    assert is_dicom_uid(uid) is ok


@pytest.fixture
def two_studies(orthanc, tmp_path):
    """Orthanc holding a January CT study (with a non-CT series) and a March CT study."""
    volume = np.full((16, 16, 4), -500, np.int16)
    jan = write_ct_series(volume, np.eye(4), tmp_path / "jan", study_date="20240115", patient_id="P1")
    mar = write_ct_series(volume, np.eye(4), tmp_path / "mar", study_date="20240301", patient_id="P2")
    mr = write_ct_series(
        volume, np.eye(4), tmp_path / "mr", modality="MR", study_uid=jan.study_uid, series_number=2
    )
    orthanc.upload([*jan.files, *mar.files, *mr.files])
    return jan, mar


def test_find_and_retrieve_from_orthanc(orthanc, two_studies, tmp_path):
    jan, mar = two_studies
    by_study = find_series(orthanc.dicomweb_url, study_uid=jan.study_uid)
    assert [(s.study_uid, s.series_uid) for s in by_study] == [(jan.study_uid, jan.series_uid)]  # MR left out
    by_date = find_series(orthanc.dicomweb_url, study_date="20240101-20240131")
    assert [s.series_uid for s in by_date] == [jan.series_uid]
    assert {s.series_uid for s in find_series(orthanc.dicomweb_url, study_date="20240101-20241231")} == {
        jan.series_uid, mar.series_uid,
    }  # fmt: skip
    assert find_series(orthanc.dicomweb_url, study_date="20230101") == []

    folder = retrieve_series(orthanc.dicomweb_url, jan.study_uid, jan.series_uid, tmp_path / "pull")
    assert folder == tmp_path / "pull" / jan.series_uid
    for sop, original in zip(jan.sop_instance_uids, jan.files, strict=True):
        assert filecmp.cmp(folder / f"{sop}.dcm", original, shallow=False)  # byte for byte, as stored
    assert len(list(folder.iterdir())) == len(jan.files)
    with pytest.raises(InputError, match="exists already"):
        retrieve_series(orthanc.dicomweb_url, jan.study_uid, jan.series_uid, tmp_path / "pull")


def test_pulled_series_folder_is_removed_afterwards_even_on_error(orthanc, two_studies, tmp_path):
    jan, _ = two_studies
    out = tmp_path / "out"
    query = PullQuery(f"dicomweb+{orthanc.dicomweb_url}", study_date="20240101-20240131")
    with pulled_series(query, out, log=lambda _: None) as folder:
        assert folder.parent == out and folder.name.startswith(".dicomweb-")
        assert {p.name for p in folder.iterdir()} == {jan.series_uid, "owner"}
    assert list(out.iterdir()) == []
    with pytest.raises(RuntimeError, match="boom"), pulled_series(query, out, log=lambda _: None):
        raise RuntimeError("boom")
    assert list(out.iterdir()) == []
    stale = out / ".dicomweb-deadbeef"
    stale.mkdir()
    (stale / "owner").write_text(f"999999999 {__import__('socket').gethostname()}\n")  # a dead writer
    with pulled_series(query, out, log=lambda _: None):
        assert not stale.exists()
    with pytest.raises(InputError, match="no CT series"):
        with pulled_series(
            PullQuery(f"dicomweb+{orthanc.dicomweb_url}", study_date="19990101"), out, log=print
        ):
            pass
    for bad in ({"study_uid": "1.02"}, {}, {"study_uid": "1.2", "study_date": "20240101"}, {"study_date": "20240230"},
                {"study_date": "20240301-20240101"}):  # fmt: skip
        with pytest.raises(InputError):
            PullQuery(f"dicomweb+{orthanc.dicomweb_url}", **bad)


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    """Three CT slice files of series SERIES in study STUDY, and one of another series, as bytes."""
    root = tmp_path_factory.mktemp("hostile")
    volume = np.full((8, 8, 3), -500, np.int16)
    ours = write_ct_series(volume, np.eye(4), root / "a", study_uid=STUDY, series_uid=SERIES)
    other = write_ct_series(volume[..., :1], np.eye(4), root / "b", study_uid=STUDY, series_uid="1.2.3.4.6")
    return [f.read_bytes() for f in ours.files], other.files[0].read_bytes(), ours.sop_instance_uids


def _with_sop(data: bytes, sop: str) -> bytes:
    """``data`` with another (possibly invalid) SOP Instance UID; pydicom's warnings about it are expected."""
    import warnings
    from io import BytesIO

    ds = pydicom.dcmread(BytesIO(data))
    out = BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


MULTI = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b0undary'}


def _hostile_cases(instances):
    ours, other, _ = instances
    huge = (b"x" * 65536 for _ in range(64))  # 4 MiB streamed, never ending with a boundary
    return {
        "foreign series": (200, MULTI, multipart([ours[0], other]), "not the one asked for"),
        "bad SOP UID": (200, MULTI, multipart([_with_sop(ours[0], "1.2/../../x")]), "not a valid DICOM UID"),
        "duplicate": (200, MULTI, multipart([ours[0], ours[0]]), "sent twice"),
        "too many": (200, MULTI, multipart(ours), "more than 2 instances"),
        "oversized instance": (
            200,
            MULTI,
            multipart([ours[0] + b"\0" * 300_000]),
            "larger than 200000 bytes",
        ),
        "oversized stream": (
            200,
            MULTI,
            (c for c in [b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n", *huge]),
            "larger than",
        ),
        "truncated": (200, MULTI, multipart(ours[:1])[:-40], "ends before its closing boundary"),
        "not multipart": (
            200,
            {"Content-Type": "application/dicom"},
            ours[0],
            "expected a multipart/related",
        ),
        "not dicom": (200, MULTI, multipart([b"hello"]), "not a DICOM Part 10 file"),
        "wrong part type": (
            200,
            MULTI,
            multipart([ours[0]], content_type="text/html"),
            "not application/dicom",
        ),
        "no instance": (200, MULTI, b"--b0undary--\r\n", "sent no instance"),
        "server error": (500, {}, b"oops", "HTTP 500"),
    }


@pytest.mark.parametrize(
    "case",
    ["foreign series", "bad SOP UID", "duplicate", "too many", "oversized instance", "oversized stream",
     "truncated", "not multipart", "not dicom", "wrong part type", "no instance", "server error"],
)  # fmt: skip
def test_hostile_wado_answers_are_refused_and_leave_nothing(instances, tmp_path, case):
    status, headers, body, needle = _hostile_cases(instances)[case]
    limits = PullLimits(instances=2, instance_bytes=200_000, series_bytes=1_000_000)
    with FakeServer(lambda *_: (status, headers, body)) as server:
        with pytest.raises(DicomwebError) as info:
            retrieve_series(server.url, STUDY, SERIES, tmp_path / "pull", limits=limits)
    message = str(info.value)
    assert needle in message and "\n" not in message and server.url in message
    assert list((tmp_path / "pull").iterdir()) == []


def test_hostile_answer_within_limits_is_accepted_as_a_control(instances, tmp_path):
    ours, _, sops = instances
    body = b"preamble\r\n" + multipart(ours) + b"epilogue"
    with FakeServer(lambda *_: (200, MULTI, body)) as server:
        folder = retrieve_series(server.url, STUDY, SERIES, tmp_path / "pull")
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s}.dcm" for s in sops)


@pytest.mark.parametrize(
    ("answer", "needle"),
    [
        ([{"0020000E": {"vr": "UI", "Value": ["../../etc"]}}], "not a valid DICOM UID"),
        (
            [{"0020000E": {"vr": "UI", "Value": [SERIES]}, "0020000D": {"vr": "UI", "Value": ["9.9"]}}],
            "belongs to study",
        ),
        ({"not": "a list"}, "not a list of DICOM JSON objects"),
        ("x" * 3000, "larger than"),
    ],
)
def test_hostile_qido_answers_are_refused(answer, needle, monkeypatch):
    import medseg.network.dicomweb as dicomweb

    monkeypatch.setattr(dicomweb, "PullLimits", lambda: PullLimits(query_bytes=2000))
    seen = []

    def respond(method, path, headers, body):
        seen.append(headers.get("Authorization"))
        if headers.get("Authorization") != "Bearer t0k":
            return 401, {}, b""
        return 200, {"Content-Type": "application/dicom+json"}, json.dumps(answer).encode()

    with FakeServer(respond) as server:
        with pytest.raises(DicomwebError, match="HTTP 401"):
            find_series(server.url, study_uid=STUDY)
        with pytest.raises(DicomwebError) as info:
            find_series(server.url, study_uid=STUDY, credentials=Credentials("test", token="t0k"))
    assert needle in str(info.value) and "\n" not in str(info.value)
