"""``medseg segment`` on clinical inputs: DICOM series and trees, mixed folders, ``.zip`` archives, ensembles,
statistics, resuming, the run manifest and sharding (flags, Slurm array variables, a real ``torchrun``).

DICOM series are written from phantoms with :func:`medseg.testing.dicom_series.write_ct_series` (shuffled file
names, both slice orders, RAS and LPS sources); what the CLI writes is compared with what was written (UIDs)
and with what the DICOM reader gives for the same series (geometry), never with the batch code's own view.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg.batch.inputs import discover_cases, extract_zip, resolve_checkpoints
from medseg.batch.manifest import Manifest, read_manifest
from medseg.batch.run import read_sidecar, statistics_path
from medseg.batch.sharding import ShardingError, resolve_part
from medseg.data.phantoms import generate_phantom
from medseg.inference.predictor import autocast_dtype
from medseg.io import InputError, save_like
from medseg.io.atomic import temp_prefix
from medseg.io.dicom import find_series, read_series
from medseg.report.statistics import organ_statistics
from medseg.testing.dicom_series import write_ct_series
from pipelines.cli import app
from tests.bad_inputs.cli import REPO, assert_no_temp_files

runner = CliRunner()


def _segment(*args: object, env: dict | None = None):
    result = runner.invoke(app, ["segment", *map(str, args), "--device", "cpu"], env=env)
    assert "Traceback" not in result.output, result.output
    return result


def _manifest(out: Path) -> list[dict]:
    return list(read_manifest(out / "manifest.jsonl"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _as_nifti(image: nib.Nifti1Image, tmp: Path) -> nib.Nifti1Image:
    """The reader's image as a NIfTI file on disk (the header stores the affine in float32)."""
    nib.save(image, tmp)
    return nib.load(tmp)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> dict:
    """A PACS-like tree: two CT series (RAS ascending; LPS descending), both with shuffled file names, and
    an MR series, in nested folders."""
    root = tmp_path_factory.mktemp("pacs")
    a = generate_phantom(21, (40, 40, 20), orientation="RAS")
    b = generate_phantom(22, (40, 36, 16), orientation="LPS")
    written = {
        "P1_20240101_2": write_ct_series(
            a.image,
            a.affine,
            root / "P1" / "study" / "s2",
            patient_id="P1",
            series_number=2,
            shuffle_names=True,
        ),
        "P2_20240101_5": write_ct_series(
            b.image,
            b.affine,
            root / "P2" / "s5",
            patient_id="P2",
            series_number=5,
            shuffle_names=True,
            descending=True,
        ),
    }
    write_ct_series(b.image, b.affine, root / "P2" / "mr", patient_id="P2", series_number=7, modality="MR")
    return {"root": root, "written": written, "phantoms": {"P1_20240101_2": a, "P2_20240101_5": b}}


