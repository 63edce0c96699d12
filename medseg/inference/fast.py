"""The network as the sliding window runs it: precision, memory layout and device, chosen once per predictor.

:func:`prepare_network` wraps a trained network (eval mode) in :class:`WindowNetwork`, whose ``forward`` takes a
batch of float32 windows and returns float32 logits — what the network computes, in the chosen precision:

* **precision**: ``torch.autocast`` to ``dtype`` on the windows' device (bf16 on the CPU and CUDA, fp16 on
  CUDA), or float32 (``dtype=None``). Weights stay float32; autocast casts them once per window batch.
* **in a lower precision**, a copy of the network whose output head runs in float32 (:class:`Float32Head`)
  and whose max pools run in the windows' precision (:class:`PoolInInputPrecision`);
* **memory layout**: ``channels_last_3d`` (NDHWC) where :func:`default_channels_last` chooses it, with instance
  norms as the equal group norms (:func:`instance_norms_as_group_norms`).

``dtype=None`` in the default layout runs the network itself in float32 (on CUDA without TF32): the exact
reference path. The measurements behind these choices, and the levers tried and not kept, are in
``docs/speed.md`` (section ``medseg.inference.fast``).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from torch import nn


def default_channels_last(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether windows run channels-last (NDHWC) by default on ``device`` in ``dtype`` (module docstring):
    True for bf16 on the CPU only. float32 stays on the reference path (NCDHW, ``InstanceNorm3d``) so that
    ``fp32`` gives the trained network's exact float32 numbers; CUDA keeps cuDNN's default layout."""
    return device.type == "cpu" and dtype == torch.bfloat16


def instance_norms_as_group_norms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``InstanceNorm3d`` layers are ``GroupNorm`` with one group per channel.

    Instance normalisation (Ulyanov et al. 2016) normalises each channel of each sample over its spatial
    positions, then applies the per-channel affine; ``GroupNorm(C, C)`` (Wu & He 2018, Eq. 1 with ``G = C``) is
    the same function — so the copy computes what the network computes, with the same weights. Only
    layers that normalise with the instance's own statistics are replaced (``track_running_stats=False``,
    the default): with running statistics an eval-mode instance norm is a different function. ``model``
    itself is not changed.

    Why: PyTorch's CPU ``instance_norm`` makes a channels-last input contiguous and returns NCDHW (two copies
    per layer, and the next convolution reorders again), while ``group_norm`` has a channels-last kernel that
    keeps the layout (timings: ``docs/speed.md``, section ``medseg.inference.fast``).
    """
    net = copy.deepcopy(model)
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.InstanceNorm3d) and not child.track_running_stats:
                c = child.num_features
                norm = nn.GroupNorm(c, c, eps=child.eps, affine=child.affine)
                if child.affine:
                    norm.weight, norm.bias = child.weight, child.bias
                setattr(parent, name, norm)
    return net


class PoolInInputPrecision(nn.Module):
    """A max pooling layer run with autocast off, so it pools the bf16/fp16 features in their own precision.

    CPU autocast lists ``max_pool3d`` among the float32 operations: it casts the features up, pools in float32
    and hands float32 to the next convolution, which casts them down again, and it runs a float32 pooling
    kernel instead of the bf16 one (the cost: ``docs/speed.md``, section ``medseg.inference.fast``). A maximum
    picks one of its inputs, which are bf16 numbers either way, so the result is bit for bit what the float32
    pool gives (tested).
    """

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.pool(x)


def pools_in_input_precision(model: nn.Module) -> nn.Module:
    """``model`` with each ``MaxPool3d`` wrapped in :class:`PoolInInputPrecision` (in place; returns it)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MaxPool3d):
                setattr(parent, name, PoolInInputPrecision(child))
    return model


class Float32Head(nn.Module):
    """The network's output head run in float32 (autocast off), on features cast up from the lower precision.

    Under autocast the 1×1×1 head would compute the logits in bf16 and round them to bf16 (8 bits of
    mantissa: ±0.03 at a logit of 10), which flips labels where two classes are close. What the float32 head
    costs and how many voxels it brings back to float32's labels (``python -m benchmarks.bench_precision``):
    ``docs/speed.md``, section ``medseg.inference.fast``.
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor):
        with torch.autocast(x.device.type, enabled=False):
            return self.head(x.float())


class WindowNetwork(nn.Module):
    """``model`` run on windows in ``dtype`` autocast (None: float32), channels-last or not; float32 out.

    Example:
        >>> net = WindowNetwork(torch.nn.Conv3d(1, 2, 3, padding=1).eval(), None, False)
        >>> net(torch.zeros(2, 1, 8, 8, 8)).dtype
        torch.float32
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None, channels_last: bool) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.channels_last = channels_last
        self.device_type = next(model.parameters()).device.type

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            windows = windows.contiguous(memory_format=torch.channels_last_3d)
        autocast = torch.autocast(
            self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
        )
        # float32 on CUDA means float32: no TF32 tensor-core rounding in the convolutions (cuDNN's default)
        exact = (
            torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
            if self.dtype is None
            else nullcontext()
        )
        with torch.no_grad(), autocast, exact:
            logits = self.model(windows)
        return logits.float().contiguous()


def prepare_network(
    model: nn.Module,
    device: torch.device,
    dtype: torch.dtype | None,
    channels_last: bool | None = None,
) -> WindowNetwork:
    """``model`` (eval mode, moved to ``device``) wrapped for the sliding window (module docstring).

    ``channels_last=None`` takes :func:`default_channels_last`. In a lower precision a copy of the network runs,
    its output head in float32 (:class:`Float32Head`, for a network with a ``head``), its max pools in the
    windows' precision (:class:`PoolInInputPrecision`) and, channels-last, its
    instance norms as group norms (:func:`instance_norms_as_group_norms`); ``model`` itself is not changed.
    """
    model = model.to(device).eval()
    if channels_last is None:
        channels_last = default_channels_last(device, dtype)
    if channels_last or dtype is not None:
        model = instance_norms_as_group_norms(model) if channels_last else copy.deepcopy(model)
    if dtype is not None:
        pools_in_input_precision(model)
        if isinstance(getattr(model, "head", None), nn.Module):
            model.head = Float32Head(model.head)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return WindowNetwork(model, dtype, channels_last)
