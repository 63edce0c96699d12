"""One optimisation step, and the precision it runs in (``train.precision``).

The step is what :func:`medseg.engine.train` repeats and what ``python -m benchmarks.bench_train`` times:

1. ``optimizer.zero_grad(set_to_none=True)`` (gradients are dropped, not filled with zeros);
2. the network's forward pass under ``torch.autocast`` in the resolved dtype — bfloat16 on a CPU with native
   bf16 instructions and on CUDA (convolutions run in bf16 on oneDNN / cuDNN, weights stay float32);
3. the loss in float32 (:class:`medseg.losses.SegmentationLoss` upcasts the logits: softmax, log and the
   Dice sums are not run in bf16, following PyTorch's AMP recipe of float32 losses);
4. backward; gradients are float32 because the weights are; clipping to a global norm of 12 (nnU-Net's
   value); the optimizer step. A ``GradScaler`` is used only for float16 (CUDA): bfloat16 has float32's
   exponent range, so gradients do not underflow and need no scaling.

``auto`` precision (the default) resolves as inference's does — one resolver,
:func:`medseg.device.resolve_precision`: on CUDA bfloat16 when the GPU supports it, float16 with loss scaling
otherwise; on a CPU bfloat16 when it has native bf16 arithmetic (AVX-512-BF16 or AMX,
:func:`medseg.device.cpu_has_native_bf16`), float32 otherwise.

A bf16 check guards the CPU path against a oneDNN defect: a wrong bfloat16 weight gradient for 3×3×3
convolutions whose input is 2 voxels deep, which a U-Net meets at its bottleneck for patches 32-47 voxels deep
(the measurements: ``docs/design.md``, section ``medseg.engine.step``). :func:`training_precision` runs, before
training, every distinct convolution of the network whose input grid has a side of at most
:data:`_CHECK_MAX_SIDE` voxels (found by one no-grad forward pass of a CPU copy) once in bf16 and once in
float32 on random data: if a weight gradient's relative error exceeds :data:`_CHECK_TOLERANCE`, ``auto``
trains in float32 (and says why) and an explicit ``bf16`` is refused with a :class:`~medseg.config.ConfigError`.

The speed of the step in bf16 and float32 and the demo's Dice trained both ways are in ``docs/speed.md``
(section ``medseg.engine.step``).
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F

from medseg.config import ConfigError
from medseg.device import Precision, resolve_precision

#: Global gradient-norm clip of every step (nnU-Net's value).
MAX_GRAD_NORM = 12.0


#: Convolutions whose input grid has a side of at most this many voxels are checked in bf16 (module docstring):
#: where the kernel overhangs the grid, the JIT kernels take their edge-case paths.
_CHECK_MAX_SIDE = 4
#: Largest relative error of a bf16 weight gradient against float32 that passes (bf16 rounding: ~0.3 %).
_CHECK_TOLERANCE = 0.05


def _conv_configs(model: torch.nn.Module, in_channels: int, patch) -> dict[tuple, str]:
    """Distinct ``(module settings, input shape)`` of every ``Conv3d`` in one training-mode forward of a zero
    ``(1, in_channels, *patch)`` input through a float32 CPU copy of ``model`` (the model itself is left
    untouched). Why a real pass and not a ``meta``-device one: ``docs/design.md``, section
    ``medseg.engine.step``."""
    probe = copy.deepcopy(model).cpu().float().train()
    configs: dict[tuple, str] = {}

    def record(conv: torch.nn.Conv3d, args: tuple, name: str) -> None:
        settings = (tuple(conv.weight.shape), conv.stride, conv.padding, conv.dilation, conv.groups)
        configs.setdefault((*settings, tuple(args[0].shape)), name)

    for name, conv in probe.named_modules():
        if isinstance(conv, torch.nn.Conv3d):
            conv.register_forward_pre_hook(functools.partial(record, name=name))
    with torch.no_grad():
        probe(torch.zeros(1, in_channels, *patch))
    return configs


def bf16_weight_grad_errors(model: torch.nn.Module, in_channels: int, patch) -> dict[str, float]:
    """Convolutions whose bf16 weight gradient disagrees with float32 here: ``{module name: relative error}``.

    Checks each distinct convolution (settings and input shape) of a forward pass on a
    ``(1, in_channels, *patch)`` input whose input grid has a side of at most ``_CHECK_MAX_SIDE``, with random
    bf16-representable data from a private generator (the global RNG is untouched), see the module docstring.
    """
    gen = torch.Generator().manual_seed(0)
    errors = {}
    for (weight_shape, stride, padding, dilation, groups, shape), name in _conv_configs(
        model, in_channels, patch
    ).items():
        if min(shape[2:]) > _CHECK_MAX_SIDE:
            continue
        x = torch.randn(shape, generator=gen).bfloat16().float()
        w = torch.randn(weight_shape, generator=gen).bfloat16().float()
        args = (None, stride, padding, dilation, groups)
        ref = w.clone().requires_grad_()
        out = F.conv3d(x, ref, *args)
        grad_out = torch.randn(out.shape, generator=gen).bfloat16()
        out.backward(grad_out.float())
        low = w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = F.conv3d(x, low, *args)
        out.backward(grad_out)
        error = float((low.grad - ref.grad).abs().max() / ref.grad.abs().max().clamp_min(1e-30))
        if not error <= _CHECK_TOLERANCE:  # also NaN
            errors[f"{name} (input {'×'.join(map(str, shape[1:]))})"] = error
    return errors


def training_precision(
    name: str, device: torch.device, model: torch.nn.Module, in_channels: int, patch, log=print
) -> Precision:
    """:func:`medseg.device.resolve_precision`, then on the CPU the bf16 check of the module docstring.

    Raises:
        ConfigError: ``fp16`` off CUDA, or ``bf16`` asked for explicitly and the check fails (``auto`` falls
            back to fp32).
    """
    try:
        precision = resolve_precision(name, device)
    except ValueError as exc:  # "precision 'fp16' needs a CUDA device, not cpu; …"
        raise ConfigError(f"train.{exc}") from None
    if precision.name != "bf16" or device.type != "cpu":
        return precision
    errors = bf16_weight_grad_errors(model, in_channels, patch)
    if not errors:
        return precision
    where, error = next(iter(errors.items()))
    reason = (
        f"the CPU's bf16 weight gradient of {len(errors)} convolution(s) disagrees with float32, e.g. {where}: "
        f"relative error {error:.3g} (a oneDNN defect for 3×3×3 convolutions on 2-voxel-deep inputs)"
    )
    if name == "bf16":
        raise ConfigError(
            f"train.precision: bf16 would train with wrong gradients here: {reason}; use train.precision: fp32, "
            "or a patch whose depth is not 32-47 voxels (2 voxels at the bottleneck)"
        )
    log(f"train.precision auto: training in fp32, not bf16: {reason}")
    return Precision("fp32", None)


def training_layout(name: str, device: torch.device, precision: Precision) -> bool:
    """Whether the network trains channels-last with instance norms as ``GroupNorm(C, C)``
    (:func:`medseg.inference.fast.instance_norms_as_group_norms`: the same function and parameters, so the same
    gradients up to float rounding, tested). ``auto`` keeps the standard layout everywhere: under the AVX2
    emulation the forward + backward alone measured 1.11× (demo network) to 1.25× (default network) faster in
    float32, but the demo's whole training took 257 s against 209 s standard; in bf16 it was slower too
    (``docs/speed.md``, section "Training step"). ``channels_last`` by name, for measuring on other CPUs."""
    del device, precision  # the rule may depend on them once a CPU where it pays end to end is measured
    return name == "channels_last"


def train_step(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    image: torch.Tensor,
    label: torch.Tensor,
    precision: Precision,
) -> torch.Tensor:
    """One step on a batch (see the module docstring); returns the detached float32 loss.

    ``scaler``: enabled for float16 only (``GradScaler(device, enabled=precision.scaled)``); a disabled
    scaler passes the loss and the step through unchanged.
    """
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(image.device.type, dtype=precision.dtype, enabled=precision.dtype is not None):
        outputs = model(image)
    loss = loss_fn(outputs, label)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()
