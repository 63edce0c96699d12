"""Segment a scan with one checkpoint or an ensemble: preprocess with the plan, slide, average, restore, clean.

>>> predictor = Predictor("runs/demo/best.pt")            # doctest: +SKIP
>>> result = predictor.predict("ct.nii.gz")                 # doctest: +SKIP
>>> result.labels.shape == result.reference.shape           # doctest: +SKIP
True
>>> Predictor(["fold0/best.pt", "fold1/best.pt"], tta=True, precision="bf16")   # doctest: +SKIP

Memory. Stages of :meth:`Predictor.predict` and what each adds at its peak, counted per voxel of the input grid
(``N`` voxels, ``s`` bytes each as stored: 2 for int16) and of the model grid (``M`` voxels after the body crop;
``M ≈ r N`` with ``r`` = input voxel volume / plan voxel volume, 0.284 for a 0.8×0.8×1.5 mm CT on a 1.5 mm
plan), for ``K`` classes:

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

i.e. ``s + r (4 K + 8)`` (or ``s + r (8 K + 12)``) bytes per input voxel plus ``c`` ≈ 1.35 GB: ≈ 0.5 GB for
Python, torch, MONAI and the weights, ≈ 0.85 GB of activations of the default Attention U-Net (16..256) for two
96×96×64 windows (measured on the CPU; activations scale with ``sw_batch_size`` and the patch). For an int16
CT on a 1.5 mm plan that is ``4.3 + 1.14 K`` B per input voxel (``5.4 + 2.28 K`` with mirroring). A
512×512×300 CT (``N`` = 78.6 M, ``M`` ≤ 22.4 M when the body fills the field of view) with ``K`` = 7 needs at
most ≈ 2.3 GB (3.0 GB with mirroring); ``K`` ≤ 25 (12 with mirroring) stays under 4 GB at that size.
``python -m pipelines.bench_segment`` measures it. Before (whole-volume float64 restore of all ``K`` channels,
whole-volume float64 ``Spacingd``, a second buffer for the softmax) the restore alone peaked at ≈ 7.4 GB on
that CT.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from medseg.config import checkpoint_config
from medseg.device import resolve_device
from medseg.inference.ensemble import check_ensemble, check_single_channel
from medseg.inference.fast import prepare_network
from medseg.inference.maps import argmax_labels, entropy_map, label_means, restore_map
from medseg.inference.postprocess import ComponentRule
from medseg.inference.preprocess import preprocess
from medseg.inference.restore import restore_labels
from medseg.inference.rules import clean_labels, component_rules
from medseg.inference.sliding import (
    CPU_STITCHING_WARNING,
    sliding_window_logits,
    softmax_,
    stitching_device,
    with_cpu_stitching,
)
from medseg.inference.tta import average_probabilities, choose_flips, sagittal_axis
from medseg.io import InputError, load_volume, voxel_spacing
from medseg.io.checkpoint import load_checkpoint
from medseg.nets.registry import build_network
from medseg.transforms import infer_transforms
from medseg.transforms.presets import BODY_HU_THRESHOLD, body_mask

#: ``precision`` values besides ``auto``: float32, bfloat16 autocast (CPU and CUDA), float16 autocast (CUDA).
PRECISIONS = ("fp32", "bf16", "fp16")
#: ``postprocess`` values besides a mapping ``label → rule``.
POSTPROCESS_MODES = ("auto", "none")


@dataclass
class Prediction:
    """A label map in the input's voxel grid, the input image it belongs to, and the label names.

    ``info`` describes how it was made: ``checkpoints`` (paths), ``tta_flips`` (model-space axes of each
    mirrored pass, ``[[]]`` without mirroring), ``precision``, ``model_grid`` (shape after preprocessing),
    ``postprocess`` (per label name: ``label``, ``largest_only``, ``min_ml``, ``removed_voxels``),
    ``mean_entropy`` (per label name: the mean normalised softmax entropy inside the label, see
    :meth:`Predictor.predict`), ``seconds``
    per stage (read, preprocess, network, restore, postprocess, total) and ``peak_rss_gb`` (the process's peak
    resident memory so far, after each stage).
    """

    labels: np.ndarray
    reference: nib.Nifti1Image
    label_names: dict[str, int]
    # One-line human-readable notes about this case (e.g. no body found); batch code prints them.
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    # Normalised softmax entropy on the input grid (float32, 0 = certain, 1 = uniform), when asked for.
    uncertainty: np.ndarray | None = None


def _shape(tensor: torch.Tensor) -> str:
    return "[" + ",".join(str(n) for n in tensor.shape) + "]"


def state_dict_differences(saved: dict, expected: dict) -> list[str]:
    """Where saved weights do not fit a network's ``state_dict``: one phrase per tensor, network order.

    A tensor differs when its shape differs, when the network has it and the file does not, or the file has
    it and the network does not — what makes ``load_state_dict`` fail, counted here instead of parsed from
    PyTorch's error text.
    """
    out = []
    for key, tensor in expected.items():
        if key not in saved:
            out.append(f"{key} {_shape(tensor)} missing from the file")
        elif tuple(saved[key].shape) != tuple(tensor.shape):
            out.append(f"{key} {_shape(saved[key])} vs {_shape(tensor)}")
    out += [f"{key} {_shape(saved[key])} not in the network" for key in saved if key not in expected]
    return out


def model_from_checkpoint(
    ckpt: dict, device: torch.device, path: str | os.PathLike = "checkpoint"
) -> torch.nn.Module:
    """Rebuild the network recorded in a checkpoint (config migrated if older) and load its weights (eval).

    Raises:
        ConfigError: the recorded config is incomplete or invalid (from :func:`checkpoint_config`).
        InputError: the weights do not fit the recorded network, e.g. ``best.pt: weights do not match the
            recorded network: 85 tensors differ, first encoder.0.0.0.weight [4,1,3,3,3] vs [8,1,3,3,3]``
            (shape in the file vs shape in the network).
    """
    cfg = checkpoint_config(ckpt, path)
    plan = ckpt["plan"]
    try:
        model = build_network(
            cfg.model, plan.get("in_channels", 1), len(ckpt["labels"]), plan.get("pool_kernels")
        )
    except ValueError as exc:  # pool kernels that do not fit the recorded network's depth
        raise InputError(f"{path}: {exc}") from None
    differ = state_dict_differences(ckpt["model"], model.state_dict())
    if differ:
        count = f"{len(differ)} tensor{'s differ' if len(differ) > 1 else ' differs'}"
        raise InputError(f"{path}: weights do not match the recorded network: {count}, first {differ[0]}")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:  # same names and shapes, yet refused (e.g. a dtype torch cannot copy)
        raise InputError(
            f"{path}: weights do not match the recorded network ({str(exc).splitlines()[0]})"
        ) from None
    return model.to(device).eval()


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX): there bf16 convolutions beat float32;
    elsewhere oneDNN emulates them and float32 is faster."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def autocast_dtype(precision: str | None, device: torch.device) -> tuple[torch.dtype | None, str]:
    """``(dtype for torch.autocast or None, name)`` for a ``precision`` on ``device``.

    ``"fp32"``: no autocast (exact float32). ``"bf16"``: bfloat16 autocast of the network on the CPU or CUDA;
    ``"fp16"``: float16 autocast, CUDA only. ``"auto"`` or None, the default, is the fast path that keeps the
    masks: bf16 on a CPU with native bf16 (:func:`native_bf16_cpu`, else fp32) and on a GPU that has it (else
    fp16). The stitched logits stay float32 in every case. The agreement of bf16 with fp32 masks (Dice ≥ 0.99
    per label on the demo's held-out phantoms) is measured by ``python -m pipelines.bench_precision``.

    Raises:
        ValueError: an unknown precision, or fp16 on the CPU.
    """
    if precision in (None, "auto"):
        if device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
            return (torch.bfloat16, "bf16") if bf16 else (torch.float16, "fp16")
        return (torch.bfloat16, "bf16") if native_bf16_cpu() else (None, "fp32")
    if precision == "fp32":
        return None, "fp32"
    if precision == "bf16":
        return torch.bfloat16, "bf16"
    if precision == "fp16" and device.type == "cuda":
        return torch.float16, "fp16"
    if precision == "fp16":
        raise ValueError("precision 'fp16' needs a CUDA device; on the CPU use bf16 or fp32")
    raise ValueError(f"unknown precision {precision!r}; valid: auto, {', '.join(PRECISIONS)}")


def peak_rss_gb() -> float | None:
    """The process's peak resident memory so far in GB (``getrusage``), or None where unavailable."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**30 if sys.platform == "darwin" else 2**20), 3)  # bytes on macOS, KiB on Linux


class _Stages:
    """Seconds per stage and the running peak RSS after each (``Prediction.info``); ``earlier``: the stages
    of a :class:`Prepared` scan, counted in the total."""

    def __init__(self, earlier: _Stages | None = None) -> None:
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = dict(earlier.seconds) if earlier else {}
        self.peak: dict[str, float | None] = dict(earlier.peak) if earlier else {}
        self.start -= sum(self.seconds.values())

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self.last, 3)
        self.peak[stage] = peak_rss_gb()
        self.last = now

    def info(self) -> dict[str, Any]:
        return {
            "seconds": {**self.seconds, "total": round(time.perf_counter() - self.start, 3)},
            "peak_rss_gb": self.peak,
        }


