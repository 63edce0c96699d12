"""Batches through the real CLI: stale temporary files, complete cases skipped, odd folder entries listed.

The library rules behind them are tested directly too: which temporary files are stale
(:func:`medseg.io.atomic.remove_stale_temps`) and when a case is complete
(:func:`medseg.batch.run.is_complete`).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import pytest

from medseg.batch.run import is_complete, segment_inputs, sidecar_path, source_stamp
from medseg.io import InputError
from medseg.io.atomic import STALE_AFTER_S, remove_stale_temps, temp_prefix
from tests.bad_inputs.cli import REPO, assert_no_temp_files, assert_one_error, run_cli

_CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _dead_writer_prefix(path: Path) -> str:
    """The temporary-name prefix a writer process would use for ``path``, from a process that has exited
    (and been reaped), so its PID is dead."""
    code = "import sys; from medseg.io.atomic import temp_prefix; print(temp_prefix(sys.argv[1]))"
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], env=_CHILD_ENV, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def _inputs(tiny_dataset: Path, folder: Path, names: list[str]) -> list[Path]:
    """Copies of the two test phantoms under new case names (alternating)."""
    sources = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, name in enumerate(names):
        files.append(folder / f"{name}.nii.gz")
        shutil.copyfile(sources[i % len(sources)], files[-1])
    return files


def _assert_case_written(src: Path, out: Path) -> dict:
    """Mask with the input's shape and affine, and a sidecar that names this input; returns the sidecar."""
    mask, ref = nib.load(out / src.name), nib.load(src)
    assert mask.shape == ref.shape and (mask.affine == ref.affine).all()
    side = json.loads(sidecar_path(out / src.name).read_text())
    assert side["source_file"] == source_stamp(src) and side["labels"]["liver"] == 1
    return side


def test_remove_stale_temps_keeps_live_writers(tmp_path):
    target = tmp_path / "mask.nii.gz"
    live = tmp_path / f"{temp_prefix(target)}abc.nii.gz"  # this test process: alive
    dead = tmp_path / f"{_dead_writer_prefix(target)}abc.nii.gz"
    old_pattern = tmp_path / ".tmp-mask.nii.gz.k2j4h1q9.nii.gz"  # medseg ≤ 0.2: no writer recorded
    other_host = tmp_path / f".tmp-{os.getpid()}-0000ffff-mask.nii.gz.abc.nii.gz"
    ancient_other_host = tmp_path / ".tmp-1-0000ffff-mask.nii.gz.old.nii.gz"
    # a child killed with SIGKILL and not reaped yet is a zombie: it still answers signal 0
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    zombie_file = tmp_path / f".tmp-{zombie.pid}-{temp_prefix(target).split('-')[2]}-mask.nii.gz.z.nii.gz"
    keep = [live, other_host, target, tmp_path / "notes.tmp-1.txt", tmp_path / ".tmp-another-tools-file"]
    for path in [*keep, dead, old_pattern, ancient_other_host, zombie_file]:
        path.write_bytes(b"x")
    two_days = time.time() - 2 * STALE_AFTER_S
    os.utime(ancient_other_host, (two_days, two_days))
    try:
        zombie.send_signal(signal.SIGKILL)
        while Path(f"/proc/{zombie.pid}").exists() and "Z" not in _proc_state(zombie.pid):
            time.sleep(0.01)
        removed = remove_stale_temps(tmp_path)
    finally:
        zombie.wait()
    assert sorted(removed) == sorted([dead, old_pattern, ancient_other_host, zombie_file])
    assert sorted(tmp_path.iterdir()) == sorted(keep)
    assert remove_stale_temps(tmp_path / "missing") == []


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_complete_means_mask_and_matching_sidecar(tmp_path):
    src = tmp_path / "ct.nii.gz"
    src.write_bytes(b"scan")
    mask = tmp_path / "out" / "ct.nii.gz"
    mask.parent.mkdir()
    identity = {"source_file": source_stamp(src), "checkpoint_sha256": "ab" * 32, "overlap": 0.5}
    assert not is_complete(mask, identity)  # nothing written
    sidecar_path(mask).write_text(json.dumps({"labels": {}, **identity}))
    assert not is_complete(mask, identity)  # sidecar without mask (killed before the mask's rename)
    mask.write_bytes(b"mask")
    assert is_complete(mask, identity)
    assert not is_complete(mask, {**identity, "checkpoint_sha256": "cd" * 32})  # another checkpoint
    assert not is_complete(mask, {**identity, "overlap": 0.25})  # other sliding-window overlap
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 1))
    assert not is_complete(mask, {**identity, "source_file": source_stamp(src)})  # input changed
    sidecar_path(mask).write_text('{"labels": ')  # a sidecar cut short
    assert not is_complete(mask, identity)


