"""Every YAML in configs/ trains with the real loop, writes a checkpoint, and segments from it alone."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.config import load_config
from medseg.engine import train
from medseg.inference import Predictor

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))
QUICK = [
    "model.filters=[4, 8, 16, 32]",
    "augment.patch_size=[32, 32, 32]",
    "augment.samples_per_volume=1",
    "train.epochs=1",
    "train.iters_per_epoch=1",
    "train.batch_size=1",
    "train.progress=false",
    "train.quantize=off",
    "data.val_fraction=0",
    "infer.overlap=0",
    "infer.sw_batch_size=1",
    "preprocess.spacing=auto",  # a recipe's fixed spacing (oktay2018_pancreas: 2 mm) would blow up the phantoms
]


def test_configs_found():
    names = {p.stem for p in CONFIGS}
    assert {"unet", "attention_unet", "ag_pam", "ag_dual", "ag_scale_attention", "phantoms"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_and_segments_from_checkpoint(path, tiny_dataset, tmp_path):
    cfg = load_config(path, [*QUICK, f"data.root={tiny_dataset}", f"train.output={tmp_path / 'run'}"])
    run = train(cfg, log=lambda *_: None)
    src = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]
    pred = Predictor(run / "best.pt", device="cpu").predict(src)
    ref = nib.load(src)
    assert pred.labels.shape == ref.shape and np.array_equal(pred.reference.affine, ref.affine)
