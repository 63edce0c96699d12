"""Reading and writing volumes with their geometry kept (affine, spacing, orientation)."""

from __future__ import annotations

from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.io.nifti import InputError, case_name, is_nifti, load_volume, save_like, save_volume

__all__ = [
    "InputError",
    "atomic_path",
    "atomic_write_text",
    "case_name",
    "is_nifti",
    "load_volume",
    "save_like",
    "save_volume",
]
