"""End to end with a real Orthanc: a CT series uploaded to Orthanc by REST is C-STOREd by Orthanc to the node
(``/modalities/{id}/store``); the node segments it and C-STOREs SEG and RTSTRUCT back; they are fetched from
Orthanc by DICOMweb (dicomweb-client) and checked against the node's mask in patient coordinates."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medseg.export.rtstruct_check import check_rtstruct_round_trip
from medseg.export.seg_check import check_seg_round_trip
from medseg.testing.orthanc import free_port, orthanc_available, start_orthanc

from .conftest import NodeProcess, job_states, phantom_ct, wait_for

pytestmark = pytest.mark.slow

SEG, RTSTRUCT = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.481.3"


def test_orthanc_routes_ct_to_the_node_and_gets_seg_and_rtstruct_back(tmp_path, segmenting_run, tiny_dataset):
    if reason := orthanc_available():
        pytest.skip(reason)
    from dicomweb_client.api import DICOMwebClient

    node_port = free_port()
    pacs = start_orthanc(
        tmp_path / "orthanc", modalities={"MEDSEG": ("MEDSEG", "127.0.0.1", node_port)}, aet="ORTHANC"
    )
    node = None
    try:
        workdir = tmp_path / "node"
        args = ["--stable-seconds", "1", "--send", f"dimse://{pacs.aet}@127.0.0.1:{pacs.dicom_port}"]
        args += [
            "--output-type",
            "dicom-seg,dicom-rtstruct",
            "--allow-ae",
            pacs.aet,
            "--port",
            str(node_port),
        ]
        node = NodeProcess(workdir, segmenting_run, *args)  # the last --port wins: the one Orthanc knows
        assert node.port == node_port
        written = phantom_ct(tiny_dataset, tmp_path / "ct", patient_id="ORTH1")
        ids = pacs.upload(written.files)
        pacs.store_to("MEDSEG", ids)  # Orthanc → node, C-STORE, synchronous
        wait_for(lambda: job_states(workdir) == [(1, "done")], timeout=90, what="segmented and sent")
        (side_path,) = (workdir / "outputs").glob("*.json")
        side = json.loads(side_path.read_text())
        mask = nib.load(workdir / "outputs" / f"{side['case']}.nii.gz")

        client = DICOMwebClient(url=pacs.dicomweb_url)
        found = {}
        for series in client.search_for_series(search_filters={"StudyInstanceUID": written.study_uid}):
            uid = series["0020000E"]["Value"][0]
            for inst in client.retrieve_series(written.study_uid, uid):
                found.setdefault(inst.SOPClassUID, []).append(inst)
        assert len(found[SEG]) == 1 and len(found[RTSTRUCT]) == 1  # exactly one of each
        seg, rt = found[SEG][0], found[RTSTRUCT][0]
        for derived in (seg, rt):
            assert derived.StudyInstanceUID == written.study_uid
        assert seg.FrameOfReferenceUID == written.frame_of_reference_uid
        assert rt.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == written.frame_of_reference_uid
        assert seg.SOPInstanceUID == side["exports"]["dicom_seg"]["sop_instance_uid"]

        labels = np.asarray(mask.dataobj)
        names = side["labels"]
        segments = {number: names[name] for name, number in side["exports"]["dicom_seg"]["segments"].items()}
        assert labels.any() and segments
        result = check_seg_round_trip(seg, labels, mask.affine, segments, side["dicom"]["sop_instance_uids"])
        assert result.segments == len(segments)
        present = {n: v for n, v in names.items() if v and (labels == v).any()}
        rois = check_rtstruct_round_trip(rt, labels, mask.affine, written.files, present)
        assert set(rois) == set(present)
    finally:
        if node is not None:
            node.stop()
        pacs.stop(timeout_s=0.5)
