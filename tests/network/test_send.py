"""send_files against real peers: Orthanc (C-STORE and STOW-RS, read back by DICOMweb and checked voxel for
voxel), pynetdicom Storage SCPs that are down, come up late, reject, fail or warn, and a scripted HTTP peer."""

from __future__ import annotations

import json
import time

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, SegmentationStorage

from medseg.export.dicom_seg import SegOptions, write_dicom_seg
from medseg.export.seg_check import check_seg_round_trip
from medseg.io.dicom import find_series, read_series
from medseg.network.send import SendError, SendPolicy, send_files
from medseg.testing.orthanc import free_port

from .fake_server import FakeServer

LABEL_MAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
FAST = {"backoff_s": 0.02, "timeout_s": 5.0}


@pytest.fixture
def two_segs(phantom_seg, tmp_path):
    """The BINARY SEG and a LABELMAP SEG (Label Map Segmentation Storage) of the same label map."""
    report, written, labels, _, names = phantom_seg
    volume = read_series(find_series(written.files[0].parent)[0])
    labelmap = write_dicom_seg(
        labels,
        volume,
        names,
        tmp_path / "out" / "case_seg_lm.dcm",
        options=SegOptions(segmentation_type="LABELMAP"),
    )
    assert pydicom.dcmread(labelmap.path).SOPClassUID == LABEL_MAP_SEG
    return report, labelmap


def _check_voxels(ds, report, written, labels, affine, names):
    segments = {number: names[name] for name, number in report.segments.items()}
    check_seg_round_trip(ds, labels, affine, segments, written.sop_instance_uids)
    assert ds.StudyInstanceUID == written.study_uid
    assert ds.FrameOfReferenceUID == written.frame_of_reference_uid


def test_c_store_to_orthanc_then_read_back_by_dicomweb_voxel_for_voxel(orthanc, phantom_seg, two_segs):
    report, written, labels, affine, names = phantom_seg
    _, labelmap = two_segs
    dest = f"dimse://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
    result = send_files([report.path, labelmap.path], dest, SendPolicy(attempts=1))
    assert set(result.delivered) == {report.sop_instance_uid, labelmap.sop_instance_uid}
    assert result.attempts == 1 and result.warnings == ()
    assert str(result.destination) == dest

    client = DICOMwebClient(orthanc.dicomweb_url)
    found = client.search_for_series(written.study_uid, search_filters={"Modality": "SEG"})
    assert len(found) == 2
    for seg in (report, labelmap):
        ds = client.retrieve_instance(written.study_uid, seg.series_instance_uid, seg.sop_instance_uid)
        _check_voxels(ds, seg, written, labels, affine, names)


def test_stow_rs_to_orthanc_then_read_back_voxel_for_voxel(orthanc, phantom_seg):
    report, written, labels, affine, names = phantom_seg
    result = send_files([report.path], orthanc.dicomweb_url + "/", SendPolicy(attempts=1))
    assert result.delivered == (report.sop_instance_uid,) and result.attempts == 1
    assert orthanc.sop_instance_uids() == {report.sop_instance_uid}
    ds = DICOMwebClient(orthanc.dicomweb_url).retrieve_instance(
        written.study_uid, report.series_instance_uid, report.sop_instance_uid
    )
    _check_voxels(ds, report, written, labels, affine, names)


def test_stow_rs_wrong_root_is_permanent(orthanc, phantom_seg):
    report = phantom_seg[0]
    with pytest.raises(SendError) as info:
        send_files([report.path], orthanc.http_url + "/no-dicom-web", SendPolicy(attempts=5, **FAST))
    assert info.value.permanent and info.value.attempts == 1 and "HTTP 404" in str(info.value)


