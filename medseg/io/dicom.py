"""DICOM CT series in: find the series in a folder tree, check them, read each as a NIfTI image in HU.

Nothing is taken from file names, InstanceNumber or file order. :func:`find_series` reads headers only
(pydicom, ``stop_before_pixels``), groups, orders and checks; :func:`read_series` reads the pixels with
SimpleITK's ``ImageSeriesReader`` from that file list and returns a ``nib.Nifti1Image`` (so the rest of
medseg uses it unchanged) with what a DICOM SEG export needs later (ordered files, SOP Instance UIDs,
study / series / frame-of-reference UIDs, patient and study identifiers).

Rules, each either handled as stated or refused with one :class:`InputError` line
``<folder> (series <case>): <cause>``, never a silently distorted volume:

* **Grouping** by SeriesInstanceUID; files without one are grouped by (folder, StudyInstanceUID,
  SeriesNumber, FrameOfReferenceUID) with a note (a wrong merge still meets every check below).
* **Files** pydicom cannot parse (README, ``.DS_Store``) and DICOM files without an image (DICOMDIR, SR)
  are ignored; a file with the DICOM preamble and a broken header is named in a note of its folder's series.
* **Modality**: CT only by default (``modalities``); other series come back with ``skipped`` set.
* **Localizers**: images with LOCALIZER in ImageType, and up to :data:`MAX_STRAY_IMAGES` images in an
  orientation other than the series' majority, are dropped with a note; more → refused (mixed
  orientation). A series of localizers only is skipped.
* **Order**: ascending position along the slice normal (row cosine × column cosine · ImagePositionPatient).
* **Duplicates** (two files within :data:`DUPLICATE_TOL_MM` along the normal): same pixel data and rescale
  → the extra files are dropped with a note; different pixel data → refused.
* **Spacing**: every step between neighbouring slices, and every slice's offset from the uniform grid
  between the first and last slice, must be within ``max(1 % of the median step, 0.02 mm)``; otherwise
  refused, naming the observed steps (a missing slice shows as a step twice the others). Not resampled.
* **Gantry tilt** (positions drifting in-plane by more than that tolerance) → refused with the angle: a
  regular grid would shear the volume (dcm2niix can resample tilted series first).
* **Refused** too: fewer than 2 slices; differing Rows/Columns/PixelSpacing; missing geometry tags.
* **Pixel module**, from the headers before any pixel is read (:mod:`medseg.io.dicom_pixels`; the first
  failing file is named): MONOCHROME2/MONOCHROME1 with 1 sample per pixel, BitsAllocated 8/16/32, BitsStored
  ≤ BitsAllocated, HighBit = BitsStored − 1, PixelRepresentation 0/1, Rows/Columns 1–8192, finite non-zero
  RescaleSlope, finite RescaleIntercept, pixel data of the declared byte count (compressed: not implausibly
  small), at most 2^30 declared voxels per series. MONOCHROME1 is read via copies relabelled MONOCHROME2.
* **SliceThickness ≠ spacing between positions** → a note; the voxel spacing comes from the positions.
* **Rescale** slope/intercept applied per slice (by GDCM): int16 when all are integral and the values fit.
* **Transfer syntaxes**: what SimpleITK 2.5's GDCM decodes (explicit/implicit/big-endian/deflated, RLE,
  JPEG-LS, JPEG 2000, JPEG); a file it cannot decode is refused, named. Multi-frame images are refused.

Case names are ``PatientID_StudyDate_SeriesNumber`` with every character outside ``[A-Za-z0-9._-]``
replaced by ``_``, no leading dots, ``unknown`` for a missing part; names that two series of one search
would share get ``_`` and the first 8 hex digits of the SHA-1 of the SeriesInstanceUID appended.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk

from medseg.io import dicom_pixels
from medseg.io.nifti import InputError

ORIENTATION_TOL = 1e-4  #: largest difference of direction cosines within one orientation
DUPLICATE_TOL_MM = 0.01  #: slices closer than this along the normal are at one position
#: Spacing and in-plane drift tolerance: max(SPACING_REL_TOL × median step, SPACING_ABS_TOL_MM).
SPACING_REL_TOL = 0.01
SPACING_ABS_TOL_MM = 0.02
#: At most this many images in another orientation are dropped as scouts; more means mixed orientation.
MAX_STRAY_IMAGES = 3
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series as found on disk: its files in slice order, identifiers, and what was done to it.

    ``files`` and ``sop_instance_uids`` run along the slice normal (ascending), i.e. the volume's third
    axis; ``positions`` are the ImagePositionPatient (LPS mm) of those files. ``skipped`` (a policy: not a
    CT, only localizers) and ``error`` (a broken series) are one-line reasons, ``None`` when the series is
    usable; ``notes`` record what was dropped or tolerated.
    """

    case: str
    folder: Path
    files: tuple[Path, ...]
    modality: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]
    patient_id: str
    study_date: str
    series_number: int | None
    series_description: str = ""
    positions: tuple[tuple[float, float, float], ...] = ()
    orientation: tuple[float, ...] = ()
    pixel_spacing: tuple[float, float] = (0.0, 0.0)
    slice_spacing: float | None = None
    notes: tuple[str, ...] = ()
    skipped: str | None = None
    error: str | None = None
    rescale: tuple[tuple[float, float], ...] = field(default=(), repr=False)
    bits: tuple[int, int] = field(default=(16, 0), repr=False)
    monochrome1: tuple[Path, ...] = field(default=(), repr=False)  # read through MONOCHROME2 copies

    @property
    def usable(self) -> bool:
        """Neither skipped nor refused: :func:`read_series` will read it."""
        return self.skipped is None and self.error is None

    @property
    def where(self) -> str:
        """``<folder> (series <case>)``, the prefix of every message about this series."""
        return f"{self.folder} (series {self.case})"


