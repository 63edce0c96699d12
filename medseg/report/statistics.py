"""Organ statistics of a label map on its scan: what a reviewer checks first when a volume looks wrong.

Per case and label (:func:`organ_statistics`): volume in mL and voxel count; mean / std / median / min / max
of the original scan's intensities (HU for CT) inside the mask; centroid in mm in patient coordinates (DICOM
LPS, what PACS viewers show) and in the NIfTI world frame (RAS); bounding box in voxel indices; the number of
26-connected components; and ``touches_border`` — the structure reaches the edge of the scan, so it is
probably cut off by the field of view and its volume is a lower bound.

Each label is measured inside its own bounding box (all boxes from one pass), so a 512×512×300 scan with a
handful of organs costs about one pass over the volume.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.io import atomic_write_text, voxel_spacing
from medseg.metrics.overlap import label_boxes

#: Columns of the batch CSV (one row per case and label), in order.
STAT_COLUMNS = (
    "case",
    "label",
    "name",
    "voxels",
    "volume_ml",
    "hu_mean",
    "hu_std",
    "hu_median",
    "hu_min",
    "hu_max",
    "centroid_lps_mm",
    "centroid_ras_mm",
    "bbox_min",
    "bbox_max",
    "components",
    "touches_border",
)

_STRUCTURE = np.ones((3, 3, 3), dtype=bool)


def organ_statistics(
    labels: np.ndarray,
    image: np.ndarray,
    affine: np.ndarray,
    label_names: Mapping[str, int],
    case: str = "",
) -> list[dict]:
    """One row per named non-background label (absent labels get ``voxels = 0`` and empty measures).

    Args:
        labels: integer label map on the scan's grid.
        image: the scan (same shape), e.g. HU.
        affine: the scan's NIfTI (RAS) voxel-to-world affine.
        label_names: ``{name: index}`` (background 0 is skipped).
        case: case name written into every row.
    """
    if labels.shape != image.shape:
        raise ValueError(f"label map {labels.shape} and image {image.shape} differ in shape")
    affine = np.asarray(affine, dtype=np.float64)
    voxel_ml = float(np.prod(voxel_spacing(affine))) / 1000.0
    wanted = {int(i): str(n) for n, i in label_names.items() if int(i) > 0}
    boxes = label_boxes(labels, max(wanted, default=0))
    rows = []
    for index, name in sorted(wanted.items()):
        box = boxes[index - 1] if index - 1 < len(boxes) else None
        row: dict = {"case": case, "label": index, "name": name, "voxels": 0, "volume_ml": 0.0}
        if box is None:
            rows.append(_empty(row))
            continue
        mask = labels[box] == index
        values = np.asarray(image[box][mask], dtype=np.float64)
        offset = np.array([s.start for s in box], dtype=np.float64)
        centroid_vox = np.argwhere(mask).mean(axis=0) + offset
        ras = affine[:3, :3] @ centroid_vox + affine[:3, 3]
        _, n_components = ndimage.label(mask, structure=_STRUCTURE)
        row.update(
            voxels=int(mask.sum()),
            volume_ml=float(mask.sum() * voxel_ml),
            hu_mean=float(values.mean()),
            hu_std=float(values.std()),
            hu_median=float(np.median(values)),
            hu_min=float(values.min()),
            hu_max=float(values.max()),
            centroid_lps_mm=[round(float(-ras[0]), 3), round(float(-ras[1]), 3), round(float(ras[2]), 3)],
            centroid_ras_mm=[round(float(v), 3) for v in ras],
            bbox_min=[int(s.start) for s in box],
            bbox_max=[int(s.stop) - 1 for s in box],
            components=int(n_components),
            touches_border=any(s.start == 0 or s.stop == n for s, n in zip(box, labels.shape, strict=True)),
        )
        rows.append(row)
    return rows


def _empty(row: dict) -> dict:
    for key in STAT_COLUMNS:
        row.setdefault(key, None)
    row.update(components=0, touches_border=False)
    return row


def write_statistics_csv(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """The batch table: :data:`STAT_COLUMNS`, lists written as ``a;b;c``, empty cells for absent organs."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(STAT_COLUMNS)
    for row in rows:
        cells = []
        for key in STAT_COLUMNS:
            value = row.get(key)
            cells.append(
                ";".join(str(v) for v in value) if isinstance(value, list) else "" if value is None else value
            )
        writer.writerow(cells)
    atomic_write_text(path, buf.getvalue())
    return Path(path)
