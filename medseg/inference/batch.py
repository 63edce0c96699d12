"""Batch segmentation: NIfTI files, DICOM series, folders of them or a ``.zip`` in → label maps in each scan's
exact geometry out, resumable, shardable, with a run manifest and optional organ statistics.

>>> from medseg.inference.batch import segment_inputs
>>> report = segment_inputs("pacs_export/", "pred/", ["fold_0/best.pt", "fold_1/best.pt"])  # doctest: +SKIP
>>> report.written, report.skipped, report.failed, report.skipped_modality               # doctest: +SKIP

Inputs are found by :mod:`medseg.inference.inputs` (NIfTI files by :func:`medseg.io.list_cases`, DICOM series
by :func:`medseg.io.dicom.find_series`). The model (one checkpoint or an ensemble) is loaded once per run. A
bad input is reported in one line and the other cases go on; a DICOM series that is not CT is *skipped*
(a warning), one the reader refuses (gantry tilt, missing slices, …) is a *failed* case.

**Outputs per case** ``<case>`` (in OUTDIR): the mask ``<case>.nii.gz`` (uint8, the scan's exact shape and
affine — for a DICOM series the geometry SimpleITK read), the sidecar ``<case>.json`` (label names, source,
checkpoints, warnings, the identity below, the predictor's ``info``; for DICOM a ``dicom`` block with
what a DICOM SEG export needs: study / series / frame-of-reference UIDs, the SOP Instance UIDs and files in
slice order, patient ID, study date, series number and description) and, with ``statistics=True``,
``<case>_stats.json`` (:func:`medseg.export.statistics.organ_statistics` on the original scan's values).
Per run: ``manifest.jsonl`` (:mod:`medseg.inference.manifest`, one line per case) and, with statistics,
``statistics.csv`` rebuilt at the end from every ``*_stats.json`` in OUTDIR (so a resumed or sharded run
gives the whole table). A single NIfTI input with ``-o mask.nii.gz`` writes only the mask, its sidecar and
its ``mask_stats.json``: no manifest and no CSV beside a file the user named.

**Kill-safe outputs.** Each file is written atomically (:mod:`medseg.io.atomic`) in the order: old mask and
old statistics deleted, sidecar, statistics, mask. Wherever a run is killed, a mask never exists without its
own sidecar, and statistics never outlive the mask they describe.

**Complete cases are skipped.** A case is *complete* when its mask exists and its sidecar records exactly
this identity:

* the input (:func:`medseg.inference.inputs.case_stamp`): for a NIfTI file its absolute path, size and
  modification time (``st_mtime_ns``) — what ``make`` and ``rsync`` trust, cheap for a 500-scan folder; for
  a DICOM series its SeriesInstanceUID and every file's path, size and mtime; for a case from a ``.zip`` the
  archive's stamp and the member names;
* the model: the SHA-256 of every checkpoint (``Predictor.checkpoint_sha256``: a retrained ``best.pt`` at
  the same path is another model), the sliding-window overlap, TTA, precision and postprocessing mode.

A re-run into the same folder (e.g. after a killed batch) skips complete cases and redoes the rest; a
complete case without statistics, when they are asked for, gets them from its mask without inference.
``overwrite=True`` redoes every case.

**Parts.** With a :class:`medseg.inference.sharding.Part`, only that part's cases are done. Parts can run
at once into one OUTDIR: each case belongs to exactly one part, temporary files carry their writer's PID
and host so a part only removes dead writers' leftovers, manifest lines are appended atomically, and every
part rewrites ``statistics.csv`` atomically from all statistics present when it ends (the last to finish
leaves the full table).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.export.statistics import organ_statistics
from medseg.inference.exports import (
    parse_output_types,
    preview_paths,
    write_attention,
    write_case_exports,
    write_folder_exports,
    write_previews,
)
from medseg.inference.inputs import (
    CaseSource,
    case_stamp,
    opened_cases,
    remove_stale_extractions,
    resolve_checkpoints,
)
from medseg.inference.inputs import source_stamp as source_stamp
from medseg.inference.manifest import MANIFEST_NAME, Manifest
from medseg.inference.outputs import (
    dicom_block,
    is_complete,
    output_path_for,
    read_sidecar,
    sidecar_path,
    statistics_path,
    write_statistics_table,
)
from medseg.inference.predictor import POSTPROCESS_MODES, PRECISIONS, Prediction, Predictor
from medseg.inference.sharding import Part
from medseg.io import InputError, atomic_write_text, is_nifti, load_volume, save_like
from medseg.io.atomic import remove_stale_temps
from medseg.io.cases import check_case_file
from medseg.io.dicom import read_series


@dataclass
class SegmentReport:
    """What a batch did: masks written, masks skipped as complete, failures (source → one-line reason
    naming the file), DICOM series skipped by policy (source → reason), warnings (source → one-line notes,
    also kept in the sidecar), the stale temporary files removed from the output folder at the start, the
    part run and the statistics table written."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped_modality: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    removed_temps: list[Path] = field(default_factory=list)
    part: Part = field(default_factory=Part)
    statistics_csv: Path | None = None
    review_page: Path | None = None


