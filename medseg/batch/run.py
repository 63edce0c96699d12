"""Batch segmentation: NIfTI files, DICOM series, folders of them or a ``.zip`` in → label maps in each scan's
exact geometry out, resumable, shardable, with a run manifest and optional organ statistics.

>>> from medseg.config.segment import OutputSpec, SegmentOptions
>>> from medseg.batch.run import segment_inputs
>>> report = segment_inputs(
...     "pacs_export/", "pred/", ["fold_0/best.pt", "fold_1/best.pt"],
...     SegmentOptions(device="cpu", tta=True), OutputSpec(statistics=True),
... )  # doctest: +SKIP
>>> report.written, report.skipped, report.failed, report.skipped_modality  # doctest: +SKIP

How to segment (:class:`~medseg.config.segment.SegmentOptions`) and what to write
(:class:`~medseg.config.segment.OutputSpec`) are one frozen object each, checked when made; their defaults
are the command line's.

Inputs are found by :mod:`medseg.batch.inputs` (NIfTI files by :func:`medseg.io.list_cases`, DICOM series
by :func:`medseg.io.dicom.find_series`). The model (one checkpoint or an ensemble) is loaded once per run. A
bad input is reported in one line and the other cases go on; a DICOM series that is not CT is *skipped*
(a warning), one the reader refuses (gantry tilt, missing slices, …) is a *failed* case.

**Outputs per case** ``<case>`` (in OUTDIR): the mask ``<case>.nii.gz`` (uint8, the scan's exact shape and
affine — for a DICOM series the geometry SimpleITK read), the sidecar ``<case>.json`` (label names, source,
checkpoints, warnings, the identity below, the predictor's ``info``; for DICOM a ``dicom`` block with
what a DICOM SEG export needs: study / series / frame-of-reference UIDs, the SOP Instance UIDs and files in
slice order, patient ID, study date, series number and description) and, with ``OutputSpec(statistics=True)``,
``<case>_stats.json`` (:func:`medseg.report.statistics.organ_statistics` on the original scan's values).
Per run: ``manifest.jsonl`` (:mod:`medseg.batch.manifest`, one line per case) and, with statistics,
``statistics.csv`` rebuilt at the end from every ``*_stats.json`` in OUTDIR (so a resumed or sharded run
gives the whole table). A single NIfTI input with ``-o mask.nii.gz`` writes only the mask, its sidecar and
its ``mask_stats.json``: no manifest and no CSV beside a file the user named.

**Kill-safe outputs.** Each file is written atomically (:mod:`medseg.io.atomic`) in the order: old mask and
old statistics deleted, sidecar, statistics, mask. Wherever a run is killed, a mask never exists without its
own sidecar, and statistics never outlive the mask they describe.

**Complete cases are skipped.** A case is *complete* when its mask exists and its sidecar records exactly
this identity:

* the input (:func:`medseg.batch.inputs.case_stamp`): for a NIfTI file its absolute path, size and
  modification time (``st_mtime_ns``) — what ``make`` and ``rsync`` trust, cheap for a 500-scan folder; for
  a DICOM series its SeriesInstanceUID and every file's path, size and mtime; for a case from a ``.zip`` the
  archive's stamp and the member names;
* the model: the SHA-256 of every checkpoint (``Predictor.checkpoint_sha256``: a retrained ``best.pt`` at
  the same path is another model), the sliding-window overlap, TTA, precision and postprocessing mode;
* the outputs asked for: output types, ``split``, ``uncertainty``
  (:func:`medseg.batch.cases.run_identity`).

A re-run into the same folder (e.g. after a killed batch) skips complete cases and redoes the rest; a
complete case without statistics, when they are asked for, gets them from its mask without inference.
``OutputSpec(overwrite=True)`` redoes every case.

**Parts.** With a :class:`medseg.batch.sharding.Part`, only that part's cases are done. Parts can run
at once into one OUTDIR: each case belongs to exactly one part, temporary files carry their writer's PID
and host so a part only removes dead writers' leftovers, manifest lines are appended atomically, and every
part rewrites ``statistics.csv`` atomically from all statistics present when it ends (the last to finish
leaves the full table).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from medseg.batch.cases import BatchRun, SegmentReport
from medseg.batch.exports import ITKSNAP_LABELS, write_folder_exports
from medseg.batch.inputs import (
    CaseSource,
    opened_cases,
    remove_stale_extractions,
    resolve_checkpoints,
)
from medseg.batch.inputs import source_stamp as source_stamp
from medseg.batch.manifest import MANIFEST_NAME, Manifest
from medseg.batch.outputs import STATISTICS_CSV, output_path_for, write_statistics_table
from medseg.batch.outputs import is_complete as is_complete
from medseg.batch.outputs import read_sidecar as read_sidecar
from medseg.batch.outputs import sidecar_path as sidecar_path
from medseg.batch.outputs import statistics_path as statistics_path
from medseg.batch.sharding import Part
from medseg.config.segment import OutputSpec, SegmentOptions
from medseg.inference.ensemble import check_single_channel
from medseg.inference.predictor import Predictor
from medseg.io import InputError, is_nifti
from medseg.io.atomic import check_writable, no_space, remove_stale_temps
from medseg.nnunet.loading import nnunet_predictor


def _prepare_output(input_path: Path, output: Path, single: bool) -> Path:
    """The folder the masks go to (created); refuse a file output for a folder, archive or DICOM input,
    and the input folder itself as output."""
    if not single and is_nifti(output):
        what = "a folder" if input_path.is_dir() else "not a NIfTI file"
        raise InputError(
            f"{output}: input {input_path} is {what}, so the output must be a folder, not a NIfTI file"
        )
    folder = output.parent if single and is_nifti(output) else output
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None
    if not folder.is_dir():
        raise InputError(f"{folder}: output exists and is not a folder")
    try:
        check_writable(folder)
    except OSError as exc:
        raise InputError(
            f"{folder}: the output folder cannot be written ({exc.strerror or exc}); nothing was done"
        ) from None
    if input_path.is_dir() and os.path.samefile(folder, input_path):
        raise InputError(f"{folder}: output folder is the input folder; masks would be taken for scans")
    if single and is_nifti(output) and output.exists() and os.path.samefile(output, input_path):
        raise InputError(f"{output}: the mask would overwrite its input scan; choose another output")
    return folder


def _refuse_clashes(cases: list[CaseSource], output: Path, single: bool, statistics: bool) -> None:
    """No mask may overwrite its scan; with statistics, no ``<a>_stats.json`` may be the sidecar of case
    ``<a>_stats``."""
    names = {c.name for c in cases}
    for case in cases:
        dst = output_path_for(case, output, single)
        if case.kind == "nifti" and dst.exists() and case.path.exists() and os.path.samefile(dst, case.path):
            raise InputError(f"{dst}: the mask would overwrite its input scan; choose another output")
        if statistics and f"{case.name}_stats" in names:
            raise InputError(
                f"{case.source}: cases {case.name!r} and {case.name + '_stats'!r} would both write "
                f"{case.name}_stats.json (statistics and sidecar); rename one"
            )


def segment_inputs(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
    options: SegmentOptions = SegmentOptions(),
    outputs: OutputSpec = OutputSpec(),
    *,
    part: Part | None = None,
    log: Callable[[str], object] = print,
    progress: bool = False,
) -> SegmentReport:
    """Segment every case of ``input_path`` (this ``part``'s share) with one checkpoint or an ensemble.

    Args:
        input_path: a NIfTI file, a DICOM file, a folder (NIfTI files and/or DICOM series, any depth) or a
            ``.zip`` of these (:mod:`medseg.batch.inputs`).
        output: a folder; or, for a single NIfTI input, a ``.nii.gz`` path.
        checkpoints: ``-m`` values: files or folders (:func:`resolve_checkpoints`); several are averaged.
        options: how to segment (:class:`~medseg.config.segment.SegmentOptions`: device, sliding window,
            TTA, precision and postprocessing for :class:`medseg.inference.predictor.Predictor`; prefetching
            (:mod:`medseg.batch.lanes`), ``profile`` lines, the caps of a ``.zip`` input).
        outputs: what to write besides mask and sidecar (:class:`~medseg.config.segment.OutputSpec`: viewer
            files (:mod:`medseg.batch.exports`), per-organ masks, statistics (``<case>_stats.json`` and
            ``statistics.csv``), previews and the review page ``index.html`` (:mod:`medseg.batch.review`,
            rebuilt from every case in the folder), attention maps
            (:func:`medseg.inference.attention.attention_maps`), the entropy map ``<case>_entropy.nii.gz``
            (the per-label mean entropy is in every sidecar regardless), and ``overwrite`` of complete cases.
        part: the share of the cases to do (:mod:`medseg.batch.sharding`); None: all of them.
        log: receives one progress line per case.
        progress: show a progress bar over the cases on stderr.

    Raises:
        InputError: problems of the whole run, not of one case: the input does not exist or holds no case,
            an unsafe or unreadable ``.zip``, a file output for a folder input, an output that cannot be
            created or would overwrite an input, colliding case names, an unusable checkpoint.
    """
    input_path, output, part = Path(input_path), Path(output), part or Part()
    if not input_path.exists() and not input_path.is_symlink():
        raise InputError(f"{input_path}: input not found")
    single = is_nifti(input_path) and not input_path.is_dir()
    folder = _prepare_output(input_path, output, single)
    # an nnU-Net v2 model folder (medseg.nnunet), else medseg checkpoints
    predictor = nnunet_predictor(
        checkpoints, options, uncertainty=outputs.uncertainty, attention=outputs.attention
    )
    if predictor is None:
        checkpoints = resolve_checkpoints(checkpoints)
        # precision auto: bf16 where native (medseg.device.resolve_precision)
        predictor = Predictor(checkpoints, options, uncertainty=outputs.uncertainty)
        check_single_channel(predictor.plan, checkpoints[0])  # k-channel models: one line, before any case
    batch = BatchRun(predictor, options, outputs, output=output, single=single, log=log)
    report = batch.report
    report.part = part
    report.removed_temps = remove_stale_temps(folder)
    if report.removed_temps:
        log(f"removed {len(report.removed_temps)} stale temporary file(s) of an interrupted run in {folder}")
    if removed := remove_stale_extractions(folder):
        log(f"removed {len(removed)} extraction folder(s) of an interrupted run in {folder}")
    limits = options.archive_limits
    with opened_cases(input_path, folder, limits=limits) as cases, contextlib.ExitStack() as stack:
        for note in cases.notes:  # archive members that are not inputs: named, not read
            report.warnings.setdefault(str(input_path), []).append(note)
        _refuse_clashes(cases, output, single, outputs.statistics)
        mine = part.select(cases)
        if part.count > 1:
            log(f"{part}: {len(mine)} of {len(cases)} cases")
        if not single:
            try:
                manifest = Manifest(folder / MANIFEST_NAME, part.index, part.count)
            except OSError as exc:
                raise InputError(f"{folder / MANIFEST_NAME}: cannot open ({exc.strerror or exc})") from None
            batch.manifest = stack.enter_context(manifest)
        batch.run(mine, progress)
    if not single:
        _write_folder_files(report, folder, predictor.label_names, outputs)
    return report


def _write_folder_files(
    report: SegmentReport, folder: Path, label_names: dict[str, int], outputs: OutputSpec
) -> None:
    """The files of the whole folder (statistics table, ITK-SNAP labels, review page), each rebuilt from
    every case present; one that cannot be written (full disk) is a failure of its own, in one line."""
    if outputs.statistics:
        with _folder_file(report, folder / STATISTICS_CSV):
            report.statistics_csv = write_statistics_table(folder)
    if "slicer" in outputs.types or outputs.split:
        with _folder_file(report, folder / ITKSNAP_LABELS):
            write_folder_exports(folder, label_names)
    if outputs.preview:
        from medseg.batch.review import collect_cases, write_review_page

        with _folder_file(report, folder / "index.html"):
            report.review_page = write_review_page(folder, collect_cases(folder))


@contextlib.contextmanager
def _folder_file(report: SegmentReport, path: Path) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        if not (isinstance(exc, OSError) or no_space(exc)):
            raise
        cause = getattr(exc, "strerror", None) or " ".join(str(exc).split())
        report.failed[str(path)] = f"{path}: cannot write ({cause})"
