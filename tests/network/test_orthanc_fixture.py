"""The Orthanc launcher: it starts a real Orthanc on free ports, stores what is uploaded, forwards it by
C-STORE to a pynetdicom Storage SCP, refuses undeclared callers, and leaves the ports free once stopped."""

from __future__ import annotations

import json

import pytest
import requests
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from medseg.testing.orthanc import free_port, port_is_free


def test_orthanc_starts_stores_forwards_and_stops(orthanc, phantom_ct, tmp_path):
    written, _, _ = phantom_ct
    files = [f for f in written.files if f is not None]
    config = json.loads((orthanc.folder / "orthanc.json").read_text())
    assert config["RemoteAccessAllowed"] is False and config["StorageDirectory"].startswith(str(tmp_path))
    assert orthanc.system()["DicomAet"] == "ORTHANC"
    assert requests.get(f"{orthanc.dicomweb_url}/studies", timeout=10).json() == []

    ids = orthanc.upload(files)
    assert len(ids) == len(files)
    assert orthanc.sop_instance_uids() == set(written.sop_instance_uids)

    # Orthanc → a pynetdicom Storage SCP by C-STORE (store_to, synchronous, by Study Instance UID).
    received = []
    scp_ae = AE(ae_title="SCP")
    scp_ae.add_supported_context(CTImageStorage)
    port = free_port()

    def on_store(event):
        received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    scp = scp_ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        orthanc.add_modality("scp", "SCP", "127.0.0.1", port)
        assert "scp" in orthanc.modalities()
        orthanc.store_to("scp", written.study_uid)
    finally:
        scp.shutdown()
    assert sorted(received) == sorted(written.sop_instance_uids)

    http_port, dicom_port, pid = orthanc.http_port, orthanc.dicom_port, orthanc.pid
    assert orthanc.stop() == 0
    assert port_is_free(http_port) and port_is_free(dicom_port)
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)


def test_orthanc_accepts_declared_caller_and_refuses_others(orthanc):
    """C-ECHO from the declared calling AE (MEDSEG at 127.0.0.1) is accepted; an undeclared AE is rejected."""
    for calling, accepted in (("MEDSEG", True), ("STRANGER", False)):
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
        assert assoc.is_established == accepted, calling
        if assoc.is_established:
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
