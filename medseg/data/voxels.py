"""Reading a dataset's voxel data once (the voxel part of :mod:`medseg.data.check`): the check of each file,
the processes that read many files, and what the label files held.

* :func:`scan_voxels` reads one file to the end (a truncated gzip is a cause, never an exception); an image
  must be finite, a label map pass :func:`check_label_values` — the one voxel check of labels, used by
  ``medseg check-dataset`` and ``medseg train`` alike;
* :func:`scan_files` runs it over many files, in worker processes when asked (:func:`scan_workers`: from
  :data:`PARALLEL_SCAN_VOXELS` voxels on, below which a pool costs more than it saves). On Linux they are
  forked: they only read files with nibabel, numpy and zlib, start in milliseconds, and do not import the
  caller's ``__main__`` again — a script calling ``train(cfg)`` without an ``if __name__ == "__main__"`` guard
  would fail under ``spawn``. Elsewhere ``spawn`` (``medseg check-dataset --workers``; ``train`` reads in its
  own process there). Processes, not threads, because nibabel's gzip reading holds the GIL;
* a label file found clean is remembered by its identity (:func:`identity`: real path, size, mtime, ctime,
  inode) with its smallest and largest value — in this process and in ``label_scan.json`` in a run folder
  (:func:`write_label_scan`) — so ``medseg train --resume``, another fold or another ablation variant does not
  read it again. Values are remembered, not verdicts: they are checked against the labels of the day
  (:func:`known_clean`), and a file that changed in any of those five respects is read again.

For declared labels 0…K−1 the label check is a minimum and a maximum of the decompressed voxels, with no
per-voxel count (:func:`check_label_values`). Measured cost: ``docs/speed.md`` (section
``medseg.data.voxels``).
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import sys
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.io import atomic_write_text

_COMPRESSED_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)
#: Undeclared label values a problem line lists before "… (N values)".
SHOWN_VALUES = 10
#: :func:`scan_workers` reads in parallel (:data:`MAX_SCAN_WORKERS` processes at most) from this many voxels
#: on (about 6 label maps of 512×512×300); below it starting the processes costs more than they save.
PARALLEL_SCAN_VOXELS = 500_000_000
MAX_SCAN_WORKERS = 8
#: What the label files of a run's dataset held, in its run folder (``train.output``).
LABEL_SCAN_NAME = "label_scan.json"
_LABEL_SCAN_VERSION = 1
#: Label files found clean in this process: real path → ``(size, mtime_ns, ctime_ns, inode, min, max)``.
seen_labels: dict[str, tuple[int, ...]] = {}

Result = tuple[str | None, tuple[int, int] | None]


#: How worker processes start (see the module docstring).
_START = "fork" if sys.platform.startswith("linux") else "spawn"


def scan_workers(voxels: int) -> int:
    """Processes for reading ``voxels`` voxels: 1 below :data:`PARALLEL_SCAN_VOXELS` or where workers would be
    spawned, else the usable cores (at most :data:`MAX_SCAN_WORKERS`)."""
    if voxels < PARALLEL_SCAN_VOXELS or _START != "fork":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, MAX_SCAN_WORKERS)


def scan_files(
    tasks: Sequence[tuple[str, str]], declared: Sequence[int] | None, workers: int
) -> list[Result]:
    """:func:`scan_voxels` of each ``(path, role)``, in order, with ``workers`` processes."""
    if workers <= 1 or len(tasks) <= 1:
        return [scan_voxels(path, role, declared) for path, role in tasks]
    context = multiprocessing.get_context(_START)
    results: list[Result] = []
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context) as pool:
        futures = [pool.submit(scan_voxels, path, role, declared) for path, role in tasks]
        for future in futures:
            try:
                results.append(future.result())
            except BrokenProcessPool:
                cause = "the worker process reading it stopped unexpectedly (killed, or out of memory)"
                results.append((cause, None))
    return results


def scan_voxels(path: str, role: str, declared: Sequence[int] | None = None) -> Result:
    """Read one file's voxels to the end: ``(cause or None, (min, max) of a label map)``.

    Images must be finite; labels pass :func:`check_label_values` against ``declared``. Runs in a worker
    process, so it takes and returns plain values and turns every failure into a cause rather than an
    exception.
    """
    try:
        data = np.asanyarray(nib.load(path).dataobj)
    except _COMPRESSED_ERRORS as exc:
        return f"truncated or corrupt compressed file ({exc})", None
    except MemoryError:
        return "voxel data too large to read into memory", None
    except Exception as exc:
        return f"cannot read voxel data, file truncated or corrupt ({type(exc).__name__}: {exc})", None
    if role == "image":
        if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
            nan, inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
            return f"image holds {nan} NaN and {inf} infinite voxel(s)", None
        return None, None
    return check_label_values(data, declared)


def check_label_values(data: np.ndarray, declared: Sequence[int] | None = None) -> Result:
    """The voxel check of a label map: ``(cause or None, (min, max))``, ``(min, max)`` whenever the values
    are integers.

    Values must be finite integers (any voxel type) and, with ``declared``, each one declared. The declared
    labels being 0…K−1, a minimum and a maximum decide; only when values fall outside are those voxels
    gathered to name them (at most :data:`SHOWN_VALUES`, and how many voxels hold them).
    """
    if data.size == 0:
        return None, None
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            return "label map holds NaN or infinite values", None
        fractional = data != np.round(data)
        if fractional.any():
            example = float(data[fractional].flat[0])
            return f"label values are not integers ({int(fractional.sum())} voxel(s), e.g. {example:g})", None
    elif data.dtype.kind not in "iub":
        return f"label map of voxel type {data.dtype} (expected integers)", None
    span = (int(data.min()), int(data.max()))
    if declared is None:
        return None, span
    values = sorted(set(declared))
    if values == list(range(len(values))):
        if 0 <= span[0] and span[1] < len(values):
            return None, span
        outside = data[(data < 0) | (data >= len(values))]
        known = f"0..{len(values) - 1}" if values else "none"
    else:  # labels that are not 0..K-1 are a problem of dataset.json already; name the values all the same
        outside = data[~np.isin(data, values)]
        if not outside.size:
            return None, span
        known = ", ".join(map(str, values))
    extra = np.unique(outside)
    shown = ", ".join(str(int(v)) for v in extra[:SHOWN_VALUES])
    if len(extra) > SHOWN_VALUES:
        shown += f", … ({len(extra)} values)"
    count, plural = int(outside.size), "s" * (len(extra) > 1)
    return (
        f"label value{plural} {shown} not declared in dataset.json labels (declared: {known}); "
        f"{count} voxel{'s' * (count > 1)}"
    ), span


def identity(real: str) -> tuple[int, int, int, int] | None:
    """What being the same file again means here: ``(size, mtime_ns, ctime_ns, inode)`` (None: no such file).

    ctime and inode as well as mtime: a rewrite that keeps size and mtime (``rsync -t``, ``touch -r``, a copy
    back from a backup) still changes the ctime, so it is read again."""
    try:
        st = os.stat(real)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def known_clean(
    real: str, classes: int, sources: Sequence[Mapping[str, Sequence[int]]]
) -> tuple[int, ...] | None:
    """The remembered facts that make the label file ``real`` clean now: the same file (:func:`identity`)
    with values within ``0..classes-1``; None when no source has such facts."""
    now = identity(real)
    for source in sources:
        facts = source.get(real)
        if facts and tuple(facts[:4]) == now and 0 <= facts[4] <= facts[5] < classes:
            return tuple(facts)
    return None


def label_sources(scan_file: str | os.PathLike | None = None) -> list[Mapping[str, Sequence[int]]]:
    """Where clean label files are remembered, for :func:`known_clean`: this process, and ``scan_file``."""
    return [seen_labels, read_label_scan(scan_file) if scan_file is not None else {}]


def read_label_scan(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The label facts recorded in ``path`` (:func:`write_label_scan`); empty when it is missing or unusable
    (nothing is taken that does not parse as written: a damaged file only means the labels are read)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _LABEL_SCAN_VERSION:
        return {}
    files = data.get("files")
    if not isinstance(files, dict):
        return {}
    return {
        name: tuple(facts)
        for name, facts in files.items()
        if isinstance(facts, list) and len(facts) == 6 and all(type(v) is int for v in facts)
    }


def write_label_scan(path: str | os.PathLike, facts: Mapping[str, Sequence[int]]) -> None:
    """Record ``facts`` (real path → size, mtime_ns, ctime_ns, inode, min, max) in ``path`` atomically, unless
    it holds them already."""
    about = "label files found clean by medseg train: size, mtime_ns, ctime_ns, inode, min, max"
    head = json.dumps({"version": _LABEL_SCAN_VERSION, "about": about})[:-1]
    rows = ",\n".join(f" {json.dumps(name)}: {json.dumps(list(facts[name]))}" for name in sorted(facts))
    text = f'{head}, "files": {{\n{rows}\n}}}}\n'  # one file a line
    path = Path(path)
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    atomic_write_text(path, text)


def remember_label_scan(facts: Mapping[str, Sequence[int]]) -> None:
    """Take ``facts`` that another process found (``medseg train --nproc``: the launcher checked the labels
    before starting the training processes) as found in this process."""
    seen_labels.update({name: tuple(v) for name, v in facts.items()})
