"""``medseg export`` reads a sidecar as data, not authority — through the real CLI.

One DICOM series is segmented once per module (the tiny checkpoint; its mask is then overwritten with a
cube of label 1, so the SEG has a segment). Each test copies that output folder and puts a bad case beside
the good one: ``bad.nii.gz`` (the good mask) with a ``bad.json`` that is broken or records a source series
medseg must not open. The bad case fails alone in one ``error:`` line naming its sidecar or mask and the
cause (exit 1, no traceback, no SEG of it, no temporary file left); the good case is still exported.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.bad_inputs.cli import assert_no_temp_files, assert_one_error, run_cli


@pytest.fixture(scope="module")
def segmented(tiny_run, tmp_path_factory):
    """``(sources, out, good)``: the series folder's parent, the segment output, the good case's name."""
    from medseg.data.phantoms import generate_phantom
    from medseg.testing.dicom_series import write_ct_series

    root = tmp_path_factory.mktemp("export_sidecars")
    sources = root / "sources"
    ph = generate_phantom(41, (32, 32, 12), orientation="LPS")
    write_ct_series(ph.image, ph.affine, sources / "P1", patient_id="P1", series_number=3)
    out = root / "out"
    result = run_cli(
        "segment", "-i", sources / "P1", "-o", out, "-m", tiny_run / "best.pt", "--device", "cpu"
    )
    assert result.code == 0, result.output
    (mask_path,) = out.glob("*.nii.gz")
    good = mask_path.name.removesuffix(".nii.gz")
    side = json.loads((out / f"{good}.json").read_text())
    value = min(v for v in side["labels"].values() if v > 0)
    mask = nib.load(mask_path)
    cube = np.zeros(mask.shape, dtype=np.uint8)
    cube[8:20, 8:20, 3:9] = value
    nib.save(nib.Nifti1Image(cube, mask.affine, mask.header), mask_path)
    return sources, out, good


def _copy(segmented, tmp_path: Path) -> tuple[Path, str, dict]:
    _, out_src, good = segmented
    out = tmp_path / "out"
    shutil.copytree(out_src, out)
    return out, good, json.loads((out / f"{good}.json").read_text())


def _bad_case(out: Path, good: str, side: dict | None = None, text: str | None = None) -> Path:
    """``bad.nii.gz`` (the good mask) and ``bad.json`` (``side`` as JSON, or ``text``); returns the sidecar."""
    shutil.copy(out / f"{good}.nii.gz", out / "bad.nii.gz")
    sidecar = out / "bad.json"
    sidecar.write_text(text if text is not None else json.dumps({**side, "case": "bad"}))
    return sidecar


def _export(out: Path, *extra: object):
    return run_cli("export", out, "--output-type", "dicom-seg", *extra)


def _good_exported_bad_not(result, out: Path, good: str) -> None:
    assert result.code == 1, result.output
    assert "1 exported, 1 failed" in result.stdout, result.output
    assert (out / f"{good}_seg.dcm").is_file(), result.output
    assert json.loads((out / f"{good}.json").read_text())["exports"]["dicom_seg"]["path"]
    assert not (out / "bad_seg.dcm").exists()
    assert "dicom_seg" not in (out / "bad.json").read_text()  # the bad sidecar is left as it was
    assert_no_temp_files(out)


def _with_dicom(side: dict, **block) -> dict:
    """``side`` with these keys of its ``dicom`` block changed (other files: the SOP UIDs no longer apply)."""
    kept = {k: v for k, v in side["dicom"].items() if k != "sop_instance_uids" or "files" not in block}
    return {**side, "dicom": {**kept, **block}}


# ---------------------------------------------------------------------------------------------- valid


def test_valid_export_works_with_and_without_a_source_root_covering_the_source(segmented, tmp_path):
    sources, _, _ = segmented
    out, good, _ = _copy(segmented, tmp_path)
    # not cases: another case's output (no sidecar) and a temporary file, even with a sidecar beside it
    shutil.copy(out / f"{good}.nii.gz", out / f"{good}_entropy.nii.gz")
    shutil.copy(out / f"{good}.nii.gz", out / ".tmp-1-00000000-x.nii.gz")
    (out / ".tmp-1-00000000-x.json").write_text("{")
    result = _export(out)
    assert result.code == 0, result.output
    assert "1 exported, 0 failed" in result.stdout and not result.error_lines(), result.output
    seg = out / f"{good}_seg.dcm"
    assert seg.is_file()
    side = json.loads((out / f"{good}.json").read_text())
    assert side["exports"]["dicom_seg"]["round_trip"] == "voxel for voxel identical"
    seg.unlink()
    result = _export(out, "--source-root", sources)
    assert result.code == 0, result.output
    assert "1 exported, 0 failed" in result.stdout and seg.is_file(), result.output


def test_a_series_recorded_in_a_zip_is_found_among_its_listed_members(segmented, tmp_path):
    sources, _, _ = segmented
    out, good, side = _copy(segmented, tmp_path)
    archive = tmp_path / "series.zip"
    members = []
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("README.txt", "not DICOM, not listed, never extracted")
        for path in side["dicom"]["files"]:
            members.append(f"P1/{Path(path).name}")
            zf.write(path, members[-1])
    shutil.copy(out / f"{good}.nii.gz", out / "zipped.nii.gz")
    zipped = {**_with_dicom(side, archive=str(archive), files=members), "case": "zipped"}
    (out / "zipped.json").write_text(json.dumps(zipped))
    result = _export(out, "--source-root", tmp_path)  # the zip inside the root, the series folder outside
    assert result.code == 1, result.output  # ... so the good case's folder source is refused
    assert_one_error(result, f"{good}.nii.gz", sources / "P1", cause="outside --source-root")
    assert (out / "zipped_seg.dcm").is_file() and not (out / f"{good}_seg.dcm").exists()
    assert_no_temp_files(out)


# ---------------------------------------------------------------------------------------------- sidecars


def test_a_truncated_sidecar_fails_its_case_naming_the_sidecar(segmented, tmp_path):
    out, good, _ = _copy(segmented, tmp_path)
    text = (out / f"{good}.json").read_text()
    sidecar = _bad_case(out, good, text=text.replace(f'"{good}"', '"bad"')[: len(text) // 2])
    result = _export(out)
    assert_one_error(result, sidecar, cause="not valid JSON")
    _good_exported_bad_not(result, out, good)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"labels": ["background", "liver"]}, "labels: expected an object"),
        ({"labels": {"liver": 300}}, 'labels["liver"]: expected an integer 0..255'),
        ({"kind": "mri"}, "kind: expected one of nifti, dicom"),
        ({"case": "someone_else"}, 'case: expected the mask\'s name "bad"'),
        ({"dicom": None}, "dicom: expected an object"),
        ({"dicom": {"series_uid": "1.2", "files": "/etc/passwd"}}, "dicom.files: expected a list of strings"),
        ({"warnings": "one"}, "warnings: expected a list of strings"),
        ({"checkpoints": [1]}, "checkpoints[0]: expected a string"),
        ({"exports": []}, "exports: expected an object"),
    ],
)
def test_a_sidecar_with_wrong_types_fails_naming_the_key(segmented, tmp_path, change, key):
    out, good, side = _copy(segmented, tmp_path)
    sidecar = _bad_case(out, good, text=json.dumps({**side, "case": "bad", **change}))
    result = _export(out)
    line = assert_one_error(result, sidecar, cause=key)
    assert "found" in line
    _good_exported_bad_not(result, out, good)


def test_a_million_listed_files_are_refused_by_the_cap_without_looking_at_them(segmented, tmp_path):
    out, good, side = _copy(segmented, tmp_path)
    files = [f"/nonexistent/{i}" for i in range(10**6)]
    sidecar = _bad_case(out, good, _with_dicom(side, files=files))
    result = _export(out)
    line = assert_one_error(result, sidecar, cause="dicom.files: expected at most 10000 files")
    assert "not found" not in line
    _good_exported_bad_not(result, out, good)


# ---------------------------------------------------------------------------------------------- sources


def test_a_recorded_source_in_etc_is_refused_naming_the_case(segmented, tmp_path):
    out, good, side = _copy(segmented, tmp_path)
    _bad_case(out, good, _with_dicom(side, files=["/etc/passwd", "/etc/group"]))
    result = _export(out)
    assert_one_error(result, out / "bad.nii.gz", "/etc", cause="system folder")
    _good_exported_bad_not(result, out, good)


def test_a_series_folder_linked_into_a_system_folder_is_refused(segmented, tmp_path):
    out, good, side = _copy(segmented, tmp_path)
    (tmp_path / "innocent").symlink_to("/etc")
    _bad_case(out, good, _with_dicom(side, files=[str(tmp_path / "innocent" / "passwd")]))
    result = _export(out)
    assert_one_error(result, out / "bad.nii.gz", "/etc", cause="system folder")
    _good_exported_bad_not(result, out, good)


def test_recorded_files_leading_out_through_dotdot_are_refused(segmented, tmp_path):
    sources, _, _ = segmented
    out, good, side = _copy(segmented, tmp_path)
    first = side["dicom"]["files"][0]
    files = [f"{sources}/P1/../../../../../../etc/passwd", *side["dicom"]["files"][1:]]
    _bad_case(out, good, _with_dicom(side, files=files))
    result = _export(out)
    assert_one_error(result, out / "bad.nii.gz", cause="through '..'")
    _good_exported_bad_not(result, out, good)
    assert Path(first).is_file()


def test_a_series_split_over_subfolders_is_found_and_a_missing_file_named(segmented, tmp_path):
    """DICOMDIR-like layouts split one series over subfolders (the reader groups it by UID): its folder is
    the one holding all files; a listed file that is not there fails the case, named."""
    out, good, side = _copy(segmented, tmp_path)
    files = []
    for i, path in enumerate(side["dicom"]["files"]):
        files.append(tmp_path / "split" / f"part{i % 2}" / Path(path).name)
        files[-1].parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, files[-1])
    split = {**_with_dicom(side, files=[str(f) for f in files]), "case": "split"}
    shutil.copy(out / f"{good}.nii.gz", out / "split.nii.gz")
    (out / "split.json").write_text(json.dumps(split))
    missing = [*side["dicom"]["files"][:-1], str(tmp_path / "elsewhere" / "last.dcm")]
    _bad_case(out, good, _with_dicom(side, files=missing))
    result = _export(out)
    assert_one_error(result, out / "bad.nii.gz", tmp_path / "elsewhere" / "last.dcm", cause="not found")
    assert "2 exported, 1 failed" in result.stdout, result.output
    assert (out / "split_seg.dcm").is_file() and not (out / "bad_seg.dcm").exists()
    assert_no_temp_files(out)


def test_a_listed_file_that_links_out_of_its_series_folder_is_refused(segmented, tmp_path):
    sources, _, _ = segmented
    out, good, side = _copy(segmented, tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(sources / "P1", copy)
    files = [str(copy / Path(f).name) for f in side["dicom"]["files"]]
    outside = tmp_path / "outside.dcm"
    shutil.move(files[2], outside)
    os.symlink(outside, files[2])
    _bad_case(out, good, _with_dicom(side, files=files))
    result = _export(out)
    assert_one_error(result, out / "bad.nii.gz", files[2], cause="outside its series folder")
    _good_exported_bad_not(result, out, good)


@pytest.mark.parametrize("how", ["copied", "linked"])
def test_a_source_outside_the_source_root_is_refused(segmented, tmp_path, how):
    """The same series, copied outside ``--source-root`` or reached through a link inside it that leads out."""
    sources, _, _ = segmented
    out, good, side = _copy(segmented, tmp_path)
    outside = tmp_path / "outside" / "P1"
    shutil.copytree(sources / "P1", outside)
    recorded = outside
    if how == "linked":
        recorded = sources / f"link-{tmp_path.name}"
        recorded.symlink_to(outside, target_is_directory=True)
    files = [str(recorded / Path(f).name) for f in side["dicom"]["files"]]
    _bad_case(out, good, _with_dicom(side, files=files))
    try:
        result = _export(out, "--source-root", sources)
    finally:
        if how == "linked":
            recorded.unlink()
    assert_one_error(result, out / "bad.nii.gz", recorded, cause="outside --source-root")
    _good_exported_bad_not(result, out, good)


def test_a_recorded_zip_that_is_not_a_zip_is_refused(segmented, tmp_path):
    out, good, side = _copy(segmented, tmp_path)
    fake = tmp_path / "series.zip"
    fake.write_bytes(b"PK\x03\x04 this is not an archive" * 10)
    members = [f"P1/{Path(f).name}" for f in side["dicom"]["files"]]
    _bad_case(out, good, _with_dicom(side, archive=str(fake), files=members))
    result = _export(out)
    assert_one_error(result, out / "bad.nii.gz", fake, cause="not a readable .zip")
    _good_exported_bad_not(result, out, good)


@pytest.mark.parametrize(
    ("archive", "members", "cause"),
    [
        ("series.tar", ["P1/a.dcm"], "not a .zip file"),
        ("series.zip", ["../a.dcm"], "leads outside the archive"),
        ("series.zip", ["/abs/a.dcm"], "absolute path"),
        ("series.zip", ["P1/missing.dcm"], "no longer in"),
    ],
)
def test_unsafe_recorded_zips_and_members_are_refused(segmented, tmp_path, archive, members, cause):
    out, good, side = _copy(segmented, tmp_path)
    path = tmp_path / archive
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("P1/a.dcm", b"x")
    _bad_case(out, good, _with_dicom(side, archive=str(path), files=members))
    result = _export(out)
    assert_one_error(result, out / "bad.nii.gz", cause=cause)
    _good_exported_bad_not(result, out, good)


def test_a_listed_zip_member_that_is_a_symbolic_link_is_refused(segmented, tmp_path):
    import stat

    out, good, side = _copy(segmented, tmp_path)
    path = tmp_path / "series.zip"
    link = zipfile.ZipInfo("P1/a.dcm")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(link, "/etc/passwd")
    _bad_case(out, good, _with_dicom(side, archive=str(path), files=["P1/a.dcm"]))
    result = _export(out)
    assert_one_error(result, out / "bad.nii.gz", path, cause="symbolic link")
    _good_exported_bad_not(result, out, good)