def _jsonable(mode: str | Mapping) -> str | dict:
    """A postprocessing mode for the identity: the name, or ``{label: rule fields}``."""
    if isinstance(mode, str):
        return mode
    return {str(k): dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in mode.items()}


def _check_options(precision: str, postprocess: str | Mapping) -> None:
    if precision not in ("auto", *PRECISIONS):
        raise InputError(
            f"--precision {precision!r} is not valid; valid values: auto, {', '.join(PRECISIONS)}"
        )
    if isinstance(postprocess, str) and postprocess not in POSTPROCESS_MODES:
        raise InputError(
            f"--postprocess {postprocess!r} is not valid; valid values: {', '.join(POSTPROCESS_MODES)}"
        )


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


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


class _Batch:
    """The state of one run: predictor, identity, outputs, report, manifest; :meth:`run` does the cases."""

    def __init__(
        self,
        predictor: Predictor,
        checkpoints: list[Path],
        identity: dict,
        output: Path,
        single: bool,
        folder: Path,
        statistics: bool,
        overwrite: bool,
        log: Callable[[str], object],
        preview: bool = False,
        attention: bool = False,
        exports: tuple[tuple[str, ...], bool] = (("nifti",), False),
    ) -> None:
        self.predictor, self.checkpoints, self.identity = predictor, checkpoints, identity
        self.output, self.single, self.folder = output, single, folder
        self.statistics, self.overwrite, self.log = statistics, overwrite, log
        self.preview, self.attention = preview, attention
        self.output_types, self.split = exports
        self.report = SegmentReport()
        self.manifest: Manifest | None = None

    def run(self, cases: list[CaseSource], progress: bool) -> None:
        from tqdm import tqdm

        bar = tqdm(total=len(cases), unit="case", file=sys.stderr, disable=not progress, leave=False)
        say = self.log
        if progress:  # progress lines on stdout, bar on stderr: clear the bar while a line is printed

            def say(text: str) -> None:
                with tqdm.external_write_mode(file=sys.stdout):
                    self.log(text)

        with bar:
            for i, case in enumerate(cases, 1):
                t0 = time.monotonic()
                status, error, line = self._case(case)
                seconds = time.monotonic() - t0
                say(f"[{i}/{len(cases)}] {line}")
                if self.manifest is not None:
                    self.manifest.append(case.name, case.source, case.kind, status, seconds, error)
                bar.update()

    def _case(self, case: CaseSource) -> tuple[str, str | None, str]:
        """Do one case; return (manifest status, error, progress text)."""
        report, dst = self.report, output_path_for(case, self.output, self.single)
        if case.skipped:
            where = case.shown(case.series.where)
            report.skipped_modality[case.source] = case.skipped
            report.warnings.setdefault(case.source, []).append(f"{where}: skipped: {case.skipped}")
            return "skipped-modality", None, f"{case.label}: skipped ({case.skipped})"
        t0 = time.monotonic()
        try:
            if case.error:
                raise InputError(case.error)
            if case.kind == "nifti":
                check_case_file(case.path)
            identity = {self._source_key(case): case_stamp(case), **self.identity}
            if not self.overwrite and is_complete(dst, identity):
                note = self._complete_statistics(case, dst) + self._complete_previews(case, dst)
                report.skipped.append(dst)
                if warnings := list((read_sidecar(dst) or {}).get("warnings", [])):
                    report.warnings[case.source] = warnings
                return "skipped", None, f"{case.label}: done, skipped (complete from an earlier run){note}"
            pred, warnings, extra = self._predict(case)
            sidecar = {
                "case": case.name,
                "labels": pred.label_names,
                "source": case.source,
                "kind": case.kind,
                "checkpoints": [str(c) for c in self.checkpoints],
                "shape": list(pred.labels.shape),
                "warnings": warnings,
                **identity,
                "inference": pred.info,
                **extra,
            }
            self._write_case(case, dst, sidecar, pred)
        except InputError as exc:
            return self._failed(case, case.shown(str(exc)))
        except Exception as exc:  # keep the batch going; name the file and the cause
            return self._failed(case, case.shown(f"{case.source}: {type(exc).__name__}: {_first_line(exc)}"))
        if warnings:
            report.warnings[case.source] = warnings
        report.written.append(dst)
        what = (
            case.label if case.kind == "nifti" else f"{case.label} (DICOM, {len(case.series.files)} slices)"
        )
        return "written", None, f"{what} → {dst} ({time.monotonic() - t0:.1f} s)"

    def _failed(self, case: CaseSource, reason: str) -> tuple[str, str, str]:
        self.report.failed[case.source] = reason
        return "failed", reason, f"{case.label}: failed"

    @staticmethod
    def _source_key(case: CaseSource) -> str:
        return "source_file" if case.kind == "nifti" else "source_series"

    def _predict(self, case: CaseSource) -> tuple[Prediction, list[str], dict]:
        """Read and segment one case; returns the prediction, its warnings and the sidecar's extra keys."""
        if case.kind == "nifti":
            pred = self.predictor.predict(case.path)
            return pred, [case.shown(str(w)) for w in pred.warnings], {}
        volume = read_series(case.series)
        pred = self.predictor.predict(volume.image)
        where = case.shown(case.series.where)
        notes = [f"{where}: {case.shown(n)}" for n in case.series.notes]
        return (
            pred,
            notes + [f"{where}: {w}" for w in pred.warnings],
            {"dicom": dicom_block(case)},
        )

    def _write_case(self, case: CaseSource, dst: Path, sidecar: dict, pred: Prediction) -> None:
        """Old mask and statistics out, sidecar in, statistics in, new mask in (module docstring)."""
        dst.unlink(missing_ok=True)
        statistics_path(dst).unlink(missing_ok=True)
        if self.output_types != ("nifti",) or self.split:  # viewer files first: a failed SEG fails the case
            sidecar["exports"], notes = write_case_exports(
                case,
                dst,
                pred,
                self.output_types,
                self.split,
                self.checkpoints[0],
                self.identity["checkpoint_sha256"][0],
            )
            sidecar["warnings"].extend(case.shown(n) for n in notes)
        atomic_write_text(sidecar_path(dst), json.dumps(sidecar, indent=2, default=str))
        if self.statistics:
            image = np.asanyarray(pred.reference.dataobj)
            self._write_statistics(case, dst, pred.labels, image, pred.reference.affine, pred.label_names)
        for old in preview_paths(dst):
            old.unlink(missing_ok=True)
        save_like(pred.labels, pred.reference, dst)
        if self.preview:
            write_previews(dst, pred.reference, pred.labels, pred.label_names)
        if self.attention:
            sidecar["warnings"].extend(write_attention(dst, self.predictor, pred))

    def _complete_previews(self, case: CaseSource, dst: Path) -> str:
        """Previews for a complete case that has none yet (from its mask and scan, no inference)."""
        if not self.preview or all(p.is_file() for p in preview_paths(dst)):
            return ""
        import nibabel as nib

        labels = np.asarray(nib.load(dst).dataobj)
        scan = load_volume(case.path) if case.kind == "nifti" else read_series(case.series).image
        names = (read_sidecar(dst) or {}).get("labels") or self.predictor.label_names
        write_previews(dst, scan, labels, names)
        return "; preview added"

    def _write_statistics(
        self,
        case: CaseSource,
        dst: Path,
        labels: np.ndarray,
        image: np.ndarray,
        affine: np.ndarray,
        label_names: Mapping[str, int],
    ) -> None:
        rows = organ_statistics(labels, image, affine, label_names, case.name)
        doc = {"case": case.name, "source": case.source, "rows": rows}
        atomic_write_text(statistics_path(dst), json.dumps(doc, indent=1, default=str))

    def _complete_statistics(self, case: CaseSource, dst: Path) -> str:
        """Statistics for a complete case that has none yet (from its mask and scan, no inference)."""
        if not self.statistics or statistics_path(dst).is_file():
            return ""
        import nibabel as nib

        mask = nib.load(dst)
        labels = np.asarray(mask.dataobj)
        scan = load_volume(case.path) if case.kind == "nifti" else read_series(case.series).image
        if scan.shape[:3] != labels.shape or not np.allclose(scan.affine, mask.affine, atol=1e-5):
            raise InputError(f"{dst}: mask does not match its scan {case.source}; rerun with --overwrite")
        names = (read_sidecar(dst) or {}).get("labels") or self.predictor.label_names
        self._write_statistics(case, dst, labels, np.asanyarray(scan.dataobj), scan.affine, names)
        return "; statistics added"


