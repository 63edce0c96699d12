"""Bad input: one-line errors naming the file and cause, batches go on, nothing half-written."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg.io import InputError, load_volume, save_like
from medseg.io.checkpoint import load_checkpoint
from pipelines.cli import app

runner = CliRunner()


def _nifti(path, shape, dtype=np.int16):
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype=dtype), np.diag([1.5, 1.5, 3.0, 1.0])), str(path))
    return path


@pytest.fixture
def bad_files(tmp_path):
    good = _nifti(tmp_path / "good.nii.gz", (40, 40, 20))
    raw = gzip.decompress(good.read_bytes())
    files = {
        "missing": (tmp_path / "missing.nii.gz", "not found"),
        "empty": (tmp_path / "empty.nii.gz", "empty"),
        "truncated": (tmp_path / "truncated.nii.gz", "truncated"),
        "truncated_raw": (tmp_path / "truncated_raw.nii", "truncated"),
        "2d": (_nifti(tmp_path / "flat.nii.gz", (40, 40)), "expected a 3D volume"),
        "4d": (_nifti(tmp_path / "multi.nii.gz", (20, 20, 10, 3)), "expected a 3D volume, found 4D"),
        "garbage": (tmp_path / "garbage.nii.gz", "not a readable NIfTI"),
    }
    files["empty"][0].write_bytes(b"")
    files["truncated"][0].write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    files["truncated_raw"][0].write_bytes(raw[: len(raw) // 2])
    files["garbage"][0].write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    return good, files


def test_load_volume_errors_name_file_and_cause(bad_files):
    good, files = bad_files
    assert load_volume(good).shape == (40, 40, 20)
    for key, (path, cause) in files.items():
        with pytest.raises(InputError) as info:
            load_volume(path)
        message = str(info.value)
        assert str(path) in message and cause in message, (key, message)
        assert "\n" not in message


def test_segment_folder_continues_and_reports_failures(tiny_run, tiny_dataset, bad_files, tmp_path):
    _, files = bad_files
    folder = tmp_path / "batch"
    folder.mkdir()
    src = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]
    (folder / "ok.nii.gz").write_bytes(src.read_bytes())
    for key in ("empty", "truncated", "2d", "4d"):
        path = files[key][0]
        (folder / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["segment", "-i", str(folder), "-o", str(out), "-m", str(tiny_run / "best.pt"), "--device", "cpu"],
    )
    assert result.exit_code == 1
    assert (out / "ok.nii.gz").exists() and (out / "ok.json").exists()
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.jsonl",
        "ok.json",
        "ok.nii.gz",
    ]  # no partial or temp files
    for key in ("empty", "truncated", "2d", "4d"):
        assert files[key][0].name in result.output
    assert "1 written, 4 failed" in result.output


def test_single_bad_file_exits_nonzero(tiny_run, bad_files, tmp_path):
    _, files = bad_files
    path = files["missing"][0]
    result = runner.invoke(
        app, ["segment", "-i", str(path), "-o", str(tmp_path / "o.nii.gz"), "-m", str(tiny_run / "best.pt")]
    )
    assert result.exit_code != 0 and str(path) in result.output


def test_foreign_checkpoints_are_rejected(tmp_path, bad_files):
    good, _ = bad_files
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, plain)
    with pytest.raises(InputError, match="not a medseg checkpoint"):
        load_checkpoint(plain)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "medseg-checkpoint", "x": Evil()}, evil)
    with pytest.raises(InputError, match=r"contains pickled code \(builtins.print\); refused"):
        load_checkpoint(evil)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    result = runner.invoke(
        app, ["segment", "-i", str(good), "-o", str(tmp_path / "o.nii.gz"), "-m", str(text)]
    )
    assert result.exit_code != 0 and "text.pt" in result.output
    assert not (tmp_path / "o.nii.gz").exists()


def test_interrupted_write_leaves_nothing(tmp_path, bad_files, monkeypatch):
    good, _ = bad_files
    ref = load_volume(good)
    dst = tmp_path / "mask.nii.gz"

    def boom(img, filename):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_like(np.zeros(ref.shape, np.uint8), ref, dst)
    assert list(tmp_path.glob("mask*")) == [] and list(tmp_path.glob(".tmp-*")) == []


def test_folder_input_needs_folder_output(tiny_dataset, tmp_path):
    result = runner.invoke(
        app,
        [
            "segment",
            "-i",
            str(tiny_dataset / "imagesTs"),
            "-o",
            str(tmp_path / "x.nii.gz"),
            "-m",
            "unused.pt",
        ],
    )
    assert result.exit_code == 2 and "must be a folder" in result.output


def test_atomic_writes_get_normal_permissions(tmp_path):
    import os

    from medseg.io import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask
