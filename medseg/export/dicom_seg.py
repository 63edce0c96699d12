"""DICOM SEG out: a label map on the grid of a DICOM series → one Segmentation instance that references it.

Built with highdicom (``hd.seg.Segmentation``; Bridge et al. 2022, *Highdicom: a Python library for
standardized encoding of image annotations and machine learning model outputs in pathology and radiology*,
J Digit Imaging 35:1719) from the *source images' headers*, so the SEG shares their Frame of Reference,
copies the Patient and General Study modules, and each frame references its source image by SOP Instance
UID (PS3.3 C.8.20 Segmentation IOD; C.7.6.16.2.6 Derivation Image Functional Group). One segment per non-empty label, coded with :mod:`medseg.export.codes`
(category, type, laterality modifier, recommended CIELab colour), algorithm type AUTOMATIC with the
algorithm identification of PS3.3 C.8.20.2 (family DCM 123110 "Artificial Intelligence", CID 7162).

Axis mapping. :func:`medseg.io.dicom.read_series` returns the volume indexed (i, j, k) = (column, row,
slice in ``SeriesInfo.files`` order), so source image ``k`` is ``labels[:, :, k].T`` —
``pixel_array[r, c] == labels[c, r, k]`` (verified in the tests against the CT voxels and pydicom).

Types. ``BINARY`` (1 bit per pixel, one frame per segment and slice; Segmentation Storage, read by every
viewer) is the default; ``LABELMAP`` (Label Map Segmentation Storage, DICOM Supplement 243, 2024; one 8/16-bit
frame per slice, far smaller for many labels) only where the viewer reads that new SOP class.

Guarantees of :func:`write_dicom_seg`:

* empty labels are not written (OHIF waits forever on an empty segment) and are listed in the report; a map
  with no labelled voxel writes no file and says so;
* missing Study/Series/Frame of Reference UIDs and Type 2 patient/study attributes of anonymised sources are
  filled *in the copies given to highdicom* (UIDs generated deterministically from the source SOP Instance
  UIDs, so repeated exports agree), each named in the report's warnings; source SOP Instance UIDs are never
  invented — a series without them cannot be referenced and is refused;
* the SEG's Series and SOP Instance UIDs are derived from the SEG type, the source series and its SOP
  Instance UIDs and the checkpoint's SHA-256 (:mod:`medseg.export.uids`): the same series segmented by the
  same model writes the same UIDs, so a re-sent SEG replaces the earlier one in a PACS;
* **round trip on every write**: the written file is read back (``hd.seg.segread``), every frame is placed
  on the label grid through its own Plane Position / Orientation / Pixel Measures (patient coordinates, not
  frame order) and compared voxel for voxel with the label map, and its referenced SOP Instance UID must be
  the source image at that position. Any difference is :class:`SegRoundTripError` and no file is left.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from medseg import __version__
from medseg.export.codes import (
    SegmentCode,
    algorithm_identification,
    long_string,
    lookup,
    segment_descriptions,
)
from medseg.export.seg_check import GRID_TOL_VOXELS, RoundTrip, SegRoundTripError, check_seg_round_trip
from medseg.export.uids import DerivedUids, derived_uids
from medseg.io.atomic import atomic_path
from medseg.io.dicom import RAS_FROM_LPS, DicomVolume, SeriesInfo
from medseg.io.nifti import InputError

SEGMENTATION_TYPES = ("BINARY", "LABELMAP")
#: UIDs a SEG needs from its source (General Study, General Series, Frame of Reference modules; Type 1).
SOURCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
#: ContentCreatorName (0070,0084), Type 2: the algorithm as a person name (family name component); the
#: algorithm itself is identified in each segment's Algorithm Identification.
CONTENT_CREATOR = "medseg^automatic"
#: Patient and study attributes copied into the SEG (PS3.3 C.7.1.1, C.7.2.1; Type 2: present, may be empty).
PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "AccessionNumber", "ReferringPhysicianName", "StudyID",
)  # fmt: skip


@dataclass(frozen=True)
class SegReport:
    """Result of :func:`write_dicom_seg`.

    ``path`` is None when nothing was written (no labelled voxel). ``segments``: label name → segment
    number written; ``omitted``: empty labels not written; ``filled``: attribute → value filled into the
    source copies (record it in the case's sidecar); ``warnings``: one line each for humans.
    """

    path: Path | None
    segmentation_type: str
    segments: dict[str, int]
    omitted: tuple[str, ...]
    filled: dict[str, str]
    warnings: tuple[str, ...]
    round_trip: RoundTrip | None = None
    frames: int = 0
    size_bytes: int = 0
    sop_instance_uid: str = ""
    series_instance_uid: str = ""
    codes: dict[str, SegmentCode] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class SegOptions:
    """What a DICOM SEG says besides its segments: its SOP class, the series it starts and who made it.

    Attributes:
        segmentation_type: ``"BINARY"`` (Segmentation Storage, read by every viewer) or ``"LABELMAP"``
            (Label Map Segmentation Storage; module docstring).
        series_number: the SEG series' number; default 1000 + the source series' number.
        series_description: the SEG series' description.
        algorithm_name: the algorithm identification's name (PS3.3 C.8.20.2).
        algorithm_version: its version; default the running medseg's version.
        checkpoint_name, checkpoint_sha256: the weights, recorded in the algorithm identification.
        extra_codes: codes for project-specific label names (see :func:`medseg.export.codes.lookup`).
    """

    segmentation_type: str = "BINARY"
    series_number: int | None = None
    series_description: str = "medseg segmentation"
    algorithm_name: str = "medseg"
    algorithm_version: str | None = None
    checkpoint_name: str | None = None
    checkpoint_sha256: str | None = None
    extra_codes: Mapping[str, SegmentCode] | None = None

    def __post_init__(self) -> None:
        if self.segmentation_type not in SEGMENTATION_TYPES:
            raise ValueError(
                f"segmentation_type must be one of {SEGMENTATION_TYPES}, got {self.segmentation_type!r}"
            )


def medseg_version() -> str:
    """The running medseg's version."""
    return __version__


def series_affine(info: SeriesInfo) -> np.ndarray:
    """The RAS voxel → world affine of a series' grid from its headers alone (PS3.3 C.7.6.2.1.1):
    columns ``row cosine × column spacing``, ``column cosine × row spacing``, ``normal × slice spacing``,
    origin the first slice's ImagePositionPatient, all in LPS, then ``diag(-1, -1, 1, 1)``."""
    row, col = np.asarray(info.orientation[:3]), np.asarray(info.orientation[3:])
    normal = np.cross(row, col)
    lps = np.eye(4)
    lps[:3, 0] = row * info.pixel_spacing[1]
    lps[:3, 1] = col * info.pixel_spacing[0]
    lps[:3, 2] = normal / np.linalg.norm(normal) * info.slice_spacing
    lps[:3, 3] = info.positions[0]
    return RAS_FROM_LPS @ lps


def check_grid(labels: np.ndarray, affine: np.ndarray, info: SeriesInfo, rows: int, columns: int) -> None:
    """The label map lies on the series grid: shape (Columns, Rows, slices), and its corners are within
    :data:`GRID_TOL_VOXELS` of the series' voxels of the same index."""
    shape = tuple(labels.shape)
    n = np.array(shape, dtype=float) - 1
    corners = np.array([[a, b, c, 1.0] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])])
    to_series = np.linalg.inv(series_affine(info)) @ np.asarray(affine, dtype=np.float64)
    gap = np.abs(corners @ to_series.T - corners)[:, :3].max()
    if shape != (columns, rows, len(info.files)) or gap > GRID_TOL_VOXELS:
        raise InputError(
            f"{info.where}: label map {'×'.join(map(str, shape))} does not lie on the series grid "
            f"({columns}×{rows}×{len(info.files)}; corners {gap:.3g} voxels apart); resample it onto the "
            "series (read_series) first"
        )


