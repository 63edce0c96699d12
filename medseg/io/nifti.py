"""NIfTI reading with clear errors, and label-map writing in a reference scan's exact geometry.

Reading checks the header before any voxel is read (:func:`check_header`): a voxel type that is not a real
number, a declared size the file does not hold or that no scan has, and a missing voxel spacing are refused
in one line naming the file, before memory is allocated for the voxels.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from contextlib import contextmanager
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


#: Refuse, before reading, headers that declare more voxels or bytes than this (a corrupt or hostile header
#: must not become a bare ``MemoryError``). 2**31 voxels is 2048×1024×1024; 16 GiB is far above any CT.
MAX_VOXELS = 2**31
MAX_VOLUME_BYTES = 16 * 2**30
#: NIfTI datatype codes of real numbers (integers and floats): everything else (complex, RGB/RGBA,
#: bit-packed ``binary``, ``float128`` where NumPy cannot read it) is refused from the header.
REAL_DATATYPES = {2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280}


def _size(nbytes: float) -> str:
    """``61440`` → ``60 KiB``; ``2**31`` → ``2.0 GiB`` (binary units)."""
    if nbytes < 2**10:
        return f"{int(nbytes)} bytes"
    if nbytes < 2**20:
        return f"{nbytes / 2**10:.0f} KiB"
    if nbytes < 2**30:
        return f"{nbytes / 2**20:.1f} MiB"
    if nbytes < 2**40:
        return f"{nbytes / 2**30:.1f} GiB"
    return f"{nbytes / 2**40:.1f} TiB"


def read_header(path: str | os.PathLike) -> nib.Nifti1Header | nib.Nifti2Header:
    """The NIfTI-1 or NIfTI-2 header of a ``.nii``/``.nii.gz`` file, without reading voxels or checking it.

    Raises:
        InputError: truncated or corrupt gzip stream, a header cut short, or not a NIfTI header.
    """
    path = Path(path)
    compressed = path.name.endswith(".gz")
    try:
        if compressed:
            with open(path, "rb") as fh:
                if fh.read(2) != b"\x1f\x8b":
                    raise InputError(
                        f"{path}: not a readable NIfTI file (named .gz but not gzip-compressed data)"
                    )
        with (gzip.open if compressed else open)(path, "rb") as fh:
            block = fh.read(540)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(
            f"{path}: truncated or corrupt compressed file ({exc or 'ends inside the header'})"
        ) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    sizes = {int.from_bytes(block[:4], "little"), int.from_bytes(block[:4], "big")}
    klass = nib.Nifti2Header if 540 in sizes else nib.Nifti1Header if 348 in sizes else None
    if klass is None:
        raise InputError(f"{path}: not a readable NIfTI file (no NIfTI-1 or NIfTI-2 header)")
    if len(block) < klass.sizeof_hdr:
        raise InputError(f"{path}: truncated NIfTI header ({len(block)} of {klass.sizeof_hdr} bytes)")
    try:
        return klass(block[: klass.sizeof_hdr], check=False)
    except Exception as exc:  # nibabel raises several types for malformed header blocks
        raise InputError(f"{path}: not a readable NIfTI file ({exc})") from None


def _gzip_content_at_least(path: Path, need: int) -> int:
    """Uncompressed bytes of a ``.gz`` file, or ``need`` when there are at least that many.

    Fast path: the gzip trailer (ISIZE, last 4 bytes) holds the uncompressed size modulo 2**32 — exact for
    a single-member file under 4 GiB. Otherwise (a smaller trailer value, several members, ≥ 4 GiB) the
    stream is decompressed and counted in 1 MiB blocks, keeping nothing and stopping at ``need``.
    """
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        isize = int.from_bytes(fh.read(4), "little")
    if (need < 2**32 and isize >= need) or isize == need % 2**32:
        return need
    count = 0
    try:
        with gzip.open(path, "rb") as fh:
            while count < need and (block := fh.read(1 << 20)):
                count += len(block)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{path}: truncated or corrupt compressed file ({exc})") from None
    return min(count, need)


def check_header(
    path: str | os.PathLike,
    header: nib.Nifti1Header | nib.Nifti2Header,
    max_bytes: int = MAX_VOLUME_BYTES,
) -> tuple[int, ...]:
    """Check from the header alone that a volume can be read; return its 3D shape.

    Checks, in order: real-valued voxel type; 3D (or X×Y×Z×1) with at least 2 voxels per axis; declared
    size within :data:`MAX_VOXELS` / ``max_bytes``; the file holds the declared voxels (``vox_offset`` +
    voxel bytes against the file size, or the uncompressed size of a ``.nii.gz``); a voxel spacing.

    Spacing follows nibabel's choice of affine: a ``sform_code > 0`` means the sform is the affine (pixdim
    is then ignored, so it may be 0); otherwise the affine is built from pixdim[1:4] (qform or the
    Analyze-style base affine), and nibabel silently replaces a zero pixdim by 1 mm and a negative one by
    its absolute value — refused here instead.

    Raises:
        InputError: one line naming the file and the cause.
    """
    path = Path(path)
    code = int(header["datatype"])
    if code not in REAL_DATATYPES:
        name = nib.nifti1.data_type_codes.label.get(code, "unknown")
        raise InputError(
            f"{path}: unsupported voxel type {name} (NIfTI datatype {code}); "
            "medseg reads real-valued scans (integer or floating-point voxels)"
        )
    dim = [int(d) for d in header["dim"]]
    if not 1 <= dim[0] <= 7:
        raise InputError(f"{path}: not a readable NIfTI file (dim[0] = {dim[0]})")
    shape = tuple(dim[1 : dim[0] + 1])
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{path}: expected a 3D volume, found {len(shape)}D with shape {shape}")
    if min(shape) < 2:
        raise InputError(f"{path}: volume too small for 3D segmentation, shape {shape}")
    dtype = header.get_data_dtype()
    voxels = int(np.prod(shape, dtype=np.float64))
    nbytes = voxels * dtype.itemsize
    declared = f"{'×'.join(map(str, shape))} {dtype.name} voxels ({_size(nbytes)})"
    if voxels > MAX_VOXELS or nbytes > max_bytes:
        raise InputError(
            f"{path}: header declares {declared}, more than medseg reads "
            f"(at most 2^{MAX_VOXELS.bit_length() - 1} voxels and {_size(max_bytes)}); header corrupt?"
        )
    vox_offset = float(header["vox_offset"])
    if not np.isfinite(vox_offset) or vox_offset < 0:
        raise InputError(f"{path}: not a readable NIfTI file (vox_offset = {vox_offset:g})")
    # nibabel reads a single-file NIfTI's voxels from vox_offset, raised to just past the header.
    need = max(int(vox_offset), header.single_vox_offset) + nbytes
    on_disk = path.stat().st_size
    held = _gzip_content_at_least(path, need) if path.name.endswith(".gz") else on_disk
    if held < need:
        found = _size(on_disk) + (f" ({_size(held)} uncompressed)" if held != on_disk else "")
        raise InputError(
            f"{path}: header declares {declared} but the file holds only {found}; "
            "file truncated or header wrong"
        )
    _check_spacing(path, header)
    return shape


def _check_spacing(path: Path, header: nib.Nifti1Header | nib.Nifti2Header) -> None:
    """A usable sform, or positive finite pixdim[1:4] (see :func:`check_header`)."""
    pixdim = [float(v) for v in header["pixdim"][1:4]]
    if int(header["sform_code"]) > 0:
        sform = header.get_sform()
        if np.all(np.isfinite(sform)) and abs(np.linalg.det(sform[:3, :3])) > 1e-8:
            return
        raise InputError(
            f"{path}: degenerate or non-finite affine in the header "
            f"(sform_code {int(header['sform_code'])} with a singular or non-finite sform)"
        )
    if not all(np.isfinite(v) and v > 0 for v in pixdim):
        shown = ", ".join(f"{v:g}" for v in pixdim)
        raise InputError(
            f"{path}: no voxel spacing (pixdim [{shown}] not all positive and finite, and no usable sform)"
        )


@contextmanager
def _nibabel_quiet():
    """Silence nibabel's header-fix log lines (e.g. "setting 0 dims to 1"): medseg checked the header."""
    logger = nib.imageglobals.logger
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_volume(path: str | os.PathLike, max_bytes: int = MAX_VOLUME_BYTES) -> nib.Nifti1Image:
    """Load a 3D NIfTI volume and check it can be used, reading the whole voxel array once.

    The header is checked first (:func:`check_header`: voxel type, shape, declared size against the file,
    voxel spacing), so nothing is allocated for a header that lies. A trailing singleton fourth dimension
    (``X×Y×Z×1``) is accepted and dropped.

    Raises:
        InputError: missing, empty, truncated or corrupt file, unsupported voxel type, not 3D, a declared
            size the file does not hold, no voxel spacing, a degenerate affine or NaN/inf voxels — with a
            one-line message ``<path>: <cause>``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a NIfTI file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty (0 bytes)")
    check_header(path, read_header(path), max_bytes)
    try:
        with _nibabel_quiet():
            img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{path}: truncated or corrupt compressed file ({exc})") from None
    except nib.filebasedimages.ImageFileError as exc:
        raise InputError(f"{path}: not a readable NIfTI file ({str(exc).splitlines()[0]})") from None
    except nib.spatialimages.HeaderDataError as exc:
        raise InputError(f"{path}: not a readable NIfTI file ({exc})") from None
    except MemoryError:
        raise InputError(f"{path}: not enough memory to read its voxels") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read voxel data, file truncated or corrupt ({exc})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(f"{path}: not a NIfTI image (found {type(img).__name__})")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3D volume, found {data.ndim}D with shape {tuple(data.shape)}")
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-8:
        raise InputError(f"{path}: degenerate or non-finite affine in the header")
    if not np.all(np.isfinite(data)):
        raise InputError(f"{path}: voxel data contains NaN or infinite values")
    out = nib.Nifti1Image(data, affine, header=img.header)
    out.set_qform(img.get_qform(), code=int(img.header["qform_code"]))
    out.set_sform(img.get_sform(), code=int(img.header["sform_code"]))
    return out


def image_like(array: np.ndarray, reference: nib.Nifti1Image, dtype: type = np.uint8) -> nib.Nifti1Image:
    """``array`` as an in-memory NIfTI image with the reference image's exact shape, affine, qform and sform.

    Raises:
        ValueError: if the array's shape differs from the reference's 3D shape.
    """
    shape = tuple(reference.shape[:3])
    if tuple(array.shape) != shape:
        raise ValueError(f"array shape {tuple(array.shape)} differs from reference shape {shape}")
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
    return img


def save_like(
    array: np.ndarray, reference: nib.Nifti1Image, path: str | os.PathLike, dtype: type = np.uint8
) -> Path:
    """Write ``array`` with the reference image's exact shape, affine, qform and sform (:func:`image_like`),
    atomically.

    Raises:
        ValueError: if the array's shape differs from the reference's 3D shape.
    """
    try:
        img = image_like(array, reference, dtype)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
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
