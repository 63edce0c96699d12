"""Cross-validation: K-fold splits, splits.json reuse, one plan per run, 5 folds end to end through the CLI
(train --fold K → cv-summary → segment with the fold ensemble)."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medseg.data.folds import kfold_splits, load_or_create_splits, parse_fold
from medseg.io import InputError
from pipelines.cli import app

runner = CliRunner()

#: The smallest settings that train: 3 levels, 16³ patches, one iteration of batch 1.
CV_TRAIN = [
    "model.filters=[4, 8, 16]",
    "augment.patch_size=[16, 16, 16]",
    "augment.samples_per_volume=1",
    "train.epochs=1",
    "train.iters_per_epoch=1",
    "train.batch_size=1",
    "train.progress=false",
    "train.quantize=off",
    "train.device=cpu",
    "infer.overlap=0.25",
]


@pytest.mark.parametrize(("n_cases", "n_folds"), [(12, 5), (5, 5), (7, 2)])
def test_kfold_splits_validate_every_case_once(n_cases, n_folds):
    names = [f"case_{i:02d}" for i in range(n_cases)]
    splits = kfold_splits(names, n_folds, seed=3)
    vals = [fold["val"] for fold in splits]
    # scikit-learn KFold sizes: the first n % k folds one larger
    assert [len(v) for v in vals] == [n_cases // n_folds + (k < n_cases % n_folds) for k in range(n_folds)]
    assert sorted(c for v in vals for c in v) == names  # each case validated exactly once
    for fold in splits:
        assert fold["train"] == sorted(set(names) - set(fold["val"]))
    assert kfold_splits(list(reversed(names)), n_folds, seed=3) == splits  # input order does not matter
    if n_cases > n_folds:
        assert kfold_splits(names, n_folds, seed=4) != splits  # the seed shuffles


def test_kfold_refuses_too_few_cases_and_folds_parse():
    with pytest.raises(ValueError, match="3 case"):
        kfold_splits(["a", "b", "c"], 5, seed=0)
    assert parse_fold("2", 5) == 2 and parse_fold("all", 5) == "all"
    for bad in ("5", "-1", "x"):
        with pytest.raises(ValueError, match=r"0\.\.4 \(data.folds=5\) or all"):
            parse_fold(bad, 5)


def test_splits_json_is_written_once_and_a_changed_case_list_is_an_error(tmp_path):
    names = [f"c{i}" for i in range(6)]
    first = load_or_create_splits(tmp_path, names, 3, seed=0)
    assert json.loads((tmp_path / "splits.json").read_text()) == first  # nnU-Net's splits_final.json format
    assert load_or_create_splits(tmp_path, names, 3, seed=99) == first  # reused, not re-split
    with pytest.raises(InputError, match=r"1 new in the dataset \(c6\); 1 no longer in it \(c0\)"):
        load_or_create_splits(tmp_path, [*names[1:], "c6"], 3, seed=0)
    with pytest.raises(InputError, match=r"holds 3 folds but data\.folds is 5"):
        load_or_create_splits(tmp_path, names, 5, seed=0)


def _dice(pred: np.ndarray, ref: np.ndarray, label: int) -> float:
    p, r = pred == label, ref == label
    total = int(p.sum() + r.sum())
    return 1.0 if total == 0 else 2.0 * int((p & r).sum()) / total


def test_five_fold_cross_validation_end_to_end(tmp_path):
    data, run, pred = tmp_path / "data", tmp_path / "run", tmp_path / "pred"
    r = runner.invoke(
        app, ["phantoms", str(data), "--cases", "5", "--test", "1", "--shape", "32", "32", "16"]
    )
    assert r.exit_code == 0, r.output
    config = tmp_path / "cv.yaml"
    config.write_text(f"data:\n  root: {data}\ntrain:\n  output: {run}\n")
    sets = [a for s in CV_TRAIN for a in ("--set", s)]

    for k in range(4):  # fold 4 comes later: cv-summary first names it as missing
        r = runner.invoke(app, ["train", str(config), *sets, "--fold", str(k)])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["cv-summary", str(run)])
    assert r.exit_code == 1 and "fold 4 missing: not trained" in r.output, r.output

    # a fold whose config plans differently cannot join the run; neither can a changed dataset
    r = runner.invoke(
        app, ["train", str(config), *sets, "--fold", "4", "--set", "augment.patch_size=[16,16,8]"]
    )
    assert r.exit_code == 2 and "plan.json" in r.output and "patch_size" in r.output, r.output
    smaller = tmp_path / "smaller"
    shutil.copytree(data, smaller)
    meta = json.loads((smaller / "dataset.json").read_text())
    meta["training"] = meta["training"][1:]
    (smaller / "dataset.json").write_text(json.dumps(meta))
    r = runner.invoke(app, ["train", str(config), *sets, "--fold", "4", "--set", f"data.root={smaller}"])
    assert r.exit_code == 2 and "1 no longer in it (phantom_000)" in r.output, r.output
    r = runner.invoke(app, ["train", str(config), *sets, "--fold", "5"])
    assert r.exit_code == 2 and "expected 0..4" in r.output
    r = runner.invoke(app, ["train", str(config), *sets])  # a run without folds would replace plan.json
    assert r.exit_code == 2 and "a cross-validation run folder (splits.json)" in r.output, r.output

    r = runner.invoke(app, ["train", str(config), *sets, "--fold", "4"])
    assert r.exit_code == 0, r.output
    splits = json.loads((run / "splits.json").read_text())
    assert sorted(c for f in splits for c in f["val"]) == [f"phantom_{i:03d}" for i in range(5)]
    shared_plan = json.loads((run / "plan.json").read_text())
    for k in range(5):
        fold = run / f"fold_{k}"
        for name in ("config.yaml", "plan.json", "last.pt", "best.pt", "metrics.csv", "curves.png"):
            assert (fold / name).exists(), (k, name)
        assert json.loads((fold / "plan.json").read_text()) == shared_plan  # one plan for every fold
        scores = json.loads((fold / "validation.json").read_text())
        assert scores["cases"] == splits[k]["val"]
        for row in scores["rows"]:  # each row is the Dice of the saved model-space label maps
            with np.load(fold / "validation" / f"{row['case']}.npz") as saved:
                assert row["dice"] == pytest.approx(
                    _dice(saved["prediction"], saved["reference"], row["label"])
                )

    r = runner.invoke(app, ["cv-summary", str(run)])
    assert r.exit_code == 0, r.output
    assert "pooled" in r.output and "liver" in r.output and "5 of 5 folds" in r.output
    summary = json.loads((run / "cv_summary.json").read_text())
    rows = [
        row for k in range(5) for row in json.loads((run / f"fold_{k}/validation.json").read_text())["rows"]
    ]
    for name, pooled in summary["pooled"].items():  # pooled = every fold's cases, reduced here by hand
        mine = [row for row in rows if row["name"] == name]
        assert pooled["cases"] == 5
        assert pooled["dice"] == pytest.approx(np.mean([row["dice"] for row in mine]))
        worst = [row["diagonal_mm"] if row["hd95"] == "inf" else row["hd95"] for row in mine]
        assert pooled["hd95"] == pytest.approx(np.mean(worst))
    with (run / "cv_summary.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert {row["fold"] for row in table} == {"0", "1", "2", "3", "4", "pooled"}

    # the pooled postprocessing decision is recorded in every fold, the fold's own kept beside it
    from medseg.io.checkpoint import load_checkpoint

    decision = json.loads((run / "postprocessing.json").read_text())
    for k in range(5):
        ckpt = load_checkpoint(run / f"fold_{k}" / "best.pt")
        assert ckpt["postprocess"] == decision["rules"] and "postprocess_fold" in ckpt
        assert ckpt["postprocess_source"].startswith("cross-validation: 5 validation cases")

    # --fold all: every case, no validation; not part of the fold ensemble
    r = runner.invoke(app, ["train", str(config), *sets, "--fold", "all"])
    assert r.exit_code == 0 and "5 training / 0 validation cases" in r.output, r.output
    assert (run / "fold_all" / "best.pt").exists() and not (run / "fold_all" / "validation.json").exists()

    r = runner.invoke(
        app, ["segment", "-i", str(data / "imagesTs"), "-o", str(pred), "-m", str(run), "--device", "cpu"]
    )
    assert r.exit_code == 0, r.output
    side = json.loads((pred / "phantom_005.json").read_text())
    assert side["checkpoints"] == [str(run / f"fold_{k}" / "best.pt") for k in range(5)]
    assert (
        nib.load(pred / "phantom_005.nii.gz").shape
        == nib.load(data / "imagesTs" / "phantom_005.nii.gz").shape
    )
