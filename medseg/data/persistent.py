"""MONAI's ``PersistentDataset`` with cache files that are safe to read and never half-written.

``PersistentDataset`` (MONAI 1.6) runs the deterministic prefix of a ``Compose`` — everything before the first
random transform — once per case, stores the result as one ``torch.save`` file in ``cache_dir`` and, on later
draws, reads it back and runs only the random rest. :class:`SafePersistentDataset` keeps all of that and
changes only how a case's file is written and read (``_cachecheck``):

* **What is stored: plain containers only.** Each MetaTensor becomes its array (a plain tensor) and a dict
  of its metadata reduced to plain types (tensors, numbers, strings; NIfTI header text fields and the
  transform trace are dropped); numpy arrays become tensors. Reading rebuilds the MetaTensors (affine and
  metadata), so the random transforms see what ``CacheDataset`` would give them, and a cold epoch (case just
  preprocessed) sees exactly what a warm one (case read back) sees. Neither MetaTensor nor numpy is ever
  pickled, so nothing needs ``torch.serialization.add_safe_globals``.
* **How it is read: ``torch.load(weights_only=True)``, always.** MONAI 1.6 also loads with
  ``weights_only=True`` by default, but takes it as a constructor argument and, for a MetaTensor with
  metadata outside the allowlist, quietly deletes and recomputes the file on every draw (the cache never
  hits). Here the flag is not a parameter. Before loading, :func:`medseg.io.checkpoint.check_archive` checks
  the zip archive is complete, every member's CRC-32 (PyTorch does not: a flipped bit would feed wrong voxels
  to training) and that the pickle names no global outside the allowlist; after loading, the format tag and
  the layout are checked.
* **A file failing any check is rebuilt**, with a warning naming it and the cause: it is a cache, the source
  volumes are the truth, and nothing in a refused file is ever run. (An error would stop a long training run
  for something the run can repair itself.)
* **How it is written: atomically, next to its final name** (:func:`medseg.io.atomic.atomic_path`). MONAI
  writes into the system temp folder and ``shutil.move``s the file, which is a copy — not atomic — when that
  folder is on another file system. A killed run leaves at most a ``.tmp-<pid>-…`` file, which is never read
  as a cache file and which :func:`medseg.io.atomic.remove_stale_temps` removes.

A case's file is ``<case>-<hash>.pt``: the hash covers the data item with every file it names by path, size
and modification time, so a source volume replaced in place is preprocessed again. Keying the folder by the
preprocessing (which transforms, with which parameters) is the caller's job (:mod:`medseg.engine.caching`).
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor, PersistentDataset

from medseg.io import InputError
from medseg.io.atomic import atomic_path
from medseg.io.checkpoint import check_archive

FORMAT = "medseg-cache"
VERSION = 1

_DROP = object()  # marks a value that has no plain form (left out of the stored metadata)


def plain(value: object) -> object:
    """``value`` in types ``torch.load(weights_only=True)`` accepts, or ``_DROP``.

    Tensors (detached, on the CPU), numeric numpy arrays (as tensors; 0-d ones and numpy scalars as numbers),
    enums (their value), ``str``/``int``/``float``/``bool``/``None``, and lists, tuples and dicts of these.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().as_subclass(torch.Tensor)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            return _DROP
        return value.item() if value.ndim == 0 else torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, np.generic):
        return plain(value.item()) if value.dtype.kind in "biuf" else _DROP
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, (list, tuple)):
        items = [plain(v) for v in value]
        return (
            _DROP if any(v is _DROP for v in items) else (items if isinstance(value, list) else tuple(items))
        )
    if isinstance(value, Mapping):
        out = {str(k): plain(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _DROP}
    return _DROP


def _compact(array: torch.Tensor) -> torch.Tensor:
    """``array`` alone in its storage: ``torch.save`` writes a view's whole storage (a crop's uncropped volume)."""
    if array.untyped_storage().nbytes() > array.numel() * array.element_size():
        return array.clone(memory_format=torch.contiguous_format)
    return array


def to_record(item: Mapping) -> dict:
    """A preprocessed data item as plain containers (see the module docstring); inverse of :func:`from_record`."""
    tensors, other = {}, {}
    for key, value in item.items():
        if isinstance(value, MetaTensor):
            tensors[key] = {"array": _compact(value.as_tensor()), "meta": plain(dict(value.meta))}
        else:
            converted = plain(value)
            if converted is not _DROP:
                other[key] = converted
    return {"format": FORMAT, "version": VERSION, "tensors": tensors, "other": other}


def from_record(record: object, path: str | os.PathLike) -> dict:
    """The data item stored by :func:`to_record`, MetaTensors rebuilt; :class:`InputError` if not one."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InputError(f"{path}: not a medseg cache file")
    if record.get("version") != VERSION:
        raise InputError(f"{path}: cache file version {record.get('version')!r}, expected {VERSION}")
    tensors, other = record.get("tensors"), record.get("other")
    if not isinstance(tensors, dict) or not isinstance(other, dict):
        raise InputError(f"{path}: cache file without its tensors")
    item = dict(other)
    for key, entry in tensors.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("array"), torch.Tensor):
            raise InputError(f"{path}: cache file entry {key!r} holds no array")
        item[key] = MetaTensor(entry["array"], meta=dict(entry.get("meta") or {}))
    return item


def _describe(value: object) -> object:
    """``value`` for hashing: a path of an existing file as ``[path, size, mtime_ns]``."""
    if isinstance(value, str) and os.path.isfile(value):
        st = os.stat(value)
        return [value, st.st_size, st.st_mtime_ns]
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _describe(v) for k, v in value.items()}
    return value


def cache_file_name(item: Mapping) -> str:
    """``<case>-<hash>.pt`` for a data item (``case`` when it has one); see the module docstring."""
    text = json.dumps(_describe(item), sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:32]
    case = str(item.get("case", "")).replace(os.sep, "_")
    return f"{case}-{digest}.pt" if case and not case.startswith(".") else f"{digest}.pt"


def read_cache_file(path: str | os.PathLike) -> dict:
    """Check and load one cache file with ``weights_only=True``; :class:`InputError` names what is wrong."""
    check_archive(path)  # complete archive, CRC-32 of every member, no pickled code — before unpickling
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise InputError(f"{path}: unreadable cache file ({text})") from None
    return from_record(record, path)


def write_cache_file(path: str | os.PathLike, record: dict) -> None:
    """Store a :func:`to_record` record atomically (temporary file in the same folder, then ``os.replace``)."""
    with atomic_path(path) as tmp:
        torch.save(record, tmp)


class SafePersistentDataset(PersistentDataset):
    """``PersistentDataset`` writing and reading its cache files as described in the module docstring.

    Example:
        >>> ds = SafePersistentDataset(cases, train_transforms(plan, augment), "cache/ab12/train")  # doctest: +SKIP
        >>> ds[0]  # first draw: preprocess, write atomically; later draws: read, check, augment  # doctest: +SKIP
    """

    def __init__(self, data, transform, cache_dir: str | os.PathLike) -> None:
        super().__init__(data, transform, cache_dir=Path(cache_dir), weights_only=True)

    def _cachecheck(self, item_transformed):
        path = self.cache_dir / cache_file_name(item_transformed)
        if path.is_file():
            try:
                return read_cache_file(path)
            except InputError as exc:
                cause = str(exc).removeprefix(f"{path}: ")
                warnings.warn(f"{path}: rebuilding an unusable cache file ({cause})", stacklevel=2)
        item = self._pre_transform(deepcopy(item_transformed))
        record = to_record(item)
        write_cache_file(path, record)
        return from_record(record, path)  # what a later, warm draw reads back
