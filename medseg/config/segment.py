"""The options of the inference jobs, one frozen object each: every default written once, here, and every
value checked once, when the object is made — before a checkpoint or a scan is read.

* :class:`SegmentOptions` — *how* ``medseg segment`` (:func:`medseg.batch.run.segment_inputs`) computes
  the masks: device, sliding window, TTA, precision, postprocessing, prefetching, profile, archive caps;
* :class:`OutputSpec` — *what* it writes besides each mask and sidecar: viewer files, per-organ masks,
  statistics, previews, attention and entropy maps, and whether complete cases are redone;
* :class:`ExportOptions` — what ``medseg export`` (:func:`medseg.batch.reexport.export_outputs`) writes
  from masks a batch already wrote.

>>> from medseg.config.segment import OutputSpec, SegmentOptions
>>> SegmentOptions(device="cpu", tta=True).precision
'auto'
>>> OutputSpec(types="nifti,slicer", statistics=True).types
('nifti', 'slicer')
>>> SegmentOptions(precision="fp8")
Traceback (most recent call last):
...
medseg.config.schema.ConfigError: --precision 'fp8' is not valid; valid values: auto, fp32, bf16, fp16, int8

The Typer commands (:mod:`pipelines.segment`, :mod:`pipelines.export`) take their defaults from these classes
(``= SegmentOptions.precision``), and the messages name the command-line flags, as a user of either reads
them. This module imports neither torch nor numpy, so ``medseg --help`` stays instant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from medseg.config.schema import ConfigError
from medseg.device import BACKENDS, DEVICE_CHOICES, INFERENCE_PRECISIONS, is_device_name

if TYPE_CHECKING:
    from medseg.io.archive import ArchiveLimits

#: ``--postprocess`` names (a mapping ``label → rule`` is accepted from Python too).
POSTPROCESS_MODES = ("auto", "none")
#: ``--output-type`` values; ``nifti`` (the label map) is written for every case whatever is asked.
OUTPUT_TYPES = ("nifti", "dicom-seg", "dicom-seg-labelmap", "slicer", "dicom-rtstruct")
#: ``--prefetch``: 0 one case at a time, 1 one case ahead and one behind (:mod:`medseg.batch.lanes`).
PREFETCH = (0, 1)


def parse_output_types(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"nifti,dicom-seg"`` (or a sequence of names) → ``("nifti", "dicom-seg")``, duplicates dropped.

    Raises:
        ConfigError: an unknown name or none at all, listing the valid ones.
    """
    text = text if isinstance(text, str) else ",".join(text)
    types = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not types or any(t not in OUTPUT_TYPES for t in types):
        raise ConfigError(
            f"--output-type {text!r} is not valid; valid values (comma-separated): {', '.join(OUTPUT_TYPES)}"
        )
    return types


