"""Per-case files for viewers, written beside the mask by ``medseg segment --output-type``/``--split``.

* ``dicom-seg`` — a DICOM SEG referencing the source series (:func:`medseg.export.dicom_seg.write_dicom_seg`,
  read back and compared voxel for voxel on every write); DICOM inputs only: a NIfTI input has no source
  series to reference, which the case's warnings say;
* ``dicom-rtstruct`` — an RT Structure Set ``<case>_rtstruct.dcm`` of the same series, one ROI per non-empty
  label (:func:`medseg.export.rtstruct.write_rtstruct`, rasterised back and measured on every write: the
  sidecar records each ROI's Dice and HD95); DICOM inputs only, like the SEG;
* ``slicer`` — a 3D Slicer segmentation ``<case>.seg.nrrd`` with names, colours and label values;
* ``--split`` — one 0/1 mask per organ, ``<case>_organs/<case>_<organ>.nii.gz``;
* ``--preview`` — ``<case>_preview.png`` (three planes, radiological convention) and ``<case>_thumb.png``;
* ``--attention`` — each gated level's α on the scan's grid, ``<case>_alpha_levelN.nii.gz`` (float32) and its
  overlay on the CT, ``<case>_alpha_levelN.png``;
* ``--uncertainty`` — the normalised softmax entropy on the scan's grid, ``<case>_entropy.nii.gz`` (float32).

The ``--output-type`` names and their check are :data:`medseg.config.segment.OUTPUT_TYPES` and
:func:`medseg.config.segment.parse_output_types` (torch-free, so the command line checks them instantly).

The ITK-SNAP label description file (one per output folder, :func:`write_folder_exports`) lets ITK-SNAP open
every ``<case>.nii.gz`` with names and colours.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from medseg.batch.inputs import CaseSource
from medseg.io import atomic_path, case_name, save_like

if TYPE_CHECKING:  # the type only: importing the predictor loads torch and MONAI (~2 s), which
    from medseg.inference.predictor import Prediction  # `medseg export` never needs


@dataclass(frozen=True)
class MaskOnGrid:
    """What the viewer files are made from: a label map, the image whose grid it is on, the label names —
    a :class:`~medseg.inference.predictor.Prediction` of this run, or a mask read back by ``medseg export``."""

    labels: np.ndarray
    reference: nib.Nifti1Image
    label_names: dict[str, int]


ITKSNAP_LABELS = "itksnap_labels.txt"


def write_case_exports(
    case: CaseSource,
    dst: Path,
    pred: Prediction | MaskOnGrid,
    output_types: tuple[str, ...],
    split: bool,
    checkpoint: Path,
    checkpoint_sha256: str,
) -> tuple[dict, list[str]]:
    """Write the requested viewer files of one case; return (the sidecar's ``exports`` entry, warnings).

    The writers are imported here, not with the module: importing highdicom and pydicom's code dictionaries
    takes time that a NIfTI-only ``medseg segment`` run does not need to spend (measured in ``docs/speed.md``,
    section ``medseg.batch.exports``).
    """
    from medseg.export.dicom_seg import SegOptions, write_dicom_seg
    from medseg.export.viewers import write_slicer_seg_nrrd, write_split_masks

    name = case_name(dst)
    exports: dict = {}
    warnings: list[str] = []
    seg_types = [t for t in output_types if t.startswith("dicom-seg")]
    if seg_types and case.kind != "dicom":
        warnings.append("no DICOM SEG: the input is NIfTI, so there is no source series to reference")
    elif seg_types:
        kind = "LABELMAP" if "dicom-seg-labelmap" in seg_types else "BINARY"
        report = write_dicom_seg(
            pred.labels,
            case.series,
            pred.label_names,
            dst.parent / f"{name}_seg.dcm",
            affine=pred.reference.affine,
            options=SegOptions(
                segmentation_type=kind, checkpoint_name=checkpoint.name, checkpoint_sha256=checkpoint_sha256
            ),
        )
        warnings += list(report.warnings)
        exports["dicom_seg"] = {
            "path": None if report.path is None else str(report.path),
            "type": kind,
            "segments": report.segments,
            "omitted": list(report.omitted),
            "filled": report.filled,
            "sop_instance_uid": report.sop_instance_uid,
            "series_instance_uid": report.series_instance_uid,
            "round_trip": "voxel for voxel identical" if report.path is not None else None,
        }
    if "dicom-rtstruct" in output_types:
        if case.kind != "dicom":
            warnings.append(
                "no DICOM RT Structure Set: the input is NIfTI, so there is no source series to reference"
            )
        else:
            exports["dicom_rtstruct"], notes = _write_rtstruct(case, dst, pred, checkpoint, checkpoint_sha256)
            warnings += notes
    if "slicer" in output_types:
        path = write_slicer_seg_nrrd(
            pred.labels, pred.reference.affine, pred.label_names, dst.parent / f"{name}.seg.nrrd"
        )
        exports["slicer"] = str(path)
    if split:
        written = write_split_masks(
            pred.labels, pred.reference, pred.label_names, dst.parent / f"{name}_organs", case=name
        )
        exports["split"] = {organ: str(p) for organ, p in written.items()}
    return exports, warnings


def _write_rtstruct(
    case: CaseSource, dst: Path, pred: Prediction | MaskOnGrid, checkpoint: Path, checkpoint_sha256: str
) -> tuple[dict, list[str]]:
    """``<case>_rtstruct.dcm`` and its sidecar entry (ROIs, omitted labels, UIDs, measured round trip)."""
    from medseg.export.rtstruct import RtOptions, write_rtstruct

    report = write_rtstruct(
        pred.labels,
        case.series,
        pred.label_names,
        dst.parent / f"{case_name(dst)}_rtstruct.dcm",
        affine=pred.reference.affine,
        options=RtOptions(checkpoint_name=checkpoint.name, checkpoint_sha256=checkpoint_sha256),
    )
    entry = {
        "path": None if report.path is None else str(report.path),
        "rois": report.rois,
        "omitted": list(report.omitted),
        "sop_instance_uid": report.sop_instance_uid,
        "series_instance_uid": report.series_instance_uid,
        "round_trip": {name: agreement.as_dict() for name, agreement in report.round_trip.items()},
    }
    return entry, list(report.warnings)


def write_folder_exports(folder: Path, label_names: dict[str, int]) -> Path:
    """The ITK-SNAP label description file of an output folder (names and colours of every label)."""
    from medseg.export.viewers import write_itksnap_labels

    return write_itksnap_labels(label_names, folder / ITKSNAP_LABELS)


def preview_paths(mask_path: Path) -> tuple[Path, Path]:
    """``(<case>_preview.png, <case>_thumb.png)`` beside ``<case>.nii.gz`` (the names the review page reads)."""
    name = case_name(mask_path)
    return mask_path.parent / f"{name}_preview.png", mask_path.parent / f"{name}_thumb.png"


def write_previews(dst: Path, image, labels: np.ndarray, label_names: Mapping[str, int]) -> None:
    """The three-plane preview and the review page's thumbnail of one case."""
    from medseg.report.preview import write_preview, write_thumbnail

    full, thumb = preview_paths(dst)
    write_preview(image, labels, label_names, full, title=case_name(dst))
    write_thumbnail(image, labels, label_names, thumb)


def write_attention(dst: Path, predictor, pred: Prediction) -> list[str]:
    """Each gated level's α restored to the scan and its overlay; returns notes (a network without gates)."""
    import nibabel as nib

    from medseg.inference.attention import attention_maps
    from medseg.report.preview import write_attention_overlay

    notes: list[str] = []
    maps = attention_maps(predictor, pred.reference, notes=notes)
    name = case_name(dst)
    for level, img in maps.items():
        with atomic_path(dst.parent / f"{name}_{level}.nii.gz") as tmp:
            nib.save(img, str(tmp))
        write_attention_overlay(
            pred.reference,
            np.asarray(img.dataobj),
            dst.parent / f"{name}_{level}.png",
            labels=pred.labels,
            label_names=pred.label_names,
            title=f"{name}: {level.replace('_', ' ')}",
        )
    return notes


def uncertainty_path(mask_path: Path) -> Path:
    """``<case>_entropy.nii.gz`` beside ``<case>.nii.gz`` (the name the review page links as "uncertainty")."""
    return mask_path.parent / f"{case_name(mask_path)}_entropy.nii.gz"


def write_uncertainty(dst: Path, pred: Prediction) -> Path:
    """The case's entropy map as float32 NIfTI in the scan's exact geometry (``pred.uncertainty``)."""
    return save_like(pred.uncertainty, pred.reference, uncertainty_path(dst), dtype=np.float32)
