"""Training and validation datasets for ``data.cache``: ``memory``, ``disk`` or ``none``.

The deterministic preprocessing of :mod:`medseg.transforms.presets` (load → orient → resample → crop to the
body → normalise → pad to the patch) is the expensive part of reading a case; the random part (patch
sampling, augmentation) must run on every draw. The three modes differ only in where the deterministic
result lives, so for one seed they give the same batches (tested):

* ``memory`` (the default) — MONAI ``CacheDataset``: the fraction ``data.cache_rate`` of the cases (all, by
  default) is preprocessed once before the first epoch and held in RAM; any others are preprocessed on every
  draw. RAM grows with the dataset (and DataLoader workers touch the parent's cached tensors, so forked
  workers' memory grows too; measured in ``docs/speed.md``, section "Disk cache vs RAM (training)").
* ``disk`` — :class:`medseg.data.persistent.SafePersistentDataset` (MONAI ``PersistentDataset``): a case is
  preprocessed the first time it is drawn, written to one file in the cache folder, and read back on later
  draws. RAM holds only the cases of the current batches. See :mod:`medseg.data.persistent` for how files are
  written (atomically) and read (``weights_only=True`` after a CRC check; unusable files are rebuilt).
* ``none`` — MONAI ``Dataset``: every draw loads and preprocesses its case (streaming; nothing kept).

**The cache folder** is ``<data.cache_dir>/<key>/{train,val}/``; ``data.cache_dir`` defaults to
``.medseg_cache`` next to the run folder (``<train.output>/../.medseg_cache``), so runs side by side (variants
of an ablation, folds, a resumed run) share it. ``<key>`` is a hash of everything the cached result depends on:
the plan without the entries the preprocessing does not read (``fingerprint``, ``mirror_axes``), the medseg
and MONAI versions and the source of ``medseg.transforms`` and ``medseg.io.nifti`` (so an edited transform is
not served from an old cache even before a version bump). A changed plan gets a new folder and never reuses
stale files; ``key.json`` in the folder records what was hashed. Old folders are not deleted: remove them to
free the disk.

**Randomness and workers.** The random transforms are seeded by the DataLoader from its per-epoch generator
(MONAI's ``DataLoader``: in the main process with ``num_workers=0``, per worker with ``num_workers > 0``), so
the batches of an epoch depend on ``(seed, epoch)`` only — in every mode, and a resumed run continues exactly
(tested for each mode with ``num_workers=0``). With workers the random stream is a different one than without
(each worker draws its own), but it is equally fixed by ``(seed, epoch, num_workers)``: the modes still give
the same batches, and resuming with the same ``num_workers`` is exact too (tested with 2 workers). In ``disk`` mode the workers write cache files concurrently; each write is
atomic, so two writers of one case only replace identical files.

**Errors.** A case that cannot be read is an :class:`medseg.io.InputError` naming the file: raised as is in
the main process (:class:`NamedErrorsMixin`), and rebuilt from the worker's traceback by
:func:`named_errors` when a DataLoader worker hit it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import monai
from monai.data import CacheDataset, Dataset

import medseg
from medseg.config import Config
from medseg.data.persistent import SafePersistentDataset
from medseg.io import InputError, atomic_write_text
from medseg.io.atomic import remove_stale_temps
from medseg.io.plan import Plan

#: Plan entries the cached preprocessing does not read: they do not key the cache folder.
NOT_PREPROCESSING = ("fingerprint", "mirror_axes")
CACHE_FOLDER_NAME = ".medseg_cache"


def input_error_in(exc: BaseException | None) -> InputError | None:
    """The :class:`InputError` (names file and cause) inside MONAI's chain of wrapped errors, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def worker_input_error(exc: BaseException) -> InputError | None:
    """The one-line :class:`InputError` a DataLoader worker raised, from PyTorch's re-raised copy.

    PyTorch re-raises a worker's exception in the main process as ``type(exc)(traceback text)``; an
    ``InputError``'s message (one line) is the text after the traceback's last ``InputError:``.
    """
    text = str(exc)
    if "Original Traceback" not in text or "InputError: " not in text:
        return None
    return InputError(text.rsplit("InputError: ", 1)[1].strip().splitlines()[0])


