"""The ablation as an experiment, end to end on a tiny budget: every (variant, seed) stored as it finishes,
resumed and skipped, locks that keep two processes apart, paired tables, α focus, costs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from medseg.config import ConfigError, ModelConfig
from medseg.engine.ablation import AblationPhantoms, run_ablation, take_lock
from medseg.engine.cost import measure_cost
from tests.conftest import TINY_TRAIN

TINY = dict(
    phantoms=AblationPhantoms("standard", 3, 2, (40, 40, 20)),
    extra_overrides=[*TINY_TRAIN, "train.epochs=1", "train.val_every=1"],
    cost_size=32,
    log=lambda *_: None,
)


def test_measure_cost_counts_flops_of_a_known_network():
    cost = measure_cost(ModelConfig(name="unet", filters=(4, 8)), 2, size=16, repeats=1, threads=1)
    # UNet with filters [4, 8] on 16³: encoder 1→4→4 at 16³, 4→8→8 at 8³; decoder 12→4→4 at 16³; head 4→2
    macs = 16**3 * 27 * (1 * 4 + 4 * 4 + 12 * 4 + 4 * 4) + 8**3 * 27 * (4 * 8 + 8 * 8) + 16**3 * 4 * 2
    assert abs(cost["gflops"] - 2 * macs / 1e9) / (2 * macs / 1e9) < 0.01
    assert cost["params"] > 0 and cost["ms"] > 0


@pytest.mark.slow
def test_seeded_ablation_stores_runs_pairs_them_and_resumes(tmp_path):
    results = run_ablation(tmp_path, ["unet", "attention_unet"], seeds=[0, 1], **TINY)
    assert sorted((r["variant"], r["seed"]) for r in results) == [
        ("attention_unet", 0),
        ("attention_unet", 1),
        ("unet", 0),
        ("unet", 1),
    ]
    for r in results:
        assert len(r["cases"]) == 2 and all(len(scores) == 6 for scores in r["cases"].values())
    gated = next(r for r in results if r["variant"] == "attention_unet")
    assert gated["attention"], "the Attention U-Net's gates are measured"
    level = next(iter(gated["attention"].values()))
    assert 0.0 < level["entropy"] <= 1.0
    assert all(0.0 <= v["mass_fraction"] <= 1.0 for v in level["organs"].values())
    assert not next(r for r in results if r["variant"] == "unet")["attention"]  # no gates, nothing measured

    cases = list(csv.DictReader((tmp_path / "ablation_cases.csv").open()))
    assert len(cases) == 2 * 2 * 2  # variants × seeds × cases
    paired = list(csv.DictReader((tmp_path / "ablation_paired.csv").open()))
    vs_unet = [p for p in paired if p["reference"] == "unet" and p["metric"] == "dice_mean"]
    assert len(vs_unet) == 1 and int(vs_unet[0]["n"]) == 4  # 2 seeds × 2 cases, paired
    assert vs_unet[0]["verdict"] in ("better", "worse", "no difference")
    table = (tmp_path / "ablation.md").read_text()
    assert "Paired difference against `unet`" in table and "Where the gates look" in table

    # a second call repeats nothing: the stored results are kept byte for byte
    stored = {p.name: p.read_bytes() for p in (tmp_path / "results").glob("*.json")}
    run_ablation(tmp_path, ["unet", "attention_unet"], seeds=[0, 1], **TINY)
    assert {p.name: p.read_bytes() for p in (tmp_path / "results").glob("*.json")} == stored
    assert not list((tmp_path / "locks").glob("*.lock"))


def test_a_run_held_by_a_live_process_is_skipped(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "locks").mkdir()
        (tmp_path / "locks" / "unet__s0.lock").write_text(str(sleeper.pid))  # another live process
        lines = []
        run_ablation(tmp_path, ["unet"], seeds=[0], **{**TINY, "log": lines.append})
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not (tmp_path / "results" / "unet__s0.json").exists()  # nothing trained
    assert any("running in another process" in line for line in lines)
    assert (tmp_path / "locks" / "unet__s0.lock").read_text() == str(sleeper.pid)  # not ours to remove


def test_a_stale_lock_is_taken_over(tmp_path):
    lock = tmp_path / "a.lock"
    lock.write_text("999999999")  # a process that is gone
    assert take_lock(lock) and lock.read_text() == str(os.getpid())
    lock.write_text("")  # a writer killed before it wrote its PID
    assert take_lock(lock)


def test_take_lock_is_exclusive(tmp_path):
    lock = tmp_path / "a.lock"
    assert take_lock(lock)
    assert lock.read_text() == str(os.getpid())
    assert not take_lock(lock)  # held by this live process


def test_an_ablation_folder_holds_one_phantom_kind(tmp_path):
    (tmp_path / "ablation.json").write_text(
        json.dumps(
            {
                "kind": "standard",
                "train_cases": 3,
                "test_cases": 2,
                "shape": [40, 40, 20],
                "phantom_seed": 2027,
            }
        )
    )
    with pytest.raises(ConfigError, match="another --out"):
        run_ablation(
            tmp_path,
            ["unet"],
            seeds=[0],
            **{**TINY, "phantoms": AblationPhantoms("hard", 3, 2, (40, 40, 20))},
        )
