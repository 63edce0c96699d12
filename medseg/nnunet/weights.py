"""nnU-Net v2 fold checkpoints (``fold_<f>/checkpoint_final.pth``) loaded without executing pickled code.

nnU-Net saves a trainer's state with ``torch.save``: ``network_weights`` (the state dict), the optimizer's
state, ``logging`` (lists of floats, some of them numpy scalars), ``init_args`` (plans, configuration, fold,
dataset.json and a ``torch.device``), ``trainer_name`` and ``inference_allowed_mirroring_axes``. nnU-Net itself
loads them with ``weights_only=False``, i.e. runs whatever the pickle names. Here:

1. the pickle's opcodes are read (:func:`medseg.io.checkpoint.pickle_globals`, nothing executed) and every
   global it names must be in PyTorch's weights-only allowlist or :data:`NNUNET_SAFE_GLOBALS` — the plain
   numpy types nnU-Net's logging holds (scalars, dtypes, arrays); anything else is refused in one line
   naming it (``contains pickled code (posix.system); refused``);
2. ``torch.load(weights_only=True)`` inside ``torch.serialization.safe_globals(NNUNET_SAFE_GLOBALS)`` — the
   gate that enforces the same list.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.io import InputError
from medseg.io.checkpoint import pickle_globals, unsafe_globals

#: Largest ``data.pkl`` read (nnU-Net's holds plans, dataset.json and the training log: ~1 MB for 117 labels).
MAX_PICKLE_BYTES = 256 * 2**20


def _numpy_globals() -> dict[str, Any]:
    """``module.name`` → object of the numpy types a pickled numpy scalar, dtype or array names."""
    from numpy import dtypes

    multiarray = _multiarray()
    found: dict[str, Any] = {"numpy.dtype": np.dtype, "numpy.ndarray": np.ndarray}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 and 2 write either
        found[f"{module}.scalar"] = multiarray.scalar
        found[f"{module}._reconstruct"] = multiarray._reconstruct
    for name in dir(dtypes):
        if name.endswith("DType"):
            found[f"numpy.dtypes.{name}"] = getattr(dtypes, name)
    return found


def _multiarray():
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    return multiarray


def safe_globals() -> list[tuple[Any, str]]:
    """``(object, module.name)`` pairs added to PyTorch's weights-only allowlist while an nnU-Net checkpoint
    loads (a pair, so that numpy 1's ``numpy.core`` names match numpy 2's objects)."""
    return [(obj, name) for name, obj in _numpy_globals().items()]


def _refused(found: set[str]) -> list[str]:
    return [g for g in unsafe_globals(found) if g not in _numpy_globals()]


def check_pickle(path: Path) -> None:
    """Refuse a checkpoint whose pickle names a global outside the allowlist, before anything is unpickled.

    Raises:
        InputError: not a ``torch.save`` zip archive, a broken archive, or pickled code (named).
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise InputError(f"{path}: not an nnU-Net checkpoint (not a torch.save zip archive)") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise InputError(f"{path}: not an nnU-Net checkpoint (no data.pkl in the zip archive)")
        info = archive.getinfo(pickles[0])
        if info.file_size > MAX_PICKLE_BYTES:
            raise InputError(f"{path}: data.pkl of {info.file_size} bytes; refused")
        try:
            found = pickle_globals(io.BytesIO(archive.read(info)))
        except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
            raise InputError(
                f"{path}: truncated or corrupt checkpoint ({type(exc).__name__}: {exc})"
            ) from None
    refused = _refused(found)
    if refused:
        shown = ", ".join(refused[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
        raise InputError(f"{path}: contains pickled code ({shown}); refused")


def load_fold(path: str | os.PathLike) -> dict:
    """One fold's checkpoint, loaded safely (module docstring), checked for what inference reads.

    Returns:
        ``{"weights": state dict, "trainer": name, "configuration": name or None, "mirror_axes": tuple or None}``.

    Raises:
        InputError: a missing or empty file, pickled code, a corrupt file, or no ``network_weights``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: checkpoint file is empty (0 bytes)")
    check_pickle(path)
    try:
        with torch.serialization.safe_globals(safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # the gate: never PyTorch's advice to use weights_only=False
        first = " ".join(str(exc).split())[:160]
        raise InputError(
            f"{path}: holds pickled objects outside the weights-only set ({first}); refused"
        ) from None
    except Exception as exc:  # torch raises many types for corrupt files
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(f"{path}: truncated or corrupt checkpoint ({text[:200]})") from None
    if not isinstance(ckpt, Mapping) or "network_weights" not in ckpt:
        raise InputError(f"{path}: not an nnU-Net checkpoint (no 'network_weights')")
    weights = ckpt["network_weights"]
    if not isinstance(weights, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise InputError(f"{path}: 'network_weights' is not a mapping of names to tensors")
    init = ckpt.get("init_args") if isinstance(ckpt.get("init_args"), Mapping) else {}
    axes = ckpt.get("inference_allowed_mirroring_axes")
    return {
        "weights": dict(weights),
        "trainer": str(ckpt.get("trainer_name", "")),
        "configuration": init.get("configuration"),
        "mirror_axes": tuple(int(a) for a in axes) if axes is not None else None,
    }