@dataclass(frozen=True)
class DicomVolume:
    """A series read as a volume: ``image`` (int16 or float32 HU, RAS affine, axes i=columns, j=rows,
    k=slices along the normal) and the :class:`SeriesInfo` with its file list and UIDs."""

    image: nib.Nifti1Image
    series: SeriesInfo


@dataclass
class _Header:
    """The tags of one image file that grouping, ordering and checking need."""

    path: Path
    ds: pydicom.Dataset
    extent: dicom_pixels.PixelExtent | None = None

    def get(self, keyword: str, default=None):
        value = self.ds.get(keyword, default)
        return default if value is None or value == "" else value

    def floats(self, keyword: str, n: int) -> np.ndarray | None:
        value = self.get(keyword)
        try:
            out = np.asarray([float(v) for v in value], dtype=np.float64)
        except (TypeError, ValueError):
            return None
        return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def _read_header(path: Path) -> _Header | str | None:
    """The header of an image file; ``None`` for a non-DICOM or non-image file; a cause when a file with
    the DICOM preamble cannot be parsed (:func:`medseg.io.dicom_pixels.read_image_header`)."""
    found = dicom_pixels.read_image_header(path)
    return _Header(path, *found) if isinstance(found, tuple) else found


def _safe(part: str) -> str:
    part = re.sub(r"[^A-Za-z0-9._-]", "_", part.strip()).lstrip(".")[:64]
    return part or "unknown"


def series_case_name(patient_id: str, study_date: str, series_number: int | None) -> str:
    """``PatientID_StudyDate_SeriesNumber``, filesystem-safe (only ``[A-Za-z0-9._-]``, no leading dot)."""
    number = "unknown" if series_number is None else str(series_number)
    return "_".join(_safe(p) for p in (patient_id, study_date, number))


def _fmt(values) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def _image_type(h: _Header) -> list[str]:
    value = h.get("ImageType") or []
    return [_text(v).upper() for v in ([value] if isinstance(value, str) else value)]


class _Refused(Exception):
    """A series cannot be read as a volume; the message is the cause (one line)."""