def source_datasets(info: SeriesInfo) -> list[Dataset]:
    """The headers of the series' images in slice order (pixels not read), checked to be referenceable.

    Raises:
        InputError: an image without SOP Instance/Class UID, duplicate SOP Instance UIDs, or files that
            changed since :func:`~medseg.io.dicom.find_series` (other UIDs or positions).
    """
    if not info.usable:
        raise InputError(f"{info.where}: {info.error or 'skipped: ' + str(info.skipped)}")
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in info.files]
    no_uid = [p.name for p, ds in zip(info.files, sources, strict=True) if not ds.get("SOPInstanceUID")]
    if no_uid:
        raise InputError(
            f"{info.where}: {len(no_uid)} of {len(sources)} image(s) have no SOPInstanceUID (e.g. "
            f"{no_uid[0]}); a DICOM SEG references its source images by SOP Instance UID, which medseg never "
            "invents: no SEG written"
        )
    if no_class := [p.name for p, ds in zip(info.files, sources, strict=True) if not ds.get("SOPClassUID")]:
        raise InputError(f"{info.where}: {len(no_class)} image(s) without SOPClassUID (e.g. {no_class[0]})")
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    if dup := [u for u, n in Counter(uids).items() if n > 1]:
        raise InputError(
            f"{info.where}: SOPInstanceUID {dup[0]} is shared by several images; cannot reference"
        )
    moved = [
        p.name
        for p, ds, pos in zip(info.files, sources, info.positions, strict=True)
        if np.abs(np.asarray(ds.ImagePositionPatient, float) - pos).max() > 1e-3
    ]
    if tuple(uids) != tuple(info.sop_instance_uids) or moved:
        what = f"positions, e.g. {moved[0]}" if moved else "SOP Instance UIDs"
        raise InputError(f"{info.where}: the files changed since the series was read ({what}); read it again")
    return sources


