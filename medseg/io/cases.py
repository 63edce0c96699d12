"""One way to list the cases of a folder: NIfTI files named by case, temporary files never taken for inputs.

Used by ``medseg segment`` (inputs), ``medseg evaluate`` (predictions and references) and anything else
that reads a folder of volumes, so they agree on what a case is: ``liver_001.nii.gz`` and ``liver_001.nii``
are the same case ``liver_001`` — both present is an error naming the two files, never two outputs written
to one path or one silently preferred.
"""

from __future__ import annotations

import os
from pathlib import Path

from medseg.io.atomic import TEMP_PREFIX
from medseg.io.nifti import InputError, case_name, is_nifti


def list_cases(path: str | os.PathLike, what: str = "input") -> dict[str, Path]:
    """Case name → NIfTI file, for one file or a folder of them (sorted by case name).

    Hidden files and the temporary files of interrupted atomic writes (``.tmp-*``) are not cases.

    Raises:
        InputError: the path does not exist, or a folder holds two files for one case.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise InputError(f"{path}: {what} not found")
    if not path.is_dir():
        return {case_name(path): path}
    found: dict[str, Path] = {}
    for p in sorted(path.iterdir()):
        if p.name.startswith((".", TEMP_PREFIX)) or not is_nifti(p) or p.is_dir():
            continue
        name = case_name(p)
        if name in found:
            raise InputError(
                f"{path}: {what} folder has two files for case {name!r}: {found[name].name}, {p.name}"
            )
        found[name] = p
    return dict(sorted(found.items()))
