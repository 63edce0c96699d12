"""The round-trip check of an RT Structure Set: its contours rasterised back onto the label grid, measured.

Independent of the writer (:mod:`medseg.export.rtstruct`): nothing here traces contours or uses the writer's
pixel → patient transform. The file is read with pydicom; every contour point goes from patient coordinates
(LPS mm) to voxel indices through the *label map's* affine (RAS, turned into LPS by ``diag(-1, -1, 1, 1)``
and inverted), after that affine has been checked against the source images' own ImagePositionPatient (image
``k``'s first pixel must be voxel (0, 0, k)). A contour must lie in the plane of one slice, reference that
slice's SOP Instance, be ``CLOSED_PLANAR`` with as many points as it says. The contours of one ROI on one
slice are filled by the **even-odd rule** — each polygon's inside (``matplotlib.path.Path.contains_points``
at the voxel centres) XOR-ed into the slice — the convention of :mod:`medseg.export.rtstruct` (holes are
nested contours; PS3.3 C.8.8.6.3).

Each ROI is then compared with its label: Dice and HD95 in voxels (the DeepMind ``surface-distance``
definition, :func:`medseg.metrics.surface.compute_surface_distances` with unit spacing). It must reach Dice ≥
:data:`MIN_DICE` and HD95 ≤ :data:`MAX_HD95_VOXELS`. The header must agree with the source: Frame of Reference,
Study Instance UID, the referenced series and its images, and the ROIs: one per non-empty label, named as the
label, numbered uniquely, each with one RT ROI Observation. Any miss is :class:`RtRoundTripError`.

:func:`check_rtstruct_round_trip` also serves files that come back from a PACS (a file path or a dataset,
with the source series as :class:`~medseg.io.dicom.SeriesInfo`, datasets or file paths).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from medseg.export.seg_check import SegRoundTripError
from medseg.io.dicom import SeriesInfo
from medseg.metrics.pair import surface_metrics
from medseg.metrics.surface import compute_surface_distances

#: Smallest Dice per ROI, and largest HD95 in voxels, that the read-back contours may reach.
MIN_DICE = 0.97
MAX_HD95_VOXELS = 1.0
#: A contour lies in slice k's plane when every point is within this many voxels of it along k; the label
#: affine matches the sources when each image's first pixel is this close to voxel (0, 0, k).
PLANE_TOL_VOXELS = 0.1
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
CONTOUR_DATA = Tag(0x3006, 0x0050)


class RtRoundTripError(SegRoundTripError):
    """The RT Structure Set read back differs from the label map it was written from (no file is left)."""


@dataclass(frozen=True)
class RoiAgreement:
    """How one ROI read back: its number, contours, the voxels it fills, Dice and HD95 (voxels) vs its label."""

    number: int
    contours: int
    voxels: int
    dice: float
    hd95_voxels: float

    def as_dict(self) -> dict[str, float]:
        """``{"dice", "hd95_voxels"}`` rounded for a sidecar."""
        return {"dice": round(self.dice, 6), "hd95_voxels": round(self.hd95_voxels, 4)}


def _source_headers(source: SeriesInfo | Sequence[Dataset] | Sequence[str | os.PathLike]) -> list[Dataset]:
    if isinstance(source, SeriesInfo):
        source = list(source.files)
    return [s if isinstance(s, Dataset) else pydicom.dcmread(s, stop_before_pixels=True) for s in source]


def _header_problems(rt: Dataset, sources: Sequence[Dataset]) -> list[str]:
    """Frame of Reference, study, series and image references against the source (where it has them)."""
    src = sources[0]
    problems = [
        f"{keyword} {rt.get(keyword)} ≠ source {src.get(keyword)}"
        for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID")
        if src.get(keyword) and str(rt.get(keyword, "")) != str(src.get(keyword))
    ]
    if rt.get("SOPClassUID") != "1.2.840.10008.5.1.4.1.1.481.3" or rt.get("Modality") != "RTSTRUCT":
        problems.append(f"not an RT Structure Set (SOP Class {rt.get('SOPClassUID')}, {rt.get('Modality')})")
    try:
        (frame,) = rt.ReferencedFrameOfReferenceSequence
        (study,) = frame.RTReferencedStudySequence
        (series,) = study.RTReferencedSeriesSequence
        images = [str(i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence]
    except (AttributeError, ValueError):
        return [
            *problems,
            "no single Referenced Frame of Reference → Study → Series → Contour Image Sequence",
        ]
    if str(frame.FrameOfReferenceUID) != str(rt.get("FrameOfReferenceUID", frame.FrameOfReferenceUID)):
        problems.append("Referenced Frame of Reference differs from the Frame of Reference UID")
    if src.get("StudyInstanceUID") and str(study.ReferencedSOPInstanceUID) != str(src.StudyInstanceUID):
        problems.append(f"references study {study.ReferencedSOPInstanceUID}, not the source's")
    if src.get("SeriesInstanceUID") and str(series.SeriesInstanceUID) != str(src.SeriesInstanceUID):
        problems.append(f"references series {series.SeriesInstanceUID}, not the source's")
    if sorted(images) != sorted(str(s.SOPInstanceUID) for s in sources):
        problems.append(
            f"Contour Image Sequence lists {len(images)} images, not the {len(sources)} source images"
        )
    return problems


def _affine_problems(inverse: np.ndarray, sources: Sequence[Dataset], shape: tuple[int, ...]) -> list[str]:
    """The label affine puts each source image's first pixel at voxel (0, 0, k)."""
    if len(sources) != shape[2]:
        return [f"{len(sources)} source images for a label map of {shape[2]} slices"]
    for k, src in enumerate(sources):
        ijk = inverse[:3, :3] @ np.asarray(src.ImagePositionPatient, float) + inverse[:3, 3]
        if np.abs(ijk - [0, 0, k]).max() > PLANE_TOL_VOXELS:
            return [
                f"source image {k} lies at voxel {np.round(ijk, 2).tolist()} of the label map, not (0, 0, {k})"
            ]
    return []


