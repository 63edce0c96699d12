"""Safe resolution of paths that an untrusted file (a dataset's ``dataset.json``) names relative to a folder.

A dataset folder is data someone handed you. Its ``dataset.json`` may name ``../../home/me/.ssh/id_rsa``,
``/etc/passwd`` or ``imagesTr/x.nii.gz`` that is a symlink to a file elsewhere; reading such a path would
make medseg read (and, in training, learn from or copy into a checkpoint's plan) a file outside the folder
the user chose. :func:`resolve_inside` is the one resolver every reader of such paths uses: it accepts a
relative path only when the operating system's resolution of it — through every symlink, file or parent
folder — lands inside the resolved folder.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from medseg.io.nifti import InputError


class UnsafePathError(InputError):
    """A path named in ``source`` leads outside its folder (or is not a usable relative path).

    ``cause`` is the reason alone (``'../x.nii.gz' leads outside the dataset folder``), for callers that
    put it into their own message; ``str(exc)`` is ``"<source>: <cause>"``.
    """

    def __init__(self, source: str, cause: str) -> None:
        self.source, self.cause = source, cause
        super().__init__(f"{source}: {cause}")


def _outside(path: Path, root: Path) -> bool:
    return not (path == root or path.is_relative_to(root))


def _escape_reason(root: Path, relative: str, target: Path) -> str:
    """Why ``root / relative`` (which resolves to ``target``, outside ``root``) leaves the folder."""
    if os.path.normpath(relative).split(os.sep)[0] == os.pardir:
        return f"{relative!r} leads outside the dataset folder (through '..')"
    resolved_root = root.resolve()
    step = root
    for part in Path(relative).parts:
        step = step / part
        if step.is_symlink():
            link_target = step.resolve()
            if _outside(link_target, resolved_root):
                via = os.path.relpath(step, root)
                what = "is" if step == root / relative else f"goes through {via!r}, which is"
                return f"{relative!r} {what} a symlink to {link_target}, outside the dataset folder"
    return f"{relative!r} resolves to {target}, outside the dataset folder"


def resolve_inside(root: str | os.PathLike, relative: object, source: str = "path") -> Path:
    """``root / relative`` after checking that it resolves inside ``root``; ``source`` names who wrote it.

    Refused: anything but a non-empty string, absolute paths (POSIX or Windows style), ``..`` that climbs
    out, and symlinks (the file itself or any folder on the way) whose target lies outside the resolved
    ``root``. ``..`` and symlinks that stay inside are fine. The path does not need to exist: a missing file
    is the caller's (clearer) error. The returned path is ``root / relative`` as written, not the symlink
    target, so messages show the names the user knows.

    Raises:
        UnsafePathError: with ``source`` and the cause, e.g.
            ``dataset.json: training[2] image: '../x.nii.gz' leads outside the dataset folder (through '..')``.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise UnsafePathError(source, f"expected a relative file path, found {relative!r}")
    if "\0" in relative:
        raise UnsafePathError(source, f"{relative!r} contains a NUL byte")
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).anchor:
        raise UnsafePathError(
            source, f"absolute path {relative!r} is not allowed; write it relative to the dataset folder"
        )
    root = Path(root)
    path = root / relative
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loop (RuntimeError before Python 3.13)
        raise UnsafePathError(source, f"{relative!r} cannot be resolved ({exc})") from None
    if _outside(target, root.resolve()):
        raise UnsafePathError(source, _escape_reason(root, relative, target))
    return path