def _set(obj: object, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # a normalised value in a frozen dataclass's __post_init__


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SegmentOptions:
    """How a batch is segmented (the same for every case).

    Attributes:
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (checked for spelling here, for hardware when the
            model is loaded).
        overlap: sliding-window overlap in [0, 1); None: the (first) checkpoint's ``infer.overlap``.
        sw_batch_size: windows per forward pass, ≥ 1; None: the checkpoint's ``infer.sw_batch_size``.
        tta: test-time mirroring (:mod:`medseg.inference.tta`).
        precision: ``auto`` or one of :data:`medseg.device.INFERENCE_PRECISIONS`; ``auto`` is int8 where
            OpenVINO runs and ``medseg quantize`` stored an int8 graph of the checkpoint that held the agreement
            bound (:mod:`medseg.inference.quantize`), else bf16 where the CPU or GPU computes it natively, else
            fp32 on the CPU and fp16 on CUDA (:func:`medseg.device.resolve_precision`).
        backend: ``auto`` or one of :data:`medseg.device.BACKENDS`: what runs the network on the windows
            (:func:`medseg.inference.backends.resolve_backend`; ``auto`` is OpenVINO on the CPU when it is
            installed, except for ``precision="fp32"``, which stays PyTorch's exact path).
        postprocess: ``auto`` (the checkpoint's per-label component rules), ``none``, or from Python a
            mapping ``label → ComponentRule | {"largest_only", "min_ml"}`` (kept read-only).
        prefetch: :data:`PREFETCH`.
        profile: log one line of stage seconds per case (they are in every sidecar either way).
        archive_limits: caps for a ``.zip`` input (:class:`medseg.io.archive.ArchiveLimits`); None: its
            defaults.
        folds, checkpoint_name: for an nnU-Net v2 model folder (:mod:`medseg.nnunet`): the folds to run
            (``"0"``, ``"1"``, …, ``"all"``; None: every fold present) and the file in each fold folder (None:
            ``checkpoint_final.pth``).

    Raises:
        ConfigError: a value that is not allowed, in one line naming the flag and the valid values.
    """

    device: str = "auto"
    overlap: float | None = None
    sw_batch_size: int | None = None
    tta: bool = False
    precision: str = "auto"
    backend: str = "auto"
    postprocess: str | Mapping[Any, Any] = "auto"
    prefetch: int = 1
    profile: bool = False
    archive_limits: ArchiveLimits | None = None
    folds: tuple[str, ...] | None = None
    checkpoint_name: str | None = None

    def __post_init__(self) -> None:
        if self.folds is not None:
            _set(self, "folds", tuple(str(f) for f in self.folds) or None)
        if not is_device_name(self.device):
            raise ConfigError(f"unknown device {self.device!r}; valid: {', '.join(DEVICE_CHOICES)}")
        if self.overlap is not None and not (_is_number(self.overlap) and 0 <= self.overlap < 1):
            raise ConfigError(f"--overlap {self.overlap!r} is not valid; valid values: 0 <= overlap < 1")
        if self.sw_batch_size is not None and not (_is_whole(self.sw_batch_size) and self.sw_batch_size >= 1):
            raise ConfigError(
                f"--sw-batch-size {self.sw_batch_size!r} is not valid; valid values: a whole number >= 1"
            )
        if self.precision not in ("auto", *INFERENCE_PRECISIONS):
            raise ConfigError(
                f"--precision {self.precision!r} is not valid; valid values: auto, "
                f"{', '.join(INFERENCE_PRECISIONS)}"
            )
        if self.backend not in ("auto", *BACKENDS):
            raise ConfigError(
                f"--backend {self.backend!r} is not valid; valid values: auto, {', '.join(BACKENDS)}"
            )
        if isinstance(self.postprocess, Mapping):
            _set(self, "postprocess", MappingProxyType(dict(self.postprocess)))
        elif self.postprocess not in POSTPROCESS_MODES:
            valid = ", ".join(POSTPROCESS_MODES)
            raise ConfigError(f"--postprocess {self.postprocess!r} is not valid; valid values: {valid}")
        if not (_is_whole(self.prefetch) and self.prefetch in PREFETCH):
            raise ConfigError(
                f"--prefetch {self.prefetch!r} is not valid; valid values: {', '.join(map(str, PREFETCH))}"
            )
        if self.overlap is not None:
            _set(self, "overlap", float(self.overlap))


@dataclass(frozen=True)
class OutputSpec:
    """What a batch writes besides each case's mask ``<case>.nii.gz`` and sidecar ``<case>.json``.

    Attributes:
        types: :data:`OUTPUT_TYPES` (a comma-separated string is accepted and parsed): ``dicom-seg`` /
            ``dicom-seg-labelmap`` and ``dicom-rtstruct`` (RT Structure Set) for DICOM inputs, ``slicer``
            (``.seg.nrrd``).
        split: one 0/1 mask per organ in ``<case>_organs/``.
        statistics: ``<case>_stats.json`` per case and ``statistics.csv`` for the folder.
        preview: ``<case>_preview.png`` / ``<case>_thumb.png`` and the review page ``index.html``.
        attention: each gated level's α on the scan's grid (``<case>_alpha_levelN.nii.gz`` + ``.png``).
        uncertainty: ``<case>_entropy.nii.gz``, the normalised softmax entropy (0 certain .. 1 uniform).
        overwrite: redo cases that are complete from an earlier run.

    Raises:
        ConfigError: an unknown output type (:func:`parse_output_types`).
    """

    types: tuple[str, ...] = ("nifti",)
    split: bool = False
    statistics: bool = False
    preview: bool = False
    attention: bool = False
    uncertainty: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        _set(self, "types", parse_output_types(self.types))

    @property
    def viewer_files(self) -> bool:
        """Whether a case gets more than its mask from :func:`medseg.batch.exports.write_case_exports`."""
        return self.types != ("nifti",) or self.split


@dataclass(frozen=True)
class ExportOptions:
    """What ``medseg export`` writes for each segmented case of a folder.

    Attributes:
        types: :data:`OUTPUT_TYPES` (or a comma-separated string), as for :class:`OutputSpec`.
        split: one 0/1 mask per organ in ``<case>_organs/``.
        source_root: refuse recorded source series outside this folder (checked to be a folder when the
            export starts); None: no such confinement.

    Raises:
        ConfigError: an unknown output type.
    """

    types: tuple[str, ...] = ("dicom-seg",)
    split: bool = False
    source_root: Path | None = None

    def __post_init__(self) -> None:
        _set(self, "types", parse_output_types(self.types))
        if self.source_root is not None:
            _set(self, "source_root", Path(self.source_root))