def _fill(volume: np.ndarray, polygon: np.ndarray, k: int) -> None:
    """XOR the inside of a closed (n, 2) (i, j) polygon, at voxel centres, into ``volume[:, :, k]``."""
    from matplotlib.path import Path as Polygon  # only here: matplotlib is slow to import

    lo = np.maximum(np.floor(polygon.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(polygon.max(axis=0)).astype(int) + 1, volume.shape[:2])
    if np.any(hi <= lo):
        return
    ii, jj = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij")
    inside = Polygon(polygon).contains_points(np.column_stack([ii.ravel(), jj.ravel()])).reshape(ii.shape)
    volume[lo[0] : hi[0], lo[1] : hi[1], k] ^= inside


def _text(item: Dataset, tag: int) -> str:
    """An element's value as text. Values still encoded (as read from a file) are decoded here, not
    converted by pydicom into one object per number (~20 µs each: seconds for a CT's contours)."""
    if tag not in item:
        return ""
    value = item.get_item(tag).value
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace").strip(" \0")
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _contour_data(item: Dataset) -> np.ndarray:
    """Contour Data (3006,0050) as floats (NaN when it is not a list of decimal strings)."""
    text = _text(item, CONTOUR_DATA)
    try:
        return np.array(text.split("\\"), dtype=np.float64) if text else np.zeros(0)
    except ValueError:
        return np.full(1, np.nan)


def _rasterise(
    roi: Dataset, inverse: np.ndarray, sops: Sequence[str], volume: np.ndarray
) -> tuple[int, list[str]]:
    """Fill one ROI Contour item's contours into ``volume`` (even-odd); (contours, problems)."""
    problems: list[str] = []
    contours = list(roi.get("ContourSequence") or [])
    for n, item in enumerate(contours, start=1):
        where = f"ROI {roi.get('ReferencedROINumber')} contour {n}"
        if (kind := _text(item, 0x30060042)) != "CLOSED_PLANAR":
            problems.append(f"{where}: {kind or 'no geometric type'}, not CLOSED_PLANAR")
            continue
        data = _contour_data(item)
        count = int(_text(item, 0x30060046)) if _text(item, 0x30060046).isdigit() else 0
        if data.size != 3 * count or count < 3 or not np.isfinite(data).all():
            problems.append(f"{where}: {data.size} coordinates for {count} points (at least 3 needed)")
            continue
        ijk = data.reshape(-1, 3) @ inverse[:3, :3].T + inverse[:3, 3]
        k = int(np.rint(ijk[:, 2].mean()))
        if np.abs(ijk[:, 2] - k).max() > PLANE_TOL_VOXELS or not 0 <= k < volume.shape[2]:
            problems.append(
                f"{where}: not in the plane of a slice of the label map (k ≈ {ijk[:, 2].mean():.2f})"
            )
            continue
        images = item.get("ContourImageSequence") or []
        referenced = [_text(i, 0x00081155) for i in images]
        if referenced != [sops[k]]:
            problems.append(f"{where}: lies on slice {k} but references {referenced or 'no image'}")
        _fill(volume, ijk[:, :2], k)
    return len(contours), problems


def _agreement(filled: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(Dice, HD95 in voxels) of two boolean masks."""
    total = int(filled.sum()) + int(truth.sum())
    dice = 2.0 * int(np.logical_and(filled, truth).sum()) / total if total else 1.0
    hd95 = surface_metrics(compute_surface_distances(filled, truth, (1.0, 1.0, 1.0)))["hd95"]
    return dice, float(hd95)


@dataclass(frozen=True)
class RtComparison:
    """What :func:`compare_rtstruct` measured: label name → :class:`RoiAgreement`, and every problem found."""

    rois: dict[str, RoiAgreement]
    problems: list[str]


def compare_rtstruct(
    rtstruct: Dataset | str | os.PathLike,
    labels: np.ndarray,
    affine: np.ndarray,
    source: SeriesInfo | Sequence[Dataset] | Sequence[str | os.PathLike],
    label_names: Mapping[str, int],
) -> RtComparison:
    """Rasterise every ROI of ``rtstruct`` on the label grid and measure it against its label; never raises
    for a mismatch (see :func:`check_rtstruct_round_trip`, which does). Arguments as there."""
    rt = rtstruct if isinstance(rtstruct, Dataset) else pydicom.dcmread(rtstruct)
    labels = np.asarray(labels)
    sources = _source_headers(source)
    inverse = np.linalg.inv(LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64))
    problems = _header_problems(rt, sources) + _affine_problems(inverse, sources, labels.shape)
    if problems:
        return RtComparison({}, problems)
    sops = [str(s.SOPInstanceUID) for s in sources]
    names = {int(r.ROINumber): str(r.ROIName) for r in rt.get("StructureSetROISequence") or []}
    if len(names) != len(rt.get("StructureSetROISequence") or []):
        problems.append("ROI numbers are not unique")
    observed = sorted(int(o.ReferencedROINumber) for o in rt.get("RTROIObservationsSequence") or [])
    if observed != sorted(names):
        problems.append(f"RT ROI Observations for ROIs {observed}, structure set ROIs {sorted(names)}")
    counts = np.bincount(
        labels.ravel().astype(np.int64, copy=False), minlength=max(label_names.values(), default=0) + 1
    )
    present = {n: v for n, v in label_names.items() if v != 0 and counts[v] > 0}
    if unknown := sorted(set(names.values()) - set(label_names)):
        problems.append(f"ROIs {unknown} name no label")
    if missing := sorted(set(present) - set(names.values())):
        problems.append(f"labels {missing} hold voxels but have no ROI")
    measured: dict[str, RoiAgreement] = {}
    volume = np.zeros(labels.shape, dtype=bool)
    for roi in rt.get("ROIContourSequence") or []:
        number = int(roi.ReferencedROINumber)
        name = names.get(number)
        if name is None or name not in label_names:
            problems.append(f"ROI Contour for ROI {number}, which the structure set does not name as a label")
            continue
        volume[:] = False
        contours, found = _rasterise(roi, inverse, sops, volume)
        problems += found
        dice, hd95 = _agreement(volume, labels == label_names[name])
        measured[name] = RoiAgreement(number, contours, int(volume.sum()), dice, hd95)
        if not (dice >= MIN_DICE and hd95 <= MAX_HD95_VOXELS):
            problems.append(
                f"ROI {name!r}: Dice {dice:.4f}, HD95 {hd95:.2f} voxels (need ≥ {MIN_DICE}, ≤ {MAX_HD95_VOXELS})"
            )
    if absent := sorted(set(names.values()) - set(measured) - set(unknown)):
        problems.append(f"ROIs {absent} have no ROI Contour")
    return RtComparison(measured, problems)


def check_rtstruct_round_trip(
    rtstruct: Dataset | str | os.PathLike,
    labels: np.ndarray,
    affine: np.ndarray,
    source: SeriesInfo | Sequence[Dataset] | Sequence[str | os.PathLike],
    label_names: Mapping[str, int],
) -> dict[str, RoiAgreement]:
    """Check an RT Structure Set against the label map it was made from; return label name → agreement.

    Args:
        rtstruct: the RT Structure Set as a pydicom dataset, or a file path (e.g. as fetched from a PACS).
        labels: the (i, j, k) label map; ``affine`` its RAS affine (the mask NIfTI's).
        source: the source series in slice order (index k of ``labels``): a :class:`SeriesInfo`, or its
            images' headers as pydicom datasets or file paths.
        label_names: ROI name → label value (names as written, i.e. at most 64 characters).

    Raises:
        RtRoundTripError: any ROI below Dice :data:`MIN_DICE` or above HD95 :data:`MAX_HD95_VOXELS`, a
            contour off the slices or referencing another image, or a header that does not match the source
            (module docstring); the message lists the first problems.
    """
    result = compare_rtstruct(rtstruct, labels, affine, source, label_names)
    if result.problems:
        more = f"; … {len(result.problems) - 4} more" if len(result.problems) > 4 else ""
        raise RtRoundTripError(
            f"RT Structure Set does not match the label map: {'; '.join(result.problems[:4])}{more}"
        )
    return result.rois