def segment_inputs(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
    device: str = "auto",
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    log: Callable[[str], object] = print,
    overwrite: bool = False,
    *,
    tta: bool = False,
    precision: str = "auto",
    postprocess: str | Mapping = "auto",
    statistics: bool = False,
    part: Part | None = None,
    progress: bool = False,
    preview: bool = False,
    attention: bool = False,
    output_types: str = "nifti",
    split: bool = False,
) -> SegmentReport:
    """Segment every case of ``input_path`` (this ``part``'s share) with one checkpoint or an ensemble.

    Args:
        input_path: a NIfTI file, a DICOM file, a folder (NIfTI files and/or DICOM series, any depth) or a
            ``.zip`` of these (:mod:`medseg.inference.inputs`).
        output: a folder; or, for a single NIfTI input, a ``.nii.gz`` path.
        checkpoints: ``-m`` values: files or folders (:func:`resolve_checkpoints`); several are averaged.
        device, overlap, sw_batch_size, tta, precision, postprocess: passed to
            :class:`medseg.inference.predictor.Predictor`.
        log: receives one progress line per case.
        overwrite: redo complete cases.
        statistics: write ``<case>_stats.json`` and rebuild ``statistics.csv``.
        preview: write ``<case>_preview.png`` / ``<case>_thumb.png`` and the batch review page
            ``index.html`` (:mod:`medseg.export.review`; rebuilt from every case in the folder).
        output_types: comma-separated :data:`medseg.inference.exports.OUTPUT_TYPES` (``nifti`` always);
            ``dicom-seg`` / ``dicom-seg-labelmap`` for DICOM inputs, ``slicer`` (``.seg.nrrd``).
        split: one 0/1 mask per organ in ``<case>_organs/``.
        attention: write the grid attention coefficients α of every gated level restored to the scan
            (:func:`medseg.inference.attention.attention_maps`) as float NIfTI, and their overlays (PNG).
        part: the share of the cases to do (:mod:`medseg.inference.sharding`); None: all of them.
        progress: show a progress bar over the cases on stderr.

    Raises:
        InputError: problems of the whole run, not of one case: the input does not exist or holds no case,
            an unsafe or unreadable ``.zip``, a file output for a folder input, an output that cannot be
            created or would overwrite an input, colliding case names, an unusable option or checkpoint.
    """
    input_path, output, part = Path(input_path), Path(output), part or Part()
    _check_options(precision, postprocess)
    try:
        types = parse_output_types(output_types)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if not input_path.exists() and not input_path.is_symlink():
        raise InputError(f"{input_path}: input not found")
    single = is_nifti(input_path) and not input_path.is_dir()
    folder = _prepare_output(input_path, output, single)
    checkpoints = resolve_checkpoints(checkpoints)
    predictor = Predictor(
        checkpoints,
        device=device,
        overlap=overlap,
        sw_batch_size=sw_batch_size,
        tta=tta,
        precision=precision,  # auto: bf16 where native (medseg.inference.predictor.autocast_dtype)
        postprocess=postprocess,
    )
    identity = {
        "checkpoint_sha256": list(predictor.checkpoint_sha256),
        "overlap": predictor.overlap,
        "tta": bool(tta),
        "precision": predictor.precision,  # resolved: fp32 | bf16 | fp16
        "postprocess": _jsonable(postprocess),
        "output_types": list(types),
        "split": split,
    }
    batch = _Batch(
        predictor,
        checkpoints,
        identity,
        output,
        single,
        folder,
        statistics,
        overwrite,
        log,
        preview,
        attention,
        (types, split),
    )
    report = batch.report
    report.part = part
    report.removed_temps = remove_stale_temps(folder)
    if report.removed_temps:
        log(f"removed {len(report.removed_temps)} stale temporary file(s) of an interrupted run in {folder}")
    if removed := remove_stale_extractions(folder):
        log(f"removed {len(removed)} extraction folder(s) of an interrupted run in {folder}")
    with opened_cases(input_path, folder) as cases, contextlib.ExitStack() as stack:
        _refuse_clashes(cases, output, single, statistics)
        mine = part.select(cases)
        if part.count > 1:
            log(f"{part}: {len(mine)} of {len(cases)} cases")
        if not single:
            batch.manifest = stack.enter_context(Manifest(folder / MANIFEST_NAME, part.index, part.count))
        batch.run(mine, progress)
    if statistics and not single:
        report.statistics_csv = write_statistics_table(folder)
    if ("slicer" in types or split) and not single:
        write_folder_exports(folder, predictor.label_names)
    if preview and not single:
        from medseg.export.review import collect_cases, write_review_page

        report.review_page = write_review_page(folder, collect_cases(folder))
    return report
