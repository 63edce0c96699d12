"""Checkpoints that carry everything needed to segment a new scan: weights, config, labels, plan.

Saved with ``torch.save`` as plain containers (dicts, lists, numbers, strings, tensors) only, so they load
with ``torch.load(..., weights_only=True)`` — no untrusted pickle is ever executed. Written atomically.

Reading is checked in layers, each failure one line naming the file (:class:`medseg.io.InputError`):

1. the file is a complete ``torch.save`` zip archive (a cut-short file has no central directory; a flipped
   byte fails the archive's CRC-32, which PyTorch itself does not check);
2. its pickle (``data.pkl``) names no global outside PyTorch's weights-only allowlist — found by reading
   the opcodes (:func:`pickle_globals`), never by running them, and reported as pickled code, so the user
   never sees PyTorch's advice to load with ``weights_only=False``;
3. ``torch.load(weights_only=True)``, which stays the gate that enforces the allowlist;
4. our format tag, a supported version, and the required keys with the right kinds of values (the plan
   as :meth:`medseg.io.plan.Plan.from_dict` reads it; the checkpoint keeps the plan's plain dict form).
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import pickletools
import zipfile
import zlib
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO

import torch

from medseg.io.atomic import atomic_path
from medseg.io.nifti import InputError
from medseg.io.plan import Plan

FORMAT = "medseg-checkpoint"
#: 2: the config has no ``model.skip_gate`` (the network name decides the gates); version-1 configs are
#: migrated by :func:`medseg.config.migrate_config` when read.
VERSION = 2
REQUIRED = ("model", "config", "plan", "labels")
#: Largest ``data.pkl`` read for the opcode scan (tensors live in other archive members).
MAX_PICKLE_BYTES = 256 * 2**20
#: Pickle opcodes that push a string (candidates for the module and name of a ``STACK_GLOBAL``).
_STRING_OPS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
}
_MEMO_PUT_OPS = {"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Save ``state`` (must hold :data:`REQUIRED` keys) with the format tag, atomically."""
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(f"checkpoint state misses {missing}")
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)
    return path


def pickle_globals(stream: IO[bytes]) -> set[str]:
    """``module.name`` of every global a pickle would import (``GLOBAL``, ``INST``, ``STACK_GLOBAL``).

    Reads opcodes with :func:`pickletools.genops`; nothing is executed. A ``STACK_GLOBAL`` takes its module
    and name from the two preceding pushes (strings or memo lookups), which is how ``pickle`` writes them;
    when they are not strings it is reported as ``<unresolved STACK_GLOBAL>``. Naming only: the refusal
    itself is enforced by ``torch.load(weights_only=True)``.

    Raises:
        ValueError: the stream is not a complete pickle.
    """
    found: set[str] = set()
    memo: dict[int, object] = {}
    pushed: deque[object] = deque(maxlen=2)  # the last two pushes; None for anything not a string
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            # protocol 2 (torch.save's) writes Python 2 names; unpickling maps them, and so do we
            if (module, attr) in NAME_MAPPING:
                module, attr = NAME_MAPPING[module, attr]
            else:
                module = IMPORT_MAPPING.get(module, module)
            found.add(f"{module}.{attr}")
        elif name == "STACK_GLOBAL":
            module, attr = tuple(pushed) if len(pushed) == 2 else (None, None)
            ok = isinstance(module, str) and isinstance(attr, str)
            found.add(f"{module}.{attr}" if ok else "<unresolved STACK_GLOBAL>")
        if name in _STRING_OPS:
            pushed.append(arg if isinstance(arg, str) else None)
        elif name in _MEMO_PUT_OPS:
            memo[len(memo) if name == "MEMOIZE" else int(arg)] = pushed[-1] if pushed else None
        elif name in _MEMO_GET_OPS:
            pushed.append(memo.get(int(arg)))
        elif op.stack_after:
            pushed.append(None)
    return found


def unsafe_globals(found: Iterable[str]) -> list[str]:
    """The globals in ``found`` that PyTorch's weights-only unpickler refuses, sorted.

    The allowlist is PyTorch's own (its defaults plus ``torch.serialization.add_safe_globals``); a PyTorch
    without those helpers falls back to: anything under ``torch.`` and ``collections.OrderedDict``.
    """
    from torch import _weights_only_unpickler as wo

    try:
        allowed = set(wo._get_allowed_globals()) | set(wo._get_user_allowed_globals())
    except AttributeError:
        return sorted(g for g in found if not g.startswith("torch.") and g != "collections.OrderedDict")
    return sorted(set(found) - allowed)


