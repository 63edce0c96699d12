"""Data-parallel training with real gloo processes started by torchrun's launcher: replicas stay identical
(BatchNorm statistics and EMA bases included), validation is sharded and gathered, --resume continues, the
checkpoint segments."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.config import ConfigError
from medseg.engine.distributed import _process_device, state_digest
from medseg.io.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]

#: Batch norm and the EMA bottleneck: the two kinds of running state each process updates on its own batch.
DDP_TRAIN = [
    "model.filters=[4, 8, 16]",
    "model.norm=batch",
    "model.bottleneck=ema",
    "augment.patch_size=[16, 16, 16]",
    "augment.samples_per_volume=1",
    "train.epochs=2",
    "train.iters_per_epoch=2",
    "train.batch_size=1",
    "train.progress=false",
    "train.quantize=off",
    "train.device=cpu",
    "infer.overlap=0.25",
    "data.val_fraction=0.5",  # 2 validation cases: one per rank
]


def _digest(state: dict[str, torch.Tensor]) -> str:
    """The test's own SHA-256 of a state dict (key, dtype, shape, bytes in key order), written apart from
    medseg's so that a change there cannot hide a difference."""
    sha = hashlib.sha256()
    for key in sorted(state):
        t = state[key].cpu().contiguous()
        sha.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def test_state_digest_sees_one_changed_value():
    state = {"a": torch.zeros(3), "b": torch.ones(2, dtype=torch.int64)}
    changed = {"a": torch.tensor([0.0, 0.0, 1e-7]), "b": state["b"]}
    assert state_digest(state) == _digest(state) != state_digest(changed)


def test_a_named_gpu_is_refused_under_torchrun():
    with pytest.raises(ConfigError, match="cuda:LOCAL_RANK"):
        _process_device("cuda:1", 0)


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _check_replicas(run: Path) -> None:
    """Both ranks ended with the weights and buffers of last.pt (hashed here, independently)."""
    replicas = json.loads((run / "replicas.json").read_text())
    expected = _digest(load_checkpoint(run / "last.pt")["model"])
    assert replicas["world_size"] == 2 and replicas["digests"] == [expected, expected]


def test_two_gloo_processes_train_identical_replicas_resume_and_segment(tmp_path, tiny_dataset):
    run = tmp_path / "run"
    sets = [a for s in [*DDP_TRAIN, f"data.root={tiny_dataset}", f"train.output={run}"] for a in ("--set", s)]
    config = tmp_path / "ddp.yaml"
    config.write_text("{}\n")

    # torchrun itself; train.max_minutes=0 stops both ranks after epoch 1 of 2
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = _run(
        [*launcher, "-m", "pipelines.cli", "train", str(config), *sets, "--set", "train.max_minutes=0"],
        tmp_path,
    )
    assert "2 processes: effective batch 2 per step" in out.stdout
    assert out.stdout.count("run folder:") == 1  # rank 0 alone speaks
    _check_replicas(run)
    assert load_checkpoint(run / "last.pt")["epoch"] == 0

    # medseg's own launcher (the elastic launcher torchrun uses) continues the run
    out = _run(["-m", "pipelines.cli", "train", str(config), *sets, "--nproc", "2", "--resume"], tmp_path)
    assert "resumed from" in out.stdout
    _check_replicas(run)
    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 1
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]

    # sharded validation, gathered: each rank predicted one case, validation.json holds both, with the
    # Dice this process computes on its own from the best weights
    from medseg.config import checkpoint_config
    from medseg.data.datasets import training_cases
    from medseg.engine.validation import ValidationCases, validation_predictions
    from medseg.inference.loading import checkpoint_plan
    from medseg.inference.predictor import Predictor, model_from_checkpoint

    scores = json.loads((run / "validation.json").read_text())
    assert len(scores["cases"]) == 2
    best = load_checkpoint(run / "best.pt")
    model = model_from_checkpoint(best, torch.device("cpu"))
    cfg = checkpoint_config(best)
    cases = {c["case"]: c for c in training_cases(tiny_dataset)}
    volumes = ValidationCases([cases[name] for name in scores["cases"]])
    for name, (pred, ref, _) in zip(
        scores["cases"],
        validation_predictions(model, volumes, cfg, checkpoint_plan(best), torch.device("cpu")),
        strict=True,
    ):
        for row in (r for r in scores["rows"] if r["case"] == name):
            p, r = pred == row["label"], ref == row["label"]
            total = int(p.sum() + r.sum())
            assert row["dice"] == pytest.approx(1.0 if total == 0 else 2 * int((p & r).sum()) / total)
    assert float(rows[scores["epoch"] - 1]["val_dice"]) == pytest.approx(
        np.mean([np.mean([r["dice"] for r in scores["rows"] if r["name"] == n]) for n in scores["summary"]]),
        abs=1e-5,
    )

    # the DDP checkpoint is an ordinary checkpoint: it segments
    image = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]
    result = Predictor(run / "best.pt", device="cpu").predict(image)
    assert result.labels.shape == result.reference.shape
