"""Accuracy-controlled int8 (medseg.inference.quantize): the window-level agreement measure against a
hand-computed example, and NNCF's accuracy control returning operations to float until it holds."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from medseg.inference.quantize import WindowAgreement


def _logits(labels: list[list[int]], classes: int = 3) -> np.ndarray:
    """One-hot logits ``(1, classes, H, W)`` whose argmax is ``labels``."""
    labels = np.asarray(labels)
    return (np.arange(classes)[:, None, None] == labels[None]).astype(np.float32)[None]


def _identity(window: np.ndarray) -> list[np.ndarray]:
    return [window]  # a "compiled graph" whose output 0 is its input


def test_window_agreement_is_the_lowest_pooled_label_dice():
    reference = [np.array([[[0, 1], [1, 2]]]), np.array([[[2, 2], [0, 1]]])]
    got = [_logits([[0, 1], [1, 1]]), _logits([[2, 2], [0, 1]])]
    metric = WindowAgreement(reference, labels=[1, 2])
    # pooled: label 1 — 3 reference voxels, 4 predicted, 3 shared: 6/7; label 2 — 3, 2, 2 shared: 4/5
    lowest, per_item = metric(_identity, enumerate(got))
    assert lowest == pytest.approx(0.8)
    assert per_item == pytest.approx([0.75, 1.0])
    # a subset is compared with its own references (NNCF validates subsets by index)
    assert metric(_identity, [(1, got[1])]) == (1.0, [1.0])
    assert metric(_identity, []) == (1.0, [])


def _tiny_network():
    """Conv–InstanceNorm–ReLU ×3 and a 1×1 head (4 classes), seeded random weights: a few quantizable
    operations, so that NNCF's ranking and reverting stay quick."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers, width = [], 1
    for out in (8, 8, 8):
        layers += [nn.Conv3d(width, out, 3, padding=1), nn.InstanceNorm3d(out, affine=True), nn.ReLU()]
        width = out
    return nn.Sequential(*layers, nn.Conv3d(width, 4, 1)).eval()


def test_accuracy_control_returns_operations_to_float():
    """With an allowance of zero, operations that cost agreement on the control windows go back to float:
    fewer int8 convolutions than plain quantization, and the control agreement of the float graph."""
    from medseg.inference.backends import openvino_available

    if not openvino_available():
        pytest.skip("openvino / onnx not installed")
    pytest.importorskip("nncf", reason="NNCF (the openvino extra) not installed")
    from medseg.inference.openvino_backend import build_graph, core
    from medseg.inference.quantize import int8_key, quantize_graph, quantized_share, reference_labels

    model, key = _tiny_network(), int8_key("0" * 64, (16, 16, 16), 2, 1)
    rng = np.random.default_rng(0)
    calibration = [rng.normal(size=(2, 1, 16, 16, 16)).astype(np.float32) for _ in range(4)]
    items = [rng.normal(size=(2, 1, 16, 16, 16)).astype(np.float32) for _ in range(3)]
    metric = WindowAgreement(reference_labels(model, items), labels=[1, 2, 3])

    def agreement(graph) -> float:
        compiled = core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return metric(compiled, enumerate(items))[0]

    with tempfile.TemporaryDirectory() as scratch:
        plain = quantize_graph(build_graph(model, key, Path(scratch)), calibration)
        float_graph = build_graph(model, key, Path(scratch))
        controlled = quantize_graph(float_graph, calibration, (items, metric), max_drop=1e-9)
    assert agreement(float_graph) > 0.999  # OpenVINO fp32 against PyTorch fp32
    assert agreement(plain) < agreement(float_graph) - 1e-3  # plain int8 does cost agreement here
    assert agreement(controlled) >= agreement(float_graph) - 1e-9
    assert 0 < quantized_share(plain)[0] and quantized_share(controlled)[0] < quantized_share(plain)[0]
