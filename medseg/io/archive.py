"""``.zip`` archives as untrusted input: list every member, decide, then extract only what medseg reads.

>>> found = extract_zip("study.zip", "tmp/")                             # doctest: +SKIP
>>> found.folder, found.extracted, found.note()                         # doctest: +SKIP
(PosixPath('tmp/export'), ('export/IM0001', ...), 'study.zip: 2 member(s) not read (not NIfTI or DICOM): …')

Nothing is written before the whole central directory has been read and judged; then only the **candidate
inputs** are extracted, each with a bounded copy:

* **NIfTI** members, by name (``.nii``, ``.nii.gz``), that are cases of the folder medseg reads (directly in
  the archive's top folder or in its one top-level folder, not hidden: the rule of
  :func:`medseg.io.cases.list_cases`);
* **DICOM** members: the ``DICM`` magic at byte 128, read from the archive (at most 132 bytes of the member).
  DICOM files without the 128-byte preamble are not candidates, because the series reader
  (:func:`medseg.io.dicom.find_series`, pydicom without ``force``) does not read them either.

Everything else is **not read**, and :meth:`Extraction.note` names it in one line (README, ``.DS_Store``,
``__MACOSX/``, a member of zeros). **Archives inside the archive** (``.zip``, ``.tar``, ``.gz`` that is not
``.nii.gz``, ``.7z``, …, by name or magic) are not opened either, and named as such: PACS exports carry
viewer bundles and other archives beside the images, so refusing them would refuse real exports, and
opening them would multiply what a bomb can do (nested bombs) — the user can unpack and pass the folder. An
archive with no candidate at all is refused, naming what it held.

**Refused** (one :class:`~medseg.io.nifti.InputError` line naming the archive, and the member with its
numbers where one is to blame; nothing extracted):

* any member with an absolute path, a ``..`` component (zip-slip), a symbolic link or special file, an
  encrypted member, a compression method zipfile cannot read, or a name that is not valid UTF-8 although
  the archive flags it so (``zipfile`` raises ``UnicodeDecodeError``; the name is shown as bytes). Names
  without the UTF-8 flag are cp437 by the zip specification; they may hold odd characters and extract as
  decoded, inside the folder;
* breaches of :class:`ArchiveLimits`: more members (or a larger central directory) than allowed — checked
  on the end-of-central-directory record before ``zipfile`` reads the directory into memory —, a candidate
  member above ``ratio_from_bytes`` that expands more than ``max_ratio`` times, the candidates together
  expanding more than that, more candidate bytes than ``max_total_bytes`` or than the disk has free.

Declared sizes are a real bound: ``zipfile``'s reader never yields more than a member's declared
``file_size`` (and checks its CRC-32 at the end; tested), and the copy stops with an error should it ever
do so. Whatever :func:`extract_zip` wrote is removed again when it fails.
"""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import ClassVar, Literal

from medseg.io.nifti import InputError, is_nifti

MemberKind = Literal["folder", "nifti", "dicom", "archive", "other"]

#: Names of archives and compressed files (lower case); ``.nii.gz`` is NIfTI and is decided first.
ARCHIVE_SUFFIXES = (
    ".zip", ".zipx", ".tar", ".tgz", ".tbz", ".tbz2", ".txz", ".tzst", ".gz", ".bz2", ".xz", ".zst", ".lz4",
    ".lzma", ".7z", ".rar", ".cab",
)  # fmt: skip
#: Magic numbers of the same (zip, gzip, 7-Zip, RAR, bzip2, xz, zstd).
ARCHIVE_MAGICS = (
    b"PK\x03\x04", b"\x1f\x8b", b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd",
)  # fmt: skip
#: Compression methods Python's zipfile reads: stored, deflate, bzip2, LZMA.
READABLE_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", 12: "bzip2", 14: "LZMA"}
#: Bytes one copy step moves (the memory a member's extraction takes).
CHUNK = 1 << 20

#: What reading or writing one member may raise besides InputError (corrupt data, a full disk, …).
_READ_ERRORS = (zipfile.BadZipFile, OSError, EOFError, zlib.error, lzma.LZMAError, NotImplementedError)

