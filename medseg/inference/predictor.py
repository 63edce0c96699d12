"""Segment a scan with one checkpoint or an ensemble: preprocess with the plan, slide, average, restore, clean.

The one inference path of medseg: ``medseg segment``, :func:`medseg.segment`, the attention maps
(:mod:`medseg.inference.attention`) and the validation of a training run (:mod:`medseg.engine.validation`,
with :meth:`Predictor.from_network` on the network being trained) all run :meth:`Predictor.predict` — the
same preprocessing, sliding window (:func:`medseg.inference.sliding.sliding_window_logits`), precision
(:func:`medseg.device.resolve_precision`) and restore to the scan's geometry.

>>> predictor = Predictor("runs/demo/best.pt")            # doctest: +SKIP
>>> result = predictor.predict("ct.nii.gz")                 # doctest: +SKIP
>>> result.labels.shape == result.reference.shape           # doctest: +SKIP
True
>>> Predictor(["fold0/best.pt", "fold1/best.pt"], SegmentOptions(tta=True, precision="bf16"))   # doctest: +SKIP
>>> Predictor.from_network(net, plan, {"background": 0, "liver": 1})   # doctest: +SKIP

Memory. Stages of :meth:`Predictor.predict` and what each adds at its peak, counted per voxel of the input grid
(``N`` voxels, ``s`` bytes each as stored: 2 for int16) and of the model grid (``M`` voxels after the body crop;
about ``r N`` when the body fills the field of view, with ``r`` = input voxel volume / plan voxel volume), for
``K`` classes:

===========  ==================================================================================================
read         the scan as stored, ``s N`` — kept to the end (it is ``Prediction.reference``)
preprocess   ``12 M`` + one slab (:mod:`medseg.inference.preprocess`: the oriented scan is a view, no copy)
network      ``4 M`` image + ``4 (K + 1) M`` MONAI stitching, softmax in place (:mod:`medseg.inference.sliding`);
             with mirroring or an ensemble + ``4 K M`` accumulator + ``4 M`` flipped image
             (:mod:`medseg.inference.tta`); + the network's activations for ``sw_batch_size`` windows
restore      ``4 K M`` probabilities + ``N`` labels + one slab (:mod:`medseg.inference.restore`)
postprocess  ``N`` labels + what :func:`medseg.inference.postprocess.apply_component_rules` needs
===========  ==================================================================================================

The network stage is the peak::

    peak ≈ c + s N + (4 K + 8) M            one pass
    peak ≈ c + s N + (8 K + 12) M           mirroring or an ensemble (any number of passes)

i.e. about ``s + r (4 K + 8)`` (or ``s + r (8 K + 12)``) bytes per input voxel at most, plus ``c``, which does
not depend on the volume: Python, torch, MONAI, the weights and the activations of ``sw_batch_size`` windows.
``python -m benchmarks.bench_segment`` measures the peak; the measured ``c``, a worked example for a clinical-size
CT and the memory before this schedule: ``docs/speed.md``, section ``medseg.inference.predictor``.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from medseg.config import Config, InferConfig
from medseg.config.segment import SegmentOptions
from medseg.device import PRECISIONS as PRECISIONS
from medseg.device import resolve_device, resolve_precision
from medseg.inference.backends import resolve_backend, resolve_window_precision, window_networks
from medseg.inference.ensemble import check_single_channel
from medseg.inference.loading import LoadedCheckpoints, load_checkpoints
from medseg.inference.loading import model_from_checkpoint as model_from_checkpoint
from medseg.inference.loading import state_dict_differences as state_dict_differences
from medseg.inference.maps import argmax_labels, entropy_map, label_means, restore_map
from medseg.inference.postprocess import ComponentRule
from medseg.inference.prepared import Prepared, _Stages
from medseg.inference.prepared import peak_rss_gb as peak_rss_gb
from medseg.inference.preprocess import preprocess
from medseg.inference.restore import restore_labels
from medseg.inference.rules import clean_labels, component_rules
from medseg.inference.skipping import ConstantWindows
from medseg.inference.sliding import (
    CPU_STITCHING_WARNING,
    SlidingWindow,
    sliding_window_logits,
    softmax_,
    stitching_device,
    with_cpu_stitching,
)
from medseg.inference.tta import average_probabilities, choose_flips, sagittal_axis
from medseg.io import InputError, load_volume, voxel_spacing
from medseg.io.plan import Plan
from medseg.transforms import infer_transforms
from medseg.transforms.presets import BODY_HU_THRESHOLD, body_mask


@dataclass
class Prediction:
    """A label map in the input's voxel grid, the input image it belongs to, and the label names.

    ``info`` describes how it was made: ``checkpoints`` (paths; ``[]`` for a network given in memory),
    ``tta_flips`` (model-space axes of each mirrored pass, ``[[]]`` without mirroring), ``precision``,
    ``backend`` (``torch`` | ``openvino``),
    ``model_grid`` (shape after preprocessing), ``postprocess`` (per label name: ``label``, ``largest_only``,
    ``min_ml``, ``removed_voxels``), ``mean_entropy`` (per label name: the mean normalised softmax entropy
    inside the label, see :meth:`Predictor.predict`), ``seconds`` per stage (read, preprocess, network,
    restore, postprocess, total) and ``peak_rss_gb`` (the process's peak resident memory so far, after each
    stage).
    """

    labels: np.ndarray
    reference: nib.Nifti1Image
    label_names: dict[str, int]
    # One-line human-readable notes about this case (e.g. no body found); batch code prints them.
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    # Normalised softmax entropy on the input grid (float32, 0 = certain, 1 = uniform), when asked for.
    uncertainty: np.ndarray | None = None
    # Class probabilities (K, *input shape) on the input grid (float32), when asked for.
    probabilities: np.ndarray | None = None


def autocast_dtype(precision: str | None, device: torch.device) -> tuple[torch.dtype | None, str]:
    """``(autocast dtype or None, name)``: :func:`medseg.device.resolve_precision` as a pair (older callers).

    Raises:
        ValueError: an unknown precision, or fp16 off CUDA.
    """
    resolved = resolve_precision(precision, device)
    return resolved.dtype, resolved.name


def _channel_files(source: object) -> list[str] | None:
    """The files of a list or tuple of paths (one per input channel), else None."""
    if isinstance(source, list | tuple) and source and all(isinstance(p, str | os.PathLike) for p in source):
        return [str(p) for p in source]
    return None


class Predictor:
    """Checkpoint(s) → label maps for new scans, in each scan's exact shape and affine.

    Args:
        checkpoints: a medseg checkpoint (``best.pt``) or several (a fold ensemble: probabilities averaged;
            they must share labels and plan, see :mod:`medseg.inference.ensemble`).
        options: how to segment, a :class:`medseg.config.segment.SegmentOptions` (its defaults when None):
            ``device`` (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; on CUDA the windows run on the GPU and
            the stitching buffer too, unless it does not fit: then it is redone on the CPU, with a warning),
            ``overlap`` and ``sw_batch_size`` (None: the (first) checkpoint's config), ``tta`` (test-time
            mirroring, :mod:`medseg.inference.tta`: flips the plan's ``mirror_axes`` allow, and the sagittal
            flip when the label names give a left/right swap table), ``precision`` (``auto`` | ``fp32`` |
            ``bf16`` | ``fp16``, :func:`medseg.device.resolve_precision`), ``backend`` (``auto`` | ``torch`` |
            ``openvino``, :func:`medseg.inference.backends.resolve_backend`) and ``postprocess`` (``auto``: the
            rules recorded in the first checkpoint, none if it has none; ``none``; or a mapping ``label
            (index or name) → ComponentRule or {"largest_only", "min_ml"}``).
        device, precision, tta, postprocess: shorthands that replace that field of ``options``
            (``Predictor("best.pt", device="cpu", tta=True)``).
        roi_size: the sliding window; default each checkpoint's own config's ``infer.roi_size`` or its patch.
        uncertainty: also restore the voxel-wise normalised softmax entropy to the input grid
            (``Prediction.uncertainty``, float32; one more float map of the scan's size).

    A network in memory (no file) gives a predictor through :meth:`from_network`.

    Raises:
        InputError: an unusable checkpoint, checkpoints that cannot be averaged, malformed rules.
        ConfigError: a checkpoint's recorded config is invalid; an unknown ``precision`` or ``postprocess``
            mode (a ``ValueError``).
    """

    def __init__(
        self,
        checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
        options: SegmentOptions | None = None,
        *,
        device: str | None = None,
        precision: str | None = None,
        tta: bool | None = None,
        postprocess: str | Mapping[Any, Any] | None = None,
        roi_size: Sequence[int] | None = None,
        uncertainty: bool = False,
    ) -> None:
        paths = [checkpoints] if isinstance(checkpoints, str | os.PathLike) else list(checkpoints)
        if not paths:
            raise ValueError("no checkpoint given")
        given = {"device": device, "precision": precision, "tta": tta, "postprocess": postprocess}
        options = replace(options or SegmentOptions(), **{k: v for k, v in given.items() if v is not None})
        resolved = resolve_device(options.device)
        loaded = load_checkpoints(paths, resolved, roi_size)
        self._setup(loaded, resolved, options, uncertainty)

    @classmethod
    def from_network(
        cls,
        network: torch.nn.Module,
        plan: Plan | Mapping[str, Any],
        label_names: Mapping[str, int],
        options: SegmentOptions | None = None,
        *,
        device: str | torch.device | None = None,
        roi_size: Sequence[int] | None = None,
        uncertainty: bool = False,
        config: Config | None = None,
    ) -> Predictor:
        """A predictor for a network in memory — e.g. the one being trained — with the plan it was trained
        with (a :class:`~medseg.io.plan.Plan`, or its JSON form: a run's ``plan.json``) and its label names.

        Everything else is as for checkpoints: ``options`` as for :class:`Predictor` (``device`` replaces
        ``options.device``, and may be a ``torch.device``); ``overlap``, ``sw_batch_size`` and the blending
        mode default to ``config.infer`` (the config defaults without ``config``), the window to
        ``config.infer.roi_size`` or the plan's ``patch_size``; ``postprocess`` is ``"none"`` or a mapping
        (no rules are recorded in memory; ``"auto"`` means none). The network is used as it is (eval mode,
        moved to ``device``); in a lower precision a copy runs (:func:`medseg.inference.fast.prepare_network`),
        so later changes to its weights need a new predictor.

        Example:
            >>> net = medseg.create_network("attention_unet", 1, 3)                       # doctest: +SKIP
            >>> plan = Plan.from_dict(json.loads(Path("runs/demo/plan.json").read_text()))  # doctest: +SKIP
            >>> Predictor.from_network(net, plan, plan.labels).predict("ct.nii.gz")       # doctest: +SKIP

        Raises:
            TypeError: ``network`` is not a ``torch.nn.Module``.
            ValueError: an unknown ``precision`` or ``postprocess`` mode, or a malformed plan
                (:class:`~medseg.io.plan.PlanError`, e.g. ``plan: missing spacing``).
        """
        if not isinstance(network, torch.nn.Module):
            raise TypeError(f"network: expected a torch.nn.Module, got {type(network).__name__}")
        plan = Plan.from_dict(plan, where="plan")
        options = options or SegmentOptions()
        if isinstance(device, torch.device):
            resolved = device
        else:
            resolved = resolve_device(device or options.device)
        config = config or Config()
        loaded = LoadedCheckpoints(
            paths=[],
            sha256=[],
            models=[network.to(resolved).eval()],
            roi_sizes=[[int(r) for r in (roi_size or config.infer.roi_size or plan.patch_size)]],
            config=config,
            plan=plan,
            label_names={str(k): int(v) for k, v in label_names.items()},
            postprocess=None,
            mirror_axes=sorted(plan.mirror_axes),
        )
        self = cls.__new__(cls)
        self._setup(loaded, resolved, options, uncertainty)
        return self

    def _setup(
        self, loaded: LoadedCheckpoints, device: torch.device, options: SegmentOptions, uncertainty: bool
    ) -> None:
        """The state both constructors share: networks and windows, precision, mirroring, postprocessing."""
        self.device, self.checkpoints, self.checkpoint_sha256 = device, loaded.paths, loaded.sha256
        self.checkpoint = loaded.paths[0] if loaded.paths else Path("network")
        self.models, self.roi_sizes, self.config = loaded.models, loaded.roi_sizes, loaded.config
        self.plan, self.label_names = loaded.plan, loaded.label_names
        self.model, self.roi_size = self.models[0], self.roi_sizes[0]
        infer: InferConfig = self.config.infer
        self.overlap = infer.overlap if options.overlap is None else options.overlap
        self.sw_batch_size = options.sw_batch_size or infer.sw_batch_size
        self.mode = infer.mode
        self.transforms = infer_transforms(self.plan, load=False)
        self.backend = resolve_backend(options.backend, self.device, options.precision, not loaded.paths)
        resolved = resolve_window_precision(
            options.precision, self.device, self.backend, loaded, self.sw_batch_size
        )
        self.autocast, self.precision = resolved.dtype, resolved.name
        self.networks = window_networks(
            self.backend,
            self.models,
            loaded.paths,
            loaded.sha256,
            self.roi_sizes,
            self.sw_batch_size,
            (resolved.name, resolved.dtype),
            self.plan.in_channels,
        )
        int8 = self.precision == "int8"  # the float parts' precision: quantize.int8_hint
        self.float_parts = getattr(self.networks[0], "hint", None) if int8 else None
        self.networks = [ConstantWindows(n) for n in self.networks]  # medseg.inference.skipping
        self.tta = bool(options.tta)
        self.uncertainty = bool(uncertainty)
        self.lr_axis = sagittal_axis(self.plan.orientation)
        self.tta_note: str | None = None
        self.swap: dict[int, int] | None = None
        self.flips: list[tuple[int, ...]] = [()]
        if self.tta:
            self.flips, self.swap, self.tta_note = choose_flips(
                self.label_names, self.plan.orientation, loaded.mirror_axes
            )
        postprocess = options.postprocess
        if isinstance(postprocess, str):  # "auto": the first checkpoint's recorded rules (none in memory)
            raw = loaded.postprocess if postprocess == "auto" else None
            source = (
                f"{self.checkpoint} (recorded postprocessing)" if postprocess == "auto" else "postprocess"
            )
        else:
            raw, source = postprocess, "postprocess"
        self.postprocess_rules: dict[int, ComponentRule] = component_rules(raw, self.label_names, source)

    def preprocess(self, reference: nib.Nifti1Image) -> MetaTensor:
        """Channel-first model-space image (MetaTensor with the model-space affine)."""
        return preprocess(reference, self.transforms)

    def _average(self, image: MetaTensor) -> tuple[torch.Tensor, list[str]]:
        """Softmax ``(K, ...)`` on the model grid, averaged over mirrored passes and models; warnings."""
        warnings: list[str] = []
        # the GPU when the buffers fit, else the CPU; after a fallback, later passes stitch on the CPU directly
        stitch = [stitching_device(self.device, image.shape[1:], len(self.label_names))]
        if stitch[0] != self.device:
            warnings.append(CPU_STITCHING_WARNING)

        def single(network: torch.nn.Module, roi: list[int]):
            def predict(img: torch.Tensor) -> torch.Tensor:
                def run(out_device: torch.device) -> torch.Tensor:
                    logits = sliding_window_logits(
                        network,  # autocast and memory layout inside (medseg.inference.fast)
                        img[None].to(out_device),
                        SlidingWindow(roi, self.overlap, self.sw_batch_size, self.mode),
                        sw_device=self.device,
                        out_device=out_device,
                        progress=_window_progress(img.shape[1:], roi),
                    )[0]
                    return softmax_(logits).cpu()

                probs, notes = with_cpu_stitching(run, stitch[0])
                if notes:
                    stitch[0] = torch.device("cpu")
                    warnings.extend(n for n in notes if n not in warnings)
                return probs

            return predict

        passes = [single(n, r) for n, r in zip(self.networks, self.roi_sizes, strict=True)]
        probs = average_probabilities(image.as_tensor(), passes, self.flips, self.swap, self.lr_axis)
        self.windows_skipped = sum(n.take_count() for n in self.networks)
        return probs, warnings

    def probabilities(self, image: MetaTensor) -> torch.Tensor:
        """Softmax probabilities ``(K, ...)`` on the model-space grid (mirrored passes and models averaged)."""
        return self._average(image)[0]

    def _read(
        self, source: str | os.PathLike | nib.spatialimages.SpatialImage
    ) -> nib.spatialimages.SpatialImage:
        if not isinstance(source, nib.spatialimages.SpatialImage):
            return load_volume(source)
        name = source.get_filename() or "image"
        shape = source.shape
        if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
            raise InputError(f"{name}: expected a 3D volume, found shape {tuple(shape)}")
        affine = np.asarray(source.affine, dtype=np.float64)
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-8:
            raise InputError(f"{name}: degenerate or non-finite affine")
        stored = getattr(source.dataobj, "dtype", np.dtype(np.float32))
        if stored.kind == "f" and not np.all(np.isfinite(np.asanyarray(source.dataobj))):
            raise InputError(f"{name}: voxel data contains NaN or infinite values")
        return source

    def prepare(
        self, source: str | os.PathLike | nib.spatialimages.SpatialImage | Sequence[str | os.PathLike]
    ) -> Prepared:
        """Read (a path) and preprocess one scan for :meth:`predict`; raises as :meth:`predict` does.

        A model trained on ``k`` input channels (an nnU-Net dataset, ``plan.in_channels``) takes the list
        of its ``k`` co-registered channel files, read and stacked as in training (MONAI's loader); the mask
        gets the first file's grid. A single scan for such a model is refused
        (:func:`medseg.inference.ensemble.check_single_channel`).

        Raises:
            TypeError: ``source`` is none of those (e.g. a bare array: :func:`medseg.segment` takes one with
                its affine).
        """
        stages = _Stages()
        files = _channel_files(source)
        if files is not None:
            return self._prepare_channels(files, stages)
        if not isinstance(source, str | os.PathLike | nib.spatialimages.SpatialImage):
            raise TypeError(
                "expected a NIfTI path, a nibabel image, a list of channel files or a Prepared scan, got "
                f"{type(source).__name__}; an array needs its affine: medseg.segment(array, model, affine=...)"
            )
        check_single_channel(self.plan, self.checkpoint, source)
        reference = self._read(source)
        stages.done("read")
        image = self.preprocess(reference)
        stages.done("preprocess")
        return Prepared(reference, image, stages)

    def _prepare_channels(self, files: list[str], stages: _Stages) -> Prepared:
        k = self.plan.in_channels
        if len(files) == 1:
            return self.prepare(files[0])
        if len(files) != k:
            raise InputError(f"{files[0]}: {len(files)} channel files given, {self.checkpoint} takes {k}")
        reference = load_volume(files[0])
        stages.done("read")
        try:
            image = infer_transforms(self.plan, load=True)({"image": files})["image"]
        except RuntimeError as exc:  # MONAI wraps the reader's InputError
            raise next(
                (e for e in (exc.__cause__, exc.__context__) if isinstance(e, InputError)), exc
            ) from None
        stages.done("preprocess")
        return Prepared(reference, image, stages)

    def predict(
        self,
        source: str | os.PathLike | nib.spatialimages.SpatialImage | Sequence[str | os.PathLike] | Prepared,
        *,
        probabilities: bool = False,
    ) -> Prediction:
        """Segment one scan — a NIfTI path, an image already read (e.g. :func:`medseg.io.dicom.read_series`),
        a list of channel files (:meth:`prepare`) or a :class:`Prepared` scan.

        A scan with no body (the plan crops to voxels above :data:`BODY_HU_THRESHOLD` HU and none is left:
        all air, or the few dense voxels vanish when resampled to the model grid) has nothing to segment:
        the result is an all-background map of the scan's shape with a line in ``warnings``, not a
        sliding window over an empty image.

        Confidence: the normalised softmax entropy of the (averaged) probabilities,
        :func:`medseg.inference.maps.entropy_map`, is averaged inside each label of the model-grid argmax
        (before restore and postprocessing, so no input-sized float map is needed) into
        ``info["mean_entropy"]`` — what the review page's ``low_confidence`` rule reads. With
        ``uncertainty=True`` the map itself is restored to the input grid (``Prediction.uncertainty``).
        With ``probabilities=True`` the class probabilities are restored to the input grid too
        (``Prediction.probabilities``, ``(K, *shape)`` float32, trilinear — MONAI's ``bilinear`` mode — and 0
        outside the body crop; ``4 K N`` bytes more).

        Raises:
            InputError: unusable input (one line naming the file).
        """
        if not isinstance(source, Prepared):
            source = self.prepare(source)
        stages, reference, image = _Stages(source.stages), source.reference, source.image
        source.image = None  # the network stage below frees the model-space image
        info: dict[str, Any] = {
            "checkpoints": [str(p) for p in self.checkpoints],
            "tta_flips": [list(f) for f in self.flips],
            "precision": self.precision,
            **({"int8_float_parts": self.float_parts} if self.float_parts else {}),
            "backend": self.backend,
            "model_grid": [int(n) for n in image.shape[1:]],
        }
        if self.tta_note:
            info["tta_note"] = self.tta_note
        shape = tuple(int(n) for n in reference.shape[:3])
        if min(image.shape[1:]) == 0:
            return self._no_body(reference, shape, info, stages, probabilities)
        probs, warnings = self._average(image)
        info["windows_skipped"] = self.windows_skipped
        model_affine = image.affine
        del image
        stages.done("network")
        entropy = entropy_map(probs)
        info["mean_entropy"] = label_means(entropy, argmax_labels(probs), self.label_names)
        labels = restore_labels(probs, model_affine, reference.affine, shape)
        restored = restore_map(probs, model_affine, reference.affine, shape) if probabilities else None
        del probs
        uncertainty = None
        if self.uncertainty:
            uncertainty = restore_map(entropy[None], model_affine, reference.affine, shape)[0]
        del entropy
        stages.done("restore")
        spacing = voxel_spacing(reference.affine)
        labels, info["postprocess"] = clean_labels(labels, self.postprocess_rules, spacing, self.label_names)
        stages.done("postprocess")
        return Prediction(
            labels=labels,
            reference=reference,
            label_names=self.label_names,
            warnings=warnings,
            info={**info, **stages.info()},
            uncertainty=uncertainty,
            probabilities=restored,
        )

    def _no_body(self, reference, shape, info, stages, probabilities: bool) -> Prediction:
        """The all-background result of a scan with nothing left on the model grid (see :meth:`predict`)."""
        dense = np.any(body_mask(np.asanyarray(reference.dataobj)))
        cause = (
            f"no body left on the model grid (voxels above {BODY_HU_THRESHOLD:g} HU vanish when resampled)"
            if dense
            else f"no body found (no voxel above {BODY_HU_THRESHOLD:g} HU)"
        )
        probs = None
        if probabilities:
            probs = np.zeros((len(self.label_names), *shape), np.float32)
            probs[0] = 1.0
        return Prediction(
            labels=np.zeros(shape, dtype=np.uint8),
            reference=reference,
            label_names=self.label_names,
            warnings=[f"{cause}: empty mask written"],
            info={**info, "postprocess": {}, "mean_entropy": {}, **stages.info()},
            uncertainty=np.zeros(shape, np.float32) if self.uncertainty else None,
            probabilities=probs,
        )


#: Volumes needing more windows than this get a progress bar over windows (when stderr is a terminal).
PROGRESS_MIN_WINDOWS = 64


def _window_progress(shape, roi) -> bool:
    """A window progress bar for large cases in an interactive terminal only (logs stay clean)."""
    windows = math.prod(max(1, math.ceil(2 * int(n) / int(r)) - 1) for n, r in zip(shape, roi, strict=True))
    return windows > PROGRESS_MIN_WINDOWS and sys.stderr.isatty()
