"""Workers in process: the batch core's DICOM checks end a job ``refused`` with their reason (before any model
is loaded), a series is segmented into a ``medseg segment`` output folder, and a late instance makes a new
version whose outputs sit beside the old ones."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from medseg.batch.review import collect_cases
from medseg.config.segment import OutputSpec, SegmentOptions
from medseg.node.store import Store
from medseg.node.workdir import WorkDir
from medseg.node.worker import WorkerConfig, work_once

from .conftest import phantom_ct, send, small_ct


def _workdir(scp) -> WorkDir:
    return WorkDir(scp.spool.parent).create()


def _run_all(scp, config: WorkerConfig) -> list:
    """Queue what was received and let one worker do everything."""
    workdir = _workdir(scp)
    events: list[dict] = []
    with Store(workdir.db, log_event=events.append) as store:
        store.queue_stable(0)
        while work_once(store, workdir, config, events.append):
            pass
        return store.jobs()


def _rewrite(files, change) -> None:
    for path in files:
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path)


NO_MODEL = WorkerConfig(checkpoints=(Path("/no/model/loaded.pt"),))


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("mr", "modality MR; only CT series are read"),
        ("missing", "missing slice(s)"),
        ("corrupt", "PixelData holds 576 bytes, expected 1152"),
    ],
)
def test_batch_core_checks_end_the_job_refused_with_their_reason(tmp_path, node, fault, reason):
    scp = node()
    written = small_ct(tmp_path / "ct", drop_slices=[3] if fault == "missing" else [])
    files = [f for f in written.files if f is not None]
    if fault == "mr":  # CT Image Storage, but the series says MR: the reader's modality rule refuses it
        _rewrite(files, lambda ds: setattr(ds, "Modality", "MR"))
    if fault == "corrupt":  # half the pixel data is missing
        _rewrite(files, lambda ds: setattr(ds, "PixelData", ds.PixelData[: len(ds.PixelData) // 2]))
    assert send(scp.port, files) == [0] * len(files)
    (job,) = _run_all(scp, NO_MODEL)
    assert job.state == "refused" and reason in job.reason, job.reason
    assert str(tmp_path) not in job.reason  # the job folder is shown as the series
    assert not list((tmp_path / "outputs").iterdir())


def test_segments_into_a_review_folder_and_a_late_instance_makes_version_2(
    tmp_path, node, segmenting_run, tiny_dataset
):
    scp = node()
    written = phantom_ct(tiny_dataset, tmp_path / "ct", patient_id="P7", series_number=4)
    config = WorkerConfig(
        checkpoints=(segmenting_run / "best.pt",),
        options=SegmentOptions(device="cpu", prefetch=0),
        outputs=OutputSpec(types="nifti,dicom-seg"),
    )
    assert set(send(scp.port, written.files[:-1])) == {0}  # the last slice comes late
    (v1,) = _run_all(scp, config)
    assert v1.state == "done" and v1.case_name.startswith("P7_20240101_4_") and v1.case_name.endswith("_v1")
    assert send(scp.port, written.files[-1:]) == [0]
    v1, v2 = _run_all(scp, config)
    assert (v2.version, v2.state, v2.case_name) == (2, "done", v1.case_name[:-1] + "2")
    out = tmp_path / "outputs"
    sides = {v: json.loads((out / f"{j.case_name}.json").read_text()) for v, j in ((1, v1), (2, v2))}
    assert len(sides[1]["dicom"]["sop_instance_uids"]) == len(written.files) - 1  # v1 untouched
    assert len(sides[2]["dicom"]["sop_instance_uids"]) == len(written.files)
    for v, job in ((1, v1), (2, v2)):
        assert sides[v]["case"] == job.case_name
        assert sides[v]["exports"]["dicom_seg"]["path"] == str(out / f"{job.case_name}_seg.dcm")
        assert Path(job.outputs[0]) == out / f"{job.case_name}_seg.dcm"
        assert pydicom.dcmread(job.outputs[0]).SeriesInstanceUID != written.series_uid
    seg1, seg2 = (pydicom.dcmread(j.outputs[0]).SOPInstanceUID for j in (v1, v2))
    assert seg1 != seg2  # another instance set, another derived object
    assert {c.name for c in collect_cases(out)} == {v1.case_name, v2.case_name}  # medseg review reads it
    assert not list(out.glob(".tmp-*")) and not (tmp_path / "jobs" / str(v1.id) / "out").exists()
