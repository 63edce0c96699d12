"""Where an Attention U-Net looked: its grid attention coefficients α, restored to the input scan's geometry.

The 3D Attention U-Net (Oktay et al. 2018, Eq. 1-2; :class:`medseg.nets.unet.AttentionUNet3D`) multiplies
each gated skip feature by a coefficient map ``α_l ∈ [0, 1]`` computed from the coarser decoder signal: voxels
with ``α ≈ 0`` are suppressed before the decoder sees them. :func:`attention_maps` returns those maps, one
per gated level, as float32 NIfTI images in the scan's exact shape and affine, so they overlay the scan in
any viewer and in :func:`medseg.report.preview.write_attention_overlay`.

How they are computed:

1. the scan is preprocessed exactly as for segmentation (``Predictor.preprocess``: the plan's orientation,
   spacing, body crop and intensity normalisation) — the model grid;
2. the network runs in eval mode with ``return_attention=True`` over the same sliding windows as the
   segmentation (the predictor's window size, overlap and Gaussian weighting, through the one sliding window
   of inference, :func:`medseg.inference.sliding.sliding_window_logits`). Each window's ``α_l`` (on the skip grid of level ``l``, ``2^(l-1)`` times
   coarser) is first upsampled to the window's own voxels (trilinear, ``align_corners=False`` with the exact
   factor ``2^(l-1)``, i.e. coarse voxel ``i`` is centred on the ``2^(l-1)`` fine voxels it pooled), then the
   windows are stitched on the model grid. (Stitching the coarse maps at their own resolution, which MONAI
   allows, misplaces them by up to half a coarse voxel wherever a window starts at an offset that is not a
   multiple of ``2^(l-1)``.) Instance normalisation sees the same windows as in segmentation, so α is the
   α that shaped the masks;
3. the stitched maps are restored to the input grid with the probabilities' resampler
   (:func:`medseg.inference.maps.restore_map`, bilinear; 0 outside the body crop) and clipped to [0, 1].

One network: for a fold ensemble the first checkpoint's (``Predictor.model``); no test-time mirroring. A
network without grid gates (:class:`medseg.nets.unet.UNet3D`, and the attention-to-scale wrapper, whose
``return_attention`` gives scale weights) has no α: the result is empty and :data:`NO_GATES_NOTE` is added
to ``notes``.

Level names follow the paper (1 = full resolution, never gated): ``alpha_level2`` … ``alpha_level<L-1>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg.inference.maps import restore_map
from medseg.inference.preprocess import preprocess
from medseg.inference.sliding import SlidingWindow, sliding_window_logits

#: Added to ``notes`` when the network has no grid attention gates (``{name}``: the network's class).
NO_GATES_NOTE = "{name} has no grid attention gates: no attention maps"


def gated_levels(model: nn.Module) -> list[int]:
    """1-based levels of the skips the network gates (``[2, 3, 4]`` for the 5-level Attention U-Net), in the
    order of the α list its ``forward(x, return_attention=True)`` returns; ``[]`` for a network without
    grid gates."""
    if not getattr(model, "grid_gates", False) or not len(getattr(model, "gates", ())):
        return []
    return sorted(int(k) + 1 for k in model.gates)


def upsample_alpha(
    alpha: torch.Tensor, level: int, size: Sequence[int], factor: Sequence[int] | None = None
) -> torch.Tensor:
    """``(B, 1, *coarse)`` α of 1-based ``level`` → ``(B, 1, *size)`` on the full-resolution voxels it gates.

    Trilinear with the exact factor per axis ``f`` — ``2^(level-1)`` for 2×2×2 poolings, else ``factor``
    (the network's :meth:`~medseg.nets.unet.UNet3D.level_factors`) — (fine voxel ``j`` reads coarse
    coordinate ``(j + 0.5) / f - 0.5``); a size that is not a multiple of ``f`` (max pooling floors) is
    completed by repeating the last plane.
    """
    factors = tuple(float(f) for f in factor) if factor is not None else (float(2 ** (level - 1)),) * 3
    up = F.interpolate(alpha.float(), scale_factor=factors, mode="trilinear", align_corners=False)
    pad = []
    for have, want in zip(reversed(up.shape[2:]), reversed(tuple(size)), strict=True):
        pad += [0, max(0, int(want) - int(have))]
    if any(pad):
        up = F.pad(up, pad, mode="replicate")
    return up[(slice(None), slice(None), *(slice(0, int(s)) for s in size))]


@torch.no_grad()
def attention_on_grid(
    model: nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    mode: str = "gaussian",
    *,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Stitched α of every gated level on the grid of ``image``: ``(L, X, Y, Z)`` float32 on the CPU.

    Args:
        model: a network with grid gates (:func:`gated_levels` non-empty).
        image: channel-first model-space image ``(C, X, Y, Z)``.
        roi_size, overlap, sw_batch_size, mode: the sliding window (as the segmentation's).
        device: where the network runs (default: its parameters' device).
        autocast_dtype: autocast the network to this dtype (e.g. ``torch.bfloat16``), as the predictor does.
    """
    levels = gated_levels(model)
    if not levels:
        raise ValueError(NO_GATES_NOTE.format(name=type(model).__name__))
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)

    factors = model.level_factors() if hasattr(model, "level_factors") else None

    def window(x: torch.Tensor) -> torch.Tensor:
        _, alphas = model(x, return_attention=True)
        return torch.cat(
            [
                upsample_alpha(a, lvl, x.shape[2:], factors[lvl - 1] if factors else None)
                for a, lvl in zip(alphas, levels, strict=True)
            ],
            dim=1,
        )

    out = sliding_window_logits(
        window,
        torch.as_tensor(image)[None].to(device),
        SlidingWindow(roi_size, overlap, sw_batch_size, mode),
        autocast_dtype=autocast_dtype,
        sw_device=device,
        out_device=torch.device("cpu"),
    )
    return out[0].clamp_(0.0, 1.0)


