"""Device choice: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``, checked once, used by training and inference.

Importing this module does not import torch, so a config naming a device can be checked instantly.
"""

from __future__ import annotations

import re
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