def test_rerun_skips_complete_cases_and_redoes_the_rest(tiny_dataset, tiny_run, tmp_path):
    """Also: stale temporary files go, a live writer's stay, temporary files are never inputs, and entries
    that are not readable files (dangling link, folder or FIFO named like a scan) are listed failures every run."""
    inp, out, model = tmp_path / "in", tmp_path / "out", tiny_run / "best.pt"
    files = _inputs(tiny_dataset, inp, ["a", "b", "c", "d"])
    # a leftover temporary file in the input folder would be a failed case if it were taken for an input
    (inp / ".tmp-e.nii.gz.x9q.nii.gz").write_bytes(b"half a scan")
    dangling = inp / "dangling.nii.gz"
    dangling.symlink_to(tmp_path / "gone.nii.gz")
    (inp / "folder.nii.gz").mkdir()
    os.mkfifo(inp / "pipe.nii.gz")  # a reader opening it would wait forever
    odd = [
        f"error: {dangling}: dangling symbolic link (target {tmp_path / 'gone.nii.gz'} not found)",
        f"error: {inp / 'folder.nii.gz'}: is a folder, expected a NIfTI file",
        f"error: {inp / 'pipe.nii.gz'}: not a regular file (a FIFO, socket or device), expected a NIfTI file",
    ]
    out.mkdir()
    stale = out / f"{_dead_writer_prefix(out / 'a.nii.gz')}r4nd.nii.gz"
    live = out / f"{temp_prefix(out / 'b.nii.gz')}r4nd.nii.gz"  # a concurrent run still writing b
    stale.write_bytes(b"half a mask")
    live.write_bytes(b"half a mask")

    first = run_cli("segment", "-i", inp, "-o", out, "-m", model, "--device", "cpu")
    assert first.code == 1 and "Traceback" not in first.output, first.output
    assert first.error_lines() == odd
    assert "4 written, 3 failed, 0 skipped" in first.stdout and ".tmp-e" not in first.output
    assert not stale.exists() and live.exists()
    live.unlink()
    assert_no_temp_files(out)
    sides = {f.name: _assert_case_written(f, out) for f in files}
    assert all(
        s["warnings"] == [] and [len(h) for h in s["checkpoint_sha256"]] == [64] for s in sides.values()
    )

    (out / "b.nii.gz").unlink()  # killed between sidecar and mask
    sidecar_path(out / "d.nii.gz").unlink()  # a mask without sidecar (written by an older medseg)
    st = files[2].stat()
    os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the input c changed since
    again = run_cli("segment", "-i", inp, "-o", out, "-m", model, "--device", "cpu")
    assert again.code == 1 and again.error_lines() == odd, again.output
    assert "[1/7] a.nii.gz: done, skipped" in again.stdout
    for name in ("b", "c", "d"):
        assert f"{name}.nii.gz → {out / name}.nii.gz" in again.stdout
    assert "3 written, 3 failed, 1 skipped" in again.stdout
    for f in files:
        _assert_case_written(f, out)

    redo = run_cli("segment", "-i", inp, "-o", out, "-m", model, "--device", "cpu", "--overwrite")
    assert redo.code == 1 and "4 written, 3 failed, 0 skipped" in redo.stdout, redo.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.jsonl", *(n for f in files for n in (f.name, f"{f.name[: -len('.nii.gz')]}.json"))]
    )


def test_single_bad_file_is_one_error_line(tiny_dataset, tiny_run, tmp_path):
    (good,) = _inputs(tiny_dataset, tmp_path, ["good"])
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    result = run_cli("segment", "-i", bad, "-o", tmp_path / "o.nii.gz", "-m", tiny_run / "best.pt")
    assert result.code == 1
    assert_one_error(result, bad, cause="truncated or corrupt compressed file")
    assert "[1/1] cut.nii.gz: failed" in result.stdout and "FAILED" not in result.output
    assert not (tmp_path / "o.nii.gz").exists() and not (tmp_path / "o.json").exists()
    assert_no_temp_files(tmp_path)


def test_output_onto_the_input_is_refused(tiny_dataset, tmp_path):
    """Masks written into the input folder would overwrite ``<case>.nii.gz`` scans or become inputs."""
    (scan,) = _inputs(tiny_dataset, tmp_path / "in", ["ct"])
    before = scan.read_bytes()
    with pytest.raises(InputError, match="output folder is the input folder"):
        segment_inputs(scan.parent, scan.parent, "unused.pt")
    with pytest.raises(InputError, match="the mask would overwrite its input scan"):
        segment_inputs(scan, scan, "unused.pt")
    assert scan.read_bytes() == before and sorted(scan.parent.iterdir()) == [scan]


def test_temp_files_are_not_predictions(tiny_dataset, tmp_path):
    pred = tmp_path / "pred"
    shutil.copytree(tiny_dataset / "labelsTs", pred)
    case = sorted(pred.glob("*.nii.gz"))[0]
    # an interrupted write's leftover: taken for a prediction it would be "a prediction without reference"
    (pred / f".tmp-{case.name}.q1w2.nii.gz").write_bytes(gzip.compress(b"half a mask"))
    result = run_cli("evaluate", "--pred", pred, "--ref", tiny_dataset / "labelsTs", "-o", tmp_path / "m.csv")
    assert result.code == 0, result.output
    assert ".tmp-" not in result.output and "warning:" not in result.output
    summary = json.loads((tmp_path / "m_summary.json").read_text())
    assert summary["n_evaluated"] == 2 and summary["missing_references"] == []
