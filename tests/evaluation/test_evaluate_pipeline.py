"""``medseg evaluate`` end to end on a small folder: run_evaluation and the Typer command."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from medseg.evaluation import EvaluationSettings
from medseg.evaluation import evaluate_folder as run_evaluation
from medseg.evaluation import label_index_names as load_label_names
from medseg.report import CSV_COLUMNS
from pipelines.evaluate import evaluate_command

AFFINE = np.diag([0.8, 0.8, 2.0, 1.0])


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _labels(shape=(24, 24, 12), shift=0) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    a[4 + shift : 14 + shift, 5:15, 3:8] = 1
    a[15:20, 15:21, 2:6] = 2
    return a


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    _save(ref / "case1.nii.gz", _labels())
    _save(pred / "case1.nii.gz", _labels(shift=1))
    _save(ref / "case2.nii", _labels())
    no2 = _labels()
    no2[no2 == 2] = 0  # label 2 missed
    _save(pred / "case2.nii.gz", no2)
    return pred, ref


def _read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_run_evaluation_writes_csv_summary_and_plots(folders, tmp_path):
    pred, ref = folders
    names = tmp_path / "dataset.json"
    names.write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "tumour"}}))
    out = tmp_path / "out" / "metrics.csv"
    summary = run_evaluation(pred, ref, out, label_names=names)

    rows = _read_csv(out)
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [(r["case"], r["label"], r["name"]) for r in rows] == [
        ("case1", "1", "liver"),
        ("case1", "2", "tumour"),
        ("case2", "1", "liver"),
        ("case2", "2", "tumour"),
    ]
    assert float(rows[1]["dice"]) == 1.0 and float(rows[2]["hd95"]) == 0.0
    assert float(rows[3]["dice"]) == 0.0 and math.isinf(float(rows[3]["hd95"]))  # missed -> inf, not dropped
    assert float(rows[0]["hd95"]) == pytest.approx(0.8)  # shifted one voxel along the 0.8 mm axis
    assert float(rows[0]["vol_ref_ml"]) == pytest.approx(10 * 10 * 5 * 0.8 * 0.8 * 2.0 / 1000)

    on_disk = json.loads((tmp_path / "out" / "metrics_summary.json").read_text())
    assert on_disk["ok"] and summary["ok"] and on_disk["n_evaluated"] == 2
    tumour = on_disk["labels"]["2"]
    assert tumour["name"] == "tumour" and tumour["n_missed"] == 1
    diag = math.sqrt((24 * 0.8) ** 2 + (24 * 0.8) ** 2 + (12 * 2.0) ** 2)
    assert tumour["hd95"]["worst_mean"] == pytest.approx(diag / 2)
    assert tumour["hd95"]["mean"] == 0.0 and tumour["hd95"]["n_finite"] == 1
    for metric in ("dice", "hd95", "nsd"):
        assert (tmp_path / "out" / f"metrics_{metric}.png").stat().st_size > 0
    assert not list((tmp_path / "out").glob(".tmp-*"))  # atomic writes leave nothing behind


def test_unmatched_cases_are_reported(folders, tmp_path):
    pred, ref = folders
    _save(ref / "case3.nii.gz", _labels())  # reference without prediction
    _save(pred / "extra.nii.gz", _labels())  # prediction without reference
    summary = run_evaluation(pred, ref, tmp_path / "m.csv", EvaluationSettings(labels=[1]))
    assert summary["missing_predictions"] == [str(ref / "case3.nii.gz")]
    assert summary["missing_references"] == [str(pred / "extra.nii.gz")]
    assert not summary["ok"] and summary["n_evaluated"] == 2
    assert {r["label"] for r in _read_csv(tmp_path / "m.csv")} == {"1"}


def test_bad_cases_fail_with_reason_and_others_go_on(folders, tmp_path):
    pred, ref = folders
    _save(ref / "geom.nii.gz", _labels())
    _save(pred / "geom.nii.gz", _labels(), affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    _save(ref / "frac.nii.gz", _labels())
    _save(pred / "frac.nii.gz", _labels().astype(np.float32) * 0.5)
    _save(ref / "neg.nii.gz", _labels())
    _save(pred / "neg.nii.gz", _labels().astype(np.int16) - 1)
    (pred / "broken.nii.gz").write_bytes(b"not a nifti")
    _save(ref / "broken.nii.gz", _labels())

    summary = run_evaluation(pred, ref, tmp_path / "m.csv")
    errors = {f["case"]: f["error"] for f in summary["failed"]}
    assert set(errors) == {"geom", "frac", "neg", "broken"}
    assert "geometry mismatch" in errors["geom"]
    assert str(pred / "geom.nii.gz") in errors["geom"] and str(ref / "geom.nii.gz") in errors["geom"]
    assert "non-integer" in errors["frac"] and str(pred / "frac.nii.gz") in errors["frac"]
    assert "negative" in errors["neg"]
    assert "not a readable NIfTI" in errors["broken"] and str(pred / "broken.nii.gz") in errors["broken"]
    assert all("\n" not in e for e in errors.values())
    assert summary["n_evaluated"] == 2 and not summary["ok"]
    assert {r["case"] for r in _read_csv(tmp_path / "m.csv")} == {"case1", "case2"}


def test_resample_pred_and_single_files(tmp_path):
    ref = _save(tmp_path / "r" / "a.nii.gz", _labels())
    # Same physical content on a grid with half the voxel size along axis 0.
    fine = np.repeat(_labels(), 2, axis=0)
    affine = AFFINE.copy()
    affine[0, 0] = 0.4
    affine[0, 3] = -0.2  # voxel centres of the fine grid straddle those of the coarse one
    pred = _save(tmp_path / "p" / "other_name.nii.gz", fine, affine)
    s = run_evaluation(pred, ref, tmp_path / "x.csv")
    assert not s["ok"] and "geometry mismatch" in s["failed"][0]["error"]
    s = run_evaluation(pred, ref, tmp_path / "x.csv", EvaluationSettings(resample_pred=True))
    assert s["ok"]
    rows = _read_csv(tmp_path / "x.csv")
    assert rows[0]["case"] == "a" and float(rows[0]["dice"]) == 1.0


def test_label_names_formats(tmp_path):
    sidecar = tmp_path / "model.json"
    sidecar.write_text(json.dumps({"labels": {"background": 0, "pancreas": 1, "tumour": 2}}))
    assert load_label_names(sidecar) == {0: "background", 1: "pancreas", 2: "tumour"}
    msd = tmp_path / "dataset.json"
    msd.write_text(json.dumps({"name": "Task07", "labels": {"0": "background", "1": "pancreas"}}))
    assert load_label_names(msd) == {0: "background", 1: "pancreas"}


def test_workers_in_parallel(folders, tmp_path):
    pred, ref = folders
    serial = run_evaluation(pred, ref, tmp_path / "a.csv")
    parallel = run_evaluation(pred, ref, tmp_path / "b.csv", workers=2)
    assert serial["labels"] == parallel["labels"]
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("evaluate")(evaluate_command)

    @app.command("other")
    def other() -> None:  # a second command so "evaluate" stays a sub-command
        pass

    return app


def _evaluate(pred, ref, out, *options: str) -> list[str]:
    """``evaluate --pred PRED --ref REF OPTIONS -o OUT`` as CLI arguments."""
    return ["evaluate", "--pred", str(pred), "--ref", str(ref), *options, "-o", str(out)]


def test_cli_end_to_end(folders, tmp_path):
    pred, ref = folders
    runner = CliRunner()
    out = tmp_path / "cli" / "metrics.csv"
    result = runner.invoke(_app(), _evaluate(pred, ref, out, "--labels", "1,2", "--tolerance", "1.0"))
    assert result.exit_code == 0, result.output
    assert len(_read_csv(out)) == 4
    summary = json.loads((tmp_path / "cli" / "metrics_summary.json").read_text())
    assert summary["settings"]["tolerance_mm"] == 1.0 and summary["settings"]["labels"] == [1, 2]

    help_text = runner.invoke(_app(), ["evaluate", "--help"]).output
    for option in ("--pred", "--ref", "--labels", "--tolerance", "--workers", "--resample-pred", "--output"):
        assert option in help_text


def test_cli_errors_exit_non_zero(folders, tmp_path):
    pred, ref = folders
    runner = CliRunner()
    missing = runner.invoke(
        _app(),
        ["evaluate", "--pred", str(tmp_path / "nope"), "--ref", str(ref), "-o", str(tmp_path / "m.csv")],
    )
    assert missing.exit_code != 0 and "not found" in missing.output
    _save(ref / "geom.nii.gz", _labels())
    _save(pred / "geom.nii.gz", _labels(shape=(20, 24, 12)))
    failed = runner.invoke(
        _app(), ["evaluate", "--pred", str(pred), "--ref", str(ref), "-o", str(tmp_path / "m.csv")]
    )
    assert failed.exit_code == 1
    assert "geometry mismatch" in failed.output
    assert len(_read_csv(tmp_path / "m.csv")) == 4  # the good cases are still there
    bad_labels = runner.invoke(_app(), _evaluate(pred, ref, tmp_path / "m.csv", "--labels", "1,x"))
    assert bad_labels.exit_code != 0
