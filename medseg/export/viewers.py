"""Files that desktop viewers open with names and colours and no manual setup.

* :func:`write_slicer_seg_nrrd` — a 3D Slicer segmentation (``.seg.nrrd``): one 3D label volume (the
  "Binary labelmap" master representation, all segments in layer 0) whose NRRD header carries, per segment,
  ``Segment<i>_ID / _Name / _Color / _LabelValue / _Layer / _Extent / _Tags`` and the
  ``Segmentation_*`` keys (format of Slicer's ``vtkMRMLSegmentationStorageNode``). Written with SimpleITK,
  whose NRRD writer stores each metadata entry as a ``key:=value`` line, in ``space: left-posterior-superior``
  with ``space directions`` / ``space origin`` from the RAS affine: ``diag(-1, -1, 1) ·`` its columns.
* :func:`write_itksnap_labels` — an ITK-SNAP label description file (``IDX -R- -G- -B- -A-- VIS MSH LABEL``),
  loaded in ITK-SNAP with *Segmentation → Import Label Descriptions*.
* :func:`write_split_masks` — one uint8 NIfTI per organ, ``<case>_<organ>.nii.gz``, in the reference scan's
  exact geometry (:func:`medseg.io.save_like`).

Names and colours come from :mod:`medseg.export.codes` (3D Slicer's GenericAnatomyColors), so the DICOM SEG,
Slicer and ITK-SNAP show a structure in one colour.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from pydicom.sr.coding import Code
from scipy import ndimage

from medseg.export.codes import SegmentCode, lookup
from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.io.dicom import RAS_FROM_LPS
from medseg.io.nifti import case_name, save_like

#: Terminology context names 3D Slicer uses for DICOM-coded segments (``TerminologyEntry`` tag).
SLICER_CONTEXT = "Segmentation category and type - DICOM master list"
SLICER_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def _named(labels: np.ndarray, label_names: Mapping[str, int]) -> list[tuple[int, str]]:
    """``(value, name)`` of the non-background labels, by value; refuses a map with unnamed values."""
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"label map must be a 3D integer array, got {labels.ndim}D {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("label map holds negative values")
    present = set(np.flatnonzero(np.bincount(labels.ravel())).tolist()) if labels.size else set()
    unnamed = sorted(present - {0, *label_names.values()})
    if unnamed:
        raise ValueError(f"label map holds values {unnamed[:8]} that label_names does not name")
    return sorted((v, n) for n, v in label_names.items() if v != 0)


def _code(code: Code | None) -> str:
    return "^^" if code is None else f"{code.scheme_designator}^{code.value}^{code.meaning}"


def slicer_terminology(code: SegmentCode) -> str:
    """Slicer's ``TerminologyEntry`` string: context~category~type~modifier~anatomic context~region~modifier,
    each code as ``scheme^value^meaning`` (``^^`` when absent)."""
    parts = (SLICER_CONTEXT, _code(code.category), _code(code.type), _code(code.modifier))
    return "~".join((*parts, SLICER_ANATOMIC_CONTEXT, "^^", "^^"))


def lps_geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(spacing, 3×3 direction, origin) of a RAS affine in ITK's LPS convention; exact for oblique and
    flipped axes: ``LPS affine = diag(-1, -1, 1, 1) · RAS affine``, spacing = its column norms."""
    lps = RAS_FROM_LPS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    return spacing, lps[:3, :3] / spacing, lps[:3, 3]


