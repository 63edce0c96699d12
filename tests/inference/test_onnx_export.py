"""``medseg export-model``: the exported ONNX file, run in ONNX Runtime, gives PyTorch's logits; the JSON beside it
carries the plan and the label table; errors are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from benchmarks.speed import random_checkpoint
from medseg.inference.loading import file_sha256, load_checkpoints
from medseg.inference.onnx_export import onnx_available
from pipelines.export_model import export_model_command

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(not onnx_available(), reason="onnx not installed")

SMALL = ["model.filters=[4, 8, 16, 32, 64]", "augment.patch_size=[32, 32, 16]"]


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(export_model_command)
    return app


def test_exported_model_runs_in_onnx_runtime_as_in_pytorch(tmp_path):
    checkpoint = random_checkpoint(tmp_path / "run" / "best.pt", 5, overrides=SMALL)
    out = tmp_path / "deploy" / "model.onnx"
    result = CliRunner().invoke(_app(), [str(checkpoint.parent), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "written:" in result.output and "window 32×32×16" in result.output

    meta = json.loads(out.with_suffix(".json").read_text())
    loaded = load_checkpoints([checkpoint], torch.device("cpu"))
    assert meta["labels"] == loaded.label_names and list(meta["labels"].values()) == list(range(5))
    assert meta["plan"] == loaded.plan.to_dict() and meta["checkpoint_sha256"] == file_sha256(checkpoint)
    assert meta["input"]["shape"] == ["batch", 1, 32, 32, 16] and meta["output"]["shape"][1] == 5

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    windows = torch.randn((3, 1, 32, 32, 16), generator=torch.Generator().manual_seed(0))  # batch axis free
    (logits,) = session.run(["logits"], {"image": windows.numpy()})
    with torch.no_grad():
        reference = loaded.models[0](windows).numpy()
    assert logits.shape == reference.shape
    assert np.abs(logits - reference).max() <= 1e-4 * np.abs(reference).max()
    assert (logits.argmax(1) == reference.argmax(1)).mean() > 0.999


def test_export_errors_are_one_line(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    runner = CliRunner()
    result = runner.invoke(_app(), [str(tmp_path / "bad.pt"), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "bad.pt" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "m.onnx").exists()
    result = runner.invoke(_app(), [str(tmp_path / "bad.pt"), "--window", "96,96"])
    assert result.exit_code == 2 and "--window '96,96' is not valid" in result.output
