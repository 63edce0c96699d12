"""The whole path through the CLI on tiny phantoms: phantoms → train → segment → evaluate; resume."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import torch
from typer.testing import CliRunner

from medseg.io.checkpoint import load_checkpoint
from pipelines.cli import app
from tests.conftest import TINY_TRAIN

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("phantoms", "train", "segment", "evaluate", "demo"):
        assert cmd in result.output


def test_cli_train_segment_evaluate(tmp_path):
    data, run, pred = tmp_path / "data", tmp_path / "run", tmp_path / "pred"
    r = runner.invoke(
        app,
        ["phantoms", str(data), "--cases", "3", "--test", "2", "--shape", "40", "40", "20", "--seed", "3"],
    )
    assert r.exit_code == 0, r.output
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data:\n  root: {data}\ntrain:\n  output: {run}\n")
    sets = [a for s in TINY_TRAIN for a in ("--set", s)]
    r = runner.invoke(app, ["train", str(config), *sets, "--set", "train.epochs=1"])
    assert r.exit_code == 0, r.output
    for name in ("best.pt", "last.pt", "metrics.csv", "curves.png", "config.yaml", "plan.json"):
        assert (run / name).exists(), name

    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["labels"]["pancreas"] == 6 and ckpt["plan"]["orientation"] == "RAS"
    assert len(ckpt["plan"]["spacing"]) == 3 and ckpt["config"]["model"]["name"] == "attention_unet"

    r = runner.invoke(
        app,
        [
            "segment",
            "-i",
            str(data / "imagesTs"),
            "-o",
            str(pred),
            "-m",
            str(run / "best.pt"),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    for src in sorted((data / "imagesTs").glob("*.nii.gz")):
        out = nib.load(pred / src.name)
        ref = nib.load(src)
        assert out.shape == ref.shape and np.array_equal(out.affine, ref.affine)
        assert out.get_data_dtype() == np.uint8
        side = json.loads((pred / src.name.replace(".nii.gz", ".json")).read_text())
        assert side["labels"]["liver"] == 1

    r = runner.invoke(
        app, ["evaluate", "--pred", str(pred), "--ref", str(data / "labelsTs"), "-o", str(tmp_path / "m.csv")]
    )
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert {row["case"] for row in rows} == {"phantom_003", "phantom_004"}
    assert all(0.0 <= float(row["dice"]) <= 1.0 for row in rows)


def test_resume_continues_exactly(tiny_dataset, tmp_path):
    """Training 2 epochs straight equals 1 epoch + --resume for the second (weights bit-identical)."""
    from medseg.config import load_config
    from medseg.engine import train

    def cfg(out, epochs):
        return load_config(
            None, [*TINY_TRAIN, f"data.root={tiny_dataset}", f"train.output={out}", f"train.epochs={epochs}"]
        )

    quiet = lambda *_: None  # noqa: E731
    train(cfg(tmp_path / "straight", 2), log=quiet)
    first = cfg(tmp_path / "resumed", 2)
    # the same config, interrupted: max_minutes=0 stops cleanly after the first epoch
    interrupted = replace(first, train=replace(first.train, max_minutes=0.0))
    train(interrupted, log=quiet)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 0
    train(first, resume=True, log=quiet)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = list(csv.DictReader((tmp_path / "resumed" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
