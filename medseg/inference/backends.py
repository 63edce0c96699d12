"""What runs the network on the windows: PyTorch eager or OpenVINO, chosen once per predictor.

* :func:`resolve_backend` — ``auto`` | ``torch`` | ``openvino`` (:data:`medseg.device.BACKENDS`) on a device, for
  a precision, → ``torch`` | ``openvino``;
* :func:`window_networks` — the networks of a predictor as the sliding window calls them: PyTorch's
  :func:`medseg.inference.fast.prepare_network`, or OpenVINO's :func:`medseg.inference.openvino_backend
  .openvino_network` (graphs cached per checkpoint).

The rule of ``auto`` (measured, ``docs/speed.md``, section ``OpenVINO back end``): **OpenVINO on the CPU
whenever it is installed** — its CPU plugin ran the default network's forward 2.3–3.4× faster than PyTorch in
fp32 and 1.6–2.3× in bf16 on the development machine (AMD EPYC, AVX-512 BF16), and faster in fp32 with oneDNN
capped at AVX2 — **except** for:

* ``precision="fp32"`` asked for by name: the exact reference path, PyTorch eager (``--precision fp32``);
* a CUDA device: OpenVINO's CPU plugin has no GPU, PyTorch keeps CUDA;
* a network in memory without a checkpoint (:meth:`Predictor.from_network`, training's validation): its
  weights change every epoch, and a conversion (~10 s) would cost more than it saves on a few phantoms.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch
from torch import nn

from medseg.device import BACKENDS
from medseg.inference.fast import prepare_network
from medseg.inference.onnx_export import INSTALL_HINT


def openvino_available() -> bool:
    """Whether the OpenVINO back end can run here: ``openvino`` and ``onnx`` (its converter's first step)."""
    return all(importlib.util.find_spec(name) is not None for name in ("openvino", "onnx"))


def resolve_backend(name: str | None, device: torch.device, precision: str | None, in_memory: bool) -> str:
    """``auto`` (or None) | ``torch`` | ``openvino`` → ``torch`` | ``openvino`` (module docstring's rule).

    ``precision`` is the precision as asked (``auto``, ``fp32``, ...; ``fp32`` by name keeps ``auto`` on
    PyTorch); ``in_memory``: the network has no checkpoint file.

    Raises:
        ValueError: an unknown name; ``openvino`` asked for on a GPU or without the packages installed.
    """
    if name is None or name == "auto":
        use = device.type == "cpu" and precision != "fp32" and not in_memory and openvino_available()
        return "openvino" if use else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    if name == "openvino":
        if device.type != "cpu":
            raise ValueError(f"backend 'openvino' runs on the CPU, not {device.type}; use --backend torch")
        if not openvino_available():
            raise ValueError(f"backend 'openvino' needs the openvino and onnx packages: {INSTALL_HINT}")
    return name


def window_networks(
    backend: str,
    models: Sequence[nn.Module],
    checkpoints: Sequence[str | os.PathLike],
    sha256: Sequence[str],
    windows: Sequence[Sequence[int]],
    batch: int,
    precision: tuple[str, torch.dtype | None],
    in_channels: int,
) -> list:
    """One callable ``windows → float32 logits`` per model: PyTorch's (``precision``'s autocast dtype) or
    OpenVINO's (``precision``'s name; each graph keyed by its checkpoint's SHA-256, window and ``batch``)."""
    name, dtype = precision
    device = next(models[0].parameters()).device
    if backend == "torch":
        return [prepare_network(m, device, dtype) for m in models]
    from medseg.inference.openvino_backend import GraphKey, openvino_network, openvino_version

    version = openvino_version()
    nets = []
    for i, model in enumerate(models):
        checkpoint = checkpoints[i] if i < len(checkpoints) else None
        digest = sha256[i] if i < len(sha256) else "0" * 64
        key = GraphKey(digest, tuple(int(n) for n in windows[i]), int(batch), int(in_channels), name, version)
        nets.append(openvino_network(model, key, checkpoint))
    return nets
