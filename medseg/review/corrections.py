"""Corrections: a reviewer's repainted label map saved beside the mask, and corrected cases as training data.

:func:`save_correction` takes what the viewer sends — NiiVue's drawing layer saved as NIfTI-1
(``saveImage({isSaveDrawing: true})``: the drawing in the voxel order and header of the background, which is
the scan's full-resolution display copy, :mod:`medseg.review.display`) — and checks it before anything is
written: a NIfTI-1 of at most the expected size (the scan grid's voxel count, known to the server, bounds
what is read), on the scan's grid (shape and affine), integer values that are all in the case's label table.
It is then re-stored on the mask's own grid (:func:`medseg.review.display.to_grid`: voxel order only) and
written as ``<case>_corrected.nii.gz`` with the mask's exact shape, affine (qform and sform) and voxel type
(:func:`medseg.io.save_like`, atomic), and the label table as a NIfTI-1 comment extension (ecode 6, JSON
``{"labels": {name: value}}``). The original ``<case>.nii.gz`` is never written.

:func:`export_corrections` writes every case with a correction as a Medical Segmentation Decathlon dataset
(``imagesTr/<case>.nii.gz`` — the scan in int16 HU, ``labelsTr/<case>.nii.gz`` — the correction on the
scan's grid, ``dataset.json``), which ``medseg check-dataset`` checks and ``medseg train`` fine-tunes on
(``--set train.init_from=<run>/best.pt``, :mod:`medseg.engine.trainer`).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.batch.recorded_series import open_recorded_series
from medseg.io import InputError, atomic_write_text, load_volume, save_like
from medseg.io.atomic import atomic_path
from medseg.io.dicom import read_series
from medseg.io.nifti import image_like
from medseg.review.catalog import corrected_name
from medseg.review.display import nifti_source, to_grid, to_int16

#: NIfTI-1 header (348 bytes) + extension flag (4) + room for extensions NiiVue copies from the background.
HEADER_SLACK = 1 << 20
NIFTI_ECODE_COMMENT = 6


def max_correction_bytes(shape: tuple[int, ...]) -> int:
    """Largest request body a correction of a uint8 label map on a grid of ``shape`` may take."""
    return int(np.prod(shape)) + HEADER_SLACK


def parse_drawing(body: bytes, shape: tuple[int, ...], affine: np.ndarray, what: str) -> np.ndarray:
    """The drawing's voxels, checked to be a 3D integer NIfTI-1 on the grid ``shape``/``affine``.

    Raises:
        InputError: naming ``what`` and the mismatch.
    """
    if body[:2] == b"\x1f\x8b":
        try:
            body = gzip.GzipFile(fileobj=io.BytesIO(body)).read(max_correction_bytes(shape) + 1)
        except (OSError, EOFError) as exc:
            raise InputError(f"{what}: not a readable gzip stream ({exc})") from None
    if len(body) > max_correction_bytes(shape):
        raise InputError(f"{what}: {len(body)} bytes, more than a label map of the scan's grid {shape}")
    try:
        img = nib.Nifti1Image.from_bytes(body)
    except Exception as exc:  # nibabel raises several types for broken headers
        raise InputError(
            f"{what}: not a NIfTI-1 image ({str(exc).splitlines()[0] if str(exc) else exc})"
        ) from None
    if tuple(img.shape[:3]) != tuple(shape) or any(n != 1 for n in img.shape[3:]):
        raise InputError(f"{what}: shape {tuple(img.shape)}, expected the scan's grid {tuple(shape)}")
    if img.get_data_dtype().kind not in "iu":
        raise InputError(f"{what}: voxel type {img.get_data_dtype()}, expected integer labels")
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    if not np.allclose(img.affine, affine, atol=1e-3 * spacing.min()):
        raise InputError(f"{what}: its affine differs from the scan's; reload the case and paint again")
    return np.asarray(img.dataobj.get_unscaled()).reshape(shape)


def save_correction(
    outdir: str | os.PathLike, case: str, body: bytes, scan_grid: nib.Nifti1Image, labels: dict[str, int]
) -> Path:
    """Check the drawing ``body`` and write ``OUTDIR/<case>_corrected.nii.gz`` (module docstring).

    Args:
        scan_grid: an image on the scan's grid (its header: shape and affine), e.g. the label map's display
            copy ``labels_scan_grid.nii``.
        labels: the case's label table (name → value); the drawing may use only these values.

    Raises:
        InputError: the drawing does not fit (one line naming the case and the cause).
    """
    outdir = Path(outdir)
    what = f"correction of {case}"
    data = parse_drawing(body, scan_grid.shape[:3], scan_grid.affine, what)
    allowed = set(labels.values()) | {0}
    found = {int(v) for v in np.unique(data)}
    if found - allowed:
        raise InputError(
            f"{what}: label values {sorted(found - allowed)} are not in the case's label table "
            f"({', '.join(f'{n}={v}' for n, v in sorted(labels.items(), key=lambda kv: kv[1]))})"
        )
    mask = nib.load(str(outdir / f"{case}.nii.gz"))
    on_mask_grid = to_grid(data, scan_grid.affine, mask.affine, mask.shape[:3], what)
    dtype = mask.get_data_dtype()
    img_path = outdir / corrected_name(case)
    img = image_like(on_mask_grid, mask, dtype.type)
    table = json.dumps({"labels": dict(sorted(labels.items(), key=lambda kv: kv[1]))}).encode()
    img.header.extensions.append(nib.nifti1.Nifti1Extension(NIFTI_ECODE_COMMENT, table))
    with atomic_path(img_path) as tmp:
        nib.save(img, str(tmp))
    return img_path


def read_label_table(path: str | os.PathLike) -> dict[str, int] | None:
    """The label table a corrected mask carries (its comment extension), None without one."""
    for ext in nib.load(str(path)).header.extensions:
        if ext.get_code() == NIFTI_ECODE_COMMENT:
            with contextlib.suppress(ValueError):
                table = json.loads(ext.get_content())
                if isinstance(table, dict) and isinstance(table.get("labels"), dict):
                    return {str(k): int(v) for k, v in table["labels"].items()}
    return None


def _scan(outdir: Path, case: str, side: dict, stack: contextlib.ExitStack) -> nib.Nifti1Image:
    mask = outdir / f"{case}.nii.gz"
    if side.get("kind") == "dicom":
        found = open_recorded_series(mask, case, side.get("dicom") or {}, outdir, stack)
        return read_series(found.series).image
    source = nifti_source(side, outdir)
    if source is None:
        raise InputError(f"{case}: its scan ({side.get('source')}) is no longer there; cannot export it")
    return load_volume(source)


def export_corrections(outdir: str | os.PathLike, dest: str | os.PathLike, log=print) -> Path:
    """Write the corrected cases of ``outdir`` with their scans as an MSD dataset in ``dest``; return
    ``dest/dataset.json`` (module docstring). ``dest`` must not exist or be empty.

    Raises:
        InputError: no corrected case, ``dest`` not empty, a scan missing, or label tables that disagree.
    """
    outdir, dest = Path(outdir), Path(dest)
    cases = sorted(
        p.name[: -len("_corrected.nii.gz")]
        for p in outdir.glob("*_corrected.nii.gz")
        if (outdir / p.name.replace("_corrected.nii.gz", ".json")).is_file()
    )
    if not cases:
        raise InputError(f"{outdir}: no corrected case (<case>_corrected.nii.gz); save a correction first")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InputError(f"{dest}: exists and is not an empty folder; choose a new folder")
    if dest.resolve() == outdir.resolve() or dest.resolve().is_relative_to(outdir.resolve()):
        raise InputError(f"{dest}: inside the output folder {outdir}; choose a folder outside it")
    names: dict[str, int] = {}
    training = []
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for case in cases:
            side = json.loads((outdir / f"{case}.json").read_text())
            labels = {str(k): int(v) for k, v in (side.get("labels") or {}).items()}
            for name, value in labels.items():
                if names.setdefault(name, value) != value:
                    raise InputError(
                        f"{case}: label {name} is {value} here but {names[name]} in another case"
                    )
            corrected = nib.load(str(outdir / corrected_name(case)))
            with contextlib.ExitStack() as stack:
                scan = _scan(outdir, case, side, stack)
                data = np.asarray(corrected.dataobj).astype(np.uint8)
                label = to_grid(data, corrected.affine, scan.affine, scan.shape[:3], f"{case}_corrected")
                image = nib.Nifti1Image(to_int16(np.asanyarray(scan.dataobj)), scan.affine)
                image.set_qform(scan.affine, code=1)
                image.set_sform(scan.affine, code=1)
                (partial / "imagesTr").mkdir(parents=True, exist_ok=True)
                nib.save(image, str(partial / "imagesTr" / f"{case}.nii.gz"))
                save_like(label, image, partial / "labelsTr" / f"{case}.nii.gz")
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
            log(f"{case}: exported")
        meta = {
            "name": "medseg-review-corrections",
            "description": f"Cases of {outdir.resolve()} corrected in medseg review",
            "tensorImageSize": "3D",
            "modality": {"0": "CT"},
            "labels": {str(v): k for k, v in sorted(names.items(), key=lambda kv: kv[1])},
            "numTraining": len(training),
            "numTest": 0,
            "training": training,
            "test": [],
        }
        if "0" not in meta["labels"]:
            meta["labels"] = {"0": "background", **meta["labels"]}
        atomic_write_text(partial / "dataset.json", json.dumps(meta, indent=2))
        if dest.exists():
            dest.rmdir()
        partial.rename(dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest / "dataset.json"