def named_errors(batches: Iterator) -> Iterator:
    """Yield from ``batches``; a case a DataLoader worker could not read ends in its one-line InputError."""
    try:
        yield from batches
    except (InputError, RuntimeError) as exc:
        raise worker_input_error(exc) or exc from None


class NamedErrorsMixin:
    """A MONAI dataset whose items fail with the :class:`InputError` inside MONAI's wrapped error."""

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except RuntimeError as exc:
            raise input_error_in(exc) or exc from None


class MemoryDataset(NamedErrorsMixin, CacheDataset):
    """``data.cache: memory`` — MONAI ``CacheDataset``."""


class DiskDataset(NamedErrorsMixin, SafePersistentDataset):
    """``data.cache: disk`` — :class:`medseg.data.persistent.SafePersistentDataset`."""


class StreamingDataset(NamedErrorsMixin, Dataset):
    """``data.cache: none`` — MONAI ``Dataset``."""


def _source_digest() -> str:
    """SHA-256 of the source files of the preprocessing (``medseg.transforms``, ``medseg.io.nifti``)."""
    import medseg.io.nifti
    import medseg.transforms

    files = sorted(Path(medseg.transforms.__file__).parent.glob("*.py")) + [Path(medseg.io.nifti.__file__)]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def cache_key(plan: Plan) -> dict:
    """Everything a cached case depends on besides its own files (see the module docstring)."""
    return {
        "plan": {k: v for k, v in plan.to_dict().items() if k not in NOT_PREPROCESSING},
        "medseg": medseg.__version__,
        "monai": monai.__version__,
        "source": _source_digest(),
    }


def cache_folder(cfg: Config, plan: Plan) -> Path:
    """``<data.cache_dir>/<key hash>``, ``data.cache_dir`` defaulting to ``<train.output>/../.medseg_cache``."""
    root = cfg.data.cache_dir
    base = Path(root) if root is not None else Path(cfg.train.output).resolve().parent / CACHE_FOLDER_NAME
    key = cache_key(plan)
    text = json.dumps(key, sort_keys=True, indent=2)
    return base / hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_cache(cfg: Config, plan: Plan) -> str:
    """One line for the training log: the mode and, for ``disk``, the folder."""
    mode = cfg.data.cache
    if mode == "memory":
        return f"memory (cache_rate {cfg.data.cache_rate:g})"
    return f"disk, {cache_folder(cfg, plan)}" if mode == "disk" else "none (every case read when drawn)"


def build_dataset(cfg: Config, plan: Plan, cases: Sequence[dict], transform, role: str):
    """The dataset of ``cases`` for ``cfg.data.cache``; ``role`` (``train``/``val``) names its cache subfolder.

    Raises:
        InputError: a case cannot be read (``memory`` preprocesses every case here, the others when drawn).
    """
    mode = cfg.data.cache  # one of medseg.config.schema.CACHE_MODES, checked when the config was loaded
    if mode == "none":
        return StreamingDataset(list(cases), transform)
    if mode == "disk":
        folder = cache_folder(cfg, plan)
        (folder / role).mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder / role)  # a killed run's half-written files (never a live writer's)
        if not (folder / "key.json").is_file():
            atomic_write_text(folder / "key.json", json.dumps(cache_key(plan), sort_keys=True, indent=2))
        return DiskDataset(list(cases), transform, folder / role)
    try:
        return MemoryDataset(
            list(cases), transform, cache_rate=cfg.data.cache_rate, num_workers=None, progress=False
        )
    except RuntimeError as exc:  # MONAI wraps a transform's error; surface medseg's one-line reason
        raise input_error_in(exc) or exc from None