def test_policy_backoff_doubles_up_to_the_cap():
    policy = SendPolicy(backoff_s=1.0, max_backoff_s=5.0)
    assert [policy.delay(a) for a in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    jittered = SendPolicy(backoff_s=1.0, jitter=True)
    assert all(0.5 * 2 ** (a - 1) <= jittered.delay(a) <= 2 ** (a - 1) for a in range(1, 5))
    for bad in ({"attempts": 0}, {"backoff_s": -1.0}, {"timeout_s": 0.0}, {"calling_ae": "X" * 17}):
        with pytest.raises(ValueError):
            SendPolicy(**bad)


class StorageSCP:
    """A pynetdicom Storage SCP on 127.0.0.1 answering C-STORE with ``statuses`` in turn (then 0x0000)."""

    def __init__(self, port: int, statuses=(), sop_classes=(SegmentationStorage, LABEL_MAP_SEG), handlers=()):
        self.received: list[str] = []
        self.statuses = list(statuses)
        ae = AE(ae_title="STORESCP")
        ae.require_called_aet = True
        for sop in sop_classes:
            ae.add_supported_context(sop)
        events = [(evt.EVT_C_STORE, self._store), *handlers]
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=events)

    def _store(self, event) -> int:
        self.received.append(event.request.AffectedSOPInstanceUID)
        return self.statuses.pop(0) if self.statuses else 0x0000

    def close(self) -> None:
        self.server.shutdown()


def test_down_peer_fails_after_n_attempts_with_backoff(phantom_seg):
    port = free_port()  # nothing listens there
    lines = []
    start = time.monotonic()
    with pytest.raises(SendError) as info:
        send_files(
            [phantom_seg[0].path],
            f"dimse://STORESCP@127.0.0.1:{port}",
            SendPolicy(attempts=3, **FAST),
            log=lines.append,
        )
    assert time.monotonic() - start >= 0.02 + 0.04  # two waits, doubling
    assert info.value.attempts == 3 and not info.value.permanent and info.value.delivered == ()
    assert "Connection refused" in str(info.value) and "after 3 attempt(s)" in str(info.value)
    assert [line.split(" failed")[0] for line in lines] == [
        f"dimse://STORESCP@127.0.0.1:{port}: attempt {a} of 3" for a in (1, 2)
    ]
    assert "retrying in 0.0 s" in lines[0] or "retrying in 0.1 s" in lines[1]


def test_peer_that_comes_up_between_attempts_gets_the_files(two_segs):
    seg, labelmap = two_segs
    port = free_port()
    scps = []

    def start_scp_on_first_failure(line: str) -> None:
        if not scps:
            scps.append(StorageSCP(port))

    try:
        result = send_files(
            [seg.path, labelmap.path], f"dimse://STORESCP@127.0.0.1:{port}", SendPolicy(attempts=4, **FAST),
            log=start_scp_on_first_failure,
        )  # fmt: skip
    finally:
        for scp in scps:
            scp.close()
    assert result.attempts == 2
    assert sorted(scps[0].received) == sorted([seg.sop_instance_uid, labelmap.sop_instance_uid])


def test_rejected_association_is_permanent_and_not_retried(phantom_seg):
    port = free_port()
    scp = StorageSCP(port)
    try:
        with pytest.raises(SendError) as info:
            send_files(
                [phantom_seg[0].path], f"dimse://WRONG@127.0.0.1:{port}", SendPolicy(attempts=5, **FAST)
            )
    finally:
        scp.close()
    assert info.value.permanent and info.value.attempts == 1
    assert "rejected permanently" in str(info.value) and "Called AE title not recognised" in str(info.value)
    assert scp.received == []


def test_transiently_rejected_association_is_retried(phantom_seg):
    """A busy peer (its association limit reached) rejects transiently (PS3.8 9.3.4: result 2, local limit
    exceeded): that is retried, and fails once the attempts are spent."""
    port = free_port()
    scp = StorageSCP(port)
    scp.server.ae.maximum_associations = 1
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(SegmentationStorage)
    held = holder.associate("127.0.0.1", port, ae_title="STORESCP")
    assert held.is_established
    try:
        with pytest.raises(SendError) as info:
            send_files(
                [phantom_seg[0].path], f"dimse://STORESCP@127.0.0.1:{port}", SendPolicy(attempts=2, **FAST)
            )
    finally:
        held.release()
        scp.close()
    assert not info.value.permanent and info.value.attempts == 2
    assert "rejected transiently" in str(info.value) and "Local limit exceeded" in str(info.value)