def _drop_strays(headers: list[_Header], notes: list[str]) -> list[_Header]:
    """Drop localizers (ImageType LOCALIZER) and a few images in a minority orientation."""
    scouts = [h for h in headers if "LOCALIZER" in _image_type(h)]
    if scouts:
        names = ", ".join(h.path.name for h in scouts)
        notes.append(f"dropped {len(scouts)} localizer image(s) (ImageType LOCALIZER): {names}")
    headers = [h for h in headers if h not in scouts]
    for keyword, n in (("ImageOrientationPatient", 6), ("ImagePositionPatient", 3), ("PixelSpacing", 2)):
        missing = [h.path.name for h in headers if h.floats(keyword, n) is None]
        if missing:
            raise _Refused(f"{len(missing)} image(s) without a usable {keyword} (e.g. {missing[0]})")
    clusters: list[tuple[np.ndarray, list[_Header]]] = []
    for h in headers:
        iop = h.floats("ImageOrientationPatient", 6)
        for ref, members in clusters:
            if np.max(np.abs(ref - iop)) <= ORIENTATION_TOL:
                members.append(h)
                break
        else:
            clusters.append((iop, [h]))
    if len(clusters) <= 1:
        return headers
    clusters.sort(key=lambda c: -len(c[1]))
    strays = [h for _, members in clusters[1:] for h in members]
    if len(strays) > MAX_STRAY_IMAGES or len(strays) >= len(clusters[0][1]):
        counts = " and ".join(f"{len(m)} with ({_fmt(ref)})" for ref, m in clusters[:3])
        raise _Refused(f"mixed orientation within the series: {counts} (ImageOrientationPatient)")
    names = ", ".join(h.path.name for h in strays)
    notes.append(
        f"dropped {len(strays)} image(s) whose orientation differs from the other {len(clusters[0][1])} "
        f"(scout/localizer): {names}"
    )
    return clusters[0][1]


def _pixel_key(h: _Header) -> tuple:
    """What makes two files at one position the same image: the pixel bytes and the rescale."""
    ds = pydicom.dcmread(h.path)
    rescale = (str(ds.get("RescaleSlope", 1)), str(ds.get("RescaleIntercept", 0)))
    return bytes(ds.PixelData), rescale, ds.Rows, ds.Columns, str(ds.file_meta.TransferSyntaxUID)


def _drop_duplicates(headers: list[_Header], dist: dict[int, float], notes: list[str]) -> list[_Header]:
    """Keep one file per position (headers sorted along the normal); refuse differing duplicates."""
    kept: list[_Header] = []
    dropped: list[str] = []
    for h in headers:
        if kept and dist[id(h)] - dist[id(kept[-1])] < DUPLICATE_TOL_MM:
            if _pixel_key(h) != _pixel_key(kept[-1]):
                raise _Refused(
                    f"2 files at slice position {dist[id(h)]:.3f} mm along the normal with different pixel "
                    f"data ({kept[-1].path.name}, {h.path.name}); conflicting duplicates (a dynamic or "
                    "multi-phase series?) are not read"
                )
            dropped.append(h.path.name)
        else:
            kept.append(h)
    if dropped:
        notes.append(
            f"dropped {len(dropped)} duplicate file(s) (same position and pixel data as a kept file): "
            + ", ".join(dropped)
        )
    return kept