def fill_required(sources: list[Dataset], where: str) -> tuple[dict[str, str], list[str]]:
    """Fill, in these copies, what the SEG must copy but an anonymised source lacks; never SOP UIDs.

    A UID missing from some images takes the value the others share; missing from all, a UID generated
    deterministically from the SOP Instance UIDs. Patient/study attributes are set empty (Type 2).
    Returns ``{attribute: value}`` and one warning line per attribute.
    """
    entropy = ["medseg", *(str(ds.SOPInstanceUID) for ds in sources)]
    filled, warnings = {}, []
    for keyword in (*SOURCE_UIDS, *PATIENT_STUDY):
        uid = keyword in SOURCE_UIDS

        def lacks(ds: Dataset, keyword: str = keyword, uid: bool = uid) -> bool:
            return keyword not in ds or (uid and not ds.get(keyword))  # Type 2: empty is a value

        values = [str(ds.get(keyword)) for ds in sources if not lacks(ds)]
        if len(values) == len(sources):
            continue
        if values:
            value, how = Counter(values).most_common(1)[0][0], "taken from the other images"
        elif uid:
            value, how = generate_uid(entropy_srcs=[*entropy, keyword]), "generated"
        else:
            value, how = "", "set empty"
        for ds in sources:
            if lacks(ds):
                setattr(ds, keyword, value)
        filled[keyword] = value
        shown = f" = {value}" if value else ""
        warnings.append(
            f"{where}: source lacks {keyword} in {len(sources) - len(values)} image(s); {how}{shown}"
        )
    return filled, warnings


def label_frames(labels: np.ndarray) -> np.ndarray:
    """(k, rows, columns) frames of an (i, j, k) = (column, row, slice) label map: ``labels[:, :, k].T``."""
    return np.ascontiguousarray(np.asarray(labels).transpose(2, 1, 0))


def build_segmentation(
    frames: np.ndarray,
    sources: Sequence[Dataset],
    descriptions: Sequence[hd.seg.SegmentDescription],
    segmentation_type: str,
    *,
    series_number: int,
    series_description: str,
    software_version: str,
    uids: DerivedUids | None = None,
) -> hd.seg.Segmentation:
    """highdicom Segmentation from (slice, rows, columns) frames of segment numbers, one per source image.

    ``uids``: the new series' and instance's UIDs; default :func:`~medseg.export.uids.derived_uids` of
    ``seg-<type>``, the sources and no checkpoint (:func:`write_dicom_seg` passes the checkpoint's SHA-256).
    """
    if uids is None:
        uids = derived_uids(
            f"seg-{segmentation_type}",
            str(sources[0].SeriesInstanceUID),
            [str(ds.SOPInstanceUID) for ds in sources],
            None,
        )
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=segmentation_type,
        segment_descriptions=descriptions,
        series_instance_uid=uids.series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer="medseg",
        manufacturer_model_name="medseg",
        software_versions=software_version,
        device_serial_number="0",
        content_label="MEDSEG",
        content_description=long_string("medseg automatic segmentation"),
        content_creator_name=CONTENT_CREATOR,
        series_description=long_string(series_description),
        omit_empty_frames=True,
    )


