"""Corrections: checked and written on the mask's exact grid; exported as an MSD dataset that passes the
dataset check; a training run fine-tunes from a checkpoint's weights on it (``train.init_from``)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medseg.io import InputError
from medseg.review.corrections import export_corrections, read_label_table, save_correction

from ..conftest import TINY_TRAIN
from .conftest import LABELS, SHAPE, ras_affine

runner = CliRunner()


def drawing_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """What NiiVue sends: a uint8 NIfTI-1 on the scan's grid."""
    img = nib.Nifti1Image(data.astype(np.uint8), affine)
    img.set_sform(affine, code=1)
    return img.to_bytes()


def scan_grid(order: str) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.zeros(SHAPE, np.uint8), ras_affine(order))


def test_a_correction_is_written_on_the_mask_grid_and_the_mask_is_untouched(outdir):
    """The lps case's scan grid is the lps grid; a scan stored RAS under an LPS mask is re-stored exactly."""
    mask_path = outdir / "lps.nii.gz"
    original = mask_path.read_bytes()
    labels = np.asarray(nib.load(mask_path).dataobj)
    painted = labels[::-1, ::-1, :].copy()  # the same voxels on the RAS-stored grid
    painted[5:8, 30:33, 10] = 2
    path = save_correction(outdir, "lps", drawing_bytes(painted, ras_affine("ras")), scan_grid("ras"), LABELS)
    corrected = nib.load(path)
    assert path.name == "lps_corrected.nii.gz" and mask_path.read_bytes() == original
    assert np.array_equal(corrected.affine, nib.load(mask_path).affine) and corrected.shape == SHAPE
    assert np.array_equal(np.asarray(corrected.dataobj), painted[::-1, ::-1, :])
    assert read_label_table(path) == LABELS


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("value", "not in the case's label table"),
        ("shape", "expected the scan's grid"),
        ("affine", "affine differs"),
        ("garbage", "not a NIfTI-1 image"),
        ("float", "expected integer labels"),
    ],
)
def test_a_drawing_that_does_not_fit_is_refused(outdir, change, message):
    data = np.zeros(SHAPE, np.uint8)
    affine = ras_affine("ras")
    if change == "value":
        data[0, 0, 0] = 7
    if change == "shape":
        data = np.zeros((64, 64, 23), np.uint8)
    if change == "affine":
        affine = affine.copy()
        affine[2, 3] += 4.0
    body = drawing_bytes(data, affine)
    if change == "garbage":
        body = b"not a nifti" * 40
    if change == "float":
        body = nib.Nifti1Image(data.astype(np.float32), affine).to_bytes()
    with pytest.raises(InputError, match=message):
        save_correction(outdir, "ras", body, scan_grid("ras"), LABELS)
    assert not (outdir / "ras_corrected.nii.gz").exists()


def test_export_corrections_writes_a_dataset_that_passes_the_check(outdir, tmp_path):
    from medseg.data.check import inspect_dataset
    from pipelines.cli import app

    painted = np.asarray(nib.load(outdir / "ras.nii.gz").dataobj).copy()
    painted[10:14, 10:14, 5] = 1
    save_correction(outdir, "ras", drawing_bytes(painted, ras_affine("ras")), scan_grid("ras"), LABELS)
    dest = tmp_path / "corrections"
    result = runner.invoke(app, ["review", str(outdir), "--export-corrections", str(dest)])
    assert result.exit_code == 0, result.output
    assert "train.init_from" in result.output
    meta = json.loads((dest / "dataset.json").read_text())
    assert meta["training"] == [{"image": "./imagesTr/ras.nii.gz", "label": "./labelsTr/ras.nii.gz"}]
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "spleen"}
    report = inspect_dataset(dest)
    assert not report.problems, [p.line() for p in report.problems]
    label = nib.load(dest / "labelsTr" / "ras.nii.gz")
    image = nib.load(dest / "imagesTr" / "ras.nii.gz")
    assert np.array_equal(np.asarray(label.dataobj), painted) and np.allclose(image.affine, label.affine)
    scan = nib.load(outdir.parent / "scans" / "ras.nii.gz")
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(scan.dataobj))
    again = runner.invoke(app, ["review", str(outdir), "--export-corrections", str(dest)])
    assert again.exit_code == 2 and "not an empty folder" in again.output


@pytest.mark.slow
def test_training_fine_tunes_from_the_checkpoint_on_exported_corrections(tiny_run, tiny_dataset, tmp_path):
    """Segment with a checkpoint, correct, export, train one step with train.init_from and a learning rate of
    1e-9: the run's weights are the checkpoint's to 1e-6 (it started from them); without init_from they are
    not (a fresh initialisation)."""
    import torch

    from medseg.batch.run import segment_inputs
    from medseg.config import load_config
    from medseg.engine import train
    from medseg.io.checkpoint import load_checkpoint

    out = tmp_path / "pred"
    segment_inputs(tiny_dataset / "imagesTs", out, tiny_run / "best.pt", log=lambda *_: None)
    cases = sorted(p.name[: -len(".json")] for p in out.glob("*.json") if not p.name.startswith("review"))
    for case in cases:
        mask = nib.load(out / f"{case}.nii.gz")
        labels = np.asarray(mask.dataobj).copy()
        labels[20:26, 20:26, 10:14] = 1
        side = json.loads((out / f"{case}.json").read_text())
        save_correction(out, case, drawing_bytes(labels, mask.affine), mask, side["labels"])
    data = export_corrections(out, tmp_path / "corrections", log=lambda *_: None).parent
    base = [*TINY_TRAIN, "train.epochs=1", "train.iters_per_epoch=1", "optim.lr=1e-9", "optim.weight_decay=0",
            f"data.root={data}", "data.val_fraction=0.5"]  # fmt: skip
    init = load_checkpoint(tiny_run / "best.pt")["model"]
    messages = []
    cfg = load_config(
        None, [*base, f"train.output={tmp_path / 'tuned'}", f"train.init_from={tiny_run / 'best.pt'}"]
    )
    tuned = load_checkpoint(train(cfg, log=messages.append) / "last.pt")["model"]
    assert any("fine-tuning from" in m for m in messages)
    from medseg.config import ConfigError
    from medseg.engine.finetune import initial_checkpoint

    with pytest.raises(ConfigError, match="same label table"):
        initial_checkpoint(str(tiny_run / "best.pt"), {"background": 0, "liver": 1})
    params = [k for k, v in init.items() if v.is_floating_point() and "running" not in k]
    assert all(torch.allclose(tuned[k], init[k], rtol=0, atol=1e-6) for k in params)
    cfg = load_config(None, [*base, f"train.output={tmp_path / 'fresh'}"])
    fresh = load_checkpoint(train(cfg, log=lambda *_: None) / "last.pt")["model"]
    assert not any(torch.allclose(fresh[k], init[k], rtol=0, atol=1e-3) for k in params if init[k].ndim == 5)
