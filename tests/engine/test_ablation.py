"""The ablation pipeline end to end on a tiny budget: every row has Dice, parameters, FLOPs, time, memory."""

from __future__ import annotations

import csv

from medseg.config import ModelConfig
from medseg.engine.ablation import run_ablation
from medseg.engine.cost import measure_cost
from tests.conftest import TINY_TRAIN


def test_measure_cost_counts_flops_of_a_known_network():
    cost = measure_cost(ModelConfig(name="unet", filters=(4, 8)), 2, size=16, repeats=1, threads=1)
    # UNet with filters [4, 8] on 16³: encoder 1→4→4 at 16³, 4→8→8 at 8³; decoder 12→4→4 at 16³; head 4→2
    macs = 16**3 * 27 * (1 * 4 + 4 * 4 + 12 * 4 + 4 * 4) + 8**3 * 27 * (4 * 8 + 8 * 8) + 16**3 * 4 * 2
    assert abs(cost["gflops"] - 2 * macs / 1e9) / (2 * macs / 1e9) < 0.01
    assert cost["params"] > 0 and cost["ms"] > 0


def test_tiny_ablation_writes_table(tmp_path):
    rows = run_ablation(
        tmp_path,
        ["unet", "ag_pam"],
        train_cases=3,
        test_cases=1,
        shape=(40, 40, 20),
        extra_overrides=[*TINY_TRAIN, "train.epochs=1", "train.val_every=1"],
        cost_size=32,
        log=lambda *_: None,
    )
    assert [r["variant"] for r in rows] == ["unet", "ag_pam"]
    table = (tmp_path / "ablation.md").read_text()
    assert "| unet |" in table and "pancreas" in table and "GFLOPs" in table
    parsed = list(csv.DictReader((tmp_path / "ablation.csv").open()))
    assert float(parsed[1]["params_M"]) > float(parsed[0]["params_M"])  # PAM adds parameters and gates
    assert all(0.0 <= float(r["dice_mean"]) <= 1.0 for r in parsed)


def test_rerunning_one_variant_keeps_the_others(tmp_path):
    kwargs = dict(
        train_cases=3,
        test_cases=1,
        shape=(40, 40, 20),
        cost_size=32,
        log=lambda *_: None,
        extra_overrides=[*TINY_TRAIN, "train.epochs=1", "train.val_every=1"],
    )
    run_ablation(tmp_path, ["unet", "ag_cam"], **kwargs)
    run_ablation(tmp_path, ["unet"], **kwargs)
    assert [r["variant"] for r in csv.DictReader((tmp_path / "ablation.csv").open())] == ["unet", "ag_cam"]
