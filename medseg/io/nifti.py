"""NIfTI reading with clear errors, and label-map writing in a reference scan's exact geometry."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.io.atomic import atomic_path

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class InputError(ValueError):
    """A user-supplied file cannot be used; the message names the file and the cause (one line)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def case_name(path: str | os.PathLike) -> str:
    """File name without ``.nii.gz`` / ``.nii``: ``/a/liver_001.nii.gz`` → ``liver_001``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along the three array axes: the column norms of the affine's 3×3 part.

    The one spacing function of medseg: exact for oblique and flipped affines, unlike the header's pixdim,
    which a writer may leave inconsistent with the sform.
    """
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def load_volume(path: str | os.PathLike) -> nib.Nifti1Image:
    """Load a 3D NIfTI volume and check it can be used, reading the whole voxel array once.

    A trailing singleton fourth dimension (``X×Y×Z×1``) is accepted and dropped.

    Raises:
        InputError: missing, empty, truncated or corrupt file, not 3D, or a degenerate affine — with a
            one-line message ``<path>: <cause>``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a NIfTI file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty (0 bytes)")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{path}: truncated or corrupt compressed file ({exc})") from None
    except nib.filebasedimages.ImageFileError as exc:
        raise InputError(f"{path}: not a readable NIfTI file ({str(exc).splitlines()[0]})") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read voxel data, file truncated or corrupt ({exc})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(f"{path}: not a NIfTI image (found {type(img).__name__})")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3D volume, found {data.ndim}D with shape {tuple(data.shape)}")
    if min(data.shape) < 2:
        raise InputError(f"{path}: volume too small for 3D segmentation, shape {tuple(data.shape)}")
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-8:
        raise InputError(f"{path}: degenerate or non-finite affine in the header")
    if not np.all(np.isfinite(data)):
        raise InputError(f"{path}: voxel data contains NaN or infinite values")
    out = nib.Nifti1Image(data, affine, header=img.header)
    out.set_qform(img.get_qform(), code=int(img.header["qform_code"]))
    out.set_sform(img.get_sform(), code=int(img.header["sform_code"]))
    return out


def save_like(
    array: np.ndarray, reference: nib.Nifti1Image, path: str | os.PathLike, dtype: type = np.uint8
) -> Path:
    """Write ``array`` with the reference image's exact shape, affine, qform and sform, atomically.

    Raises:
        ValueError: if the array's shape differs from the reference's 3D shape.
    """
    shape = tuple(reference.shape[:3])
    if tuple(array.shape) != shape:
        raise ValueError(f"{path}: array shape {tuple(array.shape)} differs from reference shape {shape}")
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), reference.affine, header=header)
    img.set_qform(reference.get_qform(), code=int(reference.header["qform_code"]))
    img.set_sform(reference.get_sform(), code=int(reference.header["sform_code"]))
    img.header["scl_slope"] = 1.0
    img.header["scl_inter"] = 0.0
    img.header["cal_min"] = 0
    img.header["cal_max"] = int(array.max()) if array.size else 0
    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def save_volume(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype: type) -> Path:
    """Write a new NIfTI (qform and sform set to ``affine``, code 1 = scanner) atomically."""
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path