def _float_like(values: np.ndarray, reference: nib.Nifti1Image) -> nib.Nifti1Image:
    """A float32 NIfTI with the reference's exact affine (float64, also for an image built in memory, e.g. a
    DICOM series) and its qform/sform codes; on disk it has the reference's qform and sform."""
    header = reference.header.copy()
    header.set_data_dtype(np.float32)
    header.set_data_shape(values.shape)
    img = nib.Nifti1Image(np.asarray(values, dtype=np.float32), reference.affine, header=header)
    img.header["scl_slope"] = 1.0
    img.header["scl_inter"] = 0.0
    img.header["cal_min"] = 0.0
    img.header["cal_max"] = 1.0
    return img


def attention_maps(
    source: Any,
    image: nib.Nifti1Image,
    *,
    transforms: Any = None,
    roi_size: Sequence[int] | None = None,
    overlap: float | None = None,
    notes: list[str] | None = None,
) -> dict[str, nib.Nifti1Image]:
    """``{"alpha_level2": img, …}``: each gated level's α as float32 in [0, 1] on ``image``'s exact grid.

    Args:
        source: a :class:`medseg.inference.Predictor` (its first network, preprocessing, window, overlap,
            device and precision are used) or a bare network (``nn.Module``; then ``transforms`` is the
            model-space preprocessing — e.g. ``medseg.transforms.infer_transforms(plan, load=False)`` — and
            ``roi_size`` the window; without ``transforms`` the network sees the scan's voxels as stored).
        image: the scan (any orientation; the maps get its shape and affine).
        transforms, roi_size, overlap: override the predictor's (required/used for a bare network).
        notes: one-line notes are appended here (e.g. :data:`NO_GATES_NOTE`).

    Returns:
        One image per gated level (module docstring); ``{}`` for a network without grid gates.
    """
    notes = [] if notes is None else notes
    if isinstance(source, nn.Module):
        model, device, autocast = source, None, None
        window = roi_size
        overlap = 0.5 if overlap is None else overlap
        sw_batch_size, mode = 1, "gaussian"
    else:
        model, device, autocast = source.model, source.device, source.autocast
        transforms = source.transforms if transforms is None else transforms
        window = roi_size or source.roi_size
        overlap = source.overlap if overlap is None else overlap
        sw_batch_size, mode = source.sw_batch_size, source.mode
    levels = gated_levels(model)
    if not levels:
        notes.append(NO_GATES_NOTE.format(name=type(model).__name__))
        return {}
    if window is None:
        raise ValueError("attention_maps: a bare network needs roi_size (the sliding window)")
    if transforms is not None:
        grid = preprocess(image, transforms)
        values, model_affine = grid.as_tensor(), np.asarray(grid.affine, dtype=np.float64)
    else:
        values = torch.as_tensor(np.asarray(image.dataobj, dtype=np.float32))[None]
        model_affine = np.asarray(image.affine, dtype=np.float64)
    shape = tuple(int(n) for n in image.shape[:3])
    if min(values.shape[1:]) == 0:  # nothing left after the body crop: the network never ran
        notes.append("no body on the model grid: attention maps are all 0")
        return {f"alpha_level{lvl}": _float_like(np.zeros(shape, np.float32), image) for lvl in levels}
    stitched = attention_on_grid(
        model, values, window, overlap, sw_batch_size, mode, device=device, autocast_dtype=autocast
    )
    del values
    restored = np.clip(restore_map(stitched, model_affine, image.affine, shape), 0.0, 1.0)
    return {f"alpha_level{lvl}": _float_like(restored[i], image) for i, lvl in enumerate(levels)}
