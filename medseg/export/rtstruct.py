"""DICOM RT Structure Set out: a label map on the grid of a DICOM series → planar contours per source slice.

RT Structure Set Storage (SOP Class 1.2.840.10008.5.1.4.1.1.481.3; PS3.3 A.19 RT Structure Set IOD), built with
pydicom (highdicom has no RTSTRUCT): Patient and General Study modules copied from the source images (and
filled like the SEG's where an anonymised source lacks them, :func:`medseg.export.dicom_seg.fill_required`),
a new RT Series (C.8.8.1), General Equipment (Manufacturer ``medseg``, SoftwareVersions), and

* **Structure Set** (C.8.8.5): StructureSetLabel, Date/Time; Referenced Frame of Reference Sequence → RT
  Referenced Study → RT Referenced Series → Contour Image Sequence listing every source image; one Structure
  Set ROI per non-empty label (ROI Name = the label name, ROI Generation Algorithm ``AUTOMATIC``, the
  algorithm and checkpoint in ROI Generation Description). ROI numbers are 1, 2, … over the non-empty labels
  in label-value order, the same numbers as the segments of the case's DICOM SEG;
* **ROI Contour** (C.8.8.6): ROI Display Color = the label's sRGB colour from :func:`medseg.export.codes.lookup`
  — the colour the SEG stores as RecommendedDisplayCIELabValue (there converted to CIELab); one
  ``CLOSED_PLANAR`` contour per boundary and source slice, whose Contour Image Sequence references that
  slice's SOP Instance;
* **RT ROI Observations** (C.8.8.8): RT ROI Interpreted Type ``ORGAN``, empty ROI Interpreter, and the
  label's SNOMED CT concept as RT ROI Identification Code.

Contours. Source image ``k`` is ``labels[:, :, k].T`` (axis mapping of :mod:`medseg.export.dicom_seg`). Each
slice of each label is zero-padded by one pixel and traced by marching squares
(``skimage.measure.find_contours`` at level 0.5; Lorensen & Cline 1987 in 2D): the boundary runs through the
midpoints between inside and outside pixel centres, so every inside centre lies strictly inside the
polygons and every outside centre strictly outside, and filling the polygons at pixel centres gives the mask
back exactly. A single-voxel island becomes a diamond of four points ½ pixel around its centre. Collinear
points are dropped (the polygon is unchanged); a contour of fewer than 3 points would be dropped (marching
squares on a padded binary slice makes none). Points are placed in patient coordinates (LPS mm, PS3.3
C.7.6.2.1.1) from *that source image's own* ImagePositionPatient, ImageOrientationPatient and PixelSpacing:
pixel (r, c) ↦ IPP + c·Δc·row cosine + r·Δr·column cosine (:func:`frame_to_patient`), written with 3
decimals (1 µm). The file is Implicit VR Little Endian, the transfer syntax every DICOM node accepts: its
32-bit value lengths hold a long contour's Contour Data, which Explicit VR's 16-bit length for DS caps at
64 KiB (about 2 500 points).

Holes and islands. Every boundary — outer boundaries of each island and the boundaries of holes — is its own
closed contour on the slice; a hole's contour lies inside its island's. DICOM allows this besides the
"keyhole" cut (PS3.3 C.8.8.6.3, Representing Inner and Outer Contours), and the readers that map contours
to voxels combine the contours of one slice by the even-odd (XOR) rule: dcmrtstruct2nii ≥ 3 (PR #37), platipy
(PR #271), SlicerRT's importer (odd/even nesting). In addition, outer boundaries wind counter-clockwise and
hole boundaries clockwise in image coordinates (``positive_orientation="high"``), so a reader that fills by
the non-zero winding rule gets the same holes. The round-trip check fills by the even-odd rule.

Why not rt-utils (1.2.7, last release 2023)? It traces with OpenCV's ``findContours``, whose polygon runs
*through* the centres of the boundary pixels: filling it at pixel centres puts every boundary pixel on the
edge (in or out depending on the filler's tie rule), a one-voxel island is a one-point contour, and holes are
kept only with its pin-hole option, which cuts a one-pixel channel into the mask. It would also add OpenCV
(~60 MB) for one call. Marching squares (scikit-image, already a dependency) has none of these problems; the
round trip measures it (docs/segmenting.md, "RT Structure Set": Dice 1.0, HD95 0 on phantoms and the real CT).
rt-utils itself was not installed or measured here.

Guarantees of :func:`write_rtstruct` (as :func:`medseg.export.dicom_seg.write_dicom_seg`): empty labels are
not written and are listed; a map without any labelled voxel writes no file; the Series and SOP Instance
UIDs are deterministic (:mod:`medseg.export.uids`, kind ``rtstruct``); and **every write is read back**: the
file is written to a temporary path, re-read with pydicom and rasterised by the independent
:func:`medseg.export.rtstruct_check.check_rtstruct_round_trip` (Dice ≥ 0.97 and HD95 ≤ 1 voxel per ROI,
references, Frame of Reference, Study, ROI names); any failure is :class:`RtRoundTripError` and no file is
left.
"""

