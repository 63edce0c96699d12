"""Atomic file writes: write to a temporary name in the destination folder, then rename.

``os.replace`` is atomic on POSIX when source and destination are on the same file system, so a reader (or a
resumed run) never sees a half-written file — after ``kill -9`` there is either the old file, the new file, or
no file, plus at most a stray ``.tmp-*`` file. Stray temporary files are never taken for cases
(:func:`medseg.io.cases.list_cases` skips them) and are removed by the next run in that folder
(:func:`remove_stale_temps`, called at the start of a run, e.g. on the output folder of ``medseg segment``).

A temporary name records who wrote it, ``.tmp-<pid>-<host>-<name>.<random><suffix>``: ``<host>`` is a short
tag of the machine's name, so that a cleaner only judges the writers it can see. Two runs writing into one
folder at once (sharded batches, possibly on several machines over a shared file system) thus never delete
each other's live temporary files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

#: Prefix of every temporary file; folder listings (:func:`medseg.io.cases.list_cases`) skip such names.
TEMP_PREFIX = ".tmp-"

#: A temporary file untouched for this long is stale whoever wrote it: no single write takes a day, and it
#: covers the cases a PID cannot judge (another machine's writer, a PID reused by an unrelated process).
STALE_AFTER_S = 24 * 3600.0


def _host_tag() -> str:
    """8 hex digits naming this machine (fixed width, no dash, so temporary names parse unambiguously)."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _default_mode() -> int:
    """Permissions a plain ``open(..., "w")`` would give (0666 minus the umask); mkstemp uses 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _suffixes(path: Path) -> str:
    name = path.name
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix


def temp_prefix(path: str | os.PathLike) -> str:
    """Name prefix of this process's temporary files for ``path``: ``.tmp-<pid>-<host>-<name>.``."""
    return f"{TEMP_PREFIX}{os.getpid()}-{_host_tag()}-{Path(path).name}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    The temporary name keeps the file's extension(s) so that writers that infer the format from the name
    (nibabel, SimpleITK, matplotlib) still work, and starts with ``.tmp-<pid>-<host>-`` so that
    :func:`remove_stale_temps` can tell a dead writer's leftovers from a live writer's file. On error the
    temporary file is removed.

    Example:
        >>> with atomic_path("out/mask.nii.gz") as tmp:   # doctest: +SKIP
        ...     nib.save(img, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=_suffixes(path), dir=path.parent)
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


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and is not a zombie (killed, not yet reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    try:  # Linux: a zombie still answers signal 0 but will never finish its write
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


#: ``.tmp-<pid>-<host tag>-<name>.<random>[<suffix>]``, written by :func:`atomic_path`.
_TEMP_NAME = re.compile(r"\.tmp-(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})-.+")
#: medseg ≤ 0.2 wrote ``.tmp-<name>.<random 8><suffix>`` with no writer recorded; the suffix repeats the
#: end of ``<name>``. Only names of exactly this shape are taken for such leftovers, so that another tool's
#: ``.tmp-*`` files in the same folder are never deleted.
_OLD_TEMP_NAME = re.compile(r"\.tmp-.*?(?P<suffix>\.nii\.gz|\.[^.]+|)\.[a-z0-9_]{8}(?P=suffix)")


def _writer(name: str) -> tuple[int, str] | None:
    """``(pid, host tag)`` from a temporary file name of :func:`atomic_path`, else None."""
    match = _TEMP_NAME.fullmatch(name)
    return (int(match["pid"]), match["tag"]) if match else None


def is_stale_temp(path: str | os.PathLike, now: float | None = None) -> bool:
    """Whether ``path`` is a temporary file that no live writer will rename any more.

    Stale: a writer on this machine that is not alive; the old name pattern, which records no writer; or
    either pattern untouched for :data:`STALE_AFTER_S`. A temporary file of another machine's writer is
    left alone until then; a name medseg does not write is never stale.
    """
    path = Path(path)
    writer = _writer(path.name)
    if writer is None and not _OLD_TEMP_NAME.fullmatch(path.name):
        return False
    try:
        age = (time.time() if now is None else now) - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    if writer is None or age > STALE_AFTER_S:
        return True
    pid, tag = writer
    return tag == _host_tag() and not process_alive(pid)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the stale temporary files (:func:`is_stale_temp`) directly inside ``folder``; return them.

    Call it at the start of a run that writes into ``folder``: the leftovers of a killed run go, the live
    temporary files of a concurrent run stay. A missing folder has nothing to remove.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    now = time.time()
    for path in sorted(folder.glob(f"{TEMP_PREFIX}*")):
        if path.is_dir() and not path.is_symlink():
            continue
        if is_stale_temp(path, now):
            try:
                path.unlink()
            except OSError:  # a concurrent cleaner was first, or no permission: left, still ignored
                continue
            removed.append(path)
    return removed


def check_writable(folder: str | os.PathLike) -> None:
    """Create and delete a temporary file in ``folder``: the cheapest proof that outputs can go there
    (permissions, a read-only mount, an immutable folder, no inodes left). Call it before any work.

    Raises:
        OSError: the folder cannot be written; ``strerror`` says why.
    """
    fd, name = tempfile.mkstemp(prefix=temp_prefix(Path(folder) / "write-check"), dir=folder)
    os.close(fd)
    os.unlink(name)


#: errno values that mean the output's file system has no room left.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a write that failed for lack of disk space;
    some writers (SimpleITK, highdicom) re-raise the ``OSError`` as another type, so the text counts too."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if getattr(seen, "errno", None) in _NO_SPACE or "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
