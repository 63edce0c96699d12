"""The Storage SCP with real pynetdicom peers on 127.0.0.1: what it accepts at association time, each C-STORE
status it answers, and that a bad peer never stops it serving the others."""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless
from pynetdicom import AE, _config
from pynetdicom.sop_class import BasicTextSRStorage, CTImageStorage, MRImageStorage, Verification

from medseg.io.dicom import find_series
from medseg.node.scp import StorageScp

from .conftest import send, small_ct

ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x03, 0x04


def _spooled(scp: StorageScp) -> list[Path]:
    return sorted(p for p in scp.spool.rglob("*") if p.is_file())


def _send_file_as_is(port: int, path: Path, context=CTImageStorage) -> int:
    """C-STORE the file's bytes as they are (pynetdicom's chunked mode reads only the file meta)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return send(port, [path], context=context)[0]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def test_accepts_a_ct_series_into_the_spool_and_the_store(tmp_path, node):
    scp = node()
    written = small_ct(tmp_path / "ct")
    assert send(scp.port, written.files) == [0] * len(written.files)
    study, series = written.study_uid, written.series_uid
    assert _spooled(scp) == sorted(scp.spool / study / series / f"{u}.dcm" for u in written.sop_instance_uids)
    assert scp.store.series_instances(series) == len(written.files)
    assert scp.store.jobs()[0].state == "receiving"
    row = scp.store.db.execute("SELECT calling_ae, peer, size FROM instances LIMIT 1").fetchone()
    assert (row[0], row[1]) == ("SCU", "127.0.0.1") and row[2] > 0
    (info,) = find_series(scp.spool)  # the spooled files are the series, as the batch core reads it
    assert info.usable and info.sop_instance_uids == tuple(written.sop_instance_uids)


def test_compressed_rle_is_accepted_and_read_back(tmp_path, node):
    scp = node()
    written = small_ct(tmp_path / "ct", transfer_syntax="rle")
    assert send(scp.port, written.files, ts=[RLELossless]) == [0] * len(written.files)
    (info,) = find_series(scp.spool)
    assert info.usable and pydicom.dcmread(info.files[0]).file_meta.TransferSyntaxUID == RLELossless


def test_other_sop_classes_and_transfer_syntaxes_are_refused_at_association(node):
    scp = node()
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage, [JPEG2000Lossless])  # medseg is not tested to read it
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(BasicTextSRStorage)  # not an image at all
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port)
    assert assoc.is_established
    results = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
    assert results == {
        CTImageStorage: TRANSFER_SYNTAXES_NOT_SUPPORTED,
        MRImageStorage: ABSTRACT_SYNTAX_NOT_SUPPORTED,
        BasicTextSRStorage: ABSTRACT_SYNTAX_NOT_SUPPORTED,
    }
    assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [Verification]
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_unknown_calling_ae_and_unknown_host_are_rejected(tmp_path, node):
    written = small_ct(tmp_path / "ct")
    scp = node(allow_ae=("PACS",))
    assert send(scp.port, written.files[:1], calling_ae="INTRUDER") == []
    assert send(scp.port, written.files[:1], calling_ae="PACS") == [0]
    other = node(allow_host=("10.1.2.3",))
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", other.port)
    assert assoc.is_rejected and not assoc.is_established
    assert not _spooled(other) or _spooled(other) == _spooled(scp)


def test_quota_answers_a700_before_writing_and_the_node_keeps_serving(tmp_path, node):
    written = small_ct(tmp_path / "ct")
    size = written.files[0].stat().st_size
    scp = node(quota_bytes=int(size * 3.5))
    statuses = send(scp.port, written.files)
    assert statuses[:3] == [0, 0, 0] and set(statuses[3:]) == {0xA700}
    assert len(_spooled(scp)) == 3 and scp.store.spool_bytes() <= size * 3.5
    ae = AE(ae_title="SCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port)
    assert assoc.send_c_echo().Status == 0  # still serving
    assoc.release()


def test_free_disk_reserve_answers_a700(tmp_path, node):
    scp = node(min_free_bytes=2**62)  # more than any disk has free
    written = small_ct(tmp_path / "ct")
    assert send(scp.port, written.files[:2]) == [0xA700, 0xA700] and not _spooled(scp)


def test_max_series_instances_refuses_the_series_not_the_others(tmp_path, node):
    scp = node(max_series_instances=3)
    big = small_ct(tmp_path / "big", series_number=1)
    statuses = send(scp.port, big.files)
    assert statuses[:3] == [0, 0, 0] and set(statuses[3:]) == {0xA700}
    (job,) = scp.store.jobs()
    assert job.state == "refused" and "more than 3 instances" in job.reason
    small = small_ct(tmp_path / "small", shape=(24, 24, 3), series_number=2)
    assert send(scp.port, small.files) == [0, 0, 0]


def test_corrupt_dataset_answers_c000(tmp_path, node):
    scp = node()
    good = small_ct(tmp_path / "ct").files[0]
    raw = good.read_bytes()
    ds = pydicom.dcmread(good)
    meta_end = 132 + 12 + ds.file_meta.FileMetaInformationGroupLength
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(raw[:meta_end] + b"\x08\x00\x16\x00\xff\xff\xff\x7f" + b"garbage" * 10)
    assert _send_file_as_is(scp.port, broken) == 0xC000
    assert not _spooled(scp) and not scp.store.jobs()
    assert send(scp.port, [good]) == [0]  # the same association's peer may go on


def test_invalid_uids_never_reach_a_path(tmp_path, node):
    scp = node()
    path = small_ct(tmp_path / "ct").files[0]
    ds = pydicom.dcmread(path)
    ds.SeriesInstanceUID = "../../../../tmp/evil"
    evil = tmp_path / "evil.dcm"
    ds.save_as(evil)
    assert _send_file_as_is(scp.port, evil) == 0xC000
    assert not _spooled(scp) and not (Path("/tmp") / "evil").exists()
    ds.SeriesInstanceUID = "1.2.03"  # leading zero in a component: not a UID (PS3.5 9.1)
    ds.save_as(evil)
    assert _send_file_as_is(scp.port, evil) == 0xC000


def test_sop_instance_must_match_the_command_and_sop_class_must_be_ct(tmp_path, node):
    scp = node()
    path = small_ct(tmp_path / "ct").files[0]
    ds = pydicom.dcmread(path)
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"  # pynetdicom takes the command's UID from here
    other = tmp_path / "other.dcm"
    ds.save_as(other)
    assert _send_file_as_is(scp.port, other) == 0xC000
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = BasicTextSRStorage  # a non-image SOP class inside a CT C-STORE
    ds.save_as(other)
    assert _send_file_as_is(scp.port, other) == 0xA900
    assert not _spooled(scp)


def test_a_bad_peer_does_not_stop_the_server(tmp_path, node):
    scp = node()
    for junk in (b"\x01\x00\x00\x00\xff\xff" + b"x" * 50, b"GET / HTTP/1.1\r\n\r\n", b""):
        with socket.create_connection(("127.0.0.1", scp.port), timeout=5) as sock:
            sock.sendall(junk)
    written = small_ct(tmp_path / "ct")
    assert send(scp.port, written.files) == [0] * len(written.files)


def test_tls(tmp_path, node):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        capture_output=True,
    )  # fmt: skip
    if made.returncode:
        pytest.skip(f"openssl cannot make a test certificate: {made.stderr.decode()[:200]}")
    from medseg.node.scp import tls_context

    scp = node(ssl_context=tls_context(cert, key, None))
    written = small_ct(tmp_path / "ct", shape=(24, 24, 2))
    assert send(scp.port, written.files) == []  # plain DICOM to a TLS port: no association
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", scp.port, tls_args=(client, "localhost"))
    assert assoc.is_established
    assert [assoc.send_c_store(f).Status for f in written.files] == [0, 0]
    assoc.release()
