"""Atomic file writes: write to a temporary name in the destination folder, then rename.

``os.replace`` is atomic on POSIX when source and destination are on the same file system, so a reader (or a
resumed run) never sees a half-written file — after ``kill -9`` there is either the old file, the new file, or
no file, plus at most a stray ``.tmp-*`` file that is ignored and cleaned up on the next write.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: Prefix of every temporary file; folder listings (:func:`medseg.io.cases.list_cases`) skip such names.
TEMP_PREFIX = ".tmp-"


def _default_mode() -> int:
    """Permissions a plain ``open(..., "w")`` would give (0666 minus the umask); mkstemp uses 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _suffixes(path: Path) -> str:
    name = path.name
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    The temporary name keeps the file's extension(s) so that writers that infer the format from the name
    (nibabel, SimpleITK, matplotlib) still work. On error the temporary file is removed.

    Example:
        >>> with atomic_path("out/mask.nii.gz") as tmp:   # doctest: +SKIP
        ...     nib.save(img, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f"{TEMP_PREFIX}{path.name}.", suffix=_suffixes(path), dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
