"""Check a whole training dataset and report every problem at once (``medseg check-dataset``).

Like nnU-Net's ``--verify_dataset_integrity``, but it never stops at the first problem, and it is cheap where
it can be: first ``dataset.json`` and the NIfTI *headers* (nibabel loads lazily: shape, affine and voxel type
come from the first few hundred bytes, no voxel is read), then — in the full check only — each file's voxel
data once, in parallel processes.

Header part (``full=False``; ``medseg train`` and ``medseg plan`` run it before anything else):

* ``dataset.json`` exists, is valid JSON (line and column of a syntax error), an object with a ``labels``
  mapping (MSD ``{"0": "background"}`` or nnU-Net ``{"background": 0}``, indices 0…K−1) and a non-empty
  ``training`` list whose entries have an ``image`` and a ``label`` path;
* every path resolves inside the dataset folder (:func:`medseg.io.resolve_inside`: no absolute paths, no
  ``..`` climbing out, no symlink leading out) — a dataset.json is untrusted input;
* every file exists and has a readable NIfTI header; 3D (or X×Y×Z×1); real-valued voxel type; plausible
  voxel spacing (each > 0 and < :data:`MAX_SPACING_MM`); a non-degenerate affine; an uncompressed file as
  long as its header says;
* image and label of an entry have the same shape and the same affine (within :data:`AFFINE_TOLERANCE_MM`
  per entry; the largest difference is printed);
* no file is listed twice and no two entries share a case name.

Voxel part (``full=True``; :mod:`medseg.data.voxels`): every file decompresses to the end (a truncated gzip
is a problem, never Click's "Aborted."), images hold no NaN/inf, label values are integers and all declared
in ``labels`` (:func:`~medseg.data.voxels.check_label_values`: a minimum and a maximum decide, the declared
labels being 0…K−1; only a map with values outside that range has those voxels gathered, to name them).

Label part (:func:`require_trainable_dataset`, what ``medseg train`` runs before anything else): the header
part, then — headers clean — the voxel check of the *label* files only (no image is read), so that a label
value the network has no output for (``9`` with 7 classes) is refused before training rather than failing
mid-epoch with ``RuntimeError: index 9 is out of bounds``. What a clean label file held is remembered by its
identity (real path, size, mtime, ctime, inode): in this process, and in ``label_scan.json`` in the run folder
(:mod:`medseg.data.voxels`), so a resumed run, another fold or another ablation variant does not read the
labels again.

Files in ``imagesTr``/``labelsTr`` that no entry lists are not problems; they are reported as warnings.

An nnU-Net v2 dataset (no ``training`` list, :mod:`medseg.data.nnunet`) is checked the same way, its entries
being the cases of ``labelsTr`` with one image file per channel: what :func:`medseg.data.nnunet.discover_cases`
finds (missing channel files, undeclared channels, ``file_ending`` and ``numTraining`` mismatches, region
labels) comes first, then headers, every channel against the label (shape, affine) and voxels as above.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.data.datasets import (
    ENTRY_KEYS,
    EntryError,
    entry_path,
    label_names,
    read_dataset_json,
    training_entries,
)
from medseg.data.nnunet import detect_layout, discover_cases
from medseg.data.voxels import (
    identity,
    known_clean,
    label_sources,
    remember_label_scan,
    scan_files,
    scan_workers,
)
from medseg.io import InputError, case_name, is_nifti, voxel_spacing
from medseg.io.atomic import TEMP_PREFIX
from medseg.io.nifti import check_header, read_header

#: Largest allowed difference between an image's and its label's affine entries (mm for the translation).
AFFINE_TOLERANCE_MM = 1e-3
#: Voxel sizes outside (0, MAX_SPACING_MM) mm are implausible for CT (a header error, not a scan).
MAX_SPACING_MM = 20.0


@dataclass(frozen=True)
class Problem:
    """One problem of a dataset: the file(s) it concerns and the cause, printed as one line."""

    files: tuple[str, ...]
    cause: str

    def line(self) -> str:
        """``"<file>[, <file>]: <cause>"`` — what ``medseg check-dataset`` prints after ``error:``."""
        return f"{', '.join(self.files)}: {self.cause}"


@dataclass
class DatasetReport:
    """Everything :func:`inspect_dataset` found: problems, warnings, and what the dataset holds."""

    root: Path
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    num_cases: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    layout: str = "msd"  # or "nnunet"
    channels: list[str] = field(default_factory=list)  # nnU-Net channel_names, in order
    case_names: dict[int, str] = field(default_factory=dict)  # nnU-Net: entry index → "case 'x'"
    #: label files whose voxels were found clean: real path → (size, mtime_ns, ctime_ns, inode, min, max)
    label_facts: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def entry(self, index: int, role: str) -> str:
        """How an entry's file is named in messages: ``training[3] label`` or ``case 'x' channel 0001``."""
        return f"{self.case_names.get(index, f'training[{index}]')} {role}"

    def add(self, files: str | os.PathLike | tuple, cause: str) -> None:
        names = tuple(map(str, files)) if isinstance(files, tuple) else (str(files),)
        self.problems.append(Problem(names, " ".join(cause.split())))