_WHY = {
    "other": "not NIfTI or DICOM",
    "archive": "nested archive(s), not opened",
    "nifti": "NIfTI not in the top folder, or hidden",
}


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may hold before medseg refuses it (all checked before anything is written).

    The defaults pass real PACS exports of thousands of slices and refuse deflate bombs. The compression
    ratios of real and bomb archives they were chosen from are in ``docs/design.md`` (section
    ``medseg.io.archive``).

    Attributes:
        max_members: members the archive may hold; checked first on the end-of-central-directory record,
            before ``zipfile`` reads the directory into memory.
        max_total_bytes: uncompressed bytes of the NIfTI and DICOM members together (they must also fit
            the free disk space).
        max_ratio: largest expansion (uncompressed / compressed bytes) of one candidate member above
            ``ratio_from_bytes``, and of the candidates together once they exceed ``ratio_from_bytes``.
        ratio_from_bytes: size from which the ratio is judged: above any single DICOM slice (2048² int16
            is 8 MiB), so a small member that compresses well, such as a slice of air, is not refused.
        directory_bytes_per_member: central directory bytes allowed per member.
    """

    max_members: int = 100_000
    max_total_bytes: int = 64 * 2**30
    max_ratio: float = 200.0
    ratio_from_bytes: int = 16 * 2**20
    #: Central directory bytes allowed per member (the directory is read into memory whole).
    directory_bytes_per_member: int = 1024

    #: ``parse`` keys → (field, unit): what ``medseg segment --archive-limits`` accepts.
    KEYS: ClassVar[dict[str, tuple[str, int]]] = {
        "members": ("max_members", 1),
        "total-gb": ("max_total_bytes", 2**30),
        "ratio": ("max_ratio", 1),
    }

    @classmethod
    def parse(cls, text: str | None) -> ArchiveLimits | None:
        """``members=…,total-gb=…,ratio=…`` → the limits, the others at their defaults (None: no text).

        Raises:
            ValueError: an unknown key or a value that is not a positive number (one line).
        """
        if not text:
            return None
        values: dict[str, float | int] = {}
        for item in text.split(","):
            key, _, value = (part.strip() for part in item.partition("="))
            if key not in cls.KEYS:
                raise ValueError(f"--archive-limits: unknown key {key!r}; valid: {', '.join(cls.KEYS)}")
            field, unit = cls.KEYS[key]
            try:
                number = float(value)
            except ValueError:
                number = -1.0
            if not number > 0:
                raise ValueError(f"--archive-limits: {key}={value!r} is not a positive number")
            values[field] = number if field == "max_ratio" else int(number * unit)
        return cls(**values)


@dataclass(frozen=True)
class Extraction:
    """What :func:`extract_zip` did: the folder to read, the members extracted, the members not read and why
    (``other``, ``archive``, ``nifti``: see :meth:`note`)."""

    archive: Path
    folder: Path
    extracted: tuple[str, ...]
    not_read: tuple[tuple[str, str], ...]

    def note(self, listed: int = 5) -> str | None:
        """One line naming the members not read (grouped by why, ``listed`` names per group), else None."""
        if not self.not_read:
            return None
        return f"{self.archive}: {_not_read(self.not_read, listed)}"


def is_zip(path: str | os.PathLike) -> bool:
    """Whether ``path`` is meant as an archive: a file named ``*.zip``."""
    return str(path).lower().endswith(".zip") and not Path(path).is_dir()


def _shown(name: str) -> str:
    """A member name for a message line: as is when printable, else its repr (control characters)."""
    return name if name.isprintable() else repr(name)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _not_read(members: Iterable[tuple[str, str]], listed: int) -> str:
    """``3 member(s) not read (not NIfTI or DICOM): a, b, c``, or with several reasons
    ``5 member(s) not read: 3 not NIfTI or DICOM (a, b, c); 2 nested archive, not opened (d, e)``."""
    groups: dict[str, list[str]] = {why: [] for why in _WHY}
    for name, why in members:
        groups[why].append(_shown(name))
    named = {}
    for why, names in groups.items():
        if names:
            more = f", … (+{len(names) - listed} more)" if len(names) > listed else ""
            named[why] = ", ".join(names[:listed]) + more
    total = sum(map(len, groups.values()))
    if len(named) == 1:
        ((why, names),) = named.items()
        return f"{total} member(s) not read ({_WHY[why]}): {names}"
    return f"{total} member(s) not read: " + "; ".join(
        f"{len(groups[w])} {_WHY[w]} ({n})" for w, n in named.items()
    )


def refuse_member(info: zipfile.ZipInfo) -> str | None:
    """Why one member makes the archive unsafe to extract, or None."""
    name = info.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return f"member {name!r} has an absolute path"
    if ".." in parts:
        return f"member {name!r} leads outside the archive (through '..', zip-slip)"
    kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix file type recorded (a plain file)
    if kind == stat.S_IFLNK:
        return f"member {name!r} is a symbolic link"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return f"member {name!r} is not a regular file or folder"
    if info.flag_bits & 0x1:
        return f"member {name!r} is encrypted"
    if not info.is_dir() and info.compress_type not in READABLE_METHODS:
        return f"member {name!r} uses compression method {info.compress_type}, which medseg cannot read"
    return None


def member_kind(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> MemberKind:
    """What one member is: a ``folder``; ``nifti`` by name; ``dicom`` by the ``DICM`` magic at byte 128 (at
    most 132 bytes read from the archive); a nested ``archive`` by name or magic; else ``other``. Members
    below ``__MACOSX/`` (macOS resource forks) are ``other`` unread."""
    name = info.filename
    if info.is_dir():
        return "folder"
    if name.split("/", 1)[0] == "__MACOSX":
        return "other"
    if is_nifti(name):
        return "nifti"
    head = b""
    if info.file_size > 0:
        with zf.open(info) as fh:
            head = fh.read(132)
    if head[128:132] == b"DICM":
        return "dicom"
    if name.lower().endswith(ARCHIVE_SUFFIXES) or head.startswith(ARCHIVE_MAGICS):
        return "archive"
    return "other"


def _declared_directory(path: Path) -> tuple[int, int] | None:
    """(members, central directory bytes) that the end-of-central-directory record declares (its ZIP64
    record when there is one), or None when no such record is found (zipfile then says why)."""
    with open(path, "rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, end - 22 - 65535 - 20 - 56))  # record, longest comment, ZIP64 locator and record
        tail = fh.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None
    members, size = struct.unpack_from("<HI", tail, at + 10)
    loc = at - 20
    if loc >= 56 and tail[loc : loc + 4] == b"PK\x06\x07" and tail[loc - 56 : loc - 52] == b"PK\x06\x06":
        members, size = struct.unpack_from("<QQ", tail, loc - 56 + 32)
    return members, size


def check_directory(archive: Path, limits: ArchiveLimits) -> None:
    """Refuse an archive whose end record declares more members, or a larger central directory, than
    ``limits`` allow — before ``zipfile`` reads that directory into memory."""
    declared = _declared_directory(archive)
    if declared is None:
        return
    members, size = declared
    most = limits.max_members * limits.directory_bytes_per_member
    if members > limits.max_members:
        raise InputError(
            f"{archive}: declares {members} members, more than the {limits.max_members} allowed "
            "(ArchiveLimits.max_members); archive refused"
        )
    if size > most:
        raise InputError(
            f"{archive}: central directory of {_size(size)}, more than the {_size(most)} allowed for "
            f"{limits.max_members} members; archive refused"
        )


def check_spans(archive: Path, zf: zipfile.ZipFile, members: list[zipfile.ZipInfo]) -> None:
    """Every member's local header (at least 30 bytes) and declared compressed data must end before the next
    member's header (or the central directory): no two members share bytes (an overlapping-entries bomb
    expands one compressed kernel once per member), and ``compress_size``, which the ratio caps use, is not
    declared larger than the bytes the archive holds for it."""
    ordered = sorted(members, key=lambda i: i.header_offset)
    ends = [i.header_offset for i in ordered[1:]] + [zf.start_dir]
    for info, end in zip(ordered, ends, strict=True):
        if info.header_offset + 30 + info.compress_size > end:
            raise InputError(
                f"{archive}: member {_shown(info.filename)!r} declares {info.compress_size} compressed bytes "
                f"but only {max(end - info.header_offset - 30, 0)} lie before the next member (overlapping "
                "entries, a zip bomb?); archive refused"
            )


def _top(names: list[str]) -> tuple[str, ...]:
    """The one top-level folder every name lies in (a zipped folder), or ``()``."""
    firsts = {PurePosixPath(n).parts[0] for n in names}
    if len(firsts) == 1 and all(len(PurePosixPath(n).parts) > 1 for n in names):
        return (firsts.pop(),)
    return ()


def check_caps(archive: Path, chosen: list[zipfile.ZipInfo], limits: ArchiveLimits) -> None:
    """Refuse ``chosen`` members that expand more than ``limits.max_ratio`` (one above
    ``ratio_from_bytes``, or all together) or hold more than ``limits.max_total_bytes``."""
    total = packed = 0
    for i, info in enumerate(chosen, 1):
        size, csize = info.file_size, max(info.compress_size, 1)
        if size > limits.ratio_from_bytes and size / csize > limits.max_ratio:
            raise InputError(
                f"{archive}: member {_shown(info.filename)!r} expands {size / csize:.0f}× ({_size(size)} "
                f"from {_size(csize)}), more than the {limits.max_ratio:.0f}× allowed for members above "
                f"{_size(limits.ratio_from_bytes)} (a zip bomb?); archive refused"
            )
        total, packed = total + size, packed + csize
        if total > limits.max_total_bytes:
            raise InputError(
                f"{archive}: the NIfTI and DICOM members hold more than the {_size(limits.max_total_bytes)} "
                f"allowed (ArchiveLimits.max_total_bytes): {_size(total)} at member "
                f"{_shown(info.filename)!r} ({i} of {len(chosen)}); unpack it elsewhere and pass the folder"
            )
    if total > limits.ratio_from_bytes and total / max(packed, 1) > limits.max_ratio:
        raise InputError(
            f"{archive}: its {len(chosen)} NIfTI and DICOM members expand {total / packed:.0f}× together "
            f"({_size(total)} from {_size(packed)}), more than the {limits.max_ratio:.0f}× allowed "
            "(a zip bomb?); archive refused"
        )


def _plan(archive: Path, zf: zipfile.ZipFile, limits: ArchiveLimits):
    """The members to extract, the members not read (name, why) and the top folder; raises on any refusal."""
    members = zf.infolist()
    if len(members) > limits.max_members:
        raise InputError(
            f"{archive}: holds {len(members)} members, more than the {limits.max_members} allowed "
            "(ArchiveLimits.max_members); archive refused"
        )
    for info in members:
        if cause := refuse_member(info):
            raise InputError(f"{archive}: {cause}; archive refused")
    check_spans(archive, zf, members)
    kinds: dict[str, list[zipfile.ZipInfo]] = {
        k: [] for k in ("folder", "nifti", "dicom", "archive", "other")
    }
    for info in members:
        try:
            kinds[member_kind(zf, info)].append(info)
        except _READ_ERRORS as exc:
            raise InputError(
                f"{archive}: member {_shown(info.filename)!r} cannot be read ({' '.join(str(exc).split())}); "
                "archive refused"
            ) from None
    nifti = [i for i in kinds["nifti"] if not PurePosixPath(i.filename).name.startswith(".")]
    top = _top([i.filename for i in nifti + kinds["dicom"]])
    cases = [i for i in nifti if PurePosixPath(i.filename).parts[:-1] == top]
    chosen = sorted(kinds["dicom"] + cases, key=lambda i: i.filename)
    not_read = [(i.filename, "other") for i in kinds["other"]]
    not_read += [(i.filename, "archive") for i in kinds["archive"]]
    not_read += [(i.filename, "nifti") for i in kinds["nifti"] if i not in cases]
    if not chosen:
        held = _not_read(not_read, 5) if not_read else "it holds no file"
        hint = "; unpack the nested archive and pass the folder" if kinds["archive"] else ""
        raise InputError(f"{archive}: no NIfTI (.nii, .nii.gz) or DICOM member to read; {held}{hint}")
    targets: dict[tuple[str, ...], str] = {}
    for info in chosen:
        parts = PurePosixPath(info.filename).parts
        if parts in targets:
            raise InputError(
                f"{archive}: member {_shown(info.filename)!r} appears twice (also as "
                f"{_shown(targets[parts])!r}); archive refused"
            )
        targets[parts] = info.filename
    folders = {p[:k] for p in targets for k in range(1, len(p))}
    if clash := sorted(folders & targets.keys()):
        raise InputError(
            f"{archive}: member {'/'.join(clash[0])!r} is both a file and a folder; archive refused"
        )
    check_caps(archive, chosen, limits)
    return chosen, tuple(sorted(not_read)), top


def _copy(src, dst, declared: int) -> None:
    """Copy at most ``declared`` bytes (zipfile stops there itself and checks the CRC-32; this is a guard)."""
    left = declared
    while chunk := src.read(min(CHUNK, left + 1)):
        left -= len(chunk)
        if left < 0:
            raise zipfile.BadZipFile(f"member holds more than its declared {declared} bytes")
        dst.write(chunk)


def _extract(archive: Path, zf: zipfile.ZipFile, chosen: list[zipfile.ZipInfo], dest: Path) -> None:
    """Extract ``chosen`` below ``dest``; on any failure remove every file and folder made here."""
    made: list[Path] = []
    root = dest.resolve()
    info = None
    try:
        for info in chosen:
            parts = PurePosixPath(info.filename).parts
            target = dest.joinpath(*parts)
            if not target.resolve().is_relative_to(root):  # cannot happen after refuse_member; a guard
                raise InputError(f"{archive}: member {_shown(info.filename)!r} leads outside {dest}; refused")
            for folder in (dest.joinpath(*parts[:k]) for k in range(1, len(parts))):
                if not folder.is_dir():
                    folder.mkdir()
                    made.append(folder)
            with zf.open(info) as src, open(target, "xb") as dst:
                made.append(target)
                _copy(src, dst, info.file_size)
    except BaseException as exc:
        for path in reversed(made):  # files before the folders that hold them
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if info is not None and isinstance(exc, _READ_ERRORS) and not isinstance(exc, InputError):
            raise InputError(
                f"{archive}: member {_shown(info.filename)!r} cannot be extracted "
                f"({' '.join(str(exc).split())}); archive refused"
            ) from None
        raise


def extract_zip(
    archive: str | os.PathLike, dest: str | os.PathLike, *, limits: ArchiveLimits | None = None
) -> Extraction:
    """Extract the NIfTI and DICOM members of ``archive`` into the existing folder ``dest``, after judging
    every member (module docstring). :attr:`Extraction.folder` is the folder to read: ``dest``, or its one
    top-level folder when every extracted member lies in one (a zipped folder).

    Raises:
        InputError: not a readable zip, an unsafe member, a breach of ``limits`` (default
            :class:`ArchiveLimits`), no NIfTI or DICOM member, more candidate bytes than ``dest``'s disk has
            free, or a member that fails while extracting. One line naming the archive (and the member);
            nothing stays extracted.
    """
    archive, dest = Path(archive), Path(dest)
    limits = limits or ArchiveLimits()
    try:
        check_directory(archive, limits)
        with zipfile.ZipFile(archive) as zf:
            chosen, not_read, top = _plan(archive, zf, limits)
            need, free = sum(i.file_size for i in chosen), shutil.disk_usage(dest).free
            if need > free:
                raise InputError(
                    f"{archive}: extracting its NIfTI and DICOM members needs {_size(need)} but {dest} has "
                    f"{_size(free)} free; unpack it elsewhere and pass the folder"
                )
            _extract(archive, zf, chosen, dest)
    except InputError:
        raise
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{archive}: member name {bytes(exc.object)!r} is not valid UTF-8 (the archive says it is); "
            "archive refused"
        ) from None
    except zipfile.BadZipFile as exc:
        raise InputError(f"{archive}: not a readable .zip archive ({' '.join(str(exc).split())})") from None
    except (OSError, EOFError, zipfile.LargeZipFile, NotImplementedError, RuntimeError, ValueError) as exc:
        raise InputError(f"{archive}: cannot extract ({' '.join(str(exc).split())})") from None
    return Extraction(archive, dest.joinpath(*top), tuple(i.filename for i in chosen), not_read)
