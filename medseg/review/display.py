"""What the viewer loads: display copies of a case's scan, made once and cached inside the output folder.

A 512×512×300 CT in float32 is 315 MB; a browser that fetches, decompresses and uploads it as a 3D texture
takes many seconds before the first image. The server therefore hands NiiVue a **display copy**: the scan in
int16 (Hounsfield units rounded and clipped to −32768…32767: no information lost for CT), uncompressed NIfTI
(fetching over the loopback beats decompressing in JavaScript) and, above :data:`DISPLAY_MAX_VOXELS`,
block-averaged by integer factors (the in-plane axes first) with the affine adjusted so every voxel centre
stays where it is in patient space (NIfTI-1 sform: a block of ``f`` voxels has its centre ``(f − 1)/2``
voxels further along that axis). Every copy is stored in the closest RAS+ voxel order (:func:`canonical`:
axis permutations and flips, exact), which NiiVue would otherwise make in JavaScript on every load. The label
map gets the same two copies: on the display grid (``labels_display``: per block the voxel nearest its
centre, :func:`subsample` — labels are never averaged) and on the scan's full grid (``labels_scan_grid``,
:func:`to_grid`), the start of NiiVue's drawing layer, which must share the background's grid. The
**full-resolution** copies are made on demand: the viewer asks for them when the reviewer wants full detail
or starts a correction.

Measured on the 2-core machine (``benchmarks/review_first_image.py``), NiiVue on SwiftShader spends about
10 s in JavaScript on a 512×512×300 volume (decompression, voxel reordering, intensity range) before the
first frame, against about 3 s for the 2×2×1 display copy; see ``docs/review.md``.

Copies live in ``OUTDIR/.medseg_review/<case>/`` (``scan_display.nii``, ``labels_display.nii``,
``scan_full.nii``, ``labels_scan_grid.nii``) with a ``stamp.json`` naming what they were made from (source path, size and
modification time, mask modification time); a changed source makes them again. Writes are atomic, so two
servers on one folder at worst make a copy twice. When OUTDIR cannot be written (a read-only share), the
copies go to a temporary folder of the server's.

The scan is found through the case's sidecar: ``source_file.path`` / ``source`` for a NIfTI case (read with
:func:`medseg.io.load_volume`, its size checked before anything is allocated), the recorded files of a DICOM
case (:func:`medseg.batch.recorded_series.open_recorded_series`: only those files, confined). A scan that is
no longer there leaves the viewer with the mask alone (a blank background on the mask's grid) and says so.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from medseg.batch.recorded_series import open_recorded_series
from medseg.io import InputError, atomic_path, load_volume
from medseg.io.dicom import read_series

CACHE_DIR = ".medseg_review"
#: Largest display copy (voxels) before block averaging: 2^23 ≈ 8.4 M voxels (16 MiB of int16). NiiVue's
#: time to first image grows with the voxel count (about 0.5 s per million voxels here, on SwiftShader).
DISPLAY_MAX_VOXELS = 2**23
KINDS = ("scan_display", "labels_display", "scan_full", "labels_scan_grid")
_RAS = np.array([[0, 1], [1, 1], [2, 1]])


def block_factors(
    shape: tuple[int, ...], spacing: tuple[float, ...] = (1.0, 1.0, 1.0), max_voxels: int = DISPLAY_MAX_VOXELS
) -> tuple[int, int, int]:
    """Integer reduction per axis so that the reduced grid has at most ``max_voxels`` voxels, coarsening
    whichever is finer — the in-plane axes (0, 1, together) or the slice axis (2) — so the display voxels
    tend towards cubes: 512×512×300 at 0.35×0.37×0.82 mm → 3×3×2 (170×170×150 at 1.05×1.11×1.64 mm)."""
    f = [1, 1, 1]
    while math.prod(n // k for n, k in zip(shape, f, strict=True)) > max_voxels:
        if min(spacing[0] * f[0], spacing[1] * f[1]) <= spacing[2] * f[2] or shape[2] // f[2] <= 16:
            f[0], f[1] = f[0] + 1, f[1] + 1
        else:
            f[2] += 1
    return f[0], f[1], f[2]


def block_mean(
    data: np.ndarray, affine: np.ndarray, factors: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """``data`` averaged over blocks of ``factors`` voxels (a remainder at the far edge is dropped) and the
    affine of the reduced grid (voxel centres at the blocks' centres)."""
    fx, fy, fz = factors
    nx, ny, nz = (n // f for n, f in zip(data.shape, factors, strict=True))
    out = np.zeros((nx, ny, nz), np.float32)
    for k in range(nz):  # one slab at a time: memory stays near one slab of float32
        slab = np.asarray(data[: nx * fx, : ny * fy, k * fz : (k + 1) * fz], np.float32)
        out[:, :, k] = slab.reshape(nx, fx, ny, fy, fz).mean(axis=(1, 3, 4))
    return out, block_affine(affine, factors)


def block_affine(affine: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """The affine of the grid of blocks of ``factors`` voxels: spacing × f, centres (f − 1)/2 voxels on."""
    scale = np.eye(4)
    scale[:3, :3] = np.diag(factors)
    scale[:3, 3] = [(f - 1) / 2 for f in factors]
    return affine @ scale


def to_int16(data: np.ndarray) -> np.ndarray:
    """Hounsfield units rounded and clipped to int16 (CT's native storage range)."""
    if data.dtype == np.int16:
        return data
    return np.clip(np.rint(np.asarray(data, np.float32)), -32768, 32767).astype(np.int16)


def to_grid(
    data: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, target_shape: tuple[int, ...], what: str
) -> np.ndarray:
    """``data`` (on the grid of ``affine``) re-stored on the grid ``target_affine``/``target_shape`` when the
    two grids are the same voxels in another order (axis permutations and flips only: exact, no
    interpolation).

    Raises:
        InputError: naming ``what``, when the grids differ otherwise (shape, spacing, origin, rotation).
    """
    transform = ornt_transform(io_orientation(affine), io_orientation(target_affine))
    out = apply_orientation(data, transform)
    moved = affine @ inv_ornt_aff(transform, data.shape)
    spacing = np.sqrt((np.asarray(target_affine)[:3, :3] ** 2).sum(axis=0))
    if tuple(out.shape) != tuple(target_shape) or not np.allclose(
        moved, target_affine, atol=1e-3 * spacing.min()
    ):
        raise InputError(
            f"{what}: not on the scan's grid (shape {tuple(data.shape)} vs {tuple(target_shape)}, or a "
            "different spacing, origin or rotation)"
        )
    return np.ascontiguousarray(out)


def canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``data`` re-stored in the closest RAS+ voxel order (axis permutations and flips only, exact) and its
    affine: NiiVue then has no voxel reordering to do in JavaScript."""
    transform = ornt_transform(io_orientation(affine), _RAS)
    return np.ascontiguousarray(apply_orientation(data, transform)), affine @ inv_ornt_aff(
        transform, data.shape
    )


def subsample(labels: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """A label map on the grid of :func:`block_mean`: per block the voxel at index ``f // 2`` (nearest to
    the block's centre; half a voxel off it for even ``f`` — labels are not averaged)."""
    fx, fy, fz = factors
    nx, ny, nz = (n // f for n, f in zip(labels.shape, factors, strict=True))
    return np.ascontiguousarray(
        labels[fx // 2 : nx * fx : fx, fy // 2 : ny * fy : fy, fz // 2 : nz * fz : fz]
    )


def _stamp_of(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def nifti_source(side: dict, outdir: Path) -> Path | None:
    """The scan file a NIfTI case was segmented from, if it still exists (module docstring)."""
    candidates = []
    stamp = side.get("source_file")
    if isinstance(stamp, dict) and isinstance(stamp.get("path"), str):
        candidates.append(Path(stamp["path"]))
    if isinstance(side.get("source"), str):
        source = Path(side["source"])
        candidates += [source] if source.is_absolute() else [source, outdir / source]
    return next((p for p in candidates if p.is_file()), None)


class DisplayCache:
    """Makes and finds the display copies of an output folder's cases (module docstring)."""

    def __init__(self, outdir: str | os.PathLike, max_voxels: int = DISPLAY_MAX_VOXELS) -> None:
        self.outdir = Path(outdir)
        self.max_voxels = max_voxels
        self.root = self.outdir / CACHE_DIR
        try:
            self.root.mkdir(exist_ok=True)
            probe = self.root / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError:  # read-only share: copies go to a private temporary folder
            self.root = Path(tempfile.mkdtemp(prefix="medseg-review-"))
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, case: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(case, threading.Lock())

    def scan_available(self, case: str, side: dict) -> bool:
        """Whether the case's scan can be found (DICOM: files recorded; NIfTI: the file exists)."""
        if side.get("kind") == "dicom":
            files = (side.get("dicom") or {}).get("files") or []
            return bool(files) and (
                Path(str(files[0])).is_file() or bool((side.get("dicom") or {}).get("archive"))
            )
        return nifti_source(side, self.outdir) is not None

    def path(self, case: str, side: dict, kind: str) -> Path:
        """The display copy ``kind`` (:data:`KINDS`) of ``case``, made now if missing or out of date."""
        if kind not in KINDS:
            raise InputError(f"{kind}: unknown display copy (expected one of {', '.join(KINDS)})")
        folder = self.root / case
        mask = self.outdir / f"{case}.nii.gz"
        source = None if side.get("kind") == "dicom" else nifti_source(side, self.outdir)
        stamp = {"source": _stamp_of(source), "mask": _stamp_of(mask), "max_voxels": self.max_voxels}
        if side.get("kind") == "dicom":
            stamp["series_uid"] = (side.get("dicom") or {}).get("series_uid")
        with self._lock(case):
            try:
                recorded = json.loads((folder / "stamp.json").read_text())
            except (OSError, ValueError):
                recorded = None
            target = folder / f"{kind}.nii"
            if recorded == stamp and target.is_file():
                return target
            if recorded != stamp:
                for old in KINDS:
                    (folder / f"{old}.nii").unlink(missing_ok=True)
            folder.mkdir(parents=True, exist_ok=True)
            self._make(case, side, mask, source, folder, kind)
            with atomic_path(folder / "stamp.json") as tmp:
                tmp.write_text(json.dumps(stamp))
            return target

    def _scan(self, case: str, side: dict, mask: Path, source: Path | None) -> nib.Nifti1Image | None:
        if side.get("kind") == "dicom":
            with contextlib.ExitStack() as stack:
                try:
                    found = open_recorded_series(mask, case, side.get("dicom") or {}, self.root, stack)
                    return read_series(found.series).image
                except InputError:
                    return None
        return load_volume(source) if source is not None else None

    def _make(self, case: str, side: dict, mask: Path, source: Path | None, folder: Path, kind: str) -> None:
        """Make ``kind`` and its partner from one read of the scan: the display pair (``scan_display``,
        ``labels_display``) or the full-resolution pair (``scan_full``, ``labels_scan_grid``)."""
        labels_img = nib.load(str(mask))
        scan = self._scan(case, side, mask, source)
        if scan is None:  # no scan: a blank background on the mask's grid
            data = np.full(labels_img.shape[:3], -1000, np.int16)
            data, grid_affine = canonical(data, labels_img.affine)
        else:
            data, grid_affine = canonical(np.asanyarray(scan.dataobj), scan.affine)
        labels = np.asarray(labels_img.dataobj).astype(np.uint8)
        labels = to_grid(labels, labels_img.affine, grid_affine, data.shape, f"{mask}")
        spacing = tuple(np.sqrt((grid_affine[:3, :3] ** 2).sum(axis=0)))
        factors = block_factors(data.shape, spacing, self.max_voxels)
        if kind in ("scan_full", "labels_scan_grid"):
            _write(to_int16(data), grid_affine, folder / "scan_full.nii")
            _write(labels, grid_affine, folder / "labels_scan_grid.nii")
        if kind in ("scan_display", "labels_display"):
            small, small_labels, affine = data, labels, grid_affine
            if factors != (1, 1, 1):
                small, affine = block_mean(data, grid_affine, factors)
                small_labels = subsample(labels, factors)
            _write(to_int16(small), affine, folder / "scan_display.nii")
            _write(small_labels, affine, folder / "labels_display.nii")


def _write(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
