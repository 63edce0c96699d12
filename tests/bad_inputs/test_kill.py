"""Kill tests: real ``medseg`` processes stopped with a real SIGKILL, then run again.

``segment`` is killed right after its first complete mask appears (the moment is seen by polling the
output folder, so the test does not depend on how fast the machine is); ``train`` right after ``last.pt``
of the first epoch appears. A write cut in the middle is made deterministic by a helper process that
SIGKILLs itself inside :func:`medseg.io.atomic.atomic_path`, exactly where a killed writer leaves its
temporary file.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import torch

from medseg.batch.run import read_sidecar
from medseg.io.checkpoint import load_checkpoint
from medseg.report import read_history
from tests.bad_inputs.cli import REPO, assert_no_temp_files, run_cli
from tests.conftest import TINY_TRAIN

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "NO_COLOR": "1",
    "PYTHONWARNINGS": "ignore",
    "PYTHONPATH": str(REPO),
}
#: Only a guard against a hung child; nothing is asserted about durations.
GIVE_UP_S = 300


def _start(*args: object, log: Path) -> subprocess.Popen:
    """``medseg ARGS...`` started in the background, output to ``log`` (no pipe that could fill up)."""
    with log.open("w") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", *map(str, args)],
            cwd=REPO,
            env=ENV,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], log: Path) -> None:
    """Poll until ``ready()``, then SIGKILL ``proc`` and reap it (a zombie would still look alive)."""
    deadline = time.monotonic() + GIVE_UP_S
    while not ready():
        assert proc.poll() is None, f"finished before it could be killed:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"never got there:\n{log.read_text()}"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def _killed_mid_write(dst: Path) -> None:
    """A process that dies by SIGKILL with half of ``dst`` in its temporary file."""
    code = (
        "import os, signal, sys\n"
        "from medseg.io.atomic import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'half a mask')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(dst)], env=ENV, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL


def _masks(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.nii.gz") if not p.name.startswith("."))


def test_killed_segment_continues(tiny_dataset, tiny_run, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    sources = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))
    names = ["a", "b", "c"]
    for i, name in enumerate(names):
        shutil.copyfile(sources[i % len(sources)], inp / f"{name}.nii.gz")
    args = ("segment", "-i", inp, "-o", out, "-m", tiny_run / "best.pt", "--device", "cpu")

    log = tmp_path / "killed.log"
    _kill_when(_start(*args, log=log), lambda: bool(_masks(out)), log)
    done = _masks(out)
    # a mask never exists without its sidecar, whenever the run was killed
    assert all(read_sidecar(m) is not None for m in done), done
    # and the case being written at that moment: a real SIGKILL inside the atomic write of the last mask
    _killed_mid_write(out / "c.nii.gz")
    temps = [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert temps

    again = run_cli(*args)
    assert again.code == 0, again.output
    assert f"removed {len(temps)} stale temporary file(s)" in again.stdout
    for i, name in enumerate(names, 1):
        skipped = f"[{i}/3] {name}.nii.gz: done, skipped" in again.stdout
        assert skipped == (out / f"{name}.nii.gz" in done), again.stdout
    assert f"{len(done)} skipped" in again.stdout
    assert_no_temp_files(tmp_path)
    for name in names:
        mask, scan = nib.load(out / f"{name}.nii.gz"), nib.load(inp / f"{name}.nii.gz")
        assert mask.shape == scan.shape and (mask.affine == scan.affine).all()
        assert mask.get_fdata().max() <= 6
        assert read_sidecar(out / f"{name}.nii.gz")["source_file"]["path"] == str(inp / f"{name}.nii.gz")


def test_killed_training_resumes_bit_identically(tiny_dataset, tmp_path):
    def train_args(run: Path, *extra: str) -> list[object]:
        config = tmp_path / f"{run.name}.yaml"
        config.write_text(f"data:\n  root: {tiny_dataset}\ntrain:\n  output: {run}\n")
        sets = [a for s in TINY_TRAIN for a in ("--set", s)]
        return ["train", config, *sets, "--set", "train.epochs=2", *extra]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # the uninterrupted run goes on beside the one that is killed (two processes, same settings)
    reference = _start(*train_args(straight), log=tmp_path / "straight.log")
    log = tmp_path / "killed.log"
    _kill_when(_start(*train_args(killed), log=log), (killed / "last.pt").exists, log)
    assert load_checkpoint(killed / "last.pt")["epoch"] == 0, "killed after the second epoch, not the first"
    assert reference.wait(timeout=GIVE_UP_S) == 0, (tmp_path / "straight.log").read_text()

    resumed = run_cli(*train_args(killed, "--resume"))
    assert resumed.code == 0, resumed.output
    assert "resumed from" in resumed.stdout and "at epoch 1" in resumed.stdout
    a = load_checkpoint(straight / "last.pt")
    b = load_checkpoint(killed / "last.pt")
    assert a["epoch"] == b["epoch"] == 1
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # the resumed run removed the killed writer's temporary files, and the history has one row per epoch
    assert_no_temp_files(killed)
    assert [r["epoch"] for r in read_history(killed / "metrics.csv")] == ["1", "2"]


def test_sigterm_stops_training_cleanly_and_it_resumes(tiny_dataset, tmp_path):
    """SIGTERM (a scheduler's stop, ``docker stop``) is handled like Ctrl-C: exit 143, one line, no temporary
    file, and ``--resume`` continues from the last complete epoch."""
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  root: {tiny_dataset}\ntrain:\n  output: {run}\n")
    args = ["train", config, *[a for s in TINY_TRAIN for a in ("--set", s)], "--set", "train.epochs=3"]
    log = tmp_path / "train.log"
    proc = _start(*args, log=log)
    deadline = time.monotonic() + GIVE_UP_S
    while not (run / "last.pt").exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=GIVE_UP_S) == 128 + signal.SIGTERM, log.read_text()
    text = log.read_text()
    assert "interrupted (SIGTERM): stopped after the current write" in text and "Traceback" not in text
    assert_no_temp_files(run)
    resumed = run_cli(*args, "--resume")
    assert resumed.code == 0, resumed.output
    assert "resumed from" in resumed.stdout
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