@dataclass
class Prepared:
    """A scan read and preprocessed ahead of the network (:meth:`Predictor.prepare`, e.g. in a loader thread
    while the network works on the previous scan); :meth:`Predictor.predict` takes it instead of a path and
    releases its model-space image."""

    reference: nib.spatialimages.SpatialImage
    image: MetaTensor | None
    stages: _Stages


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class Predictor:
    """Checkpoint(s) → label maps for new scans, in each scan's exact shape and affine.

    Args:
        checkpoints: a medseg checkpoint (``best.pt``) or several (a fold ensemble: probabilities averaged;
            they must share labels and plan, see :mod:`medseg.inference.ensemble`).
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``. On CUDA the windows run on the GPU and the
            stitching buffer too, unless it does not fit: then it is redone on the CPU, with a warning.
        overlap, sw_batch_size, roi_size: sliding-window settings; default from the (first) checkpoint's
            config, the window from each checkpoint's own config or patch size.
        tta: test-time mirroring (:mod:`medseg.inference.tta`): flips the plan's ``mirror_axes`` allow, and
            the sagittal flip when the label names give a left/right swap table.
        precision: ``"auto"`` (or None) | ``"fp32"`` | ``"bf16"`` | ``"fp16"`` (see :func:`autocast_dtype`).
        postprocess: ``"auto"`` (the rules recorded in the first checkpoint, none if it has none), ``"none"``,
            or a mapping ``label (index or name) → ComponentRule or {"largest_only", "min_ml"}``.
        uncertainty: also restore the voxel-wise normalised softmax entropy to the input grid
            (``Prediction.uncertainty``, float32; one more float map of the scan's size).

    Raises:
        InputError: an unusable checkpoint, checkpoints that cannot be averaged, malformed rules.
        ConfigError: a checkpoint's recorded config is invalid.
        ValueError: an unknown ``precision`` or ``postprocess`` mode.
    """

    def __init__(
        self,
        checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
        device: str = "auto",
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        roi_size: Sequence[int] | None = None,
        tta: bool = False,
        precision: str | None = None,
        postprocess: str | Mapping[Any, Any] = "auto",
        uncertainty: bool = False,
    ) -> None:
        paths = [checkpoints] if isinstance(checkpoints, str | os.PathLike) else list(checkpoints)
        if not paths:
            raise ValueError("no checkpoint given")
        if isinstance(postprocess, str) and postprocess not in POSTPROCESS_MODES:
            raise ValueError(
                f"unknown postprocess {postprocess!r}; valid: {', '.join(POSTPROCESS_MODES)} or a mapping"
            )
        self.device = resolve_device(device)
        self.checkpoints = [Path(p) for p in paths]
        self.checkpoint = self.checkpoints[0]
        self.models: list[torch.nn.Module] = []
        self.roi_sizes: list[list[int]] = []
        self.checkpoint_sha256: list[str] = []
        recorded: list[tuple[Path, dict]] = []
        for path in self.checkpoints:
            ckpt = load_checkpoint(path)
            self.checkpoint_sha256.append(_sha256(path))
            config = checkpoint_config(ckpt, path)
            summary = {"labels": ckpt["labels"], "plan": ckpt["plan"], "postprocess": ckpt.get("postprocess")}
            recorded.append((path, summary))
            check_ensemble(recorded)  # before building further networks
            self.models.append(model_from_checkpoint(ckpt, self.device, path))
            window = roi_size or config.infer.roi_size or ckpt["plan"]["patch_size"]
            self.roi_sizes.append([int(r) for r in window])
            if len(recorded) == 1:
                self.config = config
            del ckpt  # the weights live in the network now
        first = recorded[0][1]
        self.plan = first["plan"]
        self.label_names = {str(k): int(v) for k, v in first["labels"].items()}
        self.model = self.models[0]
        infer = self.config.infer
        self.roi_size = self.roi_sizes[0]
        self.overlap = infer.overlap if overlap is None else overlap
        self.sw_batch_size = sw_batch_size or infer.sw_batch_size
        self.mode = infer.mode
        self.transforms = infer_transforms(self.plan, load=False)
        self.autocast, self.precision = autocast_dtype(precision, self.device)
        self.networks = [prepare_network(m, self.device, self.autocast) for m in self.models]
        self.tta = bool(tta)
        self.uncertainty = bool(uncertainty)
        self.lr_axis = sagittal_axis(self.plan["orientation"])
        self.tta_note: str | None = None
        self.swap: dict[int, int] | None = None
        self.flips: list[tuple[int, ...]] = [()]
        if self.tta:
            shared = set.intersection(
                *({int(a) for a in p["plan"].get("mirror_axes", [])} for _, p in recorded)
            )
            self.flips, self.swap, self.tta_note = choose_flips(
                self.label_names, self.plan["orientation"], sorted(shared)
            )
        if isinstance(postprocess, str):
            raw = first["postprocess"] if postprocess == "auto" else None
            source = f"{self.checkpoint} (recorded postprocessing)"
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
                        roi,
                        self.overlap,
                        self.sw_batch_size,
                        self.mode,
                        amp=False,
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

    def prepare(self, source: str | os.PathLike | nib.spatialimages.SpatialImage) -> Prepared:
        """Read (a path) and preprocess one scan for :meth:`predict`; raises as :meth:`predict` does."""
        stages = _Stages()
        check_single_channel(self.plan, self.checkpoint, source)
        reference = self._read(source)
        stages.done("read")
        image = self.preprocess(reference)
        stages.done("preprocess")
        return Prepared(reference, image, stages)

    def predict(self, source: str | os.PathLike | nib.spatialimages.SpatialImage | Prepared) -> Prediction:
        """Segment one scan — a NIfTI path, an image already read (e.g. :func:`medseg.io.dicom.read_series`) or
        a :class:`Prepared` scan.

        A scan with no body (the plan crops to voxels above :data:`BODY_HU_THRESHOLD` HU and none is left:
        all air, or the few dense voxels vanish when resampled to the model grid) has nothing to segment:
        the result is an all-background map of the scan's shape with a line in ``warnings``, not a
        sliding window over an empty image.

        Confidence: the normalised softmax entropy of the (averaged) probabilities,
        :func:`medseg.inference.maps.entropy_map`, is averaged inside each label of the model-grid argmax
        (before restore and postprocessing, so no input-sized float map is needed) into
        ``info["mean_entropy"]`` — what the review page's ``low_confidence`` rule reads. With
        ``uncertainty=True`` the map itself is restored to the input grid (``Prediction.uncertainty``).

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
            "model_grid": [int(n) for n in image.shape[1:]],
        }
        if self.tta_note:
            info["tta_note"] = self.tta_note
        shape = tuple(int(n) for n in reference.shape[:3])
        if min(image.shape[1:]) == 0:
            dense = np.any(body_mask(np.asanyarray(reference.dataobj)))
            cause = (
                f"no body left on the model grid (voxels above {BODY_HU_THRESHOLD:g} HU vanish when "
                "resampled)"
                if dense
                else f"no body found (no voxel above {BODY_HU_THRESHOLD:g} HU)"
            )
            return Prediction(
                labels=np.zeros(shape, dtype=np.uint8),
                reference=reference,
                label_names=self.label_names,
                warnings=[f"{cause}: empty mask written"],
                info={**info, "postprocess": {}, "mean_entropy": {}, **stages.info()},
                uncertainty=np.zeros(shape, np.float32) if self.uncertainty else None,
            )
        probs, warnings = self._average(image)
        model_affine = image.affine
        del image
        stages.done("network")
        entropy = entropy_map(probs)
        info["mean_entropy"] = label_means(entropy, argmax_labels(probs), self.label_names)
        labels = restore_labels(probs, model_affine, reference.affine, shape)
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
        )


#: Volumes needing more windows than this get a progress bar over windows (when stderr is a terminal).
PROGRESS_MIN_WINDOWS = 64


def _window_progress(shape, roi) -> bool:
    """A window progress bar for large cases in an interactive terminal only (logs stay clean)."""
    windows = math.prod(max(1, math.ceil(2 * int(n) / int(r)) - 1) for n, r in zip(shape, roi, strict=True))
    return windows > PROGRESS_MIN_WINDOWS and sys.stderr.isatty()
