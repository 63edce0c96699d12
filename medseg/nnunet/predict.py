"""An nnU-Net v2 model folder as a medseg predictor: nnU-Net's inference reproduced, medseg's batch around it.

:class:`NnunetPredictor` has the interface the batch core uses (``prepare``, ``predict``, ``label_names``,
``checkpoints``, ``checkpoint_sha256``, ``overlap``, ``precision``, ``backend``), so ``medseg segment -m
FOLDER``, resume, sharding, DICOM input and every output type run unchanged. What it reproduces, step by step,
is nnU-Net's ``nnUNetPredictor`` (``nnunetv2.inference.predict_from_raw_data``) with its
``DefaultPreprocessor`` and ``export_prediction``:

1. **read** (:func:`scan_array`): the voxel array in the order nnU-Net's reader gives it — SimpleITK's and
   ``NibabelIO``'s ``(z, y, x)`` of the stored grid, ``NibabelIOWithReorient`` after reorienting to RAS — and
   the spacing in that order; nnU-Net does not reorient otherwise, and neither does this path;
2. **transpose** by the plans' ``transpose_forward``;
3. **crop to nonzero**: the bounding box of the voxels that are not 0 in any channel (nnU-Net fills holes in
   that mask first, which does not change its box);
4. **normalise** each channel (:func:`normalise`): ``CTNormalization`` clips to the recorded foreground
   ``percentile_00_5``/``percentile_99_5`` and z-scores with the recorded ``mean``/``std``;
   ``ZScoreNormalization`` with the image's own statistics (inside the filled nonzero mask when
   ``use_mask_for_norm``); ``NoNormalization`` casts only;
5. **resample** to the configuration's spacing (:mod:`medseg.nnunet.resample`, cubic, separate z);
6. **sliding window** (:func:`window_starts`, :func:`gaussian_weights`): the image zero-padded to at least the
   patch, windows at nnU-Net's ``compute_steps_for_sliding_window`` positions for a tile step of
   ``1 - overlap`` (0.5), each window's logits — averaged over the mirrored passes of the checkpoint's
   ``inference_allowed_mirroring_axes`` with TTA — weighted by nnU-Net's Gaussian (σ = patch / 8, peak 10,
   float16) and accumulated in float16 as nnU-Net does; the folds' logits are averaged (float16);
7. **export**: logits resampled back to the cropped scan grid (linear, separate z, float16), softmax, argmax,
   put back into the uncropped grid (background outside), transposed back.

``precision="fp32"`` runs the networks as nnU-Net does on the CPU (float32, one window at a time, NCDHW): the
exact path. The default precision (bf16 where the CPU computes it natively, else fp32) runs two windows per
pass on the back end :func:`medseg.inference.backends.resolve_backend` picks: on a CPU with the ``openvino``
extra, each fold's network converted by OpenVINO (:mod:`medseg.inference.openvino_backend`; the graph cached in
``.openvino-cache/`` beside the fold's checkpoint, keyed by its SHA-256, or in the user cache when the model
folder is read-only); otherwise PyTorch, a copy of each network in bf16 autocast, channels-last, with float32
segmentation heads (:func:`medseg.inference.fast.prepare_network`). Everything else is the same. ``int8`` is
not offered for nnU-Net folders (``medseg quantize`` calibrates medseg checkpoints).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import nibabel as nib
import numpy as np
import torch

from medseg.config.segment import SegmentOptions
from medseg.device import resolve_device, resolve_precision
from medseg.inference.backends import INT8, resolve_backend, window_networks
from medseg.inference.fast import Float32Head, prepare_network
from medseg.inference.loading import file_sha256
from medseg.inference.predictor import Prediction
from medseg.inference.prepared import _Stages
from medseg.io import InputError, load_volume, voxel_spacing
from medseg.nnunet.folder import ModelFolder
from medseg.nnunet.network import build_network, load_weights
from medseg.nnunet.resample import new_shape, resample
from medseg.nnunet.weights import load_fold

#: Default tile step of nnU-Net's predictor (``tile_step_size``), i.e. overlap 0.5.
TILE_STEP = 0.5
#: Voxels × classes of float32 softmax at a time when the exported logits become labels.
SLAB_VOXELS = 2**24


@dataclass
class NnunetPrepared:
    """A scan read and preprocessed for :meth:`NnunetPredictor.predict`: the reference image, the network's
    input ``(C, X, Y, Z)`` float32 and what the export needs (``properties``)."""

    reference: nib.spatialimages.SpatialImage
    data: np.ndarray | None
    properties: dict[str, Any]
    stages: _Stages


def window_starts(size: Sequence[int], patch: Sequence[int], step: float) -> list[list[int]]:
    """Window origins per axis: nnU-Net's ``compute_steps_for_sliding_window`` rule — ``ceil((size - patch) /
    (patch × step)) + 1`` windows spread evenly from 0 to ``size - patch``, rounded to whole voxels."""
    out = []
    for n, p in zip(size, patch, strict=True):
        count = int(np.ceil((n - p) / (p * step))) + 1
        stride = (n - p) / (count - 1) if count > 1 else 0
        out.append([int(np.round(stride * i)) for i in range(count)])
    return out


@lru_cache(maxsize=4)
def gaussian_weights(patch: tuple[int, ...]) -> torch.Tensor:
    """nnU-Net's window weighting (``compute_gaussian`` with ``sigma_scale=1/8``, ``value_scaling_factor=10``):
    a unit impulse at the patch centre (``p // 2``) blurred by SciPy's Gaussian filter (σ = p / 8, zero outside),
    scaled to a peak of 10, stored in float16, its zeros replaced by its smallest nonzero value."""
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    blurred = torch.from_numpy(gaussian_filter(impulse, [p / 8 for p in patch], 0, mode="constant", cval=0))
    blurred /= torch.max(blurred) / 10
    weights = blurred.to(torch.float16)
    zero = weights == 0
    weights[zero] = torch.min(weights[~zero])
    return weights


def scan_array(reference: nib.spatialimages.SpatialImage, reader: str) -> tuple[np.ndarray, list[float], Any]:
    """The voxels ``(1, Z, Y, X)`` float32 and spacing as nnU-Net's ``reader`` gives them, and the orientation
    change to undo on export (``NibabelIOWithReorient``; None otherwise)."""
    undo = None
    image = reference
    if reader == "NibabelIOWithReorient":
        start = nib.orientations.io_orientation(reference.affine)
        image = nib.as_closest_canonical(reference)
        undo = nib.orientations.ornt_transform(nib.orientations.io_orientation(image.affine), start)
    header = getattr(image, "header", None)
    if isinstance(header, nib.Nifti1Header):
        spacing = [float(z) for z in header.get_zooms()[:3]]
    else:
        spacing = [float(s) for s in voxel_spacing(image.affine)]
    voxels = np.asanyarray(image.dataobj)
    if voxels.ndim == 4:
        voxels = voxels[..., 0]
    data = np.ascontiguousarray(voxels.transpose(2, 1, 0)[None]).astype(np.float32)
    return data, [abs(s) for s in spacing[::-1]], undo


def normalise(data: np.ndarray, folder: ModelFolder, nonzero: np.ndarray | None) -> np.ndarray:
    """Each channel normalised by its configured scheme (module docstring, step 4), in place."""
    config, plans = folder.configuration, folder.plans
    masks = config.get("use_mask_for_norm") or [False] * data.shape[0]
    intensity = plans.get("foreground_intensity_properties_per_channel", {})
    for c, scheme in enumerate(config["normalization_schemes"]):
        image = data[c]
        if scheme == "CTNormalization":
            props = intensity[str(c)]
            np.clip(image, props["percentile_00_5"], props["percentile_99_5"], out=image)
            image -= props["mean"]
            image /= max(props["std"], 1e-8)
        elif scheme == "ZScoreNormalization":
            if masks[c]:
                inside = nonzero
                mean, std = image[inside].mean(), image[inside].std()
                image[inside] = (image[inside] - mean) / max(std, 1e-8)
            else:
                mean, std = image.mean(), image.std()
                image -= mean
                image /= max(std, 1e-8)
    return data


def _bbox(data: np.ndarray) -> list[list[int]]:
    """Half-open box of the voxels nonzero in any channel; the whole grid when there is none."""
    mask = np.any(data != 0, axis=0)
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, mask.shape[axis]])
    return box


class NnunetPredictor:
    """An nnU-Net v2 model folder (:class:`~medseg.nnunet.folder.ModelFolder`) → label maps in each scan's
    exact shape and affine (module docstring).

    ``options`` as for :class:`medseg.inference.Predictor`: ``device``, ``precision`` (``fp32`` is the exact
    path), ``tta`` (the checkpoint's mirroring axes; none recorded: no mirroring, as in nnU-Net), ``overlap``
    (tile step ``1 - overlap``, default 0.5), ``sw_batch_size`` (windows per pass; default 1 on the exact
    path, else 2), ``backend`` (``auto`` | ``torch`` | ``openvino``, module docstring); no postprocessing is
    applied (nnU-Net's predictor applies none).

    Raises:
        InputError: unusable checkpoints, a network the plans cannot build, weights that do not fit, or an
            option this path does not take.
    """

    def __init__(
        self, folder: ModelFolder, options: SegmentOptions | None = None, *, uncertainty: bool = False
    ):
        options = options or SegmentOptions()
        if options.precision == INT8:
            raise InputError(
                f"{folder.path}: --precision int8 is for medseg checkpoints (medseg quantize), not nnU-Net folders"
            )
        if isinstance(options.postprocess, str) is False:
            raise InputError(f"{folder.path}: postprocessing rules are not applied to nnU-Net model folders")
        if folder.in_channels != 1:
            raise InputError(
                f"{folder.path}: a model of {folder.in_channels} input channels; medseg runs 1 (CT)"
            )
        self.folder = folder
        self.device = resolve_device(options.device)
        resolved = resolve_precision(options.precision, self.device)
        self.precision, self.autocast = resolved.name, resolved.dtype
        self.float_parts = None  # int8 graphs are medseg checkpoints' (medseg.inference.quantize.int8_hint)
        try:
            self.backend = resolve_backend(options.backend, self.device, options.precision, in_memory=False)
        except ValueError as exc:
            raise InputError(f"{folder.path}: {exc}") from None
        self.tta, self.uncertainty = bool(options.tta), bool(uncertainty)
        self.overlap = TILE_STEP if options.overlap is None else float(options.overlap)
        self.step = 1.0 - self.overlap
        if self.step <= 0:
            raise InputError(f"--overlap {self.overlap}: nnU-Net's tile step 1 - overlap must be above 0")
        exact = self.autocast is None and self.backend == "torch"
        self.sw_batch_size = options.sw_batch_size or (1 if exact else 2)
        self.checkpoints = list(folder.checkpoints)
        self.checkpoint = self.checkpoints[0]
        self.label_names = dict(folder.label_names)
        self.patch = tuple(int(p) for p in folder.configuration["patch_size"])
        self.models, mirror = [], None
        where = str(folder.path / "plans.json")
        for i, path in enumerate(self.checkpoints):
            fold = load_fold(path)
            if i == 0:
                mirror = fold["mirror_axes"]
                recorded = fold["configuration"]
                if recorded is not None and recorded != folder.configuration_name:
                    raise InputError(
                        f"{path}: trained for configuration {recorded!r}, the folder name says "
                        f"{folder.configuration_name!r}"
                    )
                self.trainer = fold["trainer"] or folder.trainer
            net = build_network(
                folder.configuration["architecture"], folder.in_channels, folder.outputs, where
            )
            self.models.append(load_weights(net, fold["weights"], str(path)))
            del fold
        self.mirror_axes = tuple(mirror) if (self.tta and mirror) else ()
        self.flips = [()] + [
            combo
            for k in range(1, len(self.mirror_axes) + 1)
            for combo in itertools.combinations(self.mirror_axes, k)
        ]
        self.checkpoint_sha256 = [file_sha256(p) for p in self.checkpoints]
        if self.backend == "openvino":
            self.networks = window_networks(
                "openvino",
                self.models,
                self.checkpoints,
                self.checkpoint_sha256,
                [self.patch] * len(self.models),
                self.sw_batch_size,
                (self.precision, self.autocast),
                folder.in_channels,
            )
        else:
            self.networks = [self._window_network(m) for m in self.models]

    def _window_network(self, model: torch.nn.Module) -> torch.nn.Module:
        """The network as windows run it: itself in float32; else medseg's fast copy with float32 heads."""
        net = prepare_network(model, self.device, self.autocast)
        heads = getattr(getattr(net.model, "decoder", None), "seg_layers", None)
        if self.autocast is not None and isinstance(heads, torch.nn.ModuleList):
            for i, head in enumerate(heads):
                heads[i] = Float32Head(head)
        return net

    # ---------------------------------------------------------------- preprocessing
    def prepare(self, source: str | os.PathLike | nib.spatialimages.SpatialImage) -> NnunetPrepared:
        """Read (a NIfTI path) or take an image, and preprocess it (module docstring, steps 1-5)."""
        stages = _Stages()
        if isinstance(source, list | tuple):
            if len(source) != 1:
                raise InputError(f"{source[0]}: {len(source)} channel files given, the model takes 1")
            source = source[0]
        reference = source if isinstance(source, nib.spatialimages.SpatialImage) else load_volume(source)
        stages.done("read")
        data, spacing, undo = scan_array(reference, self.folder.reader)
        plans, config = self.folder.plans, self.folder.configuration
        forward = list(plans.get("transpose_forward", [0, 1, 2]))
        data = np.ascontiguousarray(data.transpose([0, *[a + 1 for a in forward]]))
        spacing = [spacing[a] for a in forward]
        props: dict[str, Any] = {"spacing": spacing, "shape_before_cropping": data.shape[1:], "undo": undo}
        box = _bbox(data)
        crop = tuple(slice(a, b) for a, b in box)
        data = data[(slice(None), *crop)]
        props["bbox"], props["shape_after_cropping"] = box, data.shape[1:]
        nonzero = None
        if any(config.get("use_mask_for_norm") or []):
            from scipy.ndimage import binary_fill_holes

            nonzero = binary_fill_holes(np.any(data != 0, axis=0))
        data = normalise(np.array(data, copy=True), self.folder, nonzero)
        target = [float(s) for s in config["spacing"]]
        shape = new_shape(data.shape[1:], spacing, target)
        kwargs = config.get("resampling_fn_data_kwargs") or {}
        data = resample(data, shape, spacing, target, **_resampling(kwargs, 3))
        stages.done("preprocess")
        return NnunetPrepared(reference, np.ascontiguousarray(data, dtype=np.float32), props, stages)

    # ---------------------------------------------------------------- network
    def _passes(self, network: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of windows, averaged over the mirrored passes (nnU-Net's order)."""
        out = network(windows)
        for flip in self.flips[1:]:
            dims = [a + 2 for a in flip]
            out += torch.flip(network(torch.flip(windows, dims)), dims)
        if len(self.flips) > 1:
            out /= len(self.flips)
        return out

    def _fold_logits(self, network: torch.nn.Module, data: torch.Tensor) -> torch.Tensor:
        """float16 logits ``(K, X, Y, Z)`` of one fold on the preprocessed grid (module docstring, step 6)."""
        size = data.shape[1:]
        full = [max(p, n) for p, n in zip(self.patch, size, strict=True)]
        below = [(f - n) // 2 for f, n in zip(full, size, strict=True)]
        pad = []
        for b, f, n in zip(below[::-1], full[::-1], size[::-1], strict=True):
            pad += [b, f - n - b]
        padded = torch.nn.functional.pad(data, pad, mode="constant", value=0)
        starts = window_starts(full, self.patch, self.step)
        windows = [
            (slice(None), *[slice(s, s + p) for s, p in zip(origin, self.patch, strict=True)])
            for origin in itertools.product(*starts)
        ]
        logits = torch.zeros((self.folder.outputs, *full), dtype=torch.half)
        counts = torch.zeros(full, dtype=torch.half)
        gauss = gaussian_weights(self.patch)
        for i in range(0, len(windows), self.sw_batch_size):
            group = windows[i : i + self.sw_batch_size]
            batch = torch.stack([padded[w] for w in group]).to(self.device)
            out = self._passes(network, batch).cpu()
            for w, prediction in zip(group, out, strict=True):
                prediction *= gauss
                logits[w] += prediction
                counts[w[1:]] += gauss
        torch.div(logits, counts, out=logits)
        return logits[(slice(None), *[slice(b, b + n) for b, n in zip(below, size, strict=True)])]

    @torch.inference_mode()
    def logits(self, data: np.ndarray) -> torch.Tensor:
        """float16 logits averaged over the folds, on the preprocessed grid."""
        tensor = torch.from_numpy(data).to(torch.float32).contiguous()
        total = None
        for network in self.networks:
            fold = self._fold_logits(network, tensor)
            total = fold if total is None else total.add_(fold)
        if len(self.networks) > 1:
            total /= len(self.networks)
        return total

    # ---------------------------------------------------------------- export
    def predict(
        self,
        source: str | os.PathLike | nib.spatialimages.SpatialImage | NnunetPrepared,
        *,
        probabilities: bool = False,
    ) -> Prediction:
        """Segment one scan (module docstring); ``probabilities=True`` also returns the softmax on the input grid
        (``(K, *shape)`` float32, background 1 outside the nonzero crop)."""
        if not isinstance(source, NnunetPrepared):
            source = self.prepare(source)
        stages, reference, props = _Stages(source.stages), source.reference, source.properties
        data, source.data = source.data, None
        info: dict[str, Any] = {
            "checkpoints": [str(p) for p in self.checkpoints],
            "model": "nnunet",
            "configuration": self.folder.configuration_name,
            "tta_flips": [list(f) for f in self.flips],
            "precision": self.precision,
            "backend": self.backend,
            "model_grid": [int(n) for n in data.shape[1:]],
        }
        logits = self.logits(data)
        del data
        stages.done("network")
        config = self.folder.configuration
        kwargs = config.get("resampling_fn_probabilities_kwargs") or {}
        target = [float(s) for s in config["spacing"]]
        logits = resample(
            logits.numpy(), props["shape_after_cropping"], target, props["spacing"], **_resampling(kwargs, 1)
        )
        labels, entropy, probs = _convert(logits, probabilities)
        del logits
        info["mean_entropy"] = _label_means(entropy, labels, self.label_names)
        backward = list(self.folder.plans.get("transpose_backward", [0, 1, 2]))
        shape_before = props["shape_before_cropping"]
        crop = tuple(slice(a, b) for a, b in props["bbox"])

        def back(values: np.ndarray, fill: float = 0, channels: bool = False) -> np.ndarray:
            lead = values.shape[:1] if channels else ()
            full = np.full((*lead, *shape_before), fill, dtype=values.dtype)
            full[(slice(None),) * len(lead) + crop] = values
            order = [a + len(lead) for a in backward]
            full = full.transpose([*range(len(lead)), *order])  # nnU-Net's array order of the scan
            full = full.transpose(
                [*range(len(lead)), *[len(lead) + a for a in (2, 1, 0)]]
            )  # → nibabel's order
            if props["undo"] is not None:
                full = _reorient(full, props["undo"], len(lead))
            return np.ascontiguousarray(full)

        labels = back(labels)
        uncertainty = back(entropy) if self.uncertainty else None
        restored = None
        if probs is not None:
            background = back(probs[:1], fill=1.0, channels=True)
            restored = (
                np.concatenate([background, back(probs[1:], channels=True)]) if len(probs) > 1 else background
            )
        stages.done("restore")
        info["postprocess"] = {}
        stages.done("postprocess")
        return Prediction(
            labels=labels,
            reference=reference,
            label_names=self.label_names,
            warnings=[],
            info={**info, **stages.info()},
            uncertainty=uncertainty,
            probabilities=restored,
        )


def _resampling(kwargs: dict, order: int) -> dict[str, Any]:
    """The configuration's ``resampling_fn_*_kwargs`` as :func:`medseg.nnunet.resample.resample` takes them."""
    return {
        "order": int(kwargs.get("order", order)),
        "order_z": int(kwargs.get("order_z", 0)),
        "force_separate_z": kwargs.get("force_separate_z"),
    }


def _convert(logits: np.ndarray, probabilities: bool):
    """float16 logits ``(K, ...)`` → labels (argmax of the float32 softmax), normalised entropy, and the
    softmax itself when asked for — a slab of the first axis at a time."""
    k, shape = logits.shape[0], logits.shape[1:]
    labels = np.zeros(shape, dtype=np.uint8 if k <= 255 else np.uint16)
    ent = np.zeros(shape, dtype=np.float32)
    probs = np.zeros((k, *shape), dtype=np.float32) if probabilities else None
    step = max(1, SLAB_VOXELS // max(1, k * math.prod(shape[1:])))
    for a in range(0, shape[0], step):
        slab = torch.from_numpy(logits[:, a : a + step]).float().softmax(0)
        labels[a : a + step] = slab.argmax(0).numpy()
        e = -torch.xlogy(slab, slab).sum(0)
        ent[a : a + step] = (e / (math.log(k) if k > 1 else 1.0)).clamp_(min=0).numpy()
        if probs is not None:
            probs[:, a : a + step] = slab.numpy()
    return labels, ent, probs


def _label_means(values: np.ndarray, labels: np.ndarray, names: dict[str, int]) -> dict[str, float | None]:
    from medseg.inference.maps import label_means

    return label_means(values, labels, names)


def _reorient(values: np.ndarray, undo: np.ndarray, lead: int) -> np.ndarray:
    """Undo ``NibabelIOWithReorient``'s reorientation on the spatial axes (after ``lead`` channel axes)."""
    if lead:
        return np.stack([nib.orientations.apply_orientation(v, undo) for v in values])
    return nib.orientations.apply_orientation(values, undo)


def with_options(options: SegmentOptions | None, **given: Any) -> SegmentOptions:
    """``options`` with the non-None fields of ``given`` replaced (the API's shorthands)."""
    return replace(options or SegmentOptions(), **{k: v for k, v in given.items() if v is not None})