def write_slicer_seg_nrrd(
    labels: np.ndarray,
    affine: np.ndarray,
    label_names: Mapping[str, int],
    path: str | os.PathLike,
    *,
    extra_codes: Mapping[str, SegmentCode] | None = None,
) -> Path:
    """Write a 3D Slicer segmentation (``.seg.nrrd``, labelmap representation, gzip-compressed) atomically.

    Every named label becomes a segment (an empty one too: Slicer shows it empty, with extent
    ``0 -1 0 -1 0 -1``); ``Segment<i>_LabelValue`` is the label value of ``labels``, so the voxels are
    the NIfTI's. Colours are 0–1 floats.

    Raises:
        ValueError: the label map is not 3D integer or holds values ``label_names`` does not name.
    """
    labels = np.asarray(labels)
    named = _named(labels, label_names)
    top = max([v for v, _ in named] + [int(labels.max(initial=0))])
    dtype = np.uint8 if top < 2**8 else np.uint16
    img = sitk.GetImageFromArray(np.ascontiguousarray(labels.transpose(2, 1, 0), dtype=dtype))
    spacing, direction, origin = lps_geometry(affine)
    img.SetSpacing(spacing.tolist())
    img.SetDirection(direction.ravel().tolist())
    img.SetOrigin(origin.tolist())
    boxes = ndimage.find_objects(labels.astype(np.int32, copy=False), max_label=top) if top else []
    for i, (value, name) in enumerate(named):
        code = lookup(name, value, extra_codes)
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        extent = " ".join(f"{s.start} {s.stop - 1}" for s in box) if box else "0 -1 0 -1 0 -1"
        fields = {
            "ID": f"Segment_{value}",
            "Name": name,
            "NameAutoGenerated": "0",
            "Color": " ".join(f"{c:.6g}" for c in code.rgb_float),
            "ColorAutoGenerated": "0",
            "LabelValue": str(value),
            "Layer": "0",
            "Extent": extent,
            "Tags": f"Segmentation.Status:completed|TerminologyEntry:{slicer_terminology(code)}|",
        }
        for key, text in fields.items():
            img.SetMetaData(f"Segment{i}_{key}", text)
    img.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    img.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    img.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    path = Path(path)
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True, imageIO="NrrdImageIO")
    return path


ITKSNAP_HEADER = """\
################################################
# ITK-SnAP Label Description File
# File format:
# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL
# Fields:
#    IDX:   Zero-based index
#    -R-:   Red color component (0..255)
#    -G-:   Green color component (0..255)
#    -B-:   Blue color component (0..255)
#    -A-:   Label transparency (0.00 .. 1.00)
#    VIS:   Label visibility (0 or 1)
#    MSH:   Label mesh visibility (0 or 1)
#  LABEL:   Label description
# Written by medseg (colours: 3D Slicer GenericAnatomyColors)
################################################
"""


def write_itksnap_labels(
    label_names: Mapping[str, int],
    path: str | os.PathLike,
    *,
    extra_codes: Mapping[str, SegmentCode] | None = None,
) -> Path:
    """Write an ITK-SNAP label description file: ``0`` "Clear Label", then one line per named label.

    Double quotes in a name become single quotes (the format has no escape).
    """
    lines = [
        ITKSNAP_HEADER.rstrip("\n"),
        f'{0:5d} {0:5d} {0:4d} {0:4d} {0:8g} {0:2d} {0:2d}    "Clear Label"',
    ]
    for name, value in sorted(label_names.items(), key=lambda nv: nv[1]):
        if value == 0:
            continue
        r, g, b = lookup(name, value, extra_codes).rgb
        label = str(name).replace('"', "'")
        lines.append(f'{value:5d} {r:5d} {g:4d} {b:4d} {1:8g} {1:2d} {1:2d}    "{label}"')
    path = Path(path)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name).strip()).lstrip(".") or "label"


def write_split_masks(
    labels: np.ndarray,
    reference_img: nib.Nifti1Image,
    label_names: Mapping[str, int],
    folder: str | os.PathLike,
    *,
    case: str | None = None,
) -> dict[str, Path]:
    """One uint8 (0/1) NIfTI per named label, ``<case>_<organ>.nii.gz``, in ``reference_img``'s geometry.

    Every named label gets a file, an empty one too (so "absent" is visible). ``case`` defaults to the
    reference's file name without ``.nii.gz``. Organ names are made file-safe (``[A-Za-z0-9._-]``).

    Raises:
        ValueError: no case name, unnamed label values, or two organ names that become one file name.
    """
    labels = np.asarray(labels)
    named = _named(labels, label_names)
    if case is None:
        if not reference_img.get_filename():
            raise ValueError("write_split_masks: the reference image has no file name; pass case=...")
        case = case_name(reference_img.get_filename())
    files = {name: Path(folder) / f"{_safe(case)}_{_safe(name)}.nii.gz" for _, name in named}
    if len(set(files.values())) < len(files):
        raise ValueError(f"label names {sorted(files)} give the same file name twice")
    for value, name in named:
        save_like((labels == value).astype(np.uint8), reference_img, files[name], dtype=np.uint8)
    return files