def test_dicom_tree_through_the_cli(pacs, tiny_run, tmp_path):
    """2 CT series + 1 MR → 2 masks in the reader's geometry, the MR series a warning; sidecar UIDs are the
    written ones; statistics on the scan's HU; re-runs skip, a changed file redoes its series only."""
    out, model = tmp_path / "out", tiny_run / "best.pt"
    result = _segment("-i", pacs["root"], "-o", out, "-m", model, "--statistics")
    assert result.exit_code == 0, result.output
    assert "2 written, 0 failed, 0 skipped, 1 skipped-modality" in result.stdout
    assert result.stderr.splitlines() == [
        f"warning: {pacs['root'] / 'P2' / 'mr'} (series P2_20240101_7): skipped: modality MR; only CT series "
        "are read"
    ]
    series = {s.case: s for s in find_series(pacs["root"])}
    for case, written in pacs["written"].items():
        mask = nib.load(out / f"{case}.nii.gz")
        image = read_series(series[case]).image
        reference = _as_nifti(image, tmp_path / f"{case}_reader.nii.gz")
        assert mask.shape == image.shape and np.array_equal(mask.affine, reference.affine)
        assert mask.get_data_dtype() == np.uint8
        side = read_sidecar(out / f"{case}.nii.gz")
        dicom = side["dicom"]
        assert (dicom["study_uid"], dicom["series_uid"], dicom["frame_of_reference_uid"]) == (
            written.study_uid,
            written.series_uid,
            written.frame_of_reference_uid,
        )
        assert dicom["sop_instance_uids"] == written.sop_instance_uids  # slice k ↔ volume[:, :, k]
        assert dicom["files"] == [str(f) for f in written.files]
        assert (dicom["patient_id"], dicom["study_date"], dicom["series_number"]) == (
            case[:2],
            "20240101",
            int(case.rsplit("_", 1)[1]),
        )
        assert side["source_series"]["series_uid"] == written.series_uid
        stats = json.loads(statistics_path(out / f"{case}.nii.gz").read_text())
        expected = organ_statistics(
            np.asarray(mask.dataobj), np.asarray(image.dataobj), image.affine, side["labels"], case
        )
        assert stats["rows"] == json.loads(json.dumps(expected))
    assert [(e["case"], e["kind"], e["status"]) for e in _manifest(out)] == [
        ("P1_20240101_2", "dicom", "written"),
        ("P2_20240101_5", "dicom", "written"),
        ("P2_20240101_7", "dicom", "skipped-modality"),
    ]
    table = list(csv.DictReader((out / "statistics.csv").open()))
    assert [r["case"] for r in table] == ["P1_20240101_2"] * 6 + ["P2_20240101_5"] * 6

    # the series folder on its own is the same case, segmented the same way
    single = _segment("-i", pacs["root"] / "P2" / "s5", "-o", tmp_path / "one", "-m", model)
    assert "1 written, 0 failed, 0 skipped, 0 skipped-modality" in single.stdout, single.output
    alone, in_tree = (nib.load(d / "P2_20240101_5.nii.gz") for d in (tmp_path / "one", out))
    assert np.array_equal(alone.affine, in_tree.affine) and np.array_equal(alone.dataobj, in_tree.dataobj)

    # a re-run skips both series; a file of one series changed → that series only is redone
    again = _segment("-i", pacs["root"], "-o", out, "-m", model, "--statistics")
    assert "0 written, 0 failed, 2 skipped, 1 skipped-modality" in again.stdout, again.output
    touched = pacs["written"]["P2_20240101_5"].files[3]
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = _segment("-i", pacs["root"], "-o", out, "-m", model)
    assert "1 written, 0 failed, 1 skipped" in again.stdout and "P2_20240101_5 (DICOM" in again.stdout
    # the redo without --statistics removed that case's statistics (they described the old mask)
    assert not statistics_path(out / "P2_20240101_5.nii.gz").exists()

    # statistics use the original scan: with the phantom's true labels as the mask, a run with
    # --statistics adds them without inference, and the liver's HU are those of the phantom's liver
    case, phantom = "P1_20240101_2", pacs["phantoms"]["P1_20240101_2"]
    save_like(phantom.label, nib.load(out / f"{case}.nii.gz"), out / f"{case}.nii.gz")
    statistics_path(out / f"{case}.nii.gz").unlink()
    again = _segment("-i", pacs["root"], "-o", out, "-m", model, "--statistics")
    for name in pacs["written"]:
        assert f"{name}: done, skipped (complete from an earlier run); statistics added" in again.stdout
    liver = json.loads(statistics_path(out / f"{case}.nii.gz").read_text())["rows"][0]
    inside = phantom.image[phantom.label == 1]
    assert liver["name"] == "liver" and liver["voxels"] == inside.size > 0
    assert liver["hu_mean"] == pytest.approx(float(inside.mean())) and liver["hu_max"] == inside.max()
    rows = {(r["case"], r["name"]): r for r in csv.DictReader((out / "statistics.csv").open())}
    assert int(rows[(case, "liver")]["voxels"]) == inside.size
    assert {c for c, _ in rows} == set(pacs["written"])


