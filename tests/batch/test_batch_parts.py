"""Direct tests of the batch modules that the CLI tests exercise only end to end: outputs (paths, complete
cases, the dicom block, the statistics table), exports (viewer files of one case), re-export from Python,
the per-case steps of :class:`medseg.batch.cases.BatchRun` (written, complete, claimed, full disk) and
:func:`medseg.io.atomic.no_space`."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.batch.cases import BatchRun
from medseg.batch.exports import write_case_exports
from medseg.batch.inputs import CaseSource, discover_cases, opened_cases
from medseg.batch.outputs import (
    dicom_block,
    is_complete,
    output_path_for,
    read_statistics,
    sidecar_path,
    statistics_path,
    write_statistics_table,
)
from medseg.batch.reexport import export_outputs
from medseg.config.segment import ExportOptions, OutputSpec, SegmentOptions
from medseg.inference.predictor import Prediction, Predictor
from medseg.io.atomic import no_space
from medseg.io.claims import Claims
from medseg.testing.dicom_series import write_ct_series

LABELS = {"background": 0, "liver": 1, "spleen": 2}


def _scan(folder: Path, name: str = "ct") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = np.full((12, 10, 6), -1000, dtype=np.int16)
    data[2:10, 2:8, 1:5] = 40
    affine = np.diag([-1.5, -1.5, 2.5, 1.0])  # LPS storage
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    path = folder / f"{name}.nii.gz"
    nib.save(img, path)
    return path


def _labels(shape) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    labels[3:7, 3:6, 2:4] = 1
    labels[8:10, 2:4, 1:3] = 2
    return labels


# ---------------------------------------------------------------------------------------------- outputs


def test_output_paths_and_complete_cases(tmp_path):
    case = CaseSource("ct", "nifti", path=tmp_path / "ct.nii.gz")
    assert output_path_for(case, tmp_path / "out", single=False) == tmp_path / "out" / "ct.nii.gz"
    assert output_path_for(case, tmp_path / "mask.nii.gz", single=True) == tmp_path / "mask.nii.gz"
    mask = tmp_path / "out" / "ct.nii.gz"
    assert sidecar_path(mask) == tmp_path / "out" / "ct.json"
    assert statistics_path(mask) == tmp_path / "out" / "ct_stats.json"
    identity = {"checkpoint_sha256": ["ab"], "tta": False}
    assert not is_complete(mask, identity)  # no mask
    mask.parent.mkdir()
    mask.write_bytes(b"mask")
    assert not is_complete(mask, identity)  # no sidecar
    sidecar_path(mask).write_text("{not json")
    assert not is_complete(mask, identity)  # a corrupt sidecar is not complete: the case is redone
    sidecar_path(mask).write_text(json.dumps({**identity, "tta": True}))
    assert not is_complete(mask, identity)
    sidecar_path(mask).write_text(json.dumps({**identity, "other": 1}))
    assert is_complete(mask, identity)


def test_dicom_block_names_files_in_slice_order_or_archive_members(tmp_path):
    data = np.full((8, 8, 5), -1000, dtype=np.int16)
    written = write_ct_series(data, np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "s", shuffle_names=True)
    (case,) = discover_cases(tmp_path / "s")
    block = dicom_block(case)
    assert block["series_uid"] == case.series.series_uid and "archive" not in block
    assert block["files"] == [str(p.resolve()) for p in case.series.files]
    assert block["sop_instance_uids"] == list(case.series.sop_instance_uids)
    assert len(block["files"]) == 5 and set(block["files"]) == {str(p.resolve()) for p in written.files}
    import zipfile

    archive = tmp_path / "s.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in written.files:
            zf.write(p, f"series/{p.name}")
    work = tmp_path / "work"
    work.mkdir()
    with opened_cases(archive, work) as cases:
        zipped = dicom_block(cases[0])
    assert zipped["archive"] == str(archive.resolve())
    assert sorted(zipped["files"]) == sorted(f"series/{p.name}" for p in written.files)


def test_statistics_table_reads_only_statistics_files(tmp_path):
    rows = [{"case": "a", "label": "liver", "volume_ml": 1.5}]
    (tmp_path / "a_stats.json").write_text(json.dumps({"case": "a", "rows": rows}))
    (tmp_path / "x_stats.json").write_text(json.dumps({"case": "x_stats", "labels": LABELS}))  # a sidecar
    (tmp_path / "b_stats.json").write_text("{cut")
    assert read_statistics(tmp_path) == rows
    table = write_statistics_table(tmp_path)
    assert table.read_text().splitlines()[1].startswith("a,")


# ---------------------------------------------------------------------------------------------- exports


def test_case_exports_of_a_nifti_case(tmp_path):
    scan = nib.load(_scan(tmp_path / "in"))
    labels = _labels(scan.shape)
    pred = Prediction(labels=labels, reference=scan, label_names=LABELS)
    case = CaseSource("ct", "nifti", path=tmp_path / "in" / "ct.nii.gz")
    dst = tmp_path / "out" / "ct.nii.gz"
    dst.parent.mkdir()
    exports, warnings = write_case_exports(
        case, dst, pred, ("nifti", "dicom-seg", "slicer"), True, Path("m.pt"), "00"
    )
    assert warnings == ["no DICOM SEG: the input is NIfTI, so there is no source series to reference"]
    assert Path(exports["slicer"]).is_file()
    liver = nib.load(exports["split"]["liver"])
    assert np.array_equal(np.asarray(liver.dataobj), (labels == 1).astype(np.uint8))
    assert np.allclose(liver.affine, scan.affine)


# -------------------------------------------------------------------------------------------- re-export


def test_export_outputs_from_python(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    scan = nib.load(_scan(tmp_path / "in"))
    nib.save(nib.Nifti1Image(_labels(scan.shape), scan.affine), out / "ct.nii.gz")
    side = {"case": "ct", "labels": LABELS, "kind": "nifti", "source": str(tmp_path / "in" / "ct.nii.gz")}
    (out / "ct.json").write_text(json.dumps(side))
    nib.save(nib.Nifti1Image(_labels(scan.shape), scan.affine), out / "bad.nii.gz")
    (out / "bad.json").write_text(json.dumps({**side, "case": "bad", "labels": ["liver"]}))
    lines: list[str] = []
    report = export_outputs(out, ExportOptions(types=("slicer",)), log=lines.append)
    assert report.exported == ["ct"] and list(report.failed) == ["bad"]
    assert "labels" in report.failed["bad"] and str(out / "bad.json") in report.failed["bad"]
    assert (out / "ct.seg.nrrd").is_file() and (out / "itksnap_labels.txt").is_file()
    assert json.loads((out / "ct.json").read_text())["exports"]["slicer"] == str(out / "ct.seg.nrrd")


# ------------------------------------------------------------------------------------------- the steps


def test_no_space_is_found_through_wrapping_exceptions():
    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        except OSError as exc:
            raise RuntimeError("SimpleITK: write failed") from exc
    except RuntimeError as wrapped:
        assert no_space(wrapped)
    assert no_space(RuntimeError("ITK ERROR: No space left on device"))
    assert not no_space(OSError(errno.EACCES, "Permission denied"))


@pytest.fixture
def batch(tiny_run, tiny_dataset, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    source = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]
    for name in ("a", "b"):
        (inp / f"{name}.nii.gz").write_bytes(source.read_bytes())
    predictor = Predictor(tiny_run / "best.pt", device="cpu")
    out = tmp_path / "out"
    out.mkdir()

    def run(**outputs):
        lines: list[str] = []
        job = BatchRun(predictor, SegmentOptions(device="cpu", prefetch=0), OutputSpec(**outputs), output=out,
                       single=False, log=lines.append)  # fmt: skip
        job.run(discover_cases(inp), progress=False)
        return job, lines

    return run, inp, out


def test_batch_run_writes_then_skips_complete_cases(batch):
    run, inp, out = batch
    first, _ = run()
    assert [p.name for p in first.report.written] == ["a.nii.gz", "b.nii.gz"] and not first.report.failed
    for name in ("a", "b"):
        mask, scan = nib.load(out / f"{name}.nii.gz"), nib.load(inp / f"{name}.nii.gz")
        assert mask.shape == scan.shape and np.array_equal(mask.affine, scan.affine)
    again, lines = run()
    assert [p.name for p in again.report.skipped] == ["a.nii.gz", "b.nii.gz"] and not again.report.written
    assert all("done, skipped" in line for line in lines)
    assert not list(out.glob(".claim-*"))


def test_batch_run_leaves_a_claimed_case_to_its_holder(batch, tmp_path):
    run, inp, out = batch
    holder = Claims(out)  # another run's claim (flock is per open file, so it excludes this process too)
    assert holder.claim("a") is None
    try:
        job, _ = run()
    finally:
        holder.release_all()
    assert list(job.report.claimed) == [str(inp / "a.nii.gz")]
    assert [p.name for p in job.report.written] == ["b.nii.gz"] and not (out / "a.nii.gz").exists()
