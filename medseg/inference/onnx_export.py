"""A medseg network as an ONNX graph: for serving (ONNX Runtime, OpenVINO Model Server, Triton, TensorRT) and as
the first step of the OpenVINO back end (:mod:`medseg.inference.openvino_backend`).

* :func:`export_onnx` — a network (float32, eval) → an ONNX file whose input ``image`` is ``(batch, C, *window)``
  float32 and whose output ``logits`` is ``(batch, K, *window)`` float32, with a free batch axis;
* :func:`export_model` — a checkpoint → ``model.onnx`` and, beside it, ``model.json``: the plan (how a scan is
  preprocessed before the network: orientation, spacing, intensity window, body crop), the label table
  (name → index of the logits' class axis), the input and output description and the checkpoint's SHA-256.

The graph is PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, ONNX opset
:data:`OPSET`), which needs the ``onnx`` package (the ``openvino`` extra). The spatial size is fixed to the window
it is traced with: the Attention U-Net's gates compare feature-map shapes in Python, which tracing turns into
constants, so a graph is valid for its own window only (what the sliding window feeds it).

>>> export_model("runs/demo/best.pt", "model.onnx")      # doctest: +SKIP
{'onnx': 'model.onnx', 'json': 'model.json', ...}
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.io import InputError
from medseg.io.atomic import atomic_path, atomic_write_text

#: ONNX opset of the exported graphs (ONNX Runtime ≥ 1.12 and OpenVINO ≥ 2022.1 read it).
OPSET = 17
#: Names of the graph's input and output.
INPUT_NAME, OUTPUT_NAME = "image", "logits"
#: What to install when the exporter is missing.
INSTALL_HINT = "pip install 'medseg[openvino]' (or: pip install onnx)"


def onnx_available() -> bool:
    """Whether PyTorch's ONNX exporter can run here (it needs the ``onnx`` package)."""
    return importlib.util.find_spec("onnx") is not None


def export_onnx(
    model: nn.Module, path: str | os.PathLike, window: Sequence[int], in_channels: int = 1
) -> Path:
    """Write ``model`` (float32, eval mode, on the CPU; ``model`` itself is not changed) as an ONNX graph for
    windows of ``window`` voxels and ``in_channels`` channels, the batch axis free; atomically.

    Traced with one window (half the work of two); PyTorch's tracer warnings about shape comparisons are
    expected (module docstring) and silenced.

    Raises:
        InputError: the ``onnx`` package is missing (:data:`INSTALL_HINT`).
    """
    if not onnx_available():
        raise InputError(f"{path}: ONNX export needs the onnx package: {INSTALL_HINT}")
    path = Path(path)
    was_training = model.training
    device = next(model.parameters()).device
    model = model.eval().cpu()
    example = torch.zeros((1, int(in_channels), *(int(n) for n in window)), dtype=torch.float32)
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarning / DeprecationWarning of the TorchScript exporter
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    finally:
        model.to(device).train(was_training)
    return path


def export_model(
    checkpoint: str | os.PathLike, out: str | os.PathLike, window: Sequence[int] | None = None
) -> dict[str, Any]:
    """``medseg export-model``: the checkpoint's network as ``out`` (ONNX) and ``out`` with ``.json``: plan,
    labels, input/output description, checkpoint SHA-256 (module docstring). ``window`` defaults to the
    checkpoint's ``infer.roi_size``, else its plan's patch — the window ``medseg segment`` slides.

    Returns:
        What was written: ``{"onnx", "json", "window", "labels", "checkpoint_sha256"}``.

    Raises:
        InputError: an unusable checkpoint, or the ``onnx`` package missing.
    """
    from medseg.inference.loading import load_checkpoints

    out = Path(out)
    loaded = load_checkpoints([checkpoint], torch.device("cpu"), window)
    model, roi = loaded.models[0], loaded.roi_sizes[0]
    export_onnx(model, out, roi, loaded.plan.in_channels)
    labels = dict(sorted(loaded.label_names.items(), key=lambda kv: kv[1]))
    doc = {
        "format": "medseg-onnx/1",
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": loaded.sha256[0],
        "onnx": out.name,
        "opset": OPSET,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", loaded.plan.in_channels, *roi],
            "dtype": "float32",
            "meaning": "windows of the preprocessed scan (the plan: reoriented, resampled, intensity-scaled)",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", len(labels), *roi],
            "dtype": "float32",
            "meaning": "logits; channel k is the label whose value is k (softmax over axis 1)",
        },
        "labels": labels,
        "sliding_window": {
            "roi_size": roi,
            "overlap": loaded.config.infer.overlap,
            "mode": loaded.config.infer.mode,
        },
        "plan": loaded.plan.to_dict(),
    }
    meta = out.with_suffix(".json")
    atomic_write_text(meta, json.dumps(doc, indent=2, default=str))
    return {
        "onnx": str(out),
        "json": str(meta),
        "window": roi,
        "labels": labels,
        "checkpoint_sha256": loaded.sha256[0],
    }
