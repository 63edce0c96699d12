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

``precision="int8"`` always means OpenVINO (a graph ``medseg quantize`` stored); ``auto`` takes int8 where such a
graph exists and its agreement check held (:func:`resolve_window_precision`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch
from torch import nn

from medseg.device import BACKENDS, Precision, resolve_precision
from medseg.inference.fast import prepare_network
from medseg.inference.loading import LoadedCheckpoints
from medseg.inference.onnx_export import INSTALL_HINT

#: The quantized precision (:mod:`medseg.inference.quantize`), OpenVINO only.
INT8 = "int8"


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
        if precision == INT8:
            name = "openvino"  # checked below: only OpenVINO runs int8 graphs
        else:
            use = device.type == "cpu" and precision != "fp32" and not in_memory and openvino_available()
            return "openvino" if use else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    if precision == INT8 and (name != "openvino" or in_memory):
        raise ValueError(
            "precision 'int8' runs a stored OpenVINO graph of a checkpoint: use --backend auto/openvino"
        )
    if name == "openvino":
        if device.type != "cpu":
            raise ValueError(f"backend 'openvino' runs on the CPU, not {device.type}; use --backend torch")
        if not openvino_available():
            raise ValueError(f"backend 'openvino' needs the openvino and onnx packages: {INSTALL_HINT}")
    return name


def resolve_window_precision(
    asked: str | None, device: torch.device, backend: str, loaded: LoadedCheckpoints, batch: int
) -> Precision:
    """The precision the windows run in: ``int8`` when asked for, or for ``auto`` on OpenVINO when every
    checkpoint has a stored int8 graph whose agreement check held (:func:`medseg.inference.quantize.int8_ready`);
    otherwise :func:`medseg.device.resolve_precision`."""
    if asked == INT8:
        return Precision(INT8, None)
    if asked in (None, "auto") and backend == "openvino" and loaded.paths:
        from medseg.inference.quantize import int8_key, int8_ready

        keys = [
            int8_key(sha, window, batch, loaded.plan.in_channels)
            for sha, window in zip(loaded.sha256, loaded.roi_sizes, strict=True)
        ]
        if all(int8_ready(path, key) for path, key in zip(loaded.paths, keys, strict=True)):
            return Precision(INT8, None)
    return resolve_precision(asked, device)


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
        if name == INT8:
            from medseg.inference.openvino_backend import OpenVINONetwork
            from medseg.inference.quantize import load_int8

            graph, hint = load_int8(checkpoint, key)
            nets.append(OpenVINONetwork(graph, key, hint=hint))
        else:
            nets.append(openvino_network(model, key, checkpoint))
    return nets