def label_counts(labels: np.ndarray, label_names: Mapping[str, int], where: str) -> np.ndarray:
    """Voxels per label value of a 3D integer label map, checked to hold only values ``label_names`` names."""
    if labels.ndim != 3 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise InputError(f"{where}: label map must be a 3D integer array, got {labels.ndim}D {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise InputError(f"{where}: label map holds negative values")
    counts = np.bincount(labels.ravel(), minlength=max(label_names.values(), default=0) + 1)
    unnamed = sorted(set(np.flatnonzero(counts).tolist()) - {0, *label_names.values()})
    if unnamed:
        raise InputError(f"{where}: label map holds values {unnamed[:8]} that label_names does not name")
    return counts


def write_dicom_seg(
    labels: np.ndarray,
    volume: DicomVolume | SeriesInfo,
    label_names: Mapping[str, int],
    path: str | os.PathLike,
    *,
    affine: np.ndarray | None = None,
    options: SegOptions = SegOptions(),
) -> SegReport:
    """Write ``labels`` as a DICOM SEG referencing the series it was segmented from; round trip checked.

    Args:
        labels: (i, j, k) integer label map on the grid :func:`~medseg.io.dicom.read_series` returned.
        volume: that :class:`DicomVolume`, or its :class:`SeriesInfo` together with ``affine`` (the label
            map's RAS affine, e.g. of the mask NIfTI written earlier).
        label_names: ``{name: value}``; value 0 (background) is never a segment.
        path: the ``.dcm`` file to write (atomically).
        affine: the label map's RAS affine; needed only with a :class:`SeriesInfo`.
        options: the SOP class, the new series' number and description, the algorithm identification and
            codes for project-specific names (:class:`SegOptions`).

    Returns:
        A :class:`SegReport` (``path`` None when no label holds a voxel).

    Raises:
        InputError: the label map is not on the series grid or holds unnamed values, or the source images
            cannot be referenced (no SOP Instance UIDs).
        SegRoundTripError: the written SEG does not read back equal to the label map (no file left).
    """
    info = volume.series if isinstance(volume, DicomVolume) else volume
    if affine is None:
        if not isinstance(volume, DicomVolume):
            raise ValueError("write_dicom_seg: a SeriesInfo needs the label map's affine (affine=...)")
        affine = volume.image.affine
    labels = np.asarray(labels)
    counts = label_counts(labels, label_names, info.where)
    sources = source_datasets(info)
    check_grid(labels, affine, info, int(sources[0].Rows), int(sources[0].Columns))
    named = sorted(((v, n) for n, v in label_names.items() if v != 0), key=lambda vn: vn[0])
    present = [(v, n) for v, n in named if v < len(counts) and counts[v] > 0]
    omitted = tuple(n for v, n in named if (v, n) not in present)
    code_of = {n: lookup(n, v, options.extra_codes) for v, n in named}
    warnings = [f"{info.where}: empty segment(s) not written: {', '.join(omitted)}"] if omitted else []
    if not present:
        warnings.append(f"{info.where}: no labelled voxel; no DICOM SEG written (viewers cannot show it)")
        return SegReport(None, options.segmentation_type, {}, omitted, {}, tuple(warnings), codes=code_of)

    filled, fill_warnings = fill_required(sources, info.where)
    warnings += fill_warnings
    numbers = {n: s for s, (_, n) in enumerate(present, start=1)}
    lut = np.zeros(len(counts), dtype=np.uint8 if len(present) < 256 else np.uint16)
    for v, n in present:
        lut[v] = numbers[n]
    version = options.algorithm_version or medseg_version()
    algorithm = algorithm_identification(
        options.algorithm_name, version, options.checkpoint_name, options.checkpoint_sha256
    )
    descriptions = segment_descriptions([(numbers[n], n, code_of[n]) for _, n in present], algorithm)
    series_number = options.series_number
    if series_number is None:
        series_number = 1000 + (info.series_number or 0)
    seg = build_segmentation(
        label_frames(lut[labels]),
        sources,
        descriptions,
        options.segmentation_type,
        series_number=series_number,
        series_description=options.series_description,
        software_version=version,
        uids=derived_uids(
            f"seg-{options.segmentation_type}",
            str(sources[0].SeriesInstanceUID),
            info.sop_instance_uids,
            options.checkpoint_sha256,
        ),
    )
    path = Path(path)
    segment_values = {numbers[n]: v for v, n in present}
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
        back = hd.seg.segread(tmp)
        try:
            _check_header(back, sources, {numbers[n]: n for _, n in present})
            checked = check_seg_round_trip(back, labels, affine, segment_values, info.sop_instance_uids)
        except SegRoundTripError as exc:
            raise SegRoundTripError(f"{path}: {exc}; no file written") from None
        size = tmp.stat().st_size
    return SegReport(
        path=path,
        segmentation_type=options.segmentation_type,
        segments=numbers,
        omitted=omitted,
        filled=filled,
        warnings=tuple(warnings),
        round_trip=checked,
        frames=int(back.NumberOfFrames),
        size_bytes=size,
        sop_instance_uid=str(back.SOPInstanceUID),
        series_instance_uid=str(back.SeriesInstanceUID),
        codes=code_of,
    )


def _check_header(seg: hd.seg.Segmentation, sources: Sequence[Dataset], names: Mapping[int, str]) -> None:
    """Study, Frame of Reference, referenced series and segment labels read back as written."""
    src = sources[0]
    problems = [
        f"{keyword} {seg.get(keyword)} ≠ source {src.get(keyword)}"
        for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID")
        if str(seg.get(keyword, "")) != str(src.get(keyword, ""))
    ]
    series = {str(item.SeriesInstanceUID) for item in seg.ReferencedSeriesSequence}
    images = {
        str(i.ReferencedSOPInstanceUID)
        for s in seg.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    }
    if series != {str(src.SeriesInstanceUID)} or not images <= {str(ds.SOPInstanceUID) for ds in sources}:
        problems.append(f"references series {sorted(series)} / images other than the source's")
    for number, name in names.items():
        label = seg.get_segment_description(number).segment_label
        if label != long_string(name):
            problems.append(f"segment {number} is labelled {label!r}, not {name!r}")
    if problems:
        raise SegRoundTripError("; ".join(problems))