@pytest.mark.slow
def test_dicom_seg_and_rtstruct_through_the_cli(pacs, segmenting_run, tmp_path, monkeypatch):
    """``--output-type dicom-seg,dicom-rtstruct`` on a DICOM series writes both files, referencing the written
    series, with one segment / ROI per non-empty label of the mask; the sidecar records both (the RTSTRUCT
    with its measured round trip and UIDs). ``medseg export --output-type dicom-rtstruct`` makes it again
    from the output folder with the same UIDs (same series, same model). An RTSTRUCT that fails its round
    trip makes the case ``failed-export``, like a SEG: the mask stays, neither DICOM file does."""
    import pydicom

    from medseg.export import rtstruct

    case, written = "P2_20240101_5", pacs["written"]["P2_20240101_5"]
    out, model = tmp_path / "out", segmenting_run / "best.pt"
    result = _segment(
        "-i", pacs["root"] / "P2" / "s5", "-o", out, "-m", model, "--output-type", "dicom-seg,dicom-rtstruct"
    )
    assert result.exit_code == 0 and "1 written, 0 failed" in result.stdout, result.output
    mask = np.asarray(nib.load(out / f"{case}.nii.gz").dataobj)
    side = read_sidecar(out / f"{case}.nii.gz")
    present = {name: v for name, v in side["labels"].items() if v > 0 and (mask == v).any()}
    assert present, "the segmenting model found nothing"
    seg, rt = (pydicom.dcmread(out / f"{case}_{kind}.dcm") for kind in ("seg", "rtstruct"))
    entry = side["exports"]["dicom_rtstruct"]
    assert entry["path"] == str(out / f"{case}_rtstruct.dcm")
    assert (entry["sop_instance_uid"], entry["series_instance_uid"]) == (
        rt.SOPInstanceUID,
        rt.SeriesInstanceUID,
    )
    assert side["exports"]["dicom_seg"]["sop_instance_uid"] == seg.SOPInstanceUID
    rois = {str(r.ROIName): int(r.ROINumber) for r in rt.StructureSetROISequence}
    segments = {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg.SegmentSequence}
    assert rois == segments == entry["rois"] and set(rois) == set(present)
    assert sorted(entry["omitted"]) == sorted(
        n for n, v in side["labels"].items() if v > 0 and n not in present
    )
    assert entry["round_trip"] == {name: {"dice": 1.0, "hd95_voxels": 0.0} for name in present}
    assert (rt.StudyInstanceUID, rt.FrameOfReferenceUID) == (
        written.study_uid,
        written.frame_of_reference_uid,
    )
    series = (
        rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    )
    assert series.SeriesInstanceUID == written.series_uid
    assert sorted(i.ReferencedSOPInstanceUID for i in series.ContourImageSequence) == sorted(
        written.sop_instance_uids
    )

    (out / f"{case}_rtstruct.dcm").unlink()
    again = runner.invoke(app, ["export", str(out), "--output-type", "dicom-rtstruct"])
    assert again.exit_code == 0 and "Traceback" not in again.output, again.output
    redone = pydicom.dcmread(out / f"{case}_rtstruct.dcm")
    assert (redone.SOPInstanceUID, redone.SeriesInstanceUID) == (rt.SOPInstanceUID, rt.SeriesInstanceUID)
    assert read_sidecar(out / f"{case}.nii.gz")["exports"]["dicom_rtstruct"] == entry
    assert_no_temp_files(out)

    def refused(*args, **kwargs):
        raise rtstruct.RtRoundTripError("rt.dcm: ROI 'liver': Dice 0.1000; no file written")

    monkeypatch.setattr(rtstruct, "write_rtstruct", refused)
    failed = _segment(
        "-i", pacs["root"] / "P2" / "s5", "-o", out, "-m", model, "--output-type", "dicom-seg,dicom-rtstruct",
        "--overwrite",
    )  # fmt: skip
    assert failed.exit_code == 1 and "Dice 0.1000" in failed.output, failed.output
    assert [e["status"] for e in _manifest(out)][-1] == "failed-export"
    assert (out / f"{case}.nii.gz").is_file() and "Dice 0.1000" in read_sidecar(out / f"{case}.nii.gz")[
        "export_error"
    ]
    assert not (out / f"{case}_seg.dcm").exists() and not (out / f"{case}_rtstruct.dcm").exists()


