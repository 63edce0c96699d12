"""One way to list the cases of a folder: NIfTI files named by case, temporary files never taken for inputs.

Used by ``medseg segment`` (inputs), ``medseg evaluate`` (predictions and references) and anything else
that reads a folder of volumes, so they agree on what a case is: ``liver_001.nii.gz`` and ``liver_001.nii``
are the same case ``liver_001`` — both present is an error naming the two files, never two outputs written
to one path or one silently preferred.

Every entry *named* like a NIfTI file is a case, even when it cannot be read (a dangling symbolic link, a
folder called ``x.nii.gz``, a FIFO): such an entry becomes a listed failure of that case
(:func:`check_case_file`), not a silent gap in a batch.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from medseg.io.atomic import TEMP_PREFIX
from medseg.io.nifti import InputError, case_name, is_nifti


def list_cases(path: str | os.PathLike, what: str = "input") -> dict[str, Path]:
    """Case name → NIfTI file, for one file or a folder of them (sorted by case name).

    Hidden files and the temporary files of interrupted atomic writes (``.tmp-*``) are not cases. Entries
    named ``*.nii`` / ``*.nii.gz`` are listed whatever they are (see :func:`check_case_file`).

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
        if p.name.startswith((".", TEMP_PREFIX)) or not is_nifti(p):
            continue
        name = case_name(p)
        if name in found:
            raise InputError(
                f"{path}: {what} folder has two files for case {name!r}: {found[name].name}, {p.name}"
            )
        found[name] = p
    return dict(sorted(found.items()))


def check_case_file(path: str | os.PathLike) -> None:
    """Raise :class:`InputError` unless ``path`` is a regular file this process can open for reading.

    Cheap (``lstat``/``stat``/``access``), so a batch can run it on every entry before any voxel is read;
    it names what the entry is instead of a reader's confusing error (or, for a FIFO, a reader that waits
    forever).
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise InputError(
                f"{path}: dangling symbolic link (target {os.readlink(path)} not found)"
            ) from None
        raise InputError(f"{path}: file not found") from None
    except OSError as exc:  # symlink loop, name too long, permission on a parent folder
        raise InputError(f"{path}: cannot access ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{path}: is a folder, expected a NIfTI file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file (a FIFO, socket or device), expected a NIfTI file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied (file not readable by this user)")