from __future__ import annotations

import datetime
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian

from medseg.export.codes import SegmentCode, long_string, lookup
from medseg.export.dicom_seg import (
    PATIENT_STUDY,
    check_grid,
    fill_required,
    label_counts,
    medseg_version,
    source_datasets,
)
from medseg.export.rtstruct_check import RoiAgreement, RtRoundTripError, check_rtstruct_round_trip
from medseg.export.uids import DerivedUids, derived_uids
from medseg.io.atomic import atomic_path
from medseg.io.dicom import DicomVolume, SeriesInfo
from medseg.io.nifti import InputError

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
#: ReferencedSOPClassUID of the RT Referenced Study item: Detached Study Management (the value the RT
#: Structure Set examples of PS3.3 and treatment planning systems use for the study reference).
STUDY_REFERENCE_CLASS = "1.2.840.10008.3.1.2.3.1"
#: Contour points in mm, written with this many decimals (DS, at most 16 characters).
DECIMALS = 3


@dataclass(frozen=True)
class RtOptions:
    """What an RT Structure Set says besides its contours: the series it starts and who made it.

    Attributes:
        series_number: the RTSTRUCT series' number; default 2000 + the source series' number.
        series_description: the series' description.
        structure_set_label: StructureSetLabel (SH, at most 16 characters).
        algorithm_name: named, with the version and checkpoint, in each ROI's ROI Generation Description.
        algorithm_version: default the running medseg's version.
        checkpoint_name, checkpoint_sha256: the weights; the SHA-256 also enters the UIDs.
        extra_codes: codes for project-specific label names (see :func:`medseg.export.codes.lookup`).
    """

    series_number: int | None = None
    series_description: str = "medseg structures"
    structure_set_label: str = "MEDSEG"
    algorithm_name: str = "medseg"
    algorithm_version: str | None = None
    checkpoint_name: str | None = None
    checkpoint_sha256: str | None = None
    extra_codes: Mapping[str, SegmentCode] | None = None

    def __post_init__(self) -> None:
        if not 0 < len(self.structure_set_label) <= 16:
            raise ValueError(
                f"structure_set_label must have 1 to 16 characters, got {self.structure_set_label!r}"
            )


@dataclass(frozen=True)
class RtReport:
    """Result of :func:`write_rtstruct`.

    ``path`` is None when nothing was written (no labelled voxel). ``rois``: label name → ROI number;
    ``omitted``: empty labels not written; ``filled``: attributes filled into the source copies;
    ``round_trip``: label name → the Dice and HD95 (voxels) the read-back file measured.
    """

    path: Path | None
    rois: dict[str, int]
    omitted: tuple[str, ...]
    filled: dict[str, str]
    warnings: tuple[str, ...]
    round_trip: dict[str, RoiAgreement] = field(default_factory=dict)
    contours: int = 0
    points: int = 0
    size_bytes: int = 0
    sop_instance_uid: str = ""
    series_instance_uid: str = ""