def _order_and_check(headers: list[_Header], notes: list[str]) -> tuple[list[_Header], dict]:
    """Sort along the normal, resolve duplicates, check slice count, tilt and spacing.

    Returns the kept headers in order and the geometry fields of :class:`SeriesInfo`.

    Raises:
        _Refused: with the cause.
    """
    iop = headers[0].floats("ImageOrientationPatient", 6)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    if abs(np.linalg.norm(normal) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise _Refused(f"ImageOrientationPatient ({_fmt(iop)}) is not two orthogonal unit vectors")
    normal = normal / np.linalg.norm(normal)
    sizes = {f"{h.get('Rows')}×{h.get('Columns')} at {_fmt(h.floats('PixelSpacing', 2))} mm" for h in headers}
    if len(sizes) > 1:
        raise _Refused(f"images of different size or pixel spacing in one series: {'; '.join(sorted(sizes))}")
    dist = {id(h): float(h.floats("ImagePositionPatient", 3) @ normal) for h in headers}
    kept = _drop_duplicates(sorted(headers, key=lambda h: (dist[id(h)], str(h.path))), dist, notes)
    n = len(kept)
    if n < 2:
        raise _Refused(f"{n} slice; a 3D series needs at least 2")

    pos = np.array([h.floats("ImagePositionPatient", 3) for h in kept])
    d = pos @ normal
    steps = np.diff(d)
    step = float(np.median(steps))
    tol = max(SPACING_REL_TOL * step, SPACING_ABS_TOL_MM)
    rel = pos - pos[0]
    drift = np.linalg.norm(rel - np.outer(rel @ normal, normal), axis=1)
    if drift.max() > tol:
        k = int(np.argmax(drift))
        angle = np.degrees(np.arctan2(drift[k], d[k] - d[0]))
        raise _Refused(
            f"gantry tilt: slice positions run {angle:.2f}° off the slice normal ({drift[k]:.2f} mm in-plane "
            f"drift over {d[k] - d[0]:.1f} mm); a regular grid would shear the volume — resample the series "
            "to an orthogonal grid first (e.g. dcm2niix corrects gantry tilt)"
        )
    grid = d[0] + np.arange(n) * (d[-1] - d[0]) / (n - 1)
    if np.abs(steps - step).max() > tol or np.abs(d - grid).max() > tol:
        listing = ", ".join(f"{s:g} mm ×{c}" for s, c in sorted(Counter(np.round(steps, 3).tolist()).items()))
        k = int(np.argmax(np.abs(steps - step)))
        ratio = steps[k] / step
        missing = ratio > 1.5 and abs(ratio - round(ratio)) * step <= tol
        raise _Refused(
            f"{'missing slice(s)' if missing else 'unequal spacing between slices'}: steps between slice "
            f"positions {listing} (largest deviation between {d[k]:.2f} and {d[k + 1]:.2f} mm along the "
            f"normal; tolerance {tol:.3g} mm)"
        )
    spacing = float((d[-1] - d[0]) / (n - 1))
    thickness = {round(float(t), 4) for h in kept if (t := h.get("SliceThickness")) is not None}
    if thickness and any(abs(t - spacing) > tol for t in thickness):
        notes.append(
            f"SliceThickness {_fmt(sorted(thickness))} mm differs from the spacing between slice positions "
            f"{spacing:.4g} mm; voxel spacing is taken from the positions"
        )
    return kept, {
        "positions": tuple(tuple(float(v) for v in p) for p in pos),
        "orientation": tuple(float(v) for v in iop),
        "pixel_spacing": tuple(float(v) for v in kept[0].floats("PixelSpacing", 2)),
        "slice_spacing": spacing,
        "rescale": tuple(
            sorted({(float(h.get("RescaleSlope", 1)), float(h.get("RescaleIntercept", 0))) for h in kept})
        ),
        "bits": (
            max(int(h.get("BitsStored", 16)) for h in kept),
            max(int(h.get("PixelRepresentation", 0)) for h in kept),
        ),
        "monochrome1": tuple(h.path for h in kept if dicom_pixels.is_monochrome1(h.ds)),
    }


def _group_key(h: _Header) -> tuple:
    if uid := _text(h.get("SeriesInstanceUID")):
        return ("uid", uid)
    keys = ("StudyInstanceUID", "SeriesNumber", "FrameOfReferenceUID")
    return ("nouid", str(h.path.parent), *(_text(h.get(k)) for k in keys))


def _series(members: list[_Header], key: tuple, modalities: tuple[str, ...], broken: list[str]) -> SeriesInfo:
    """Build one :class:`SeriesInfo`: modality policy, strays, order and checks (no collision suffix yet)."""
    notes = []
    if key[0] == "nouid":
        notes.append(
            "no SeriesInstanceUID; grouped by (folder, StudyInstanceUID, SeriesNumber, FrameOfReferenceUID)"
        )
    if broken:
        notes.append(f"{len(broken)} unreadable DICOM file(s) in this folder: {'; '.join(broken[:3])}")
    first = members[0]
    number = first.get("SeriesNumber")
    number = int(number) if isinstance(number, int) or _text(number).isdigit() else None
    found = Counter(_text(h.get("Modality")).upper() or "unknown" for h in members)
    modality = found.most_common(1)[0][0]
    skipped = error = None
    ordered, geometry = sorted(members, key=lambda h: str(h.path)), {}
    try:
        frames = max(int(h.get("NumberOfFrames", 1)) for h in members)
        if len(found) > 1:
            raise _Refused(f"mixed modalities in one series: {dict(found)}")
        if modality not in modalities:
            skipped = f"modality {modality}; only {', '.join(modalities)} series are read"
        elif frames > 1:
            raise _Refused(
                f"multi-frame (enhanced) image with {frames} frames; only single-frame series are read"
            )
        elif kept := _drop_strays(members, notes):
            if cause := dicom_pixels.check_series([(h.path, h.ds, h.extent) for h in kept]):
                raise _Refused(cause)
            ordered, geometry = _order_and_check(kept, notes)
        else:
            skipped = f"localizer/scout images only ({len(members)}), not a 3D volume"
    except _Refused as exc:
        error = str(exc)
    except (TypeError, ValueError) as exc:
        error = f"a tag holds an unusable value ({' '.join(str(exc).split())[:120]})"
    return SeriesInfo(
        case=series_case_name(_text(first.get("PatientID")), _text(first.get("StudyDate")), number),
        folder=Path(os.path.commonpath([str(h.path.parent) for h in members])),
        files=tuple(h.path for h in ordered),
        modality=modality,
        study_uid=_text(first.get("StudyInstanceUID")),
        series_uid=key[1] if key[0] == "uid" else "",
        frame_of_reference_uid=_text(first.get("FrameOfReferenceUID")),
        sop_instance_uids=tuple(_text(h.get("SOPInstanceUID")) for h in ordered),
        patient_id=_text(first.get("PatientID")),
        study_date=_text(first.get("StudyDate")),
        series_number=number,
        series_description=_text(first.get("SeriesDescription")),
        notes=tuple(notes),
        skipped=skipped,
        error=error,
        **geometry,
    )


def _uid_hash(info: SeriesInfo) -> str:
    """8 hex digits of the SHA-1 of the SeriesInstanceUID (of the SOP Instance UIDs when it is missing)."""
    return hashlib.sha1((info.series_uid or "|".join(info.sop_instance_uids)).encode()).hexdigest()[:8]


def find_series(root: str | os.PathLike, *, modalities: tuple[str, ...] = ("CT",)) -> list[SeriesInfo]:
    """Every DICOM image series under ``root`` (a folder tree or one file), checked but not read.

    Series of other modalities, and broken ones, are returned too, with ``skipped`` or ``error`` set, so a
    batch can list them; :func:`read_series` refuses them with that reason. Sorted by case name.

    Raises:
        InputError: ``root`` does not exist.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: not found")
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    groups: dict[tuple, list[_Header]] = defaultdict(list)
    broken: dict[Path, list[str]] = defaultdict(list)
    for path in paths:
        header = _read_header(path)
        if isinstance(header, str):
            broken[path.parent].append(header)
        elif header is not None:
            groups[_group_key(header)].append(header)
    found = []
    for key, members in groups.items():
        near = sorted({h.path.parent for h in members})
        found.append(_series(members, key, modalities, [b for p in near for b in broken.get(p, [])]))
    names = Counter(s.case for s in found)
    found = [replace(s, case=f"{s.case}_{_uid_hash(s)}") if names[s.case] > 1 else s for s in found]
    return sorted(found, key=lambda s: (s.case, str(s.folder)))


def _pixel_type(info: SeriesInfo) -> int:
    """int16 when every slope and intercept is integral and the stored range maps into int16; int32 when
    integral but possibly wider (narrowed to int16 after reading when the values fit); else float32."""
    if not all(float(s).is_integer() and float(b).is_integer() for s, b in info.rescale):
        return sitk.sitkFloat32
    bits, signed = info.bits
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    ends = [s * v + b for s, b in info.rescale for v in (lo, hi)]
    return sitk.sitkInt16 if min(ends) >= -32768 and max(ends) <= 32767 else sitk.sitkInt32


def _culprit(info: SeriesInfo, exc: RuntimeError) -> str:
    """``<file>: <ITK's reason>`` for the first file SimpleITK cannot read alone (called after a failure)."""
    name = ""
    for path in info.files:
        try:
            sitk.ReadImage(str(path), imageIO="GDCMImageIO")
        except RuntimeError as one:
            exc, name = one, f"{path.name}: "
            break
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or ["unknown error"]
    return name + re.sub(r"^ITK ERROR: \w+\(0x[0-9a-f]+\): ", "", lines[-1])[:160]


def read_series(info: SeriesInfo) -> DicomVolume:
    """Read a series found by :func:`find_series` as a RAS NIfTI image in HU, in ``info.files`` order.

    The affine comes from SimpleITK's LPS geometry: ``diag(-1, -1, 1, 1) @ [D·diag(spacing) | origin]``;
    ``sitk.GetArrayFromImage`` is (z, y, x) and is transposed to (x, y, z) (no copy: it becomes a
    Fortran-ordered view). SimpleITK's geometry is checked against the headers' before it is trusted.

    Raises:
        InputError: the series was skipped or refused, or SimpleITK cannot read or decode it.
    """
    if info.skipped:
        raise InputError(f"{info.where}: skipped: {info.skipped}")
    if info.error:
        raise InputError(f"{info.where}: {info.error}")
    reader = sitk.ImageSeriesReader()
    pixel_type = _pixel_type(info)
    reader.SetOutputPixelType(pixel_type)
    reader.SetSpacingWarningRelThreshold(max(SPACING_REL_TOL, SPACING_ABS_TOL_MM / info.slice_spacing) * 2)
    try:
        with dicom_pixels.monochrome2_copies(info.files, info.monochrome1) as files:
            reader.SetFileNames([str(p) for p in files])
            img = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{info.where}: SimpleITK cannot read the series ({_culprit(info, exc)})") from None
    except OSError as exc:  # a MONOCHROME2 copy could not be written
        raise InputError(f"{info.where}: cannot copy MONOCHROME1 images to relabel them ({exc})") from None
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    row, col = np.asarray(info.orientation[:3]), np.asarray(info.orientation[3:])
    expected = np.array([info.pixel_spacing[1], info.pixel_spacing[0], info.slice_spacing])
    if (
        img.GetDimension() != 3
        or img.GetNumberOfComponentsPerPixel() != 1
        or img.GetSize()[2] != len(info.files)
        or np.abs(direction - np.column_stack([row, col, np.cross(row, col)])).max() > 10 * ORIENTATION_TOL
        or np.abs(spacing - expected).max() > 1e-3
        or np.abs(origin - np.asarray(info.positions[0])).max() > 1e-3
    ):
        raise InputError(
            f"{info.where}: SimpleITK's geometry (size {img.GetSize()}, origin {_fmt(origin)}, spacing "
            f"{_fmt(spacing)}) disagrees with the DICOM headers; not read"
        )
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = origin
    affine = RAS_FROM_LPS @ lps
    data = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    del img
    if pixel_type == sitk.sitkInt32 and data.size and data.min() >= -32768 and data.max() <= 32767:
        data = data.astype(np.int16, order="F")
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return DicomVolume(image, info)
