"""End to end: ``medseg segment -i dicomweb+http://… --send …`` against a real Orthanc.

A phantom CT series is uploaded to Orthanc, pulled by QIDO/WADO-RS, segmented with the tiny trained model,
and its DICOM SEG and RT Structure Set are sent back (STOW-RS, and C-STORE for a local input). What Orthanc
then holds is fetched by DICOMweb (dicomweb-client, an independent client) and checked against OUT's mask:
the SEG voxel for voxel, the RTSTRUCT by Dice/HD95 (:func:`medseg.export.rtstruct_check.check_rtstruct_round_trip`).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from typer.testing import CliRunner

from medseg.export.rtstruct_check import check_rtstruct_round_trip
from medseg.export.seg_check import check_seg_round_trip
from medseg.testing.dicom_series import write_ct_series
from pipelines.cli import app
from tests.conftest import TINY_SHAPE

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture
def uploaded(orthanc, tmp_path):
    """A phantom CT (the tiny model's shape, RAS) in Orthanc, dated 2024-01-15, and a March study too."""
    from medseg.data.phantoms import generate_phantom

    ph = generate_phantom(5, TINY_SHAPE, orientation="RAS", noise_hu=0.0)
    written = write_ct_series(ph.image, ph.affine, tmp_path / "ct", patient_id="PULL1", study_date="20240115")
    march = write_ct_series(
        ph.image, ph.affine, tmp_path / "ct_march", patient_id="PULL2", study_date="20240301"
    )
    orthanc.upload([*written.files, *march.files])
    return written


def _check_outputs_in_orthanc(orthanc, written, out):
    """The SEG and RTSTRUCT Orthanc holds for ``written``'s study equal OUT's mask."""
    (mask_path,) = [p for p in out.glob("*.nii.gz")]
    case = mask_path.name.removesuffix(".nii.gz")
    mask = nib.load(mask_path)
    labels = np.asarray(mask.dataobj)
    assert labels.any(), "the tiny model should segment something"
    names = json.loads((out / f"{case}.json").read_text())["labels"]
    names = {k: int(v) for k, v in names.items() if int(v) != 0} if isinstance(names, dict) else names
    client = DICOMwebClient(orthanc.dicomweb_url)
    found = {}
    for modality in ("SEG", "RTSTRUCT"):
        (series,) = client.search_for_series(written.study_uid, search_filters={"Modality": modality})
        series_uid = series["0020000E"]["Value"][0]
        (instance,) = client.search_for_instances(written.study_uid, series_uid)
        found[modality] = client.retrieve_instance(
            written.study_uid, series_uid, instance["00080018"]["Value"][0]
        )
    seg = found["SEG"]
    segments = {int(s.SegmentNumber): names[s.SegmentLabel] for s in seg.SegmentSequence}
    check_seg_round_trip(seg, labels, mask.affine, segments, written.sop_instance_uids)
    for ds in found.values():
        assert ds.StudyInstanceUID == written.study_uid
    assert seg.FrameOfReferenceUID == written.frame_of_reference_uid
    rt = found["RTSTRUCT"]
    assert rt.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == written.frame_of_reference_uid
    present = {n: v for n, v in names.items() if (labels == v).any()}
    check_rtstruct_round_trip(rt, labels, mask.affine, [str(f) for f in written.files], present)
    return case


def test_pull_segment_and_send_back_by_stow(orthanc, uploaded, segmenting_run, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["segment", "-i", f"dicomweb+{orthanc.dicomweb_url}", "--study", uploaded.study_uid, "-o", str(out),
         "-m", str(segmenting_run / "best.pt"), "--device", "cpu", "--output-type", "dicom-seg,dicom-rtstruct",
         "--send", orthanc.dicomweb_url],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "retrieving 1 CT series of study" in result.output and "1 written" in result.output
    assert not list(out.glob(".dicomweb-*")), "the download folder is removed"
    case = _check_outputs_in_orthanc(orthanc, uploaded, out)
    (line,) = [json.loads(x) for x in (out / "deliveries.jsonl").read_text().splitlines()]
    assert line["ok"] and line["case"] == case and line["destination"] == orthanc.dicomweb_url
    assert (
        sorted(line["files"]) == [f"{case}_rtstruct.dcm", f"{case}_seg.dcm"] and len(line["delivered"]) == 2
    )


def test_date_range_pull_and_c_store_of_a_local_input(orthanc, uploaded, segmenting_run, tmp_path):
    out = tmp_path / "out"
    model = ["-m", str(segmenting_run / "best.pt"), "--device", "cpu", "--output-type", "dicom-seg"]
    result = runner.invoke(
        app,
        ["segment", "-i", f"dicomweb+{orthanc.dicomweb_url}", "--study-date", "20240101-20240131", "-o", str(out),
         *model],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.nii.gz"))) == 1 and "PULL1" in next(out.glob("*.nii.gz")).name  # not March's
    # a local DICOM folder, sent by C-STORE; the second destination refuses the called AE (permanent: no
    # retries): exit 1, one error line
    local = tmp_path / "local"
    dest = f"dimse://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
    down = f"dimse://NOBODY@127.0.0.1:{orthanc.dicom_port}"
    result = runner.invoke(
        app,
        [
            "segment",
            "-i",
            str(uploaded.files[0].parent),
            "-o",
            str(local),
            *model,
            "--send",
            dest,
            "--send",
            down,
        ],
    )
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "NOBODY" in errors[0] and "Called AE title not recognised" in errors[0]
    assert f"to {dest} (first attempt)" in result.output
    records = [json.loads(x) for x in (local / "deliveries.jsonl").read_text().splitlines()]
    # permanent: the rejection ends the retries (policy: 5 attempts). Under load an attempt may first see the
    # peer close the connection before its A-ASSOCIATE-RJ is read (an abort, transient), so 1 or 2, never 5
    assert [r["ok"] for r in records] == [True, False] and records[1]["attempts"] in (1, 2)


def test_network_options_are_checked_before_any_work(tmp_path, segmenting_run):
    base = ["segment", "-o", str(tmp_path / "o"), "-m", str(segmenting_run / "best.pt")]
    cases = [
        (["-i", "dicomweb+http://127.0.0.1:9/dicom-web"], "--study UID or --study-date"),
        (["-i", str(tmp_path), "--study", "1.2.3"], "need a dicomweb+http(s):// input"),
        (["-i", str(tmp_path), "--send", "dimse://PACS@h:104"], "--send needs a DICOM output"),
        (
            ["-i", str(tmp_path), "--send", "https://u:p@h/dicom-web", "--output-type", "dicom-seg"],
            "credentials in a URL",
        ),
        (["-i", "dicomweb+http://127.0.0.1:9/dicom-web", "--study", "1.2.3"], "Connection refused"),
    ]
    for args, needle in cases:
        result = runner.invoke(app, [*base, *args])
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output and "Traceback" not in result.output
