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
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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


def _ds(value: float) -> pydicom.valuerep.DSfloat:
    """A decimal string of at most 16 characters with as many digits as fit (about 14 significant)."""
    return pydicom.valuerep.DSfloat(float(value), auto_format=True)


def _geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row cosine, column cosine, spacing (col, row, slice), LPS origin, slice step a2) of a RAS affine.

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
    return row, col, spacing, lps[:3, 3], a2


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


def _base_dataset(
    *,
    modality: str,
    study_uid: str,
    series_uid: str | None,
    for_uid: str,
    patient_id: str,
    patient_name: str,
    study_date: str,
    series_number: int,
    series_description: str,
) -> Dataset:
    """The tags every slice of the series shares (patient, study, series, equipment, frame of reference)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = _SOP_CLASS[modality]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "medseg synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "synthetic abdomen"
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    if series_uid is not None:
        ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if modality == "CT":
        ds.KVP = 120
        ds.ConvolutionKernel = "STANDARD"
    return ds


def _slice_dataset(
    base: Dataset,
    pixels: np.ndarray,
    *,
    sop_uid: str,
    instance_number: int,
    row: np.ndarray,
    col: np.ndarray,
    position: np.ndarray,
    pixel_spacing: tuple[float, float],
    thickness: float,
    intercept: int,
    bits: int,
    rescale: bool,
) -> Dataset:
    """One image: ``pixels`` is (Rows, Columns), already in stored values."""
    ds = Dataset()
    ds.update(base)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in (*row, *col)]
    ds.SliceLocation = _ds(position @ np.cross(row, col))
    ds.SliceThickness = _ds(thickness)
    ds.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = int(pixels.dtype == np.int16)
    if rescale:
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
    descending: bool = False,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_id: str = "PHANTOM001",
    patient_name: str = "Phantom^Synthetic",
    study_date: str = "20240101",
    series_number: int = 1,
    series_description: str = "synthetic CT",
    modality: str = "CT",
    rescale_intercept: int | None = None,
    signed: bool = False,
    transfer_syntax: str = "explicit",
    file_prefix: str = "",
    shuffle_names: bool = False,
    backwards_instance_numbers: bool = False,
    slice_thickness: float | None = None,
    drop_slices: Sequence[int] = (),
    duplicate_slices: Sequence[int] = (),
    conflicting_duplicates: Sequence[int] = (),
    slice_offsets_mm: Mapping[int, float] | None = None,
    gantry_tilt_deg: float = 0.0,
    localizer: str | None = None,
    omit_series_uid: bool = False,
    varying_intercept: bool = False,
) -> WrittenSeries:
    """Write ``volume_hu`` (x, y, z integer HU) as one single-frame DICOM image per slice ``k``.

    The clean series reproduces the NIfTI exactly: the same voxels and, through the tags, the same world
    coordinates (see the module docstring). The keyword options break it the way real exports break:

    Args:
        volume_hu: 3D integer array indexed (i, j, k); slice k becomes one file.
        affine: voxel → RAS+ mm (NIfTI convention); must not be sheared.
        folder: created if needed; several calls may share one folder (use ``file_prefix``).
        descending: acquisition order from the last slice (k = nz-1) to the first: InstanceNumber 1 and
            the first file name belong to k = nz-1 (head-first CT stored top to bottom).
        series_uid, study_uid, frame_of_reference_uid: fixed UIDs; new random ones by default.
        modality: ``"CT"`` (CT Image Storage, HU rescale) or ``"MR"`` (MR Image Storage, no rescale).
        rescale_intercept: RescaleIntercept; default −1024, or the volume minimum when that is lower.
        signed: store int16 (PixelRepresentation 1) instead of uint16.
        transfer_syntax: one of :data:`TRANSFER_SYNTAXES` (``explicit``, ``implicit``, ``deflated``,
            ``rle``, ``jpegls``).
        file_prefix: prefix of every file name written by this call.
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
        varying_intercept: odd slices use a RescaleIntercept 24 lower (stored values 24 higher), so
            HU are right only when the rescale is applied per slice.

    Returns:
        The written files and the UIDs (:class:`WrittenSeries`).
    """
    volume_hu = np.asarray(volume_hu)
    if volume_hu.ndim != 3 or not np.issubdtype(volume_hu.dtype, np.integer):
        raise ValueError(f"volume_hu must be a 3D integer array, got {volume_hu.ndim}D {volume_hu.dtype}")
    if modality not in _SOP_CLASS:
        raise ValueError(f"modality must be one of {sorted(_SOP_CLASS)}, got {modality!r}")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(
            f"transfer_syntax must be one of {sorted(TRANSFER_SYNTAXES)}, got {transfer_syntax!r}"
        )
    if localizer not in (None, "typed", "untyped"):
        raise ValueError(f"localizer must be None, 'typed' or 'untyped', got {localizer!r}")
    row, col, spacing, origin, step = _geometry(affine)
    normal = np.cross(row, col)
    is_ct = modality == "CT"
    stored, intercept, bits = _stored(volume_hu, rescale_intercept if is_ct else 0, signed or not is_ct)
    if varying_intercept:  # odd slices store HU - (intercept - 24): 24 more, so BitsStored 16 leaves room
        if int(stored.max()) + 24 > np.iinfo(stored.dtype).max:
            raise ValueError("varying_intercept: stored values would overflow")
        bits = 16

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    base = _base_dataset(
        modality=modality,
        study_uid=study_uid,
        series_uid=None if omit_series_uid else series_uid,
        for_uid=for_uid,
        patient_id=patient_id,
        patient_name=patient_name,
        study_date=study_date,
        series_number=series_number,
        series_description=series_description,
    )
    if gantry_tilt_deg:
        base.GantryDetectorTilt = _ds(gantry_tilt_deg)
    nz = volume_hu.shape[2]
    order = list(range(nz))[::-1] if descending else list(range(nz))
    acquisition = {k: n for n, k in enumerate(order)}  # k → 0-based acquisition index
    offsets = dict(slice_offsets_mm or {})
    tilt_shift = spacing[2] * np.tan(np.deg2rad(gantry_tilt_deg)) * col
    thickness = spacing[2] if slice_thickness is None else slice_thickness
    pixel_spacing = (float(spacing[1]), float(spacing[0]))

    def name(sop_uid: str, index: int, tag: str = "") -> Path:
        if shuffle_names:
            stem = hashlib.sha1(f"{sop_uid}{tag}".encode()).hexdigest()[:12]
            return folder / f"{file_prefix}IM_{stem}.dcm"
        return folder / f"{file_prefix}{index:04d}{tag}.dcm"

    files: list[Path | None] = [None] * nz
    sops: list[str | None] = [None] * nz
    extra: list[Path] = []
    for k in range(nz):
        if k in drop_slices:
            continue
        n = acquisition[k]
        sop = generate_uid(entropy_srcs=[series_uid, str(k)])
        pixels = stored[:, :, k].T
        slice_intercept = intercept
        if varying_intercept and k % 2 == 1:
            slice_intercept = intercept - 24
            pixels = pixels + np.asarray(24, dtype=pixels.dtype)
        position = origin + k * step + offsets.get(k, 0.0) * normal + k * tilt_shift
        ds = _slice_dataset(
            base,
            pixels,
            sop_uid=sop,
            instance_number=(nz - n) if backwards_instance_numbers else n + 1,
            row=row,
            col=col,
            position=position,
            pixel_spacing=pixel_spacing,
            thickness=thickness,
            intercept=slice_intercept,
            bits=bits,
            rescale=is_ct,
        )
        files[k] = _save(ds, name(sop, n + 1), transfer_syntax)
        sops[k] = sop
        if k in duplicate_slices:
            extra.append(_save(ds, name(sop, n + 1, "_copy"), transfer_syntax))
        if k in conflicting_duplicates:
            other = copy.deepcopy(ds)
            other.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(k), "conflict"])
            top = 2**bits - 1 if pixels.dtype == np.uint16 else 2 ** (bits - 1) - 1
            brighter = np.minimum(pixels.astype(np.int32) + 100, top)
            other.PixelData = np.ascontiguousarray(brighter.astype(pixels.dtype)).tobytes()
            extra.append(_save(other, name(other.SOPInstanceUID, n + 1, "_other"), transfer_syntax))
    if localizer is not None:
        scout = _localizer(
            base, stored, origin, row * spacing[0], col * spacing[1], step, intercept, bits, localizer
        )
        extra.append(_save(scout, name(scout.SOPInstanceUID, 0, "_scout"), transfer_syntax))
    return WrittenSeries(files, extra, study_uid, series_uid, for_uid, sops)


def _localizer(
    base: Dataset,
    stored: np.ndarray,
    origin: np.ndarray,
    a0: np.ndarray,
    a1: np.ndarray,
    step: np.ndarray,
    intercept: int,
    bits: int,
    kind: str,
) -> Dataset:
    """A coronal-like scout through the middle of the volume (the (i, k) plane), in the same series: its
    rows run from the last slice to the first, so its orientation differs from the axial images'."""
    ny, nz = stored.shape[1], stored.shape[2]
    pixels = stored[:, ny // 2, :].T[::-1]
    thickness = float(np.linalg.norm(step))
    ds = _slice_dataset(
        base,
        pixels,
        sop_uid=generate_uid(entropy_srcs=[str(base.get("SeriesInstanceUID", "")), "localizer"]),
        instance_number=nz + 1,
        row=a0 / np.linalg.norm(a0),
        col=-step / thickness,
        position=origin + (ny // 2) * a1 + (nz - 1) * step,
        pixel_spacing=(thickness, float(np.linalg.norm(a0))),
        thickness=float(np.linalg.norm(a1)),
        intercept=intercept,
        bits=bits,
        rescale=True,
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER" if kind == "typed" else "AXIAL"]
    return ds