def _zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder.parent).as_posix())
    return archive


def test_zip_of_a_mixed_folder_with_an_ensemble(tiny_dataset, tiny_run, tmp_path):
    """A .zip holding a NIfTI scan, a CT series and a tilted series: both kinds segmented with two
    checkpoints, the tilted series a one-line failure naming the archive, the extraction folder gone."""
    mixed = tmp_path / "export"
    mixed.mkdir()
    shutil.copyfile(sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0], mixed / "ct.nii.gz")
    ph = generate_phantom(23, (32, 32, 12), orientation="LPS")
    written = write_ct_series(ph.image, ph.affine, mixed / "dicom" / "ct", patient_id="Z", shuffle_names=True)
    write_ct_series(ph.image, ph.affine, mixed / "dicom" / "tilted", patient_id="T", gantry_tilt_deg=12.0)
    archive = _zip_folder(mixed, tmp_path / "export.zip")
    shutil.rmtree(mixed)
    out, models = tmp_path / "out", [tiny_run / "best.pt", tiny_run / "last.pt"]
    args = ["-i", archive, "-o", out, "-m", models[0], "-m", models[1], "--postprocess", "none"]
    args += ["--tta", "--precision", "bf16"]

    result = _segment(*args)
    assert result.exit_code == 1, result.output
    assert "2 written, 1 failed, 0 skipped" in result.stdout
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: {archive}/export/dicom/tilted (series T_20240101_1): gantry tilt")
    assert ".tmp-" not in result.output
    assert_no_temp_files(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "Z_20240101_1.json",
        "Z_20240101_1.nii.gz",
        "ct.json",
        "ct.nii.gz",
        "manifest.jsonl",
    ]
    side = read_sidecar(out / "Z_20240101_1.nii.gz")
    assert side["checkpoint_sha256"] == [_sha256(m) for m in models]
    assert (side["tta"], side["precision"], side["postprocess"]) == (True, "bf16", "none")
    # the options reached the predictor: what it reports having done
    info = side["inference"]
    assert info["checkpoints"] == [str(m) for m in models] and info["precision"] == "bf16"
    assert len(info["tta_flips"]) > 1 and info["postprocess"] == {}
    assert side["dicom"]["archive"] == str(archive)
    assert side["dicom"]["files"] == [f"export/dicom/ct/{f.name}" for f in written.files]
    assert side["dicom"]["sop_instance_uids"] == written.sop_instance_uids
    assert read_sidecar(out / "ct.nii.gz")["source_file"]["member"] == "export/ct.nii.gz"
    assert nib.load(out / "Z_20240101_1.nii.gz").shape == ph.image.shape

    # the cases of an archive are identified by the archive: a re-run skips them
    again = _segment(*args)
    assert "0 written, 1 failed, 2 skipped" in again.stdout, again.output
    # another checkpoint set (one of the two) is another model: redone
    again = _segment("-i", archive, "-o", out, "-m", models[0], "--postprocess", "none")
    assert "2 written, 1 failed, 0 skipped" in again.stdout, again.output
    side = read_sidecar(out / "Z_20240101_1.nii.gz")
    default = autocast_dtype("auto", torch.device("cpu"))[1]  # bf16 on a CPU with native bf16, else fp32
    assert side["checkpoint_sha256"] == [_sha256(models[0])] and (side["tta"], side["precision"]) == (
        False,
        default,
    )


