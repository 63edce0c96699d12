"""The round-trip check of a DICOM SEG: every frame placed on the label grid in patient coordinates.

:func:`check_seg_round_trip` reads nothing from frame order: each frame is located through its own Plane
Position / Orientation / Pixel Measures functional groups (per-frame, or shared by all frames), must
reference the source image at that position, and its pixels must equal the label map there. This is what
catches the mirrored-SEG bug class (anterior/posterior or left/right flips). Used by
:func:`medseg.export.dicom_seg.write_dicom_seg` on every write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import iter_pixels

from medseg.io.dicom import RAS_FROM_LPS

#: A SEG frame lies on the series grid when every corner is within this many voxels of it (a shift or mirror
#: is a whole number of voxels).
GRID_TOL_VOXELS = 0.1


class SegRoundTripError(RuntimeError):
    """The SEG read back differs from the label map it was written from (nothing is left on disk)."""


@dataclass(frozen=True)
class RoundTrip:
    """What the round-trip check compared: frames, voxels, and segments (all equal when returned)."""

    frames: int
    voxels: int
    segments: int


def _frame_geometry(seg: Dataset, item: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position, orientation, pixel spacing) of one frame: per-frame groups, else shared groups."""
    shared = seg.SharedFunctionalGroupsSequence[0]

    def get(sequence: str) -> Dataset:
        return (item if sequence in item else shared)[sequence][0]

    position = np.asarray(get("PlanePositionSequence").ImagePositionPatient, float)
    orientation = np.asarray(get("PlaneOrientationSequence").ImageOrientationPatient, float)
    spacing = np.asarray(get("PixelMeasuresSequence").PixelSpacing, float)
    return position, orientation, spacing


def _frame_index(
    position: np.ndarray, orientation: np.ndarray, spacing: np.ndarray, inverse: np.ndarray, shape: tuple
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """Voxel (i, j, k) of a frame's first pixel and per-row / per-column steps, or why it is off-grid.

    Pixel (r, c) lies at ``position + c·Δc·row cosine + r·Δr·column cosine`` (LPS, PS3.3 C.7.6.2.1.1).
    """
    origin = inverse @ (RAS_FROM_LPS @ np.append(position, 1.0))
    step_r = inverse[:3, :3] @ (RAS_FROM_LPS[:3, :3] @ (orientation[3:] * spacing[0]))
    step_c = inverse[:3, :3] @ (RAS_FROM_LPS[:3, :3] @ (orientation[:3] * spacing[1]))
    o, er, ec = np.rint(origin[:3]), np.rint(step_r), np.rint(step_c)
    rows, cols = shape
    corners = [(r, c) for r in (0, rows - 1) for c in (0, cols - 1)]
    exact = [origin[:3] + r * step_r + c * step_c for r, c in corners]
    rounded = [o + r * er + c * ec for r, c in corners]
    if max(np.abs(e - q).max() for e, q in zip(exact, rounded, strict=True)) > GRID_TOL_VOXELS:
        return f"frame at {np.round(position, 3).tolist()} does not lie on the label grid"
    if sorted(np.abs(er).tolist() + np.abs(ec).tolist()) != [0, 0, 0, 0, 1, 1] or er[2] or ec[2]:
        return f"frame at {np.round(position, 3).tolist()} is not a slice of the label grid"
    return o.astype(int), er.astype(int), ec.astype(int)


def check_seg_round_trip(
    seg: Dataset,
    labels: np.ndarray,
    affine: np.ndarray,
    segments: Mapping[int, int],
    sop_instance_uids: Sequence[str],
) -> RoundTrip:
    """Rebuild every segment of ``seg`` on the label grid in patient coordinates and compare voxel for voxel.

    Args:
        seg: the Segmentation as read back (or as built).
        labels: the (i, j, k) label map the SEG was written from; ``affine`` its RAS affine.
        segments: segment number → label value it must equal.
        sop_instance_uids: the source images in slice order (index k of ``labels``).

    Raises:
        SegRoundTripError: frames off the grid, referencing the wrong image, duplicated or missing, or pixels
            that differ; the message says which segment and slice, and how many pixels.
    """
    labels = np.asarray(labels)
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    binary = seg.SegmentationType == "BINARY"
    lut = np.zeros(int(max([labels.max(initial=0), *segments.values()])) + 1, dtype=np.int64)
    for number, value in segments.items():
        lut[value] = number
    described = {int(item.SegmentNumber) for item in seg.SegmentSequence} - {0}  # LABELMAP: 0 background
    problems: list[str] = []
    if described != set(segments):
        problems.append(f"segments {sorted(described)} described, {sorted(segments)} expected")
    rows, cols = int(seg.Rows), int(seg.Columns)
    seen: dict[tuple[int, int], int] = {}
    voxels = 0
    items = seg.PerFrameFunctionalGroupsSequence
    for f, (item, pixels) in enumerate(zip(items, iter_pixels(seg), strict=True)):
        where = _frame_index(*_frame_geometry(seg, item), inverse, (rows, cols))
        if isinstance(where, str):
            problems.append(f"frame {f + 1}: {where}")
            continue
        o, er, ec = where
        r, c = np.arange(rows)[:, None], np.arange(cols)[None, :]
        i, j, k = o[0] + r * er[0] + c * ec[0], o[1] + r * er[1] + c * ec[1], int(o[2])
        if not (0 <= k < labels.shape[2] and 0 <= i.min() and i.max() < labels.shape[0]) or not (
            0 <= j.min() and j.max() < labels.shape[1]
        ):
            problems.append(f"frame {f + 1}: outside the label map (slice {k})")
            continue
        source = (
            _group(seg, item, "DerivationImageSequence")[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        )
        if source != sop_instance_uids[k]:
            problems.append(f"frame {f + 1}: lies on slice {k} but references another image ({source})")
        number = (
            int(_group(seg, item, "SegmentIdentificationSequence")[0].ReferencedSegmentNumber)
            if binary
            else 0
        )
        if (k, number) in seen:
            problems.append(f"frame {f + 1}: slice {k} segment {number} repeated (frame {seen[k, number]})")
        seen[k, number] = f + 1
        truth = lut[labels[i, j, k]]
        expected = (truth == number) if binary else truth
        if (bad := int(np.count_nonzero(pixels != expected))) > 0:
            problems.append(f"frame {f + 1} (segment {number or 'all'}, slice {k}): {bad} pixels differ")
        voxels += expected.size
    occupied = {
        number: np.flatnonzero(np.any(labels == value, axis=(0, 1))) for number, value in segments.items()
    }
    for number, slices in occupied.items():
        missing = [int(k) for k in slices if (k, number if binary else 0) not in seen]
        if missing:
            problems.append(f"segment {number}: slices {missing[:5]} hold voxels but have no frame")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; … {len(problems) - 4} more" if len(problems) > 4 else "")
        raise SegRoundTripError(f"DICOM SEG does not match the label map: {shown}")
    return RoundTrip(frames=len(items), voxels=voxels, segments=len(described))


def _group(seg, item, name: str):
    """A functional group of one frame: per-frame, or shared by all frames (highdicom moves a group that is the
    same for every frame — e.g. the segment number of a one-segment SEG — into the shared groups)."""
    if name in item:
        return getattr(item, name)
    shared = seg.get("SharedFunctionalGroupsSequence")
    if shared and name in shared[0]:
        return getattr(shared[0], name)
    raise SegRoundTripError(f"DICOM SEG frame without {name} (neither per-frame nor shared)")
