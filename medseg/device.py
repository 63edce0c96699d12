"""Device and precision choice: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` and ``auto`` | ``fp32`` | ``bf16`` |
``fp16``, each resolved by one function used by training and inference.

Importing this module does not import torch, so a config naming a device can be checked instantly.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: The spellings a config or ``--device`` accepts (``cuda:N`` for any GPU index N).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def is_device_name(name: str) -> bool:
    """True for a spelling of :data:`DEVICE_CHOICES` (no hardware check)."""
    return isinstance(name, str) and bool(_DEVICE_RE.match(name))


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error.

    Raises:
        ValueError: a name that is not one of :data:`DEVICE_CHOICES`.
        RuntimeError: CUDA asked for on a machine without a usable GPU, or a GPU index that does not exist.
    """
    import torch  # here, not at module level: config validation uses this module without torch

    if not is_device_name(name):
        raise ValueError(f"unknown device {name!r}; valid: {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but torch.cuda.is_available() is False")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return device


def device_memory_gb(name: str, fallback_gb: float) -> tuple[float, str]:
    """Memory of the device ``name`` resolves to, in GB (10⁹ bytes), and where the number comes from:
    the CUDA device's total memory, or ``fallback_gb`` on the CPU (the planner's documented default)."""
    import torch

    device = resolve_device(name)
    if device.type != "cuda":
        return float(fallback_gb), f"CPU default ({fallback_gb:g} GB; no CUDA device)"
    props = torch.cuda.get_device_properties(device.index or 0)
    return props.total_memory / 1e9, f"CUDA device {device.index or 0} ({props.name})"


#: ``backend`` values besides ``auto`` (:func:`medseg.inference.backends.resolve_backend`): PyTorch eager, or an
#: OpenVINO compiled model of the network (CPU only; the ``openvino`` extra).
BACKENDS = ("torch", "openvino")

#: ``precision`` values besides ``auto``: float32, bfloat16 autocast (CPU and CUDA), float16 autocast (CUDA).
PRECISIONS = ("fp32", "bf16", "fp16")
#: What inference adds: ``int8``, the network post-training quantized by NNCF and run by OpenVINO on the CPU
#: (:mod:`medseg.inference.quantize`); the stitching, softmax and restore stay float32.
INFERENCE_PRECISIONS = (*PRECISIONS, "int8")


@dataclass(frozen=True)
class Precision:
    """A resolved precision: its name and the ``torch.autocast`` dtype (``None`` = float32, no autocast)."""

    name: str  # fp32 | bf16 | fp16
    dtype: torch.dtype | None

    @property
    def scaled(self) -> bool:
        """float16 training needs a ``GradScaler`` (its exponent range is too small for small gradients)."""
        import torch

        return self.dtype is torch.float16


#: ``ONEDNN_MAX_CPU_ISA`` values that stop oneDNN below its bfloat16 instructions (oneDNN's "CPU dispatcher
#: control" names): with one of these set, bf16 is emulated, not native (:func:`cpu_has_native_bf16`).
ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 natively — AVX-512-BF16 (``VDPBF16PS``: AMD Zen 4, Intel Cooper
    Lake) or AMX tiles (Intel Sapphire Rapids and newer) — as PyTorch's CPU feature probes report
    (``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``; the ``/proc/cpuinfo`` flags where
    those probes are missing). ``torch.backends.cpu.get_cpu_capability()`` is not enough: it says ``AVX512``
    for every AVX-512 CPU, and without the bf16 instructions oneDNN converts bf16 to float32 around every
    kernel, which is slower than staying in float32. False too when ``ONEDNN_MAX_CPU_ISA`` caps oneDNN below its
    bf16 instructions (:data:`ISAS_WITHOUT_BF16`, e.g. ``AVX2`` to stand in for an AVX2-only CPU): the
    convolutions then cannot use them either."""
    import torch

    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ISAS_WITHOUT_BF16:
        return False
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(probe is not None for probe in probes):
        return any(bool(probe()) for probe in probes)
    try:
        with open("/proc/cpuinfo") as fh:
            flags = set(re.findall(r"\w+", fh.read()))
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(name: str | None, device: torch.device) -> Precision:
    """``auto`` (or None) | ``fp32`` | ``bf16`` | ``fp16`` on ``device`` → :class:`Precision`: the one resolver
    of training (``train.precision``) and inference (``medseg segment --precision``).

    ``auto`` is the fast path: on CUDA bf16 when the GPU supports it (``torch.cuda.is_bf16_supported()``:
    Ampere and newer), else fp16; on a CPU bf16 when it computes bf16 natively (:func:`cpu_has_native_bf16`),
    else fp32; fp32 on any other device. The stitched logits and the training loss stay float32 in every case.

    Example:
        >>> import torch
        >>> resolve_precision("fp32", torch.device("cpu"))
        Precision(name='fp32', dtype=None)

    Raises:
        ValueError: an unknown name, or fp16 off CUDA (CPU autocast in float16 has no fast kernels).
    """
    import torch

    if name is None or name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; valid: auto, {', '.join(PRECISIONS)}")
    if name == "fp16" and device.type != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device, not {device.type}; use bf16 or fp32")
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    return Precision(name, dtypes[name])