def _evil_zip(path: Path, member: str, mode: int | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok/ct.txt", "fine")
        info = zipfile.ZipInfo(member)
        if mode is not None:
            info.external_attr = mode << 16
        zf.writestr(info, "/etc/passwd" if mode and stat.S_ISLNK(mode) else "evil")
    return path


@pytest.mark.parametrize(
    ("member", "mode", "cause"),
    [
        ("../evil.nii.gz", None, "leads outside the archive (through '..', zip-slip)"),
        ("ok/../../evil.nii.gz", None, "zip-slip"),
        ("/tmp/evil.nii.gz", None, "has an absolute path"),
        ("ok/link.nii.gz", stat.S_IFLNK | 0o777, "is a symbolic link"),
        ("ok/fifo.nii.gz", stat.S_IFIFO | 0o644, "is not a regular file or folder"),
    ],
)
def test_unsafe_archives_are_refused_before_extraction(tmp_path, member, mode, cause):
    archive = _evil_zip(tmp_path / "in.zip", member, mode)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(InputError, match="archive refused") as excinfo:
        extract_zip(archive, dest)
    assert cause in str(excinfo.value) and str(archive) in str(excinfo.value)
    assert list(dest.iterdir()) == [] and not (tmp_path / "evil.nii.gz").exists()


def test_unsafe_archive_through_the_cli(tiny_run, tmp_path):
    archive = _evil_zip(tmp_path / "in.zip", "../evil.nii.gz")
    result = _segment("-i", archive, "-o", tmp_path / "out", "-m", tiny_run / "best.pt")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {archive}: member '../evil.nii.gz' leads outside the archive (through '..', zip-slip); "
        "archive refused"
    ]
    assert not (tmp_path / "evil.nii.gz").exists() and list((tmp_path / "out").iterdir()) == []
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 not really")
    result = _segment("-i", broken, "-o", tmp_path / "out", "-m", tiny_run / "best.pt")
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {broken}: not a readable .zip archive")
    assert list((tmp_path / "out").iterdir()) == []


def test_extraction_folders_removed_on_failure_and_after_a_kill(tiny_run, tmp_path):
    """A run that fails after extracting removes its folder; a killed run's folder (dead PID) is removed by
    the next run, a live run's folder is left alone."""
    out = tmp_path / "out"
    out.mkdir()
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True, check=True).stdout)  # fmt: skip
    host = temp_prefix(out / "unzip").split("-")[2]
    stale, live = out / f".tmp-{dead_pid}-{host}-unzip.abc", out / f"{temp_prefix(out / 'unzip')}def"
    for folder in (stale, live):
        (folder / "export").mkdir(parents=True)
        (folder / "export" / "ct.nii.gz").write_bytes(b"x")
    archive = tmp_path / "clash.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("a.nii.gz", "a_stats.nii.gz"):
            zf.writestr(name, "not read")
    result = _segment("-i", archive, "-o", out, "-m", tiny_run / "best.pt", "--statistics")
    assert result.exit_code == 2 and "removed 1 extraction folder(s)" in result.stdout, result.output
    assert result.stderr.splitlines() == [
        f"error: {archive}/a.nii.gz: cases 'a' and 'a_stats' would both write a_stats.json (statistics "
        "and sidecar); rename one"
    ]
    assert list(out.iterdir()) == [live]


def test_mixed_folder_cases_and_name_collisions(tmp_path):
    """NIfTI files and DICOM series of one folder are all cases; a series named like a NIfTI case gets the
    hash of its SeriesInstanceUID; skipped and refused series are listed, not dropped."""
    ph = generate_phantom(24, (24, 24, 6), orientation="RAS", noise_hu=0.0)
    w = write_ct_series(ph.image, ph.affine, tmp_path / "s", patient_id="P1", series_number=2)
    write_ct_series(ph.image, ph.affine, tmp_path / "mr", patient_id="P1", series_number=3, modality="MR")
    write_ct_series(ph.image, ph.affine, tmp_path / "gap", patient_id="P1", series_number=4, drop_slices=[3])
    for name in ("P1_20240101_2", "b"):
        (tmp_path / f"{name}.nii.gz").write_bytes(b"not read here")
    cases = discover_cases(tmp_path)
    suffix = hashlib.sha1(w.series_uid.encode()).hexdigest()[:8]
    assert [(c.name, c.kind, c.status) for c in cases] == [
        ("P1_20240101_2", "nifti", "ok"),
        (f"P1_20240101_2_{suffix}", "dicom", "ok"),
        ("P1_20240101_3", "dicom", "skipped"),
        ("P1_20240101_4", "dicom", "refused"),
        ("b", "nifti", "ok"),
    ]
    assert cases[3].error.startswith(f"{tmp_path / 'gap'} (series P1_20240101_4): missing slice(s)")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"holds no NIfTI file .* and no DICOM image series"):
        discover_cases(empty)