def test_failure_statuses_permanent_transient_and_warnings(two_segs):
    seg, labelmap = two_segs
    port = free_port()
    dest = f"dimse://STORESCP@127.0.0.1:{port}"
    files = [seg.path, labelmap.path]
    # 0xA900: permanent, first file refused, nothing retried
    scp = StorageSCP(port, statuses=[0xA900])
    try:
        with pytest.raises(SendError) as info:
            send_files(files, dest, SendPolicy(attempts=5, **FAST))
    finally:
        scp.close()
    assert info.value.permanent and info.value.attempts == 1 and len(scp.received) == 1
    assert "0xA900 (data set does not match SOP class)" in str(info.value)
    # 0xA700 on the second file: retried, and only the missing file is sent again
    scp = StorageSCP(port, statuses=[0x0000, 0xA700])
    try:
        result = send_files(files, dest, SendPolicy(attempts=3, **FAST))
    finally:
        scp.close()
    first, second = (str(pydicom.dcmread(f).SOPInstanceUID) for f in files)
    assert result.attempts == 2 and scp.received == [first, second, second]
    assert result.delivered == (first, second)
    # warnings are delivered and recorded
    scp = StorageSCP(port, statuses=[0xB000, 0xB007])
    try:
        result = send_files(files, dest, SendPolicy(attempts=1))
    finally:
        scp.close()
    assert result.warnings == (
        f"{first}: C-STORE warning 0xB000 (coercion of data elements)",
        f"{second}: C-STORE warning 0xB007 (data set does not match SOP class)",
    )


def test_peer_without_a_context_for_seg_is_permanent(phantom_seg):
    port = free_port()
    scp = StorageSCP(port, sop_classes=(CTImageStorage,))
    try:
        with pytest.raises(SendError) as info:
            send_files(
                [phantom_seg[0].path], f"dimse://STORESCP@127.0.0.1:{port}", SendPolicy(attempts=3, **FAST)
            )
    finally:
        scp.close()
    assert info.value.permanent and "no presentation context" in str(info.value)


def test_stow_rs_retries_5xx_and_reads_failed_sop_sequence(phantom_seg):
    report = phantom_seg[0]
    answers = [503, 200]

    def respond(method, path, headers, body):
        assert method == "POST" and path == "/dicom-web/studies"
        assert headers["Authorization"] == "Bearer t0k"
        status = answers.pop(0)
        if status != 200:
            return status, {}, b"busy"
        assert report.sop_instance_uid.encode() in body
        ok = {
            "00081199": {
                "vr": "SQ",
                "Value": [{"00081155": {"vr": "UI", "Value": [report.sop_instance_uid]}}],
            }
        }
        return 200, {"Content-Type": "application/dicom+json"}, json.dumps(ok).encode()

    from medseg.network.credentials import Credentials

    with FakeServer(respond) as server:
        result = send_files(
            [report.path],
            server.url,
            SendPolicy(attempts=3, **FAST),
            credentials=Credentials("test", token="t0k"),
        )
    assert result.attempts == 2 and result.delivered == (report.sop_instance_uid,)

    def refuse(method, path, headers, body):
        failed = {"00081198": {"vr": "SQ", "Value": [{
            "00081155": {"vr": "UI", "Value": [report.sop_instance_uid]}, "00081197": {"vr": "US", "Value": [0xC000]},
        }]}}  # fmt: skip
        return 409, {"Content-Type": "application/dicom+json"}, json.dumps(failed).encode()

    with FakeServer(refuse) as server, pytest.raises(SendError) as info:
        send_files([report.path], server.url, SendPolicy(attempts=3, **FAST))
    assert info.value.permanent and info.value.attempts == 1
    assert "HTTP 409" in str(info.value) and "0xC000 (cannot understand)" in str(info.value)
