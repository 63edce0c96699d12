"""Reading and writing volumes with their geometry kept (affine, spacing, orientation); case listing; label
names; checkpoints (:mod:`medseg.io.checkpoint`, imported on its own because it needs torch)."""

from __future__ import annotations

from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.io.cases import list_cases
from medseg.io.labels import parse_label_names, read_label_names
from medseg.io.nifti import (
    InputError,
    case_name,
    is_nifti,
    load_volume,
    save_like,
    save_volume,
    voxel_spacing,
)
from medseg.io.paths import UnsafePathError, resolve_inside

__all__ = [
    "InputError",
    "UnsafePathError",
    "atomic_path",
    "atomic_write_text",
    "case_name",
    "is_nifti",
    "list_cases",
    "load_volume",
    "parse_label_names",
    "read_label_names",
    "resolve_inside",
    "save_like",
    "save_volume",
    "voxel_spacing",
]
