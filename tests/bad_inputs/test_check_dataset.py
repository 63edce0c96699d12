"""Broken training data: ``medseg check-dataset`` lists every problem, ``medseg train`` refuses to start.

One dataset is broken in every way the check knows (19 problems at once, built at test time from small
phantoms); each expected problem must appear as exactly one ``error:`` line naming its file. The split into
the header part (what ``train`` runs) and the voxel part is tested on the function itself.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.check import AFFINE_TOLERANCE_MM, check_dataset
from medseg.data.datasets import EntryError, training_cases
from medseg.data.phantoms import write_msd_dataset
from medseg.io import UnsafePathError, resolve_inside
from tests.bad_inputs.cli import assert_one_error, run_cli
from tests.conftest import TINY_TRAIN

SHAPE = (32, 32, 16)
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "phantoms.yaml"

#: (fragments that must all be in one error line, found by the header check alone?)
HEADER, VOXEL = True, False


def _resave(path: Path, data: np.ndarray, affine: np.ndarray, dtype: type) -> None:
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))


def _volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def _broken_dataset(base: Path) -> tuple[Path, list[tuple[tuple[str, ...], bool]]]:
    """A 16-case phantom dataset broken in every checked way; returns it and the expected problems."""
    root, outside = base / "data", base / "elsewhere"
    write_msd_dataset(root, 16, 0, shape=SHAPE, seed=5)
    meta = json.loads((root / "dataset.json").read_text())
    tr = meta["training"]
    img = {i: root / "imagesTr" / f"phantom_{i:03d}.nii.gz" for i in range(16)}
    lab = {i: root / "labelsTr" / f"phantom_{i:03d}.nii.gz" for i in range(16)}
    outside.mkdir()
    shutil.copy(img[0], base / "outside.nii.gz")
    shutil.copy(lab[3], outside / "phantom_003.nii.gz")
    expected = []

    tr[0]["image"] = "../outside.nii.gz"  # climbs out with ..
    expected.append((("dataset.json", "training[0] image", "leads outside the dataset folder"), HEADER))
    tr[1]["label"] = str(base / "outside.nii.gz")  # absolute
    expected.append((("dataset.json", "training[1] label", "absolute path"), HEADER))
    img[2].unlink()  # a file that is a symlink to a file outside
    img[2].symlink_to(base / "outside.nii.gz")
    expected.append((("dataset.json", "training[2] image", "is a symlink to", "outside"), HEADER))
    (root / "linked").symlink_to(outside, target_is_directory=True)  # a parent folder leading out
    tr[3]["label"] = "./linked/phantom_003.nii.gz"
    expected.append((("dataset.json", "training[3] label", "goes through 'linked'"), HEADER))

    lab[4].unlink()
    expected.append(((str(lab[4]), "file not found", "training[4] label"), HEADER))
    img[5].write_bytes(b"not a NIfTI file " * 40)
    expected.append(((str(img[5]), "not a readable NIfTI"), HEADER))
    data, affine = _volume(img[6])
    _resave(img[6], np.stack([data, data], axis=-1), affine, np.int16)
    expected.append(((str(img[6]), "expected a 3D volume, found 4D"), HEADER))
    data, affine = _volume(lab[7])
    _resave(lab[7], data[:, :, :-1], affine, np.uint8)
    expected.append(((f"{img[7]}, {lab[7]}", "differ in shape: 32×32×16 vs 32×32×15"), HEADER))
    data, affine = _volume(lab[8])
    shifted = affine.copy()
    shifted[0, 3] += 0.5
    _resave(lab[8], data, shifted, np.uint8)
    expected.append(((f"{img[8]}, {lab[8]}", "differ in affine", "difference 0.5 "), HEADER))
    for path in (img[9], lab[9]):
        data, affine = _volume(path)
        coarse = affine.copy()
        coarse[:3, 2] *= 25.0 / np.linalg.norm(affine[:3, 2])
        _resave(path, data, coarse, data.dtype)
        expected.append(((str(path), "implausible voxel spacing", "25 mm"), HEADER))

    data, affine = _volume(lab[12])  # voxel part: truncated gzip (header still readable)
    raw = lab[12].read_bytes()
    lab[12].write_bytes(raw[: len(raw) // 2])
    assert nib.load(str(lab[12])).shape == SHAPE, "the cut must leave the header readable"
    expected.append(((str(lab[12]), "truncated or corrupt compressed file"), VOXEL))
    data, affine = _volume(img[13])
    data = data.astype(np.float32)
    data[3, 4, 5], data[6, 7, 8] = np.nan, np.inf
    _resave(img[13], data, affine, np.float32)
    expected.append(((str(img[13]), "1 NaN and 1 infinite"), VOXEL))
    data, affine = _volume(lab[14])
    data = data.astype(np.float32)
    data[0, 0, 0] = 0.5
    _resave(lab[14], data, affine, np.float32)
    expected.append(((str(lab[14]), "not integers", "0.5"), VOXEL))
    data, affine = _volume(lab[15])
    data[0, 0, 0], data[0, 0, 1] = 9, 12
    _resave(lab[15], data, affine, np.uint8)
    expected.append(((str(lab[15]), "label values 9, 12 not declared"), VOXEL))

    tr.append(dict(tr[10]))  # entry 16: the files of entry 10 again
    expected.append(((str(img[10]), "listed 2 times", "training[10] image, training[16] image"), HEADER))
    expected.append(((str(lab[10]), "listed 2 times"), HEADER))
    for src in (img[11], lab[11]):  # entry 17: another file with case name phantom_011
        nib.save(nib.load(str(src)), str(src).removesuffix(".gz"))
    tr.append({"image": "./imagesTr/phantom_011.nii", "label": "./labelsTr/phantom_011.nii"})
    expected.append(((f"{img[11]}, {root / 'imagesTr' / 'phantom_011.nii'}", "share the case name"), HEADER))
    tr.append({"image": "./imagesTr/phantom_000.nii.gz"})  # entry 18: no label
    expected.append((("dataset.json", "training[18]", "has no 'label'"), HEADER))
    shutil.copy(img[10], root / "imagesTr" / "extra_999.nii.gz")  # unlisted: a warning only

    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root, expected


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> tuple[Path, list[tuple[tuple[str, ...], bool]]]:
    return _broken_dataset(tmp_path_factory.mktemp("broken"))


def _matching(lines: list[str], fragments: tuple[str, ...]) -> list[str]:
    return [line for line in lines if all(f in line for f in fragments)]


def test_check_dataset_lists_every_problem_once(broken):
    root, expected = broken
    result = run_cli("check-dataset", root, "--workers", "2")
    assert result.code == 1, result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output, result.output
    lines = result.error_lines()
    for fragments, _ in expected:
        assert len(_matching(lines, fragments)) == 1, f"{fragments} not on exactly one line:\n{result.output}"
    assert len(lines) == len(expected), result.output
    assert f"{len(expected)} problem(s) in a dataset of 19 case(s)" in result.stdout
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert any("extra_999.nii.gz" in line and "not listed" in line for line in warnings), result.output


def test_header_check_finds_the_header_problems_and_reads_no_voxels(broken):
    """``full=False`` (what ``train`` runs): every header problem, none of the voxel ones."""
    root, expected = broken
    quick = [p.line() for p in check_dataset(root, full=False)]
    full = [p.line() for p in check_dataset(root, workers=1, full=True)]
    for fragments, in_header in expected:
        assert len(_matching(quick, fragments)) == (1 if in_header else 0), (fragments, quick)
        assert len(_matching(full, fragments)) == 1, (fragments, full)
    assert len(full) == len(expected) and len(quick) == sum(h for _, h in expected)


def test_clean_dataset_passes(tiny_dataset):
    result = run_cli("check-dataset", tiny_dataset, "--quick")
    assert result.code == 0 and not result.error_lines(), result.output
    assert "dataset OK: 4 cases, 7 labels" in result.stdout
    assert check_dataset(tiny_dataset, workers=1) == []


def test_missing_folder_is_an_unusable_argument(tmp_path):
    assert_one_error(run_cli("check-dataset", tmp_path / "nope"), tmp_path / "nope", cause="not found")


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        (None, "dataset.json not found"),
        ('{"labels": {"0": "background"},\n "training": [}', "invalid JSON at line 2, column 15"),
        ("[1, 2]", "expected a JSON object at the top level, found list"),
        ('{"labels": {"0": "background"}}', "missing training"),
        ('{"labels": {"0": "background"}, "training": {}}', "'training' must be a list"),
        ('{"labels": {"0": "background"}, "training": []}', "no training cases listed"),
        ('{"labels": {"0": "a", "1": "a", "x": "y"}, "training": [3]}', "neither 'index: name'"),
        ('{"labels": {"background": 0, "liver": 2}, "training": [3]}', "indices must be 0, 1"),
        ('{"labels": {"0": "background"}, "training": [3]}', "training[0]: expected an object"),
        ('{"labels": {"0": "background"}, "training": [{"image": 3, "label": ""}]}', "found 3"),
    ],
)
def test_dataset_json_problems(tmp_path, text, cause):
    if text is not None:
        (tmp_path / "dataset.json").write_text(text)
    problems = check_dataset(tmp_path)
    assert any(cause in p.line() for p in problems), [p.line() for p in problems]
    assert all(p.files == (str(tmp_path / "dataset.json"),) for p in problems)


@pytest.fixture(scope="module")
def escaping(tmp_path_factory) -> Path:
    """A dataset whose dataset.json leads out of the folder three ways (``..``, absolute, symlink)."""
    base = tmp_path_factory.mktemp("escape")
    root = base / "data"
    write_msd_dataset(root, 4, 0, shape=SHAPE, seed=9)
    shutil.copy(root / "imagesTr" / "phantom_000.nii.gz", base / "outside.nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["image"] = "../outside.nii.gz"
    meta["training"][1]["label"] = str(base / "outside.nii.gz")
    (root / "dataset.json").write_text(json.dumps(meta))
    (root / "imagesTr" / "phantom_002.nii.gz").unlink()
    (root / "imagesTr" / "phantom_002.nii.gz").symlink_to(base / "outside.nii.gz")
    return root


ESCAPES = [
    ("training[0] image", "'../outside.nii.gz' leads outside"),
    ("training[1] label", "absolute path"),
    ("training[2] image", "is a symlink to"),
]


def test_path_escape_is_refused_by_check_dataset(escaping):
    result = run_cli("check-dataset", escaping, "--quick")
    assert result.code == 1, result.output
    lines = result.error_lines()
    assert len(lines) == 3, result.output
    for line, (entry, cause) in zip(lines, ESCAPES, strict=True):
        assert line.startswith(f"error: {escaping / 'dataset.json'}: {entry}: ") and cause in line, line


def test_path_escape_is_refused_by_train_before_anything_is_written(escaping, tmp_path):
    run = tmp_path / "run"
    sets = [a for s in [*TINY_TRAIN, f"data.root={escaping}", f"train.output={run}"] for a in ("--set", s)]
    result = run_cli("train", CONFIG, *sets)
    assert result.code == 2, result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output, result.output
    lines = result.error_lines()
    assert len(lines) == 3, result.output
    for line, (entry, cause) in zip(lines, ESCAPES, strict=True):
        assert f"{escaping / 'dataset.json'}: {entry}: " in line and cause in line, line
    assert "training not started: 3 problem(s)" in result.stderr
    assert not run.exists()


def test_training_cases_uses_the_same_resolver(escaping):
    with pytest.raises(
        EntryError, match=r"dataset\.json: training\[0\] image: '\.\./outside\.nii\.gz' leads"
    ):
        training_cases(escaping)


def test_truncated_label_stops_train_with_one_line(tmp_path):
    root = tmp_path / "data"
    write_msd_dataset(root, 3, 0, shape=SHAPE, seed=4)
    label = root / "labelsTr" / "phantom_001.nii.gz"
    raw = label.read_bytes()
    label.write_bytes(raw[: len(raw) // 2])
    sets = [
        a
        for s in [*TINY_TRAIN, f"data.root={root}", f"train.output={tmp_path / 'run'}"]
        for a in ("--set", s)
    ]
    assert_one_error(run_cli("train", CONFIG, *sets), label, cause="truncated or corrupt compressed file")


def test_resolver_allows_what_stays_inside(tmp_path):
    root = tmp_path / "data"
    (root / "imagesTr").mkdir(parents=True)
    (root / "imagesTr" / "a.nii.gz").write_bytes(b"x")
    (root / "alias").symlink_to(root / "imagesTr", target_is_directory=True)
    (tmp_path / "data2").mkdir()
    assert resolve_inside(root, "./imagesTr/../imagesTr/a.nii.gz") == root / "imagesTr/../imagesTr/a.nii.gz"
    assert resolve_inside(root, "alias/a.nii.gz") == root / "alias" / "a.nii.gz"
    for bad in ("../data2/a.nii.gz", "imagesTr/../../data2", "/etc/passwd", "C:\\x.nii.gz", "", 3):
        with pytest.raises(UnsafePathError):
            resolve_inside(root, bad)
    os.symlink(root / "loop", root / "loop")
    with pytest.raises(UnsafePathError):
        resolve_inside(root, "loop/a.nii.gz")


def test_affine_tolerance(tmp_path):
    """Label affines within AFFINE_TOLERANCE_MM of the image's pass; beyond it the difference is printed."""
    write_msd_dataset(tmp_path, 2, 0, shape=SHAPE, seed=2)
    for i, shift in enumerate((0.5 * AFFINE_TOLERANCE_MM, 2 * AFFINE_TOLERANCE_MM)):
        path = tmp_path / "labelsTr" / f"phantom_{i:03d}.nii.gz"
        data, affine = _volume(path)
        affine[1, 3] += shift
        _resave(path, data, affine, np.uint8)
    lines = [p.line() for p in check_dataset(tmp_path, full=False)]
    assert len(lines) == 1 and "phantom_001" in lines[0] and "difference 0.002 " in lines[0], lines
