"""The Oktay et al. 2018 pancreas recipe: what it sets, and that `medseg train` of it starts and writes a
checkpoint that loads (on tiny phantoms, patch, spacing and budget overridden with --set)."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from medseg.config import load_config, recipe_path
from medseg.inference.predictor import model_from_checkpoint
from medseg.io.checkpoint import load_checkpoint
from pipelines.cli import app


def test_recipe_states_the_papers_setup():
    cfg = load_config(recipe_path("oktay2018_pancreas"))
    assert cfg.model.name == "attention_unet" and cfg.model.filters == (16, 32, 64, 128, 256)
    assert cfg.model.deep_supervision and cfg.model.norm == "batch"
    assert cfg.augment.patch_size == (160, 160, 96) and cfg.train.batch_size == 2
    assert cfg.loss.ce_weight == 0.0 and cfg.optim.lr == 1e-4 and cfg.preprocess.intensity.mode == "zscore"
    text = recipe_path("oktay2018_pancreas").read_text()
    assert text.count("Deviation:") >= 6 and "arXiv:1804.03999" in text


def test_recipe_trains_two_iterations_and_the_checkpoint_loads(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    overrides = [
        f"data.root={tiny_dataset}",
        f"train.output={run}",
        "augment.patch_size=[32, 32, 16]",
        "preprocess.spacing=auto",  # 2 mm would make the tiny phantoms large
        "train.epochs=1",
        "train.iters_per_epoch=2",
        "train.progress=false",
        "train.quantize=off",
        "data.val_fraction=0",  # no validation pass: the checkpoint is what is tested
    ]
    args = ["train", str(recipe_path("oktay2018_pancreas")), *(a for o in overrides for a in ("--set", o))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["config"]["model"]["norm"] == "batch" and ckpt["plan"]["batch_size"] == 2
    model = model_from_checkpoint(ckpt, torch.device("cpu"), run / "best.pt")
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32, 16)).shape == (1, 7, 32, 32, 16)
