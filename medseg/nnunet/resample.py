"""nnU-Net v2's resampling rules, reproduced for its model folders: data to the configuration's spacing
(cubic in-plane), logits back to the scan's (linear in-plane), and the separate-z rule for anisotropic spacing.

The rules are those of nnU-Net's ``nnunetv2.preprocessing.resampling.default_resampling``
(``resample_data_or_seg_to_shape`` with the configuration's ``resampling_fn_*_kwargs``), written here from
their description, on the same libraries (scikit-image's ``resize`` with ``mode="edge"`` and no
anti-aliasing, SciPy's ``map_coordinates``):

* the new shape is ``round(old spacing / new spacing × old shape)`` per axis (:func:`new_shape`);
* **separate z** (:func:`separate_axis`): unless the configuration forces it on or off, resampling is done
  in-plane first and then along one axis alone when the spacing one resamples *from* is anisotropic
  (largest / smallest > 3) — else when the spacing resampled *to* is — the lowest-resolution axis (none
  when two axes tie for the largest spacing);
* in-plane the slices are resized with ``order`` (3 for images, 1 for logits); along the separate axis with
  ``order_z`` (0: nearest neighbour, taken with ``map_coordinates`` at the pixel-centre-aligned coordinates
  ``scale (i + 0.5) - 0.5``);
* without separate z, the volume is resized in 3D with ``order``;
* values are computed in float64 and stored in the input's dtype (nnU-Net's logits are float16).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import map_coordinates

#: nnU-Net's ``ANISO_THRESHOLD``: spacing ratio above which resampling is separate along one axis.
ANISOTROPY_THRESHOLD = 3.0


def new_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """The grid size at ``target`` spacing (nnU-Net's ``compute_new_shape``)."""
    return tuple(int(round(s / t * n)) for s, t, n in zip(spacing, target, shape, strict=True))  # noqa: RUF046


def _lowres_axes(spacing: Sequence[float]) -> list[int]:
    top = max(spacing)
    return [i for i, s in enumerate(spacing) if top / s == 1]


def separate_axis(current: Sequence[float], target: Sequence[float], force: bool | None = None) -> int | None:
    """The axis resampled on its own (module docstring), or None for a plain 3D resize."""
    if force is not None:
        axes = _lowres_axes(current) if force else []
    elif max(current) / min(current) > ANISOTROPY_THRESHOLD:
        axes = _lowres_axes(current)
    elif max(target) / min(target) > ANISOTROPY_THRESHOLD:
        axes = _lowres_axes(target)
    else:
        axes = []
    return axes[0] if len(axes) == 1 else None


def _resize(image: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    from skimage.transform import resize

    return resize(image, tuple(shape), order, mode="edge", anti_aliasing=False)


def _along_axis(volume: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """``volume`` resized to ``shape`` by ``map_coordinates`` on pixel-centre-aligned coordinates."""
    grids = np.mgrid[tuple(slice(0, n) for n in shape)].astype(np.float64)
    for axis, (old, new) in enumerate(zip(volume.shape, shape, strict=True)):
        grids[axis] = old / new * (grids[axis] + 0.5) - 0.5
    return map_coordinates(volume, grids, order=order, mode="nearest")


def resample(
    data: np.ndarray,
    shape: Sequence[int],
    current: Sequence[float],
    target: Sequence[float],
    order: int = 3,
    order_z: int = 0,
    force_separate_z: bool | None = None,
) -> np.ndarray:
    """``data`` ``(C, X, Y, Z)`` resampled to ``shape`` (module docstring); ``data`` itself when no axis
    changes. ``current``/``target``: the spacings the separate-z rule reads."""
    shape = tuple(int(n) for n in shape)
    if tuple(data.shape[1:]) == shape:
        return data
    out = np.zeros((data.shape[0], *shape), dtype=data.dtype)
    axis = separate_axis(current, target, force_separate_z)
    for c in range(data.shape[0]):
        channel = data[c].astype(np.float64, copy=False)
        if axis is None:
            out[c] = _resize(channel, shape, order)
            continue
        inplane = [n for i, n in enumerate(shape) if i != axis]
        partial = [*shape]
        partial[axis] = data.shape[1 + axis]
        here = np.zeros(partial)
        for k in range(data.shape[1 + axis]):
            index = (slice(None),) * axis + (k,)
            here[index] = _resize(channel[index], inplane, order)
        out[c] = _along_axis(here, shape, order_z) if partial[axis] != shape[axis] else here
    return out
