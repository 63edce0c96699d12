"""The source series of a DICOM case found again for ``medseg export``: only what its sidecar lists, confined.

A sidecar (:mod:`medseg.batch.sidecar`, already checked against its schema) records the series a mask
was segmented from: ``dicom.files`` (absolute paths in slice order) or, for a series that came from a
``.zip``, ``dicom.archive`` and the member names. :func:`open_recorded_series` opens exactly those files and
nothing else — no folder is walked — after refusing, in one line naming the case's mask and the cause:

* a file path that is not absolute, or holds a ``..`` component (a member name: absolute, or ``..``);
* a file listed twice, more than :data:`~medseg.batch.sidecar.MAX_SERIES_FILES` files (the schema
  check); the series folder is the folder holding all the files (DICOMDIR layouts split a series);
* a file that is not a regular file, or a symbolic link leading out of its series folder;
* a series folder or archive in a system folder (:func:`system_folder`: ``/etc``, ``/proc``, ``/usr``, …),
  symbolic links resolved;
* with ``source_root`` (``medseg export --source-root DIR``): a series folder or archive that is not inside
  ``DIR`` once symbolic links are resolved;
* an archive that is not a regular file named ``*.zip``, not a readable zip, declares more members than
  :class:`medseg.io.archive.ArchiveLimits` allows, lacks a listed member, or whose listed members are
  unsafe (:func:`medseg.io.archive.refuse_member`: links, special files, encrypted, …) or folders, or that
  breaks the caps of a first read (overlapping entries, compression ratio, total size); only the
  listed members are extracted (into a temporary folder in the output folder, removed when the case is done).

The series is then found among those files only (:func:`medseg.io.dicom.find_series` run on a temporary
folder of symbolic links to them, the series' paths mapped back to the recorded ones), matched by Series
Instance UID, and must consist of exactly the recorded files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import zipfile
from collections import Counter
from dataclasses import replace
from pathlib import Path, PurePosixPath

from medseg.batch.inputs import CaseSource
from medseg.io import InputError
from medseg.io.archive import ArchiveLimits, check_caps, check_directory, check_spans, refuse_member
from medseg.io.atomic import temp_prefix
from medseg.io.dicom import SeriesInfo, find_series

#: Folders that, with everything below them, hold no series a user could have given medseg.
SYSTEM_TREES = (
    "/proc",
    "/sys",
    "/dev",
    "/etc",
    "/boot",
    "/bin",
    "/sbin",
    "/usr",
    "/run",
    "/var/log",
    "/var/run",
    "/var/lock",
    "/var/cache",
    "/var/spool",
    "/var/mail",
)
#: Exceptions below :data:`SYSTEM_TREES`: removable media (udisks2 mounts a CD or USB disk there).
MEDIA_TREES = ("/run/media",)
#: Folders that are refused themselves as a series folder (their subfolders are not).
SYSTEM_FOLDERS = ("/", "/home", "/var", "/var/lib", "/opt", "/srv")


def system_folder(path: str | os.PathLike) -> str | None:
    """The system folder ``path`` (absolute, normalised) is or lies in, else None: :data:`SYSTEM_TREES`
    (except :data:`MEDIA_TREES`), every top-level ``/lib*``, and :data:`SYSTEM_FOLDERS` themselves. macOS's
    ``/private/etc`` and ``/private/var`` count as ``/etc`` and ``/var``."""
    posix = PurePosixPath(os.fspath(path))
    if posix.parts[:2] == ("/", "private") and len(posix.parts) > 2:
        posix = PurePosixPath("/", *posix.parts[2:])
    if str(posix) in SYSTEM_FOLDERS:
        return str(posix)
    if len(posix.parts) > 1 and posix.parts[1].startswith("lib"):
        return f"/{posix.parts[1]}"
    if any(posix.is_relative_to(media) for media in MEDIA_TREES):
        return None
    return next((tree for tree in SYSTEM_TREES if posix.is_relative_to(tree)), None)


def _confine(mask: Path, what: str, recorded: Path, source_root: Path | None) -> Path:
    """``recorded`` with symbolic links resolved, after refusing system folders and, with ``source_root``
    (resolved), anything outside it. ``what`` names the thing in the message."""
    for path in (recorded, recorded.resolve()):
        if (system := system_folder(path)) is not None:
            shown = recorded if path == recorded else f"{recorded} (→ {path})"
            raise InputError(
                f"{mask}: recorded source {what} {shown} is in the system folder {system}; refused (not a "
                "series a user gave)"
            )
    real = recorded.resolve()
    if source_root is not None and not real.is_relative_to(source_root):
        shown = recorded if real == recorded else f"{recorded} (→ {real})"
        raise InputError(
            f"{mask}: recorded source {what} {shown} is outside --source-root {source_root}; refused"
        )
    return real


def _recorded_paths(mask: Path, files: list[str]) -> tuple[Path, list[Path]]:
    """The recorded files as absolute paths and their series folder: the folder that holds them all (a
    series may lie in several subfolders, as in DICOMDIR layouts; the reader groups it the same way)."""
    paths = []
    for name in files:
        path = Path(name)
        if "\x00" in name or not path.is_absolute():
            raise InputError(f"{mask}: recorded source file {name!r} is not an absolute path; refused")
        if ".." in path.parts:
            raise InputError(
                f"{mask}: recorded source file {name} leads out of its folder through '..'; refused"
            )
        paths.append(path)
    folder = Path(os.path.commonpath([str(p.parent) for p in paths]))
    if len(set(paths)) != len(paths):
        twice = next(p for p, n in Counter(paths).items() if n > 1)
        raise InputError(f"{mask}: recorded source file {twice} is listed twice; refused")
    return folder, paths


def _regular_file(mask: Path, path: Path, real_folder: Path) -> Path:
    """``path`` resolved: an existing regular file inside ``real_folder``."""
    try:
        real = path.resolve(strict=True)
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise InputError(f"{mask}: source series file {path} not found (moved or deleted?)") from None
    except (OSError, RuntimeError) as exc:
        raise InputError(f"{mask}: source series file {path} cannot be opened ({exc})") from None
    if not real.is_relative_to(real_folder):
        raise InputError(
            f"{mask}: source series file {path} is a link to {real}, outside its series folder; refused"
        )
    if not stat.S_ISREG(mode):
        raise InputError(f"{mask}: source series file {path} is not a regular file; refused")
    return real


def _matched(mask: Path, found: list[SeriesInfo], uid: str, where: str, expected: set[Path]) -> SeriesInfo:
    """The series ``uid`` among ``found``: usable, and made of exactly the ``expected`` files."""
    info = next((s for s in found if s.series_uid == uid), None)
    if info is None:
        raise InputError(f"{mask}: series {uid} is not among the {len(expected)} recorded files in {where}")
    if set(info.files) != expected:
        raise InputError(
            f"{mask}: series {uid} in {where} is now {len(info.files)} of the {len(expected)} recorded files "
            "(files replaced?)"
        )
    if info.skipped or info.error:
        raise InputError(f"{mask}: series {uid} in {where}: {info.skipped or info.error}")
    return info


def _series_in_folder(
    mask: Path, name: str, block: dict, work: Path, stack: contextlib.ExitStack, source_root: Path | None
) -> CaseSource:
    folder, paths = _recorded_paths(mask, block["files"])
    real_folder = _confine(mask, "series folder", folder, source_root)
    if not real_folder.is_dir():
        raise InputError(f"{mask}: source series folder {folder} not found (moved or deleted?)")
    real = [_regular_file(mask, p, real_folder) for p in paths]
    # in the output folder, named like an extraction folder: a killed run's is removed by the next one
    links = Path(tempfile.mkdtemp(prefix=temp_prefix(work / "unzip"), dir=work))
    stack.callback(shutil.rmtree, links, ignore_errors=True)
    recorded = {}
    for i, (path, target) in enumerate(zip(paths, real, strict=True)):
        link = links / f"{i:06d}_{path.name}"  # numbered: files of two subfolders may share a name
        link.symlink_to(target)
        recorded[link] = path
    info = _matched(mask, find_series(links), block["series_uid"], str(folder), set(recorded))

    def shown(text: str) -> str:
        return text.replace(str(links), str(folder))

    info = replace(
        info,
        folder=folder,
        files=tuple(recorded[p] for p in info.files),
        notes=tuple(shown(n) for n in info.notes),
    )
    return CaseSource(name=name, kind="dicom", series=info)


def _members(mask: Path, archive: Path, files: list[str]) -> PurePosixPath:
    """Refuse unsafe member names; return the folder inside the archive that holds them all."""
    parts = []
    for name in files:
        member = PurePosixPath(name)  # as zipfile extracts it on POSIX; '..' judged with '\\' as '/' too
        if "\x00" in name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
            raise InputError(f"{mask}: recorded member {name!r} of {archive} has an absolute path; refused")
        if ".." in PurePosixPath(name.replace("\\", "/")).parts or not member.parts:
            raise InputError(
                f"{mask}: recorded member {name!r} of {archive} leads outside the archive; refused"
            )
        parts.append(member)
    if len(set(files)) != len(files):
        raise InputError(f"{mask}: a recorded member of {archive} is listed twice; refused")
    return PurePosixPath(os.path.commonpath([str(m.parent) for m in parts]) or ".")


def _zip_members(mask: Path, archive: Path, zf: zipfile.ZipFile, files: list[str]) -> list[zipfile.ZipInfo]:
    """The listed members: present, regular files, and safe by :func:`medseg.io.archive.refuse_member`."""
    infos = []
    for name in files:
        try:
            info = zf.getinfo(name)
        except KeyError:
            raise InputError(f"{mask}: member {name} is no longer in {archive} (archive replaced?)") from None
        if cause := refuse_member(info) or (f"member {name!r} is a folder" if info.is_dir() else None):
            raise InputError(f"{mask}: {archive}: {cause}; refused")
        infos.append(info)
    return infos


def _series_in_zip(
    mask: Path, name: str, block: dict, work: Path, stack: contextlib.ExitStack, source_root: Path | None
) -> CaseSource:
    archive = Path(block["archive"])
    if "\x00" in block["archive"] or not archive.is_absolute() or ".." in archive.parts:
        raise InputError(
            f"{mask}: recorded archive {block['archive']!r} is not an absolute path without '..'; refused"
        )
    if not archive.name.lower().endswith(".zip"):
        raise InputError(f"{mask}: recorded archive {archive} is not a .zip file; refused")
    real = _confine(mask, "archive", archive, source_root)
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise InputError(f"{mask}: source archive {archive} not found (moved or deleted?)") from None
    except OSError as exc:
        raise InputError(f"{mask}: source archive {archive} cannot be opened ({exc})") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{mask}: recorded archive {archive} is not a regular file; refused")
    files = block["files"]
    inner = _members(mask, archive, files)
    limits = ArchiveLimits()
    try:
        try:  # the declared member count, before zipfile reads the whole directory into memory
            check_directory(real, limits)
        except InputError as exc:
            raise InputError(f"{mask}: {str(exc).replace(str(real), str(archive))}") from None
        with zipfile.ZipFile(real) as zf:
            infos = _zip_members(mask, archive, zf, files)
            try:  # the caps of a first read: overlapping entries, compression ratio, total size
                check_spans(real, zf, zf.infolist())
                check_caps(real, infos, limits)
            except InputError as exc:
                raise InputError(f"{mask}: {str(exc).replace(str(real), str(archive))}") from None
            need, free = sum(i.file_size for i in infos), shutil.disk_usage(work).free
            if need > free:
                raise InputError(
                    f"{mask}: the series in {archive} needs {need / 2**30:.1f} GiB to extract but {work} has "
                    f"{free / 2**30:.1f} GiB free"
                )
            tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(work / "unzip"), dir=work))
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
            for info in infos:
                zf.extract(info, tmp)
    except zipfile.BadZipFile as exc:
        raise InputError(f"{mask}: recorded archive {archive} is not a readable .zip ({exc})") from None
    except (OSError, EOFError, zipfile.LargeZipFile, NotImplementedError, RuntimeError, ValueError) as exc:
        raise InputError(
            f"{mask}: cannot extract the series from {archive} ({' '.join(str(exc).split())})"
        ) from None
    where = f"{archive}/{inner}" if str(inner) != "." else str(archive)
    expected = {tmp.joinpath(*PurePosixPath(f).parts) for f in files}
    info = _matched(mask, find_series(tmp / inner), block["series_uid"], where, expected)
    info = replace(info, folder=Path(where))  # messages name <archive>/<folder>, never the temporary folder
    return CaseSource(name=name, kind="dicom", series=info, archive=archive, root=tmp)


def open_recorded_series(
    mask: Path,
    name: str,
    block: dict,
    work: Path,
    stack: contextlib.ExitStack,
    source_root: Path | None = None,
) -> CaseSource:
    """The DICOM case ``name`` of ``mask`` from its sidecar's ``dicom`` ``block`` (checked by
    :func:`medseg.batch.sidecar.load_sidecar`): only the recorded files, confined (module docstring).
    Temporary folders (links; an archive's extracted members, in ``work``) are removed when ``stack``
    closes. ``source_root`` must be resolved already.

    Raises:
        InputError: one line naming ``mask`` and the cause.
    """
    if block.get("archive"):
        return _series_in_zip(mask, name, block, work, stack, source_root)
    return _series_in_folder(mask, name, block, work, stack, source_root)
