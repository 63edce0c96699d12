"""The output side of a batch under stress, through the real CLI: a folder that cannot be written, a disk
that fills, SIGTERM / SIGINT in the middle of a zip batch, a DICOM SEG that cannot be made, and two
unsharded runs on one input and output folder.

The full disk is a real one: a tmpfs mounted for the test (needs root, as on the development and CI
machines; the test says why it skips elsewhere). The unwritable folder is ``chattr +i`` (root ignores
permission bits, not the immutable attribute).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import pydicom
import pytest

from medseg.batch.manifest import read_manifest
from medseg.batch.run import read_sidecar
from medseg.data.phantoms import generate_phantom
from medseg.io.claims import Claims, claim_path
from medseg.testing.dicom_series import write_ct_series
from tests.bad_inputs.cli import REPO, assert_no_temp_files, assert_one_error, run_cli

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "NO_COLOR": "1",
    "PYTHONWARNINGS": "ignore",
    "PYTHONPATH": str(REPO),
}


def _inputs(tiny_dataset: Path, folder: Path, names: list[str]) -> Path:
    sources = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        shutil.copyfile(sources[i % len(sources)], folder / f"{name}.nii.gz")
    return folder


def _masks(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.nii.gz") if not p.name.startswith("."))


def _assert_whole(folder: Path) -> None:
    """Every mask has its sidecar; no temporary file, claim or extraction folder is left."""
    for name in _masks(folder):
        assert read_sidecar(folder / name) is not None, name
    assert_no_temp_files(folder)
    assert not list(folder.glob(".claim-*")), list(folder.iterdir())


@pytest.fixture
def immutable(tmp_path):
    folder = tmp_path / "immutable"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root and an ext4/xfs-like file system)")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_unwritable_output_folder_is_refused_before_any_work(tiny_dataset, tiny_run, tmp_path, immutable):
    inp = _inputs(tiny_dataset, tmp_path / "in", ["a"])
    result = run_cli("segment", "-i", inp, "-o", immutable, "-m", tiny_run / "best.pt", "--device", "cpu")
    assert result.code == 2
    assert_one_error(result, immutable, cause="output folder cannot be written")
    assert list(immutable.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last block (inodes stay: the write check still passes)."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_full_disk_fails_each_case_in_one_line_stops_and_resumes(
    tiny_dataset, tiny_run, tmp_path, small_disk
):
    """The disk fills after the first case: the next case fails on its write, the rest are not started, the
    folder files fail in one line each, nothing is half-written; freeing space and re-running continues."""
    inp = _inputs(tiny_dataset, tmp_path / "in", ["a"])
    out = small_disk / "out"
    args = ["-m", tiny_run / "best.pt", "--device", "cpu", "--statistics", "--output-type", "slicer"]
    first = run_cli("segment", "-i", inp, "-o", out, *args)
    assert first.code == 0, first.output
    _inputs(tiny_dataset, inp, ["b", "c", "d"])
    filler = _fill(small_disk)

    full = run_cli("segment", "-i", inp, "-o", out, *args)
    assert full.code == 1, full.output
    assert "Traceback" not in full.output
    errors = full.error_lines()
    assert any(f"{inp / 'b.nii.gz'}: cannot write its outputs: no space left on device" in e for e in errors)
    # c may be under way in the loader when b's write fails; d is never computed: the network would only
    # make masks that cannot be written
    assert any(f"{inp / 'c.nii.gz'}: " in e and "no space left" in e for e in errors), errors
    assert any(f"{inp / 'd.nii.gz'}: not started: no space left" in e for e in errors), errors
    assert any("statistics.csv: cannot write" in e for e in errors) and any(
        "itksnap_labels.txt" in e for e in errors
    )
    assert len(errors) == 5, errors
    assert _masks(out) == ["a.nii.gz"]
    _assert_whole(out)

    filler.unlink()
    again = run_cli("segment", "-i", inp, "-o", out, *args)
    assert again.code == 0, again.output
    assert "a.nii.gz: done, skipped" in again.stdout
    assert _masks(out) == ["a.nii.gz", "b.nii.gz", "c.nii.gz", "d.nii.gz"]
    assert (out / "statistics.csv").is_file() and (out / "itksnap_labels.txt").is_file()
    _assert_whole(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_a_zip_batch_stops_cleanly(tiny_dataset, tiny_run, tmp_path, sig):
    """Stopped right after its first mask: exit 128 + signal, one line saying so, the extraction folder, the
    claims and every temporary file removed, complete masks kept; the same command then continues."""
    inp = _inputs(tiny_dataset, tmp_path / "in", ["a", "b", "c", "d"])
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(inp.iterdir()):
            zf.write(path, f"export/{path.name}")
    out = tmp_path / "out"
    args = ["segment", "-i", archive, "-o", out, "-m", tiny_run / "best.pt", "--device", "cpu"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", *map(str, args)],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not _masks(out) if out.exists() else True:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert list(out.glob(".tmp-*-unzip.*")), "the archive is extracted into the output folder while it runs"
    proc.send_signal(sig)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + sig, output
    assert "Traceback" not in output and "Aborted" not in output
    assert f"interrupted ({sig.name}): stopped after the current write" in output
    done = _masks(out)
    assert 1 <= len(done) < 4, output
    _assert_whole(out)
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]

    again = run_cli(*args)
    assert again.code == 0, again.output
    assert again.stdout.count("done, skipped") == len(done)
    assert _masks(out) == ["a.nii.gz", "b.nii.gz", "c.nii.gz", "d.nii.gz"]
    _assert_whole(out)


def test_seg_that_cannot_be_made_keeps_mask_preview_and_statistics(tiny_run, tmp_path):
    """An anonymised series whose SOP Instance UIDs are empty: mask, preview and statistics are written,
    the SEG refusal is one line naming the missing UIDs, the case counts as failed-export (exit 1), and a
    re-run reports it again without recomputing."""
    ph = generate_phantom(3, (48, 48, 24))
    series = tmp_path / "anon"
    write_ct_series(ph.image, ph.affine, series)
    for path in sorted(series.iterdir()):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ""
        ds.file_meta.MediaStorageSOPInstanceUID = ""
        ds.save_as(path)
    out = tmp_path / "out"
    args = ["-m", tiny_run / "best.pt", "--device", "cpu", "--statistics", "--preview"]
    result = run_cli("segment", "-i", series, "-o", out, "--output-type", "nifti,dicom-seg", *args)
    assert result.code == 1
    line = assert_one_error(result, series, cause="24 of 24 image(s) have no SOPInstanceUID")
    case = "PHANTOM001_20240101_1"
    assert f"mask written: {out / case}.nii.gz" in line
    mask = nib.load(out / f"{case}.nii.gz")
    assert mask.shape == ph.image.shape
    for name in (f"{case}_preview.png", f"{case}_stats.json", "statistics.csv", "index.html"):
        assert (out / name).is_file(), name
    assert not (out / f"{case}_seg.dcm").exists()
    assert [e["status"] for e in read_manifest(out / "manifest.jsonl")] == ["failed-export"]
    assert json.loads((out / f"{case}.json").read_text())["export_error"] == line.removeprefix("error: ")
    assert "viewer export failed" in (out / "index.html").read_text()  # the review page shows it
    _assert_whole(out)

    again = run_cli("segment", "-i", series, "-o", out, "--output-type", "nifti,dicom-seg", *args)
    assert again.code == 1 and "mask complete; viewer export failed" in again.stdout
    assert_one_error(again, series, cause="no SOPInstanceUID")
    # without the SEG the same input is simply written
    plain = run_cli("segment", "-i", series, "-o", tmp_path / "plain", *args)
    assert plain.code == 0, plain.output


def test_two_unsharded_runs_on_one_folder_do_every_case_once(tiny_dataset, tiny_run, tmp_path):
    names = [f"c{i}" for i in range(6)]
    inp = _inputs(tiny_dataset, tmp_path / "in", names)
    out = tmp_path / "out"
    args = ["segment", "-i", inp, "-o", out, "-m", tiny_run / "best.pt", "--device", "cpu"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", *map(str, args)],
            cwd=REPO,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    entries = list(read_manifest(out / "manifest.jsonl"))
    written = sorted(e["case"] for e in entries if e["status"] == "written")
    assert written == names, entries  # each case segmented by exactly one of the runs
    assert {e["status"] for e in entries} <= {"written", "skipped", "claimed"}
    assert _masks(out) == [f"{n}.nii.gz" for n in names]
    _assert_whole(out)


def test_claims_exclude_live_holders_and_pass_from_dead_ones(tmp_path):
    code = (
        "import sys, time\n"
        "from medseg.io.claims import Claims\n"
        "c = Claims(sys.argv[1]); assert c.claim('ct') is None\n"
        "print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        mine = Claims(tmp_path)
        assert mine.claim("ct") == f"another run (pid {holder.pid} on {os.uname().nodename})"
        assert mine.claim("other") is None and mine.claim("other") is None  # re-entrant for its holder
    finally:
        holder.kill()
        holder.wait()
    assert claim_path(tmp_path, "ct").exists()  # a killed holder leaves its file; the kernel dropped the lock
    assert mine.claim("ct") is None
    mine.release_all()
    assert list(tmp_path.iterdir()) == []


def test_export_into_a_full_or_unwritable_folder(tiny_dataset, tiny_run, tmp_path, small_disk):
    """``medseg export`` on the same terms: a full disk fails the case in one line and starts no other; a
    folder that cannot be written is refused before any work."""
    inp = _inputs(tiny_dataset, tmp_path / "in", ["a", "b", "c"])
    out = small_disk / "out"
    done = run_cli("segment", "-i", inp, "-o", out, "-m", tiny_run / "best.pt", "--device", "cpu")
    assert done.code == 0, done.output
    filler = _fill(small_disk)
    full = run_cli("export", out, "--output-type", "slicer")
    assert full.code == 1 and "Traceback" not in full.output, full.output
    errors = full.error_lines()
    assert f"error: {out / 'a.nii.gz'}: cannot write its files: no space left on device" in errors[0], errors
    assert [e.split(": ")[1] for e in errors[1:3]] == [str(out / "b.nii.gz"), str(out / "c.nii.gz")], errors
    assert all("not started" in e for e in errors[1:3]), errors
    assert len(errors) == 3
    assert "slicer" not in read_sidecar(out / "a.nii.gz").get("exports", {})  # the old sidecar, whole
    assert not (out / "b.seg.nrrd").exists() and not (out / "c.seg.nrrd").exists()
    _assert_whole(out)
    filler.unlink()
    subprocess.run(["chattr", "+i", str(out)], check=True)
    try:
        refused = run_cli("export", out, "--output-type", "slicer")
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    assert refused.code == 2
    assert_one_error(refused, out, cause="cannot be written")