def test_checkpoint_folders(tmp_path):
    folds = tmp_path / "folds"
    for k in (1, 0, 2):
        (folds / f"fold_{k}").mkdir(parents=True)
        (folds / f"fold_{k}" / "best.pt").write_bytes(b"x")
        (folds / f"fold_{k}" / "last.pt").write_bytes(b"x")
    assert resolve_checkpoints([folds]) == [folds / f"fold_{k}" / "best.pt" for k in range(3)]
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "last.pt"):
        (run / name).write_bytes(b"x")
    assert resolve_checkpoints(run) == [run / "best.pt"]  # a training run: its best, not best + last
    loose = tmp_path / "loose"
    loose.mkdir()
    for name in ("b.pt", "a.pt", "notes.txt"):
        (loose / name).write_bytes(b"x")
    assert resolve_checkpoints([loose, run / "best.pt"]) == [loose / "a.pt", loose / "b.pt", run / "best.pt"]
    with pytest.raises(InputError, match="checkpoint given twice"):
        resolve_checkpoints([run, run / "best.pt"])
    with pytest.raises(InputError, match="checkpoint not found"):
        resolve_checkpoints([run / "missing.pt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="folder holds no checkpoint"):
        resolve_checkpoints([tmp_path / "empty"])


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        ((None, None), {}, (0, 1)),
        ((3, 2), {"RANK": "0", "WORLD_SIZE": "2"}, (2, 3)),  # flags win over the launcher
        ((None, None), {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, (1, 2)),
        ((None, None), {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "3"}, (2, 4)),
        (
            (None, None),
            {"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "0",
             "SLURM_ARRAY_TASK_STEP": "2"},
            (7, 8),
        ),
        ((None, None), {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "RANK": "1", "WORLD_SIZE": "2"}, (3, 6)),
    ],
)  # fmt: skip
def test_resolve_part(flags, env, expected):
    part = resolve_part(*flags, env=env)
    assert (part.index, part.count) == expected


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ((2, None), {}, "give both or neither"),
        ((2, 2), {}, "part 2 is outside 0..1"),
        ((0, 0), {}, "at least 1"),
        ((None, None), {"RANK": "0"}, "RANK and WORLD_SIZE must both be set"),
        ((None, None), {"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ((None, None), {"SLURM_ARRAY_TASK_ID": "4"}, "SLURM_ARRAY_TASK_COUNT is not"),
        ((None, None), {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
                        "SLURM_ARRAY_TASK_STEP": "2"}, "part 3 is outside 0..2"),
        ((None, None), {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
                        "SLURM_ARRAY_TASK_STEP": "2"}, "not on the grid"),
    ],
)  # fmt: skip
def test_resolve_part_refuses(flags, env, message):
    with pytest.raises(ShardingError, match=message.replace("(", r"\(").replace(".", r"\.")):
        resolve_part(*flags, env=env)


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_parts_are_disjoint_and_cover_every_case(count):
    names = [f"case_{i:02d}" for i in range(11)]
    parts = [resolve_part(count, k).select(names) for k in range(count)]
    assert sorted(n for p in parts for n in p) == names
    assert parts == [names[k::count] for k in range(count)]  # case i → part i % N


def test_cli_refuses_bad_options_in_one_line(tiny_run, tmp_path):
    model = tiny_run / "best.pt"
    for extra, cause in [
        (["--num-parts", "2"], "--num-parts and --part-id go together"),
        (["--num-parts", "2", "--part-id", "2"], "part 2 is outside 0..1"),
        (["--precision", "fp8"], "--precision 'fp8' is not valid; valid values: auto, fp32, bf16, fp16"),
        (["--precision", "fp16", "--device", "cpu"], "precision 'fp16' needs a CUDA device"),
        (["--postprocess", "largest"], "--postprocess 'largest' is not valid; valid values: auto, none"),
    ]:
        result = _segment("-i", tmp_path, "-o", tmp_path / "out", "-m", model, *extra)
        assert result.exit_code == 2 and result.stdout == "", result.output
        (line,) = result.stderr.splitlines()
        assert line.startswith("error: ") and cause in line


def _copies(tiny_dataset: Path, folder: Path, names: list[str]) -> None:
    sources = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))
    folder.mkdir(parents=True)
    for i, name in enumerate(names):
        shutil.copyfile(sources[i % len(sources)], folder / f"{name}.nii.gz")


