"""Write a NIfTI-style volume as a synthetic DICOM CT series — clean, or with the mess real exports have.

Used by the tests and demos of the DICOM reader (:mod:`medseg.io.dicom`): every geometry and header
problem that hospital series show (missing or duplicate slices, unequal spacing, gantry tilt, localizers
in the folder, missing UIDs, other modalities, compressed transfer syntaxes, file names and instance
numbers that do not follow the slices) can be produced on purpose, from a phantom or a real CT.

Geometry. The input affine maps voxel indices (i, j, k) to RAS+ millimetres (NIfTI). DICOM patient
coordinates are LPS+, so the LPS affine is ``diag(-1, -1, 1, 1) @ affine``; its columns ``a0, a1, a2`` are
the steps of one voxel along the array axes. Slice ``k`` is the image ``volume[:, :, k]``, written with
**columns along i and rows along j**, so ``pixel_array[r, c] == volume[c, r, k]`` and:

* ImageOrientationPatient = ``a0/|a0|`` (direction of increasing column index) then ``a1/|a1|``;
* PixelSpacing = ``[|a1|, |a0|]`` (DICOM lists the spacing between rows first, then between columns);
* ImagePositionPatient of slice k = ``origin_LPS + k * a2`` (the centre of the first transmitted pixel).

Intensities: stored value = HU − RescaleIntercept with RescaleSlope 1 (``intercept = -1024`` unless the
volume holds lower values), unsigned 12-bit storage when the range allows it, as CT scanners write.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

#: Transfer syntaxes this writer produces (name → UID); the compressed ones are encoded by pydicom itself
#: (RLE natively, JPEG-LS through the ``pyjpegls`` plugin).
TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
}
_SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class WrittenSeries:
    """What :func:`write_ct_series` wrote: the slice files (index ``k`` ↔ ``volume[:, :, k]``, ``None``
    where a slice was dropped), the files added on purpose (duplicates, localizer) and the UIDs."""

    files: list[Path | None]
    extra_files: list[Path]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list[str | None] = field(default_factory=list)


@dataclass(frozen=True)
class SeriesTags:
    """Who and what the series is: the identifiers a PACS shows, and the modality.

    Attributes:
        patient_id, patient_name, study_date, series_number, series_description: the tags of that name.
        modality: ``"CT"`` (CT Image Storage, HU rescale) or ``"MR"`` (MR Image Storage, no rescale).
        study_uid, series_uid, frame_of_reference_uid: fixed UIDs; new random ones when ``None``.
    """

    patient_id: str = "PHANTOM001"
    patient_name: str = "Phantom^Synthetic"
    study_date: str = "20240101"
    series_number: int = 1
    series_description: str = "synthetic CT"
    modality: str = "CT"
    study_uid: str | None = None
    series_uid: str | None = None
    frame_of_reference_uid: str | None = None

    def __post_init__(self) -> None:
        if self.modality not in _SOP_CLASS:
            raise ValueError(f"modality must be one of {sorted(_SOP_CLASS)}, got {self.modality!r}")


@dataclass(frozen=True)
class SeriesEncoding:
    """How the pixels are stored. The defaults are what CT scanners write: uncompressed explicit little
    endian, unsigned 12-bit, RescaleIntercept −1024.

    Attributes:
        transfer_syntax: one of :data:`TRANSFER_SYNTAXES` (``explicit``, ``implicit``, ``deflated``, ``rle``,
            ``jpegls``).
        signed: store int16 (PixelRepresentation 1) instead of uint16.
        rescale_intercept: RescaleIntercept; default −1024, or the volume minimum when that is lower.
        varying_intercept: odd slices use a RescaleIntercept 24 lower (stored values 24 higher), so HU are
            right only when the rescale is applied per slice.
    """

    transfer_syntax: str = "explicit"
    signed: bool = False
    rescale_intercept: int | None = None
    varying_intercept: bool = False

    def __post_init__(self) -> None:
        if self.transfer_syntax not in TRANSFER_SYNTAXES:
            raise ValueError(
                f"transfer_syntax must be one of {sorted(TRANSFER_SYNTAXES)}, got {self.transfer_syntax!r}"
            )


@dataclass(frozen=True)
class SeriesFaults:
    """How the files depart from the clean series, the way real exports do (the defaults: none).

    Attributes:
        descending: acquisition order from the last slice (k = nz-1) to the first: InstanceNumber 1 and the
            first file name belong to k = nz-1 (head-first CT stored top to bottom).
        shuffle_names: file names from a hash of the SOP Instance UID, so they do not sort in slice order.
        backwards_instance_numbers: InstanceNumber runs against the acquisition (and file-name) order.
        slice_thickness: SliceThickness tag; default the spacing between slices.
        drop_slices: slice indices not written (missing slices).
        duplicate_slices: slice indices written twice, byte-identical (same SOP Instance UID).
        conflicting_duplicates: slice indices written a second time at the same position with other pixel
            values (+100 HU) and a new SOP Instance UID.
        slice_offsets_mm: ``{k: mm}`` moves slice k along the slice normal (unequal spacing).
        gantry_tilt_deg: slice k is moved in-plane by ``k * spacing * tan(angle)`` along the column
            direction, so the positions no longer run along the normal of ImageOrientationPatient (the
            GantryDetectorTilt tag says the angle).
        localizer: ``"typed"`` adds a coronal scout in the same series with ImageType
            ORIGINAL\\PRIMARY\\LOCALIZER; ``"untyped"`` the same image typed AXIAL (only its orientation
            tells it apart).
        omit_series_uid: leave SeriesInstanceUID out of every file.
    """

    descending: bool = False
    shuffle_names: bool = False
    backwards_instance_numbers: bool = False
    slice_thickness: float | None = None
    drop_slices: Sequence[int] = ()
    duplicate_slices: Sequence[int] = ()
    conflicting_duplicates: Sequence[int] = ()
    slice_offsets_mm: Mapping[int, float] | None = None
    gantry_tilt_deg: float = 0.0
    localizer: str | None = None
    omit_series_uid: bool = False

    def __post_init__(self) -> None:
        if self.localizer not in (None, "typed", "untyped"):
            raise ValueError(f"localizer must be None, 'typed' or 'untyped', got {self.localizer!r}")


#: Option name → the group it belongs to (the keywords :func:`write_ct_series` accepts).
_OPTION_GROUPS = {
    f.name: group for group in (SeriesTags, SeriesEncoding, SeriesFaults) for f in fields(group)
}


def _resolve_options(
    tags: SeriesTags | None, encoding: SeriesEncoding | None, faults: SeriesFaults | None, **options: Any
) -> tuple[SeriesTags, SeriesEncoding, SeriesFaults]:
    """The three option groups (defaults where ``None``), each keyword of ``options`` set in its group.

    Raises:
        TypeError: a keyword that is no field of a group (the valid names listed, the closest suggested).
    """
    if unknown := sorted(set(options) - set(_OPTION_GROUPS)):
        close = difflib.get_close_matches(unknown[0], list(_OPTION_GROUPS), n=1)
        raise TypeError(
            f"write_ct_series: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(_OPTION_GROUPS))}."
            + (f" Did you mean {close[0]!r}?" if close else "")
        )
    given = {SeriesTags: tags, SeriesEncoding: encoding, SeriesFaults: faults}
    resolved = []
    for group, value in given.items():
        mine = {k: v for k, v in options.items() if _OPTION_GROUPS[k] is group}
        resolved.append(replace(value or group(), **mine))
    tags, encoding, faults = resolved
    return tags, encoding, faults


def _ds(value: float) -> pydicom.valuerep.DSfloat:
    """A decimal string of at most 16 characters with as many digits as fit (about 14 significant)."""
    return pydicom.valuerep.DSfloat(float(value), auto_format=True)


class _Grid(NamedTuple):
    """The DICOM geometry of a RAS affine (module docstring), in LPS."""

    row: np.ndarray  # direction of increasing column index (a0 / |a0|)
    col: np.ndarray  # direction of increasing row index (a1 / |a1|)
    spacing: np.ndarray  # |a0|, |a1|, |a2|
    origin: np.ndarray  # centre of voxel (0, 0, 0)
    step: np.ndarray  # a2: from one slice to the next


def _geometry(affine: np.ndarray) -> _Grid:
    """The row and column cosines, spacing, LPS origin and slice step of a RAS affine.

    Raises:
        ValueError: when the in-plane axes are not orthogonal or the slice step is not along their normal
            (a sheared affine has no exact DICOM image-plane representation).
    """
    lps = LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64)
    a0, a1, a2 = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    spacing = np.array([np.linalg.norm(a0), np.linalg.norm(a1), np.linalg.norm(a2)])
    if not np.all(np.isfinite(lps)) or np.any(spacing < 1e-6):
        raise ValueError("affine is degenerate or not finite")
    row, col = a0 / spacing[0], a1 / spacing[1]
    normal = np.cross(row, col)
    if abs(row @ col) > 1e-6 or np.linalg.norm(np.cross(normal, a2 / spacing[2])) > 1e-6:
        raise ValueError("affine is sheared: the axes are not orthogonal, no exact DICOM geometry")
    return _Grid(row, col, spacing, lps[:3, 3], a2)


def _stored(volume_hu: np.ndarray, intercept: int | None, signed: bool) -> tuple[np.ndarray, int, int]:
    """Stored pixel values, the RescaleIntercept and BitsStored for an integer HU volume."""
    lo, hi = int(volume_hu.min()), int(volume_hu.max())
    if intercept is None:
        intercept = 0 if signed else min(-1024, lo)
    stored = volume_hu.astype(np.int32) - intercept
    lo_s, hi_s = lo - intercept, hi - intercept
    if signed:
        if lo_s < -32768 or hi_s > 32767:
            raise ValueError(f"HU range [{lo}, {hi}] minus intercept {intercept} does not fit int16")
        bits = 12 if -2048 <= lo_s and hi_s < 2048 else 16
        return stored.astype(np.int16), intercept, bits
    if lo_s < 0 or hi_s > 65535:
        raise ValueError(f"HU range [{lo}, {hi}] minus intercept {intercept} does not fit uint16")
    return stored.astype(np.uint16), intercept, 12 if hi_s < 4096 else 16


def _base_dataset(tags: SeriesTags, omit_series_uid: bool) -> Dataset:
    """The tags every slice of the series shares (patient, study, series, equipment, frame of reference)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = _SOP_CLASS[tags.modality]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = tags.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = ""
    ds.Modality = tags.modality
    ds.Manufacturer = "medseg synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "synthetic abdomen"
    ds.SeriesDescription = tags.series_description
    ds.PatientName = tags.patient_name
    ds.PatientID = tags.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = tags.study_uid
    if not omit_series_uid:
        ds.SeriesInstanceUID = tags.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = tags.series_number
    ds.AcquisitionNumber = 1
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = tags.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if tags.modality == "CT":
        ds.KVP = 120
        ds.ConvolutionKernel = "STANDARD"
    return ds