def _corrupt(path: Path, cause: str) -> InputError:
    return InputError(f"{path}: truncated or corrupt checkpoint ({cause})")


def _open_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> IO[bytes]:
    """A member's stream, checked against its CRC-32 at the end — unless the CRC field is 0, as PyTorch
    writes after ``torch.serialization.set_crc32_options(False)``: then read unchecked."""
    if info.CRC == 0:
        info = copy.copy(info)
        del info.CRC  # zipfile checks a CRC only when the entry has one
    return archive.open(info)


def check_archive(path: str | os.PathLike) -> None:
    """Check that ``path`` is a complete ``torch.save`` archive whose pickle holds no code, before loading.

    Raises:
        InputError: not a zip archive (or a legacy/TorchScript file), cut short, a CRC mismatch, a broken
            pickle, or globals outside PyTorch's weights-only allowlist
            (``contains pickled code (posix.system); refused``).
    """
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        if head.startswith(b"PK"):
            raise _corrupt(path, "zip archive without its central directory: file cut short?") from None
        what = "a legacy pickle" if head[:1] == b"\x80" else "not a zip archive"
        raise InputError(
            f"{path}: not a medseg checkpoint ({what}, medseg writes torch.save archives)"
        ) from None
    with archive:
        names = archive.namelist()
        if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
            raise InputError(f"{path}: a TorchScript archive, not a medseg checkpoint")
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise InputError(f"{path}: not a medseg checkpoint (no data.pkl in the zip archive)")
        try:
            for info in archive.infolist():
                with _open_member(archive, info) as member:
                    while member.read(1 << 20):
                        pass
            info = archive.getinfo(pickles[0])
            if info.file_size > MAX_PICKLE_BYTES:  # medseg's holds config, plan and labels: ~100 KiB
                raise InputError(f"{path}: not a medseg checkpoint (data.pkl of {info.file_size} bytes)")
            with _open_member(archive, info) as stream:
                found = pickle_globals(io.BytesIO(stream.read()))
        except zipfile.BadZipFile as exc:
            raise _corrupt(path, str(exc)) from None
        except (EOFError, OSError, zlib.error) as exc:
            raise _corrupt(path, f"{type(exc).__name__}: {exc}") from None
        except ValueError as exc:  # pickletools on a broken pickle
            raise _corrupt(path, f"data.pkl: {exc}") from None
    unsafe = unsafe_globals(found)
    if unsafe:
        shown = ", ".join(unsafe[:3]) + (f" and {len(unsafe) - 3} more" if len(unsafe) > 3 else "")
        raise InputError(f"{path}: contains pickled code ({shown}); refused")


def check_contents(ckpt: object, path: str | os.PathLike) -> None:
    """Check a loaded checkpoint's tag, version and required keys (kinds of values, plan keys).

    Raises:
        InputError: one line naming the file and the key at fault.
    """
    if not isinstance(ckpt, dict):
        raise InputError(f"{path}: not a medseg checkpoint (holds a {type(ckpt).__name__}, not a dict)")
    if ckpt.get("format") != FORMAT:
        raise InputError(f"{path}: not a medseg checkpoint (missing format tag {FORMAT!r})")
    version = ckpt.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(f"{path}: medseg checkpoint has no valid format version (found {version!r})")
    if version > VERSION:
        raise InputError(f"{path}: checkpoint version {version} is newer than this medseg ({VERSION})")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise InputError(f"{path}: medseg checkpoint misses {missing}")
    weights = ckpt["model"]
    if not isinstance(weights, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise InputError(f"{path}: checkpoint key 'model' is not a mapping of names to tensors")
    labels = ckpt["labels"]
    if (
        not isinstance(labels, Mapping)
        or not labels
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in labels.values())
    ):
        raise InputError(f"{path}: checkpoint key 'labels' is not a mapping of label names to indices")
    Plan.from_dict(ckpt["plan"], where=f"{path}: checkpoint plan")  # checked; the dict form is kept


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a medseg checkpoint safely (``weights_only=True``) and check it is one of ours.

    Raises:
        InputError: missing, empty, truncated or corrupt file, pickled code, a file that is not a medseg
            checkpoint or comes from a newer medseg, missing or malformed keys — one line naming the file
            and the cause (see the module docstring for the order of the checks).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: checkpoint file is empty (0 bytes)")
    check_archive(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # PyTorch's text here advises weights_only=False: never shown
        raise InputError(
            f"{path}: holds pickled objects outside PyTorch's weights-only set; refused"
        ) from None
    except Exception as exc:  # torch raises many types for corrupt files
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise _corrupt(path, text.split(". ")[0][:200]) from None
    check_contents(ckpt, path)
    return ckpt
