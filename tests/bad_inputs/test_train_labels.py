"""Label files holding values the network has no output for: ``medseg train`` refuses before training.

Without the check, a label value 9 with 7 declared labels started training and died mid-epoch in the loss
(``RuntimeError: index 9 is out of bounds for dimension 1 with size 7``, 90 lines of traceback). Now the
label files' values are checked after the header check, before anything is written or built
(:func:`medseg.data.check.require_trainable_dataset`): one ``error:`` line per bad file, naming it and the
values, exit 2. Clean files are remembered by identity (``label_scan.json`` in the run folder and in the
process), so a resumed run or another fold does not read them again; a changed file is read again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medseg.data.voxels as voxels
from medseg.data.check import DatasetError, require_trainable_dataset
from medseg.data.phantoms import write_msd_dataset
from medseg.data.voxels import LABEL_SCAN_NAME, check_label_values, read_label_scan, write_label_scan
from tests.bad_inputs.cli import REPO, run_cli
from tests.conftest import TINY_TRAIN

SHAPE = (32, 32, 16)
CONFIG = REPO / "configs" / "phantoms.yaml"
WRITTEN = ("last.pt", "best.pt", "metrics.csv", "config.yaml", "plan.json", LABEL_SCAN_NAME)


def _resave(path: Path, data: np.ndarray, dtype: type) -> None:
    """``data`` stored as ``dtype`` (unscaled: a fresh header) on the grid of ``path``."""
    affine = nib.load(str(path)).affine
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))


def _label(root: Path, index: int) -> Path:
    return root / "labelsTr" / f"phantom_{index:03d}.nii.gz"


@pytest.fixture
def bad_labels(tmp_path) -> tuple[Path, Path, Path]:
    """4 phantoms (7 labels); case 1's label holds a 9, case 2's (float32) a 0.5."""
    root = tmp_path / "data"
    write_msd_dataset(root, 4, 0, shape=SHAPE, seed=3)
    undeclared, fractional = _label(root, 1), _label(root, 2)
    data = np.asarray(nib.load(str(undeclared)).dataobj).copy()
    data[0, 0, 0] = 9
    _resave(undeclared, data, np.uint8)
    data = np.asarray(nib.load(str(fractional)).dataobj).astype(np.float32)
    data[1, 2, 3] = 0.5
    _resave(fractional, data, np.float32)
    return root, undeclared, fractional


def _sets(root: Path, run: Path) -> list[str]:
    return [a for s in [*TINY_TRAIN, f"data.root={root}", f"train.output={run}"] for a in ("--set", s)]


def _assert_refused(result, undeclared: Path, fractional: Path) -> None:
    assert result.code == 2, result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output, result.output
    lines = result.error_lines()
    assert len(lines) == 2, result.output
    assert lines[0] == (
        f"error: {undeclared}: label value 9 not declared in dataset.json labels (declared: 0..6); 1 voxel"
    ), lines
    assert lines[1] == f"error: {fractional}: label values are not integers (1 voxel(s), e.g. 0.5)", lines
    assert "training not started: 2 problem(s)" in result.stderr


@pytest.mark.parametrize("launcher", [[], ["--nproc", "2"]], ids=["one process", "nproc 2"])
def test_train_refuses_undeclared_and_non_integer_labels_before_writing(bad_labels, tmp_path, launcher):
    """One line per bad label file, every one listed; nothing written in train.output (not even the folder).
    With ``--nproc 2`` the launcher checks before any training process starts."""
    root, undeclared, fractional = bad_labels
    run = tmp_path / "run"
    _assert_refused(run_cli("train", CONFIG, *_sets(root, run), *launcher), undeclared, fractional)
    assert not run.exists(), sorted(run.rglob("*"))


def test_train_refuses_into_an_existing_run_folder_without_touching_it(bad_labels, tmp_path):
    """A resumed (or new) run into a folder with files: refused before any of them is rewritten."""
    root, undeclared, fractional = bad_labels
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,train_loss\n1,0.5\n")
    _assert_refused(run_cli("train", CONFIG, *_sets(root, run), "--resume"), undeclared, fractional)
    assert sorted(p.name for p in run.iterdir()) == ["metrics.csv"]
    assert (run / "metrics.csv").read_text() == "epoch,train_loss\n1,0.5\n"


def test_torchrun_ranks_all_stop_on_a_refused_dataset(bad_labels, tmp_path):
    """Under torchrun rank 0 checks for every rank: it prints the problems, the other rank stops with it
    (no rank left waiting), and nothing is written."""
    root, undeclared, fractional = bad_labels
    run = tmp_path / "run"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    result = run_cli(
        "train", CONFIG, *_sets(root, run), "--set", "train.device=cpu", launcher=launcher, timeout=240
    )
    output = result.output
    assert result.code != 0, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and str(undeclared) in lines[0] and str(fractional) in lines[1], output
    assert output.count("training not started: 2 problem(s)") == 1, output  # rank 0 alone speaks
    assert not run.exists()


@pytest.fixture
def clean(tmp_path, monkeypatch) -> tuple[Path, Path, list[str]]:
    """A clean 3-case dataset, a scan file path, and the list of files each label scan reads (this process
    starts with nothing remembered)."""
    root = tmp_path / "data"
    write_msd_dataset(root, 3, 0, shape=SHAPE, seed=6)
    monkeypatch.setattr(voxels, "seen_labels", {})
    reads: list[str] = []
    scan = voxels.scan_voxels

    def counted(path, role, declared=None):
        reads.append(Path(path).name)
        return scan(path, role, declared)

    monkeypatch.setattr(voxels, "scan_voxels", counted)
    return root, tmp_path / "run" / LABEL_SCAN_NAME, reads


def test_label_scan_reads_each_label_once_and_is_remembered(clean, monkeypatch):
    root, scan_file, reads = clean
    report = require_trainable_dataset(root, workers=1, scan_file=scan_file)
    assert sorted(reads) == [f"phantom_{i:03d}.nii.gz" for i in range(3)]  # labels only, no image
    assert len(report.label_facts) == 3 and all(f[4:] == (0, 6) for f in report.label_facts.values())

    reads.clear()
    require_trainable_dataset(root, workers=1, scan_file=scan_file)  # same process: nothing read
    assert reads == []

    scan_file.parent.mkdir()
    write_label_scan(scan_file, report.label_facts)
    assert read_label_scan(scan_file) == report.label_facts
    monkeypatch.setattr(voxels, "seen_labels", {})  # a new process (a resumed run, another fold)
    require_trainable_dataset(root, workers=1, scan_file=scan_file)
    assert reads == []
    monkeypatch.setattr(voxels, "seen_labels", {})  # a training process of --nproc: told by the launcher
    voxels.remember_label_scan(report.label_facts)
    require_trainable_dataset(root, workers=1)
    assert reads == []

    # a label changed since (a 9 written into it): read again and refused, the others not read
    monkeypatch.setattr(voxels, "seen_labels", {})
    bad = _label(root, 2)
    data = np.asarray(nib.load(str(bad)).dataobj).copy()
    data[5, 5, 5] = 9
    _resave(bad, data, np.uint8)
    with pytest.raises(DatasetError) as info:
        require_trainable_dataset(root, workers=1, scan_file=scan_file)
    assert reads == [bad.name]
    assert [p.line() for p in info.value.problems] == [
        f"{bad}: label value 9 not declared in dataset.json labels (declared: 0..6); 1 voxel"
    ]


def test_remembered_values_are_checked_against_the_labels_of_now(clean, monkeypatch):
    """Facts are values, not verdicts: with a label removed from dataset.json, files holding it are read
    again (and refused); a damaged scan file is ignored."""
    root, scan_file, reads = clean
    scan_file.parent.mkdir()
    write_label_scan(scan_file, require_trainable_dataset(root, workers=1).label_facts)
    meta = json.loads((root / "dataset.json").read_text())
    del meta["labels"]["6"]
    (root / "dataset.json").write_text(json.dumps(meta))
    monkeypatch.setattr(voxels, "seen_labels", {})
    reads.clear()
    with pytest.raises(DatasetError) as info:
        require_trainable_dataset(root, workers=1, scan_file=scan_file)
    assert len(reads) == 3 and len(info.value.problems) == 3
    assert all(
        "label value 6 not declared" in p.line() and "(declared: 0..5)" in p.line()
        for p in info.value.problems
    )

    scan_file.write_text('{"version": 1, "files": {"x": [1, 2')
    assert read_label_scan(scan_file) == {}


def test_two_label_files_are_read_by_two_processes(bad_labels):
    root, undeclared, fractional = bad_labels
    with pytest.raises(DatasetError) as info:
        require_trainable_dataset(root, workers=2)
    assert [p.files for p in info.value.problems] == [(str(undeclared),), (str(fractional),)]


@pytest.mark.parametrize(
    ("data", "declared", "cause", "span"),
    [
        (np.array([0, 1, 6, 6], np.uint8), range(7), None, (0, 6)),
        (np.array([0.0, 2.0, 3.0], np.float32), range(7), None, (0, 3)),
        (np.array([True, False]), range(2), None, (0, 1)),
        (np.array([0, -1, 7, 7, 300], np.int16), range(7), "label values -1, 7, 300 not declared", (-1, 300)),
        (np.arange(40, dtype=np.int32), range(7), "7, 8, 9, 10, 11, 12, 13, 14, 15, 16, … (33 values)", None),
        (
            np.array([0.0, 1.5], np.float64),
            range(7),
            "label values are not integers (1 voxel(s), e.g. 1.5)",
            None,
        ),
        (np.array([0.0, np.nan], np.float32), range(7), "label map holds NaN or infinite values", None),
        (np.array([0, 1, 3], np.uint8), [0, 1, 3], None, (0, 3)),  # not 0..K-1: checked value by value
        (
            np.array([0, 2], np.uint8),
            [0, 1, 3],
            "label value 2 not declared in dataset.json labels (declared: 0, 1, 3)",
            None,
        ),
    ],
)
def test_check_label_values(data, declared, cause, span):
    got_cause, got_span = check_label_values(data, list(declared))
    if cause is None:
        assert got_cause is None and got_span == span
    else:
        assert cause in got_cause, got_cause
        assert span is None or got_span == span


def test_a_run_records_its_label_files(tiny_run, tiny_dataset):
    """A run that started wrote what its label files held into its run folder (for --resume and folds)."""
    facts = read_label_scan(tiny_run / LABEL_SCAN_NAME)
    labels = sorted(str(p.resolve()) for p in (tiny_dataset / "labelsTr").glob("*.nii.gz"))
    assert sorted(facts) == labels
    assert all(0 <= f[4] <= f[5] <= 6 and f[:4] == voxels.identity(name) for name, f in facts.items())