class DatasetError(InputError):
    """A dataset with problems; ``problems`` lists them, the message joins their lines with ``; ``."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(p.line() for p in self.problems))


@dataclass(frozen=True)
class _Header:
    shape: tuple[int, int, int]
    affine: np.ndarray


def check_dataset(root: str | os.PathLike, workers: int = 1, full: bool = True) -> list[Problem]:
    """Every problem of the dataset in ``root`` (empty list: usable). See the module docstring.

    ``full=False`` reads headers only; ``full=True`` also reads each file's voxels once, with ``workers``
    processes.

    Raises:
        InputError: ``root`` is not a folder (nothing to check).
    """
    return inspect_dataset(root, workers=workers, full=full).problems


def require_valid_dataset(root: str | os.PathLike) -> DatasetReport:
    """The header-only check, raising when it finds anything (what ``medseg train`` runs first).

    Raises:
        DatasetError: listing every problem found.
    """
    report = inspect_dataset(root, full=False)
    if report.problems:
        raise DatasetError(report.problems)
    return report


def require_trainable_dataset(
    root: str | os.PathLike, workers: int | None = None, scan_file: str | os.PathLike | None = None
) -> DatasetReport:
    """What ``medseg train`` runs before anything else: the header check, then — headers clean — every label
    file's values (integers, each declared in ``labels``), raising when either finds anything.

    Label files known clean (same real path, size, mtime, ctime and inode, values within the labels) are not
    read again: those this process checked, and those ``scan_file`` records
    (:func:`medseg.data.voxels.read_label_scan`). The others are read once each, by ``workers`` processes
    (``None``: :func:`medseg.data.voxels.scan_workers`). ``report.label_facts`` holds what every label file
    held, for :func:`medseg.data.voxels.write_label_scan`.

    Raises:
        DatasetError: listing every header problem; or, with clean headers, every label file that cannot be
            read to the end or holds non-integer or undeclared values.
    """
    report = _inspect(Path(root), workers, "labels", label_sources(scan_file))
    remember_label_scan(report.label_facts)
    if report.problems:
        raise DatasetError(report.problems)
    return report


def inspect_dataset(root: str | os.PathLike, workers: int = 1, full: bool = True) -> DatasetReport:
    """Like :func:`check_dataset`, returning the whole :class:`DatasetReport` (for the CLI's summary)."""
    return _inspect(Path(root), workers, "all" if full else "none")


def _inspect(
    root: Path, workers: int | None, voxels: str, known: Sequence[Mapping[str, tuple[int, ...]]] = ()
) -> DatasetReport:
    """The check: ``voxels`` is ``"none"`` (headers), ``"all"`` (every file's voxels) or ``"labels"`` (with
    clean headers, the label files not ``known`` clean)."""
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder {'is not a folder' if root.exists() else 'not found'}")
    report = DatasetReport(root)
    source = root / "dataset.json"
    try:
        meta = read_dataset_json(root)
    except InputError as exc:
        report.add(source, str(exc).removeprefix(f"{source}: "))
        return report
    declared = _check_labels(meta, report)
    if detect_layout(meta) == "nnunet":
        paths = _nnunet_paths(meta, report)
        if paths is None:
            return report
    else:
        paths = _msd_paths(meta, report)
        if paths is None:
            return report
        _warn_unlisted(root, paths, report)

    headers = _check_files(paths, report)
    _check_pairs(paths, headers, report)
    _check_duplicates(paths, report)
    if voxels == "all":
        _check_voxels(_voxel_tasks(paths, headers, ("image", "label")), declared, workers, report)
    elif voxels == "labels" and not report.problems:
        tasks = _voxel_tasks(paths, headers, ("label",))
        _check_voxels(_not_known(tasks, declared, known, report), declared, workers, report)
    return report


def _msd_paths(meta: dict, report: DatasetReport) -> dict[int, dict[str, Path]] | None:
    """Entry index → key (``image``, ``label``) → path of an MSD ``training`` list; None: no list to check."""
    root, source = report.root, report.root / "dataset.json"
    try:
        entries = training_entries(meta, root)
    except InputError as exc:
        report.add(source, str(exc).removeprefix(f"{source}: "))
        return None
    report.num_cases = len(entries)
    paths: dict[int, dict[str, Path]] = {}
    for index, entry in enumerate(entries):
        errors: dict[str, EntryError] = {}
        for key in ENTRY_KEYS:
            try:
                paths.setdefault(index, {})[key] = entry_path(root, index, entry, key)
            except EntryError as exc:
                errors.setdefault(str(exc), exc)  # a non-object entry fails alike for both keys: once
        for exc in errors.values():
            report.add(exc.file, f"{exc.entry}: {exc.cause}")
    return paths


def _nnunet_paths(meta: dict, report: DatasetReport) -> dict[int, dict[str, Path]] | None:
    """Case index → ``channel 0000``… / ``label`` → path of an nnU-Net dataset (its layout problems added to
    the report); None when no case could be looked for."""
    report.layout = "nnunet"
    found = discover_cases(report.root, meta)
    for files, cause in found.problems:
        report.add(tuple(files), cause)
    report.warnings += found.warnings
    report.channels = found.channels
    non_ct = sorted({name for name in found.channels if name.casefold() != "ct"})
    if non_ct:
        report.warnings.append(
            f"{report.root / 'dataset.json'}: channel_names {', '.join(non_ct)}: medseg normalises every "
            "channel as CT (nnU-Net would z-score a non-CT channel per image)"
        )
    if not found.usable:
        return None
    report.num_cases = found.num_labels
    paths: dict[int, dict[str, Path]] = {}
    for index, (name, case) in enumerate(found.cases.items()):
        report.case_names[index] = f"case {name!r}"
        paths[index] = {f"channel {c:04d}": p for c, p in enumerate(case["images"])}
        paths[index]["label"] = case["label"]
    return paths


def _check_labels(meta: dict, report: DatasetReport) -> set[int] | None:
    """Label names parse and are numbered 0…K−1 (one network output per label); the declared indices."""
    source = report.root / "dataset.json"
    try:
        names = label_names(meta, source="labels")
    except InputError as exc:
        report.add(source, str(exc))
        return None
    indices = sorted(names.values())
    if indices != list(range(len(indices))):
        report.add(
            source,
            f"labels: indices must be 0, 1, …, K−1 (one network output each); found {', '.join(map(str, indices))}",
        )
    report.labels = names
    return set(indices)


def _where(paths: dict[int, dict[str, Path]], report: DatasetReport) -> dict[Path, list[str]]:
    """Each listed file (by its real location) → the entries naming it (``training[3] label``)."""
    found: dict[Path, list[str]] = {}
    for index, keys in paths.items():
        for key, path in keys.items():
            found.setdefault(path.resolve(), []).append(report.entry(index, key))
    return found


def _check_files(paths: dict[int, dict[str, Path]], report: DatasetReport) -> dict[Path, _Header]:
    """Existence and header of each listed file (each file once); the usable headers by path."""
    headers: dict[Path, _Header] = {}
    seen: set[Path] = set()
    for index, keys in paths.items():
        for key, path in keys.items():
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            where = report.entry(index, key)
            header = _read_header(
                path, f"listed in dataset.json as {where}" if report.layout == "msd" else where
            )
            if isinstance(header, str):
                report.add(path, header)
            else:
                headers[path] = header
    return headers


def _read_header(path: Path, where: str) -> _Header | str:
    """The header of one NIfTI file, or the cause that makes it unusable (``where``: why it is read)."""
    if not path.exists():
        if path.is_symlink():
            return f"dangling symlink to {os.readlink(path)} ({where})"
        return f"file not found ({where})"
    if not path.is_file():
        return f"is not a file ({where})"
    if path.stat().st_size == 0:
        return "file is empty (0 bytes)"
    try:  # the one header reader of medseg: voxel type, 3D, declared size against the file, spacing
        header = read_header(path)
        shape = check_header(path, header)
    except InputError as exc:
        return str(exc).removeprefix(f"{path}: ")
    affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        return "non-finite affine in the header"
    spacing = voxel_spacing(affine)
    if not np.all((spacing > 0) & (spacing < MAX_SPACING_MM)):
        mm = " × ".join(f"{s:.4g}" for s in spacing)
        return f"implausible voxel spacing {mm} mm (each must be > 0 and < {MAX_SPACING_MM:g} mm)"
    if abs(np.linalg.det(affine[:3, :3])) < 1e-8:
        return "degenerate affine in the header (voxel axes are not independent)"
    return _Header(shape, affine)


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


def _check_pairs(
    paths: dict[int, dict[str, Path]], headers: dict[Path, _Header], report: DatasetReport
) -> None:
    """Each image (each channel) and the label of an entry share the voxel grid: same shape, same affine
    within tolerance."""
    for keys in paths.values():
        label = keys.get("label")
        for role, image in keys.items():
            if role == "label" or image not in headers or label not in headers:
                continue
            a, b = headers[image], headers[label]
            if a.shape != b.shape:
                report.add(
                    (image, label),
                    f"{role} and label differ in shape: {_fmt_shape(a.shape)} vs {_fmt_shape(b.shape)}",
                )
                continue
            diff = float(np.abs(a.affine - b.affine).max())
            if diff > AFFINE_TOLERANCE_MM:
                report.add(
                    (image, label),
                    f"{role} and label differ in affine: largest entry difference {diff:.3g} "
                    f"(tolerance {AFFINE_TOLERANCE_MM:g} mm)",
                )


def _check_duplicates(paths: dict[int, dict[str, Path]], report: DatasetReport) -> None:
    """No file listed twice; no two image files giving the same case name (names key splits and outputs)."""
    for real, where in _where(paths, report).items():
        if len(where) > 1:
            shown = next(p for keys in paths.values() for p in keys.values() if p.resolve() == real)
            what = "listed {} times in dataset.json" if report.layout == "msd" else "used {} times"
            report.add(shown, f"{what.format(len(where))} ({', '.join(where)})")
    by_name: dict[str, dict[Path, Path]] = {}
    for keys in paths.values():
        if "image" in keys:
            by_name.setdefault(case_name(keys["image"]), {}).setdefault(
                keys["image"].resolve(), keys["image"]
            )
    for name, files in by_name.items():
        if len(files) > 1:
            report.add(
                tuple(files.values()),
                f"{len(files)} training images share the case name {name!r}; case names must be unique",
            )


def _warn_unlisted(root: Path, paths: dict[int, dict[str, Path]], report: DatasetReport) -> None:
    listed = set(_where(paths, report))
    for folder in (root / "imagesTr", root / "labelsTr"):
        if not folder.is_dir():
            continue
        extra = [
            p.name
            for p in sorted(folder.iterdir())
            if is_nifti(p) and not p.name.startswith((".", TEMP_PREFIX)) and p.resolve() not in listed
        ]
        if extra:
            shown = ", ".join(extra[:5]) + (f", … ({len(extra) - 5} more)" if len(extra) > 5 else "")
            report.warnings.append(
                f"{folder}: {len(extra)} file(s) not listed in dataset.json (not used): {shown}"
            )


def _voxel_tasks(
    paths: dict[int, dict[str, Path]], headers: dict[Path, _Header], roles: tuple[str, ...]
) -> dict[tuple[str, str], tuple[Path, int]]:
    """``(real path, "image"/"label")`` → ``(path as listed, voxel count)`` of each file with a usable header,
    each file once, of the given roles."""
    tasks: dict[tuple[str, str], tuple[Path, int]] = {}
    for keys in paths.values():
        for key, path in keys.items():
            role = "label" if key == "label" else "image"
            if path in headers and role in roles:
                tasks.setdefault((str(path.resolve()), role), (path, int(np.prod(headers[path].shape))))
    return tasks


def _not_known(
    tasks: dict[tuple[str, str], tuple[Path, int]],
    declared: set[int] | None,
    known: Sequence[Mapping[str, Sequence[int]]],
    report: DatasetReport,
) -> dict[tuple[str, str], tuple[Path, int]]:
    """The label tasks not known clean (:func:`medseg.data.voxels.known_clean`: the same file, values within
    the labels of now); the facts of the known ones go into the report."""
    if declared is None or sorted(declared) != list(range(len(declared))):
        return tasks
    left = {}
    for (real, role), task in tasks.items():
        facts = known_clean(real, len(declared), known)
        if facts is None:
            left[real, role] = task
        else:
            report.label_facts[real] = facts
    return left


def _check_voxels(
    tasks: dict[tuple[str, str], tuple[Path, int]],
    declared: set[int] | None,
    workers: int | None,
    report: DatasetReport,
) -> None:
    """Read each file of ``tasks`` (:func:`_voxel_tasks`) once and check its voxel values, with ``workers``
    processes (``None``: :func:`medseg.data.voxels.scan_workers` of their voxels); the facts of clean label
    files go into ``report.label_facts``."""
    if workers is None:
        workers = scan_workers(sum(voxels for _, voxels in tasks.values()))
    identities = {real: identity(real) for real, role in tasks if role == "label"}  # taken before reading
    results = scan_files(list(tasks), None if declared is None else sorted(declared), workers)
    for (real, role), (path, _), (cause, span) in zip(tasks, tasks.values(), results, strict=True):
        if cause:
            report.add(path, cause)
        elif role == "label" and span is not None and identities[real] is not None:
            report.label_facts[real] = (*identities[real], *span)
