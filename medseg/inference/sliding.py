"""Sliding-window inference: MONAI ``sliding_window_inference`` with Gaussian weighting, as small functions.

This module is medseg's one caller of MONAI's sliding window: segmentation, test-time mirroring and ensembles
(:class:`medseg.inference.Predictor`), training's validation (through the predictor) and the attention maps
(:mod:`medseg.inference.attention`, whose windows return α instead of logits) all stitch through
:func:`sliding_window_logits`.

* :class:`SlidingWindow` — the window plan: size, overlap, windows per forward pass, blending mode.
* :func:`sliding_window_logits` — the stitched logits (or any per-window map), with the autocast dtype and the
  devices of the windows and of the stitching buffer as arguments.
* :func:`softmax_` — softmax over the class axis in place (no second ``K × volume`` buffer).
* :func:`stitching_device` — where the stitching buffer goes on CUDA: the GPU when the estimate of
  :func:`stitching_bytes` fits in its free memory, else the CPU (nnU-Net's choice, made before the first window);
* :func:`with_cpu_stitching` — the fallback when the estimate was too optimistic: try with the whole output on
  the GPU, and when that raises ``torch.cuda.OutOfMemoryError`` keep the windows on the GPU but stitch into a CPU
  buffer (MONAI's ``sliding_window_inference(..., sw_device=cuda, device=cpu)``), saying so in a warning.

Host↔device traffic on CUDA: with GPU stitching the model-space image is copied to the GPU once and the windows
are cut there, and the softmax comes back once; with CPU stitching each window batch goes to the GPU and its
logits come back — the window itself, nothing more.

Memory of the stitching (MONAI 1.x): a ``K``-channel output of the input's dtype (float32) and a one-channel
weight-count map, both of the model grid's size, i.e. ``4 (K + 1)`` bytes per model-grid voxel, plus the
network's activations for ``sw_batch_size`` windows (independent of the volume).

Restoring the result to the input's voxel grid is :func:`medseg.inference.restore.restore_labels`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from monai.inferers import sliding_window_inference
from torch import nn

T = TypeVar("T")

#: The warning a case gets when its stitching fell back to the CPU.
CPU_STITCHING_WARNING = "stitching on the CPU: the volume did not fit in GPU memory"


@dataclass(frozen=True)
class SlidingWindow:
    """How a volume is cut into windows and stitched back: the arguments of MONAI's
    ``sliding_window_inference`` that belong to a model rather than to a call.

    Attributes:
        roi_size: the window, in voxels per spatial axis (the training patch).
        overlap: fraction of a window shared with its neighbour along each axis, in [0, 1).
        sw_batch_size: windows per forward pass.
        mode: ``"gaussian"`` (nnU-Net's weighting: window centres count more) or ``"constant"``.
    """

    roi_size: tuple[int, ...]
    overlap: float = 0.5
    sw_batch_size: int = 2
    mode: str = "gaussian"

    def __post_init__(self) -> None:
        object.__setattr__(self, "roi_size", tuple(int(r) for r in self.roi_size))


@torch.no_grad()
def sliding_window_logits(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    window: SlidingWindow | Sequence[int],
    *,
    autocast_dtype: torch.dtype | None = None,
    sw_device: torch.device | str | None = None,
    out_device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Logits ``(B, K, *image.shape[2:])`` by Gaussian-weighted sliding windows, float32.

    Args:
        model: the network (put in eval mode), or any callable ``windows (b, C, *roi) → (b, K, *roi)``.
        image: ``(B, C, *spatial)``; volumes smaller than the window are padded, and the result cropped back.
        window: the :class:`SlidingWindow`, or just its ``roi_size`` (the other fields at their defaults).
        autocast_dtype: autocast the network to this dtype on the windows' device (``torch.bfloat16`` on the
            CPU or CUDA, ``torch.float16`` on CUDA); ``None`` runs in float32. The stitched output stays
            float32.
        sw_device: device of the windows and the network (default: ``image.device``).
        out_device: device of the stitching buffer (default: ``image.device``).
        progress: a progress bar over the windows on stderr (MONAI's tqdm bar), for large volumes.
    """
    if not isinstance(window, SlidingWindow):
        window = SlidingWindow(tuple(window))
    if isinstance(model, nn.Module):
        model.eval()
    window_device = torch.device(sw_device) if sw_device is not None else image.device
    if autocast_dtype is not None:
        autocast = torch.autocast(device_type=window_device.type, dtype=autocast_dtype)
    else:
        autocast = torch.autocast(device_type=window_device.type, enabled=False)
    with autocast:
        out = sliding_window_inference(
            torch.as_tensor(image),
            list(window.roi_size),
            window.sw_batch_size,
            model,
            overlap=window.overlap,
            mode=window.mode,
            padding_mode="constant",
            sw_device=sw_device,
            device=out_device,
            progress=progress,
        )
    return torch.as_tensor(out).float()


#: GPU memory (2 GiB) kept free for the network's activations, cuDNN workspaces and the window batch when
#: :func:`stitching_device` decides where to stitch (the activations it covers: ``docs/speed.md``, section
#: ``medseg.inference.sliding``).
ACTIVATION_RESERVE_BYTES = 2 * 2**30


def stitching_bytes(shape: Sequence[int], classes: int) -> int:
    """Bytes the GPU holds for GPU stitching of a model grid of ``shape``: the image, MONAI's ``K``-channel
    float32 output and its one-channel weight map (``4 (K + 2)`` bytes per voxel); the softmax is in place."""
    voxels = 1
    for n in shape:
        voxels *= int(n)
    return 4 * (int(classes) + 2) * voxels


def stitching_device(
    device: torch.device, shape: Sequence[int], classes: int, reserve: int = ACTIVATION_RESERVE_BYTES
) -> torch.device:
    """``device`` when the stitching of a ``shape`` model grid fits there (always on the CPU), else the CPU.

    Free memory is what the driver reports (``torch.cuda.mem_get_info``) plus what PyTorch's caching
    allocator holds unused; ``reserve`` stays free for the network (:data:`ACTIVATION_RESERVE_BYTES`).
    """
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return device if stitching_bytes(shape, classes) + reserve <= free else torch.device("cpu")


def softmax_(logits: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Softmax along ``dim`` in place (``x - max``, ``exp``, ``/ sum``); temporaries are one channel."""
    logits -= logits.amax(dim=dim, keepdim=True)
    logits.exp_()
    logits /= logits.sum(dim=dim, keepdim=True)
    return logits


def with_cpu_stitching(run: Callable[[torch.device], T], device: torch.device) -> tuple[T, list[str]]:
    """``run(device)``, and on CUDA, after ``torch.cuda.OutOfMemoryError``, ``run(cpu)`` with a warning.

    ``run(out_device)`` does the sliding window with the stitching buffer on ``out_device`` (the windows stay on
    ``device``). The retry happens outside the ``except`` block, so the failed attempt's traceback — and the GPU
    tensors its frames hold — is released and the cache emptied first. Returns ``(result, warnings)``.
    """
    if device.type != "cuda":
        return run(device), []
    try:
        return run(device), []
    except torch.cuda.OutOfMemoryError:
        pass
    torch.cuda.empty_cache()
    return run(torch.device("cpu")), [CPU_STITCHING_WARNING]