class _Plane(NamedTuple):
    """Where one image lies: its cosines, the position of its first pixel, its spacing and thickness."""

    row: np.ndarray
    col: np.ndarray
    position: np.ndarray
    pixel_spacing: tuple[float, float]  # between rows, between columns
    thickness: float


def _slice_dataset(
    base: Dataset,
    pixels: np.ndarray,
    plane: _Plane,
    *,
    sop_uid: str,
    instance_number: int,
    intercept: int | None,
    bits: int,
) -> Dataset:
    """One image: ``pixels`` is (Rows, Columns), already in stored values; ``intercept`` None: no rescale
    tags (MR)."""
    ds = Dataset()
    ds.update(base)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [_ds(v) for v in plane.position]
    ds.ImageOrientationPatient = [_ds(v) for v in (*plane.row, *plane.col)]
    ds.SliceLocation = _ds(plane.position @ np.cross(plane.row, plane.col))
    ds.SliceThickness = _ds(plane.thickness)
    ds.PixelSpacing = [_ds(plane.pixel_spacing[0]), _ds(plane.pixel_spacing[1])]
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = int(pixels.dtype == np.int16)
    if intercept is not None:
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def _save(ds: Dataset, path: Path, transfer_syntax: str) -> Path:
    """Write ``ds`` as a DICOM file (preamble, file meta) in the given transfer syntax."""
    uid = TRANSFER_SYNTAXES[transfer_syntax]
    ds = copy.deepcopy(ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    if uid.is_compressed:
        # generate_instance_uid=False: compression must not change the SOP Instance UID the test relies on.
        ds.compress(uid, generate_instance_uid=False)
    else:
        meta.TransferSyntaxUID = uid
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ct_series(
    volume_hu: np.ndarray,
    affine: np.ndarray,
    folder: str | os.PathLike,
    *,
    tags: SeriesTags | None = None,
    encoding: SeriesEncoding | None = None,
    faults: SeriesFaults | None = None,
    file_prefix: str = "",
    **options: Any,
) -> WrittenSeries:
    """Write ``volume_hu`` (x, y, z integer HU) as one single-frame DICOM image per slice ``k``.

    The clean series reproduces the NIfTI exactly: the same voxels and, through the tags, the same world
    coordinates (see the module docstring). :class:`SeriesFaults` breaks it the way real exports break.

    Every field of the three option groups may also be given as a keyword, which reads better in a test:
    ``write_ct_series(v, a, folder, patient_id="P1", shuffle_names=True, drop_slices=[3])`` is
    ``write_ct_series(v, a, folder, tags=SeriesTags(patient_id="P1"),
    faults=SeriesFaults(shuffle_names=True, drop_slices=[3]))``; a keyword overrides the group's field.

    Args:
        volume_hu: 3D integer array indexed (i, j, k); slice k becomes one file.
        affine: voxel → RAS+ mm (NIfTI convention); must not be sheared.
        folder: created if needed; several calls may share one folder (use ``file_prefix``).
        tags: patient, study and series identifiers and the modality (:class:`SeriesTags`).
        encoding: transfer syntax, signedness and rescale intercept (:class:`SeriesEncoding`).
        faults: what is wrong with the files (:class:`SeriesFaults`); default nothing.
        file_prefix: prefix of every file name written by this call.
        **options: fields of :class:`SeriesTags`, :class:`SeriesEncoding` or :class:`SeriesFaults`.

    Returns:
        The written files and the UIDs (:class:`WrittenSeries`).

    Raises:
        TypeError: a keyword that is no field of the three groups.
        ValueError: a bad option value, a volume that is not 3D integer or does not fit the storage, or a
            sheared affine.
    """
    tags, encoding, faults = _resolve_options(tags, encoding, faults, **options)
    volume_hu = np.asarray(volume_hu)
    if volume_hu.ndim != 3 or not np.issubdtype(volume_hu.dtype, np.integer):
        raise ValueError(f"volume_hu must be a 3D integer array, got {volume_hu.ndim}D {volume_hu.dtype}")
    grid = _geometry(affine)
    normal = np.cross(grid.row, grid.col)
    is_ct = tags.modality == "CT"
    intercept_hu = encoding.rescale_intercept if is_ct else 0
    stored, intercept, bits = _stored(volume_hu, intercept_hu, encoding.signed or not is_ct)
    if encoding.varying_intercept:  # odd slices store HU - (intercept - 24): 24 more, so BitsStored 16
        if int(stored.max()) + 24 > np.iinfo(stored.dtype).max:
            raise ValueError("varying_intercept: stored values would overflow")
        bits = 16

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tags = replace(
        tags,
        study_uid=tags.study_uid or generate_uid(),
        series_uid=tags.series_uid or generate_uid(),
        frame_of_reference_uid=tags.frame_of_reference_uid or generate_uid(),
    )
    series_uid = tags.series_uid
    base = _base_dataset(tags, faults.omit_series_uid)
    if faults.gantry_tilt_deg:
        base.GantryDetectorTilt = _ds(faults.gantry_tilt_deg)
    nz = volume_hu.shape[2]
    order = list(range(nz))[::-1] if faults.descending else list(range(nz))
    acquisition = {k: n for n, k in enumerate(order)}  # k → 0-based acquisition index
    offsets = dict(faults.slice_offsets_mm or {})
    tilt_shift = grid.spacing[2] * np.tan(np.deg2rad(faults.gantry_tilt_deg)) * grid.col
    thickness = grid.spacing[2] if faults.slice_thickness is None else faults.slice_thickness
    pixel_spacing = (float(grid.spacing[1]), float(grid.spacing[0]))
    syntax = encoding.transfer_syntax

    def name(sop_uid: str, index: int, tag: str = "") -> Path:
        if faults.shuffle_names:
            stem = hashlib.sha1(f"{sop_uid}{tag}".encode()).hexdigest()[:12]
            return folder / f"{file_prefix}IM_{stem}.dcm"
        return folder / f"{file_prefix}{index:04d}{tag}.dcm"

    files: list[Path | None] = [None] * nz
    sops: list[str | None] = [None] * nz
    extra: list[Path] = []
    for k in range(nz):
        if k in faults.drop_slices:
            continue
        n = acquisition[k]
        sop = generate_uid(entropy_srcs=[series_uid, str(k)])
        pixels = stored[:, :, k].T
        slice_intercept = intercept
        if encoding.varying_intercept and k % 2 == 1:
            slice_intercept = intercept - 24
            pixels = pixels + np.asarray(24, dtype=pixels.dtype)
        position = grid.origin + k * grid.step + offsets.get(k, 0.0) * normal + k * tilt_shift
        ds = _slice_dataset(
            base,
            pixels,
            _Plane(grid.row, grid.col, position, pixel_spacing, thickness),
            sop_uid=sop,
            instance_number=(nz - n) if faults.backwards_instance_numbers else n + 1,
            intercept=slice_intercept if is_ct else None,
            bits=bits,
        )
        files[k] = _save(ds, name(sop, n + 1), syntax)
        sops[k] = sop
        if k in faults.duplicate_slices:
            extra.append(_save(ds, name(sop, n + 1, "_copy"), syntax))
        if k in faults.conflicting_duplicates:
            other = copy.deepcopy(ds)
            other.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(k), "conflict"])
            top = 2**bits - 1 if pixels.dtype == np.uint16 else 2 ** (bits - 1) - 1
            brighter = np.minimum(pixels.astype(np.int32) + 100, top)
            other.PixelData = np.ascontiguousarray(brighter.astype(pixels.dtype)).tobytes()
            extra.append(_save(other, name(other.SOPInstanceUID, n + 1, "_other"), syntax))
    if faults.localizer is not None:
        scout = _localizer(base, stored, grid, intercept=intercept, bits=bits, kind=faults.localizer)
        extra.append(_save(scout, name(scout.SOPInstanceUID, 0, "_scout"), syntax))
    return WrittenSeries(files, extra, tags.study_uid, series_uid, tags.frame_of_reference_uid, sops)


def _localizer(
    base: Dataset, stored: np.ndarray, grid: _Grid, *, intercept: int, bits: int, kind: str
) -> Dataset:
    """A coronal-like scout through the middle of the volume (the (i, k) plane), in the same series: its
    rows run from the last slice to the first, so its orientation differs from the axial images'."""
    a0, a1, step = grid.row * grid.spacing[0], grid.col * grid.spacing[1], grid.step
    ny, nz = stored.shape[1], stored.shape[2]
    pixels = stored[:, ny // 2, :].T[::-1]
    thickness = float(np.linalg.norm(step))
    plane = _Plane(
        row=a0 / np.linalg.norm(a0),
        col=-step / thickness,
        position=grid.origin + (ny // 2) * a1 + (nz - 1) * step,
        pixel_spacing=(thickness, float(np.linalg.norm(a0))),
        thickness=float(np.linalg.norm(a1)),
    )
    sop_uid = generate_uid(entropy_srcs=[str(base.get("SeriesInstanceUID", "")), "localizer"])
    ds = _slice_dataset(
        base, pixels, plane, sop_uid=sop_uid, instance_number=nz + 1, intercept=intercept, bits=bits
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER" if kind == "typed" else "AXIAL"]
    return ds