def test_slurm_array_part_through_the_cli(tiny_dataset, tiny_run, tmp_path):
    """Task 3 of an array 2-3 is part 1 of 2: the cases at odd positions of the sorted names."""
    inp, out = tmp_path / "in", tmp_path / "out"
    _copies(tiny_dataset, inp, ["d", "a", "c", "b"])
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "2", "SLURM_ARRAY_TASK_COUNT": "2"}
    result = _segment("-i", inp, "-o", out, "-m", tiny_run / "best.pt", env=env)
    assert result.exit_code == 0, result.output
    assert "part 1 of 2 (Slurm array SLURM_ARRAY_TASK_ID/COUNT): 2 of 4 cases" in result.stdout
    assert [(e["case"], e["status"], e["part"], e["num_parts"]) for e in _manifest(out)] == [
        ("b", "written", 1, 2),
        ("d", "written", 1, 2),
    ]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["b.nii.gz", "d.nii.gz"]


def test_torchrun_two_parts_write_every_case_once(tiny_dataset, tiny_run, tmp_path):
    """A real ``torchrun --nproc_per_node 2``: each process takes its share from RANK/WORLD_SIZE, both write
    into one folder; every case is written exactly once and the statistics table has every case."""
    inp, out = tmp_path / "in", tmp_path / "out"
    names = ["a", "b", "c", "d", "e"]
    _copies(tiny_dataset, inp, names)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    command += ["-m", "pipelines.cli", "segment", "-i", inp, "-o", out, "-m", tiny_run / "best.pt"]
    command += ["--device", "cpu", "--statistics"]
    proc = subprocess.run(
        list(map(str, command)), env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    entries = _manifest(out)
    assert sorted(e["case"] for e in entries) == names and {e["status"] for e in entries} == {"written"}
    by_part = {k: sorted(e["case"] for e in entries if e["part"] == k) for k in (0, 1)}
    assert by_part == {0: ["a", "c", "e"], 1: ["b", "d"]}
    assert {e["num_parts"] for e in entries} == {2} and len({e["pid"] for e in entries}) == 2
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{n}.nii.gz" for n in names]
    table = list(csv.DictReader((out / "statistics.csv").open()))
    assert sorted({r["case"] for r in table}) == names
    assert_no_temp_files(out)


def _append_lines(path: str, part: int) -> None:
    with Manifest(path, part=part, num_parts=2) as manifest:
        for i in range(300):
            manifest.append(f"case_{i}", "x" * 2000, "nifti", "written", 0.5)


def test_manifest_lines_from_concurrent_writers_stay_whole(tmp_path):
    """Two processes append 300 long lines each to one manifest at once: 600 whole JSON lines."""
    path = tmp_path / "manifest.jsonl"
    fork = multiprocessing.get_context("fork")  # the children need no fresh interpreter, only os.write
    procs = [fork.Process(target=_append_lines, args=(str(path), k)) for k in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    lines = path.read_text().splitlines()
    assert len(lines) == 600 and all(json.loads(line)["source"] == "x" * 2000 for line in lines)
    entries = list(read_manifest(path))
    assert sorted(e["part"] for e in entries) == [0] * 300 + [1] * 300
    with Manifest(path) as manifest, pytest.raises(ValueError, match="status 'done' is not one of"):
        manifest.append("a", "a.nii.gz", "nifti", "done")
    with path.open("a") as fh:
        fh.write('{"case": "cut sh')  # a line cut by a full disk is skipped by the reader
    assert len(list(read_manifest(path))) == 600