def frame_to_patient(source: Dataset, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """(n, 3) LPS mm of pixel positions (row, column) of one source image (PS3.3 C.7.6.2.1.1):
    ImagePositionPatient + column·Δc·row cosine + row·Δr·column cosine, PixelSpacing = (Δr, Δc)."""
    origin = np.asarray(source.ImagePositionPatient, dtype=np.float64)
    cosines = np.asarray(source.ImageOrientationPatient, dtype=np.float64)
    d_row, d_col = (float(v) for v in source.PixelSpacing)
    return (
        origin[None, :]
        + np.asarray(columns, np.float64)[:, None] * (d_col * cosines[:3])[None, :]
        + np.asarray(rows, np.float64)[:, None] * (d_row * cosines[3:])[None, :]
    )


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """A closed polygon's vertices without those on a straight run (the polygon is unchanged)."""
    before = points - np.roll(points, 1, axis=0)
    after = np.roll(points, -1, axis=0) - points
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    turn = (np.abs(cross) > 1e-9) | ((before * after).sum(axis=1) < 0)
    return points[turn]


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed boundaries of a 2D (rows, columns) boolean mask as (n, 2) float (row, column) polygons.

    Marching squares at level 0.5 on the mask padded by one zero pixel (module docstring); outer boundaries
    counter-clockwise, holes clockwise (image coordinates); collinear points and polygons of < 3 points
    dropped.
    """
    from skimage.measure import find_contours  # DICOM exports only: keep ``import medseg`` light

    padded = np.pad(np.asarray(mask, dtype=np.uint8), 1)
    out = []
    for contour in find_contours(padded, 0.5, fully_connected="high", positive_orientation="high"):
        points = contour[:-1] if len(contour) > 1 and np.array_equal(contour[0], contour[-1]) else contour
        points = _drop_collinear(points) if len(points) >= 3 else points
        if len(points) >= 3:
            out.append(points - 1.0)
    return out


def _roi_contours(
    labels: np.ndarray, value: int, box: tuple[slice, slice, slice], sources: Sequence[Dataset]
) -> list[tuple[int, np.ndarray]]:
    """(slice k, (n, 3) LPS points) of every boundary of label ``value`` inside its bounding ``box``."""
    si, sj, sk = box
    out = []
    for k in range(sk.start, sk.stop):
        frame = (labels[si, sj, k] == value).T  # (rows ↔ j, columns ↔ i), cropped
        if not frame.any():
            continue
        for polygon in slice_contours(frame):
            rows, columns = polygon[:, 0] + sj.start, polygon[:, 1] + si.start
            out.append((k, frame_to_patient(sources[k], rows, columns)))
    return out


def _implicit(tag: int, value: bytes, pad: bytes = b" ") -> bytes:
    """One data element in Implicit VR Little Endian (PS3.5 7.1.3): tag, 32-bit length, value padded even."""
    if len(value) % 2:
        value += pad
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _sequence_item(content: bytes) -> bytes:
    """One sequence item of defined length (PS3.5 7.5.1)."""
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content


def _contour_sequence(
    contours: Sequence[tuple[int, np.ndarray]], sources: Sequence[Dataset]
) -> RawDataElement:
    """Contour Sequence (3006,0040) of one ROI, encoded here: per contour its Contour Image Sequence (the
    source image's SOP Class and Instance UIDs), CLOSED_PLANAR, the point count and the points as DS with
    :data:`DECIMALS` decimals.

    Encoded as bytes because pydicom spends ~150 µs building and writing each contour's datasets and one
    DSfloat per coordinate: half a minute for the 55 000 contours of a CT with many structures, against
    under a second this way. The file is read back with pydicom (and checked) on every write.
    """
    images = {}
    items = []
    for k, points in contours:
        if k not in images:
            src = sources[k]
            image = _implicit(0x00081150, str(src.SOPClassUID).encode(), b"\0")
            image += _implicit(0x00081155, str(src.SOPInstanceUID).encode(), b"\0")
            images[k] = _implicit(0x30060016, _sequence_item(image))
        rounded = np.round(np.asarray(points, np.float64).ravel(), DECIMALS) + 0.0  # no "-0.000"
        data = "\\".join(np.char.mod(f"%.{DECIMALS}f", rounded).tolist()).encode("ascii")
        items.append(
            _sequence_item(
                images[k]
                + _implicit(0x30060042, b"CLOSED_PLANAR")
                + _implicit(0x30060046, str(len(points)).encode())
                + _implicit(0x30060050, data)
            )
        )
    value = b"".join(items)
    return RawDataElement(Tag(0x30060040), "SQ", len(value), value, 0, True, True)


def _item(**values) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@dataclass(frozen=True)
class _Roi:
    number: int
    name: str
    code: SegmentCode
    contours: list[tuple[int, np.ndarray]]


def _structure_set(
    sources: Sequence[Dataset], rois: Sequence[_Roi], options: RtOptions, uids: DerivedUids
) -> Dataset:
    """The RT Structure Set dataset (module docstring) from the filled source copies and the contours."""
    src = sources[0]
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    version = options.algorithm_version or medseg_version()
    ds = Dataset()
    ds.SpecificCharacterSet = src.get("SpecificCharacterSet") or "ISO_IR 192"
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = uids.sop_instance_uid
    for keyword in ("StudyInstanceUID", *PATIENT_STUDY, "StudyDescription"):
        if keyword in src:
            setattr(ds, keyword, src.get(keyword))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = uids.series_instance_uid
    series_number = options.series_number
    if series_number is None:
        series_number = 2000 + int(src.get("SeriesNumber") or 0)
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = long_string(options.series_description)
    ds.OperatorsName = ""
    ds.Manufacturer = "medseg"
    ds.ManufacturerModelName = "medseg"
    ds.SoftwareVersions = long_string(version)
    ds.FrameOfReferenceUID = src.FrameOfReferenceUID
    ds.PositionReferenceIndicator = src.get("PositionReferenceIndicator", "")
    ds.StructureSetLabel = options.structure_set_label
    ds.StructureSetName = long_string(options.series_description)
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.InstanceNumber = 1
    images = [
        _item(ReferencedSOPClassUID=s.SOPClassUID, ReferencedSOPInstanceUID=s.SOPInstanceUID) for s in sources
    ]
    series = _item(SeriesInstanceUID=src.SeriesInstanceUID, ContourImageSequence=DicomSequence(images))
    study = _item(
        ReferencedSOPClassUID=STUDY_REFERENCE_CLASS,
        ReferencedSOPInstanceUID=src.StudyInstanceUID,
        RTReferencedSeriesSequence=DicomSequence([series]),
    )
    ds.ReferencedFrameOfReferenceSequence = DicomSequence(
        [_item(FrameOfReferenceUID=src.FrameOfReferenceUID, RTReferencedStudySequence=DicomSequence([study]))]
    )
    parts = [options.algorithm_name, version, options.checkpoint_name, (options.checkpoint_sha256 or "")[:12]]
    description = long_string(" ".join(p for p in parts if p))
    ds.StructureSetROISequence = DicomSequence(
        _item(
            ROINumber=roi.number,
            ReferencedFrameOfReferenceUID=src.FrameOfReferenceUID,
            ROIName=long_string(roi.name),
            ROIGenerationAlgorithm="AUTOMATIC",
            ROIGenerationDescription=description,
        )
        for roi in rois
    )
    ds.ROIContourSequence = DicomSequence(
        _item(ROIDisplayColor=list(roi.code.rgb), ReferencedROINumber=roi.number) for roi in rois
    )
    for item, roi in zip(ds.ROIContourSequence, rois, strict=True):
        item[0x30060040] = _contour_sequence(roi.contours, sources)
        # written as they are only when the item says it was encoded as the file will be (else pydicom
        # decodes and re-encodes them); its own values are ASCII
        item.set_original_encoding(True, True, item._character_set)
    ds.RTROIObservationsSequence = DicomSequence(
        _item(
            ObservationNumber=roi.number,
            ReferencedROINumber=roi.number,
            ROIObservationLabel=roi.name[:16],
            RTROIIdentificationCodeSequence=DicomSequence(
                [
                    _item(
                        CodeValue=roi.code.type.value,
                        CodingSchemeDesignator=roi.code.type.scheme_designator,
                        CodeMeaning=long_string(roi.code.type.meaning),
                    )
                ]
            ),
            RTROIInterpretedType="ORGAN",
            ROIInterpreter="",
        )
        for roi in rois
    )
    # the same at the top: else pydicom walks every item to correct ambiguous VRs (there are none), decoding
    # the encoded Contour Sequences on the way
    ds.set_original_encoding(True, True, ds._character_set)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    meta.MediaStorageSOPInstanceUID = uids.sop_instance_uid
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def write_rtstruct(
    labels: np.ndarray,
    volume: DicomVolume | SeriesInfo,
    label_names: Mapping[str, int],
    path: str | os.PathLike,
    *,
    affine: np.ndarray | None = None,
    options: RtOptions = RtOptions(),
) -> RtReport:
    """Write ``labels`` as an RT Structure Set on the series it was segmented from; round trip checked.

    Args:
        labels: (i, j, k) integer label map on the grid :func:`~medseg.io.dicom.read_series` returned.
        volume: that :class:`DicomVolume`, or its :class:`SeriesInfo` together with ``affine``.
        label_names: ``{name: value}``; value 0 (background) is never an ROI.
        path: the ``.dcm`` file to write (atomically).
        affine: the label map's RAS affine; needed only with a :class:`SeriesInfo`.
        options: series number and description, structure set label, algorithm, checkpoint, codes.

    Returns:
        An :class:`RtReport` (``path`` None when no label holds a voxel) with the measured round trip.

    Raises:
        InputError: the label map is not on the series grid or holds unnamed values, two names are the same
            once cut to 64 characters, or the source images cannot be referenced.
        RtRoundTripError: the written file does not read back as the label map (no file left).
    """
    from scipy.ndimage import find_objects

    info = volume.series if isinstance(volume, DicomVolume) else volume
    if affine is None:
        if not isinstance(volume, DicomVolume):
            raise ValueError("write_rtstruct: a SeriesInfo needs the label map's affine (affine=...)")
        affine = volume.image.affine
    labels = np.asarray(labels)
    counts = label_counts(labels, label_names, info.where)
    sources = source_datasets(info)
    check_grid(labels, affine, info, int(sources[0].Rows), int(sources[0].Columns))
    named = sorted(((v, n) for n, v in label_names.items() if v != 0), key=lambda vn: vn[0])
    if len({long_string(n) for _, n in named}) < len(named):
        raise InputError(f"{info.where}: label names are not unique in their first 64 characters (ROI Name)")
    present = [(v, n) for v, n in named if v < len(counts) and counts[v] > 0]
    omitted = tuple(n for v, n in named if (v, n) not in present)
    warnings = [f"{info.where}: empty ROI(s) not written: {', '.join(omitted)}"] if omitted else []
    if not present:
        warnings.append(f"{info.where}: no labelled voxel; no RT Structure Set written")
        return RtReport(None, {}, omitted, {}, tuple(warnings))
    filled, fill_warnings = fill_required(sources, info.where)
    warnings += fill_warnings
    boxes = find_objects(labels.astype(np.int32, copy=False) if labels.dtype == bool else labels)
    rois = [
        _Roi(number, n, lookup(n, v, options.extra_codes), _roi_contours(labels, v, boxes[v - 1], sources))
        for number, (v, n) in enumerate(present, start=1)
    ]
    uids = derived_uids(
        "rtstruct", str(sources[0].SeriesInstanceUID), info.sop_instance_uids, options.checkpoint_sha256
    )
    ds = _structure_set(sources, rois, options, uids)
    path = Path(path)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
        back = pydicom.dcmread(tmp)
        try:
            measured = check_rtstruct_round_trip(
                back, labels, affine, sources, {long_string(n): v for v, n in present}
            )
        except RtRoundTripError as exc:
            raise RtRoundTripError(f"{path}: {exc}; no file written") from None
        size = tmp.stat().st_size
    return RtReport(
        path=path,
        rois={roi.name: roi.number for roi in rois},
        omitted=omitted,
        filled=filled,
        warnings=tuple(warnings),
        round_trip={n: measured[long_string(n)] for _, n in present},
        contours=sum(len(roi.contours) for roi in rois),
        points=sum(len(p) for roi in rois for _, p in roi.contours),
        size_bytes=size,
        sop_instance_uid=str(back.SOPInstanceUID),
        series_instance_uid=str(back.SeriesInstanceUID),
    )
