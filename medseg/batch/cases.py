"""One batch run's cases, through the loader, network and writer lanes (:mod:`medseg.batch.lanes`).

:class:`BatchRun` holds the state of one :func:`medseg.batch.run.segment_inputs` run (predictor,
identity, outputs, report, manifest) and does its cases in three steps:

1. :meth:`BatchRun.load` — the checks that need no model (skipped modality, complete from an earlier run,
   unreadable file), then reading and preprocessing (:meth:`medseg.inference.predictor.Predictor.prepare`);
2. :meth:`BatchRun.compute` — the network, restore and postprocessing
   (:meth:`~medseg.inference.predictor.Predictor.predict`);
3. :meth:`BatchRun.write` — sidecar, statistics, viewer exports, the mask, previews, attention maps, in the
   kill-safe order of :mod:`medseg.batch.run`.

With ``prefetch=1`` (the default) the next case loads and the previous one is written while the network runs
(``medseg segment --prefetch 0`` does one case at a time). A failure in any step is that case's, reported in
one line; the other cases go on. With ``profile`` each case also gets a line of its stage times.

**Shared work.** Before a case is read it is claimed (:mod:`medseg.io.claims`); a case another live run has
claimed is left to it (status ``claimed``), so two unsharded runs on one input and output folder do every
case once. The claim is given back once the case's result is in.

**Viewer files never cost the mask.** The mask, sidecar, statistics and previews are written first; a DICOM
SEG (or another viewer file) that cannot be made is then one error line and the case's status is
``failed-export``: the mask stays, and ``medseg export`` can make the file later.

**A full disk stops the batch.** When a write fails for lack of space (``ENOSPC``, ``EDQUOT``), that case
fails, nothing of it is left half-written (atomic writes), and the cases not yet started are listed as
failed without being read: the network would only compute masks that cannot be written. A re-run after
space is freed continues with them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.batch.exports import (
    preview_paths,
    uncertainty_path,
    write_attention,
    write_case_exports,
    write_previews,
    write_uncertainty,
)
from medseg.batch.inputs import CaseSource, case_stamp
from medseg.batch.lanes import run_lanes
from medseg.batch.manifest import Manifest
from medseg.batch.outputs import (
    dicom_block,
    is_complete,
    output_path_for,
    read_sidecar,
    sidecar_path,
    statistics_path,
)
from medseg.batch.sharding import Part
from medseg.config.segment import OutputSpec, SegmentOptions
from medseg.inference.predictor import Prediction, Predictor, Prepared
from medseg.io import InputError, atomic_write_text, case_name, load_volume, save_like
from medseg.io.atomic import no_space
from medseg.io.cases import check_case_file
from medseg.io.claims import Claims
from medseg.io.dicom import read_series
from medseg.report.qa import image_info
from medseg.report.statistics import organ_statistics

#: Stages of the ``--profile`` line, in order: ``Prediction.info["seconds"]`` keys, then ``write``.
PROFILE_STAGES = ("read", "preprocess", "network", "restore", "postprocess", "write")


@dataclass
class SegmentReport:
    """What a batch did: masks written, masks skipped as complete, failures (source → one-line reason
    naming the file), DICOM series skipped by policy (source → reason), warnings (source → one-line notes,
    also kept in the sidecar), the stale temporary files removed from the output folder at the start, cases
    left to another run that had claimed them (source → holder), cases whose mask was written but a viewer
    file failed (source → reason; also in ``failed``), the part run and the statistics table written."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped_modality: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    removed_temps: list[Path] = field(default_factory=list)
    claimed: dict[str, str] = field(default_factory=dict)
    failed_exports: dict[str, str] = field(default_factory=dict)
    part: Part = field(default_factory=Part)
    statistics_csv: Path | None = None
    review_page: Path | None = None


@dataclass
class _Outcome:
    """A case's end: manifest status, error, progress text, stage seconds (``--profile``)."""

    status: str
    error: str | None
    line: str
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _Job:
    """A case on its way through the lanes: where it goes, what identifies it, the scan, notes so far."""

    case: CaseSource
    dst: Path
    identity: dict
    prepared: Prepared | None = None
    prediction: Prediction | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


def _jsonable(mode: str | Mapping) -> str | dict:
    """A postprocessing mode for the identity: the name, or ``{label: rule fields}``."""
    if isinstance(mode, str):
        return mode
    return {str(k): dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in mode.items()}


def run_identity(predictor: Predictor, options: SegmentOptions, outputs: OutputSpec) -> dict:
    """What every case's sidecar records of the model and options, beside its input's stamp: a complete case
    is skipped only when all of it matches (:func:`medseg.batch.outputs.is_complete`). Values as the
    predictor resolved them (overlap from the checkpoint, precision ``auto`` → fp32 | bf16 | fp16, backend
    ``auto`` → torch | openvino)."""
    return {
        "checkpoint_sha256": list(predictor.checkpoint_sha256),
        "overlap": predictor.overlap,
        "tta": bool(options.tta),
        "precision": predictor.precision,
        **({"int8_float_parts": predictor.float_parts} if predictor.float_parts else {}),
        "backend": predictor.backend,
        "postprocess": _jsonable(options.postprocess),
        "output_types": list(outputs.types),
        "split": outputs.split,
        "uncertainty": bool(outputs.uncertainty),
    }


class BatchRun:
    """The state of one run and its three per-case steps (module docstring).

    Args:
        predictor: the loaded model (its ``checkpoints`` are recorded in every sidecar).
        options: how the run segments (``prefetch``, ``profile``; the rest is already in ``predictor``).
        outputs: what each case writes.
        output: the ``-o`` path: a folder, or the mask of a ``single`` NIfTI input.
        single: one NIfTI input (``output`` may then name the mask itself).
        log: receives the progress lines.
    """

    def __init__(
        self,
        predictor: Predictor,
        options: SegmentOptions,
        outputs: OutputSpec,
        *,
        output: Path,
        single: bool,
        log: Callable[[str], object],
    ) -> None:
        self.predictor, self.options, self.outputs = predictor, options, outputs
        self.checkpoints = predictor.checkpoints
        self.identity = run_identity(predictor, options, outputs)
        self.output, self.single, self.log = output, single, log
        self.report = SegmentReport()
        self.manifest: Manifest | None = None
        self.folder = output.parent if single and output.name.endswith((".nii", ".nii.gz")) else output
        self.claims = Claims(self.folder)
        self.stopped: str | None = None  # why no further case is started (a full disk)
        self._manifest_error: str | None = None

    def run(self, cases: list[CaseSource], progress: bool) -> None:
        from tqdm import tqdm

        bar = tqdm(total=len(cases), unit="case", file=sys.stderr, disable=not progress, leave=False)
        say = self.log
        if progress:  # progress lines on stdout, bar on stderr: clear the bar while a line is printed

            def say(text: str) -> None:
                with tqdm.external_write_mode(file=sys.stdout):
                    self.log(text)

        lanes = run_lanes(cases, self.load, self.compute, self.write, self.options.prefetch)
        # closing: an interruption (SIGINT/SIGTERM) between two results still lets the lanes finish the
        # case in flight before the claims are given back.
        with bar, self.claims, contextlib.closing(lanes):
            for i, (case, outcome) in enumerate(lanes, 1):
                self.claims.release(case.name)
                say(f"[{i}/{len(cases)}] {outcome.line}")
                times = [f"{k} {outcome.seconds[k]:.1f}" for k in PROFILE_STAGES if k in outcome.seconds]
                if self.options.profile and times:
                    total = outcome.seconds.get("case", 0.0)
                    say(f"  profile {case.label}: {', '.join(times)} s (case {total:.1f} s)")
                self._append_manifest(case, outcome)
                bar.update()

    def _append_manifest(self, case: CaseSource, outcome: _Outcome) -> None:
        """One manifest line; a manifest that cannot be appended to (full disk) is one warning, not a stop."""
        if self.manifest is None or self._manifest_error is not None:
            return
        try:
            seconds = outcome.seconds.get("case", 0.0)
            self.manifest.append(case.name, case.source, case.kind, outcome.status, seconds, outcome.error)
        except OSError as exc:
            self._manifest_error = (
                f"{self.manifest.path}: cannot append ({exc.strerror or exc}); the run goes on"
            )
            self.report.warnings.setdefault(str(self.manifest.path), []).append(self._manifest_error)

    # ------------------------------------------------------------------ the three steps

    def load(self, case: CaseSource) -> _Job | _Outcome:
        """Checks, then read and preprocess (loader lane)."""
        report, dst = self.report, output_path_for(case, self.output, self.single)
        if case.skipped:
            where = case.shown(case.series.where)
            report.skipped_modality[case.source] = case.skipped
            report.warnings.setdefault(case.source, []).append(f"{where}: skipped: {case.skipped}")
            return _Outcome("skipped-modality", None, f"{case.label}: skipped ({case.skipped})")
        job = _Job(case, dst, {})
        if self.stopped:
            return self._not_started(case)
        outcome = self._load(case, job)
        if isinstance(outcome, _Outcome):
            outcome.seconds.setdefault("case", round(time.monotonic() - job.started, 3))
        return outcome

    def _load(self, case: CaseSource, job: _Job) -> _Job | _Outcome:
        report, dst = self.report, job.dst
        try:
            if case.error:
                raise InputError(case.error)
            if case.kind == "nifti":
                check_case_file(case.path)
            job.identity = {self._source_key(case): case_stamp(case), **self.identity}
            if not self.outputs.overwrite and is_complete(dst, job.identity):
                return self._complete(case, dst)
            if holder := self.claims.claim(case.name):
                report.claimed[case.source] = holder
                return _Outcome("claimed", None, f"{case.label}: left to {holder}, which is segmenting it")
            if not self.outputs.overwrite and is_complete(dst, job.identity):  # finished while we claimed
                return self._complete(case, dst)
            if case.kind == "nifti":
                job.prepared = self.predictor.prepare(case.path)
            else:
                job.prepared = self.predictor.prepare(read_series(case.series).image)
                where = case.shown(case.series.where)
                job.notes = [f"{where}: {case.shown(n)}" for n in case.series.notes]
                job.extra = {"dicom": dicom_block(case)}
        except Exception as exc:
            return self._failed(case, exc)
        return job

    def _complete(self, case: CaseSource, dst: Path) -> _Outcome:
        """A case complete from an earlier run: add missing statistics/previews; a viewer file that failed
        then is reported again (``medseg export`` retries it)."""
        note = self._complete_statistics(case, dst) + self._complete_previews(case, dst)
        self.report.skipped.append(dst)
        side = read_sidecar(dst) or {}
        if warnings := list(side.get("warnings", [])):
            self.report.warnings[case.source] = warnings
        if isinstance(error := side.get("export_error"), str):
            self.report.failed[case.source] = self.report.failed_exports[case.source] = error
            return _Outcome("failed-export", error, f"{case.label}: mask complete; viewer export failed")
        return _Outcome("skipped", None, f"{case.label}: done, skipped (complete from an earlier run){note}")

    def _not_started(self, case: CaseSource) -> _Outcome:
        reason = f"{case.source}: not started: {self.stopped}; free space and run again to continue"
        self.report.failed[case.source] = reason
        return _Outcome("failed", reason, f"{case.label}: not started (no space left)")

    def compute(self, case: CaseSource, job: _Job | _Outcome) -> _Job | _Outcome:
        """Network, restore, postprocessing (main lane)."""
        if isinstance(job, _Outcome):
            return job
        if self.stopped:
            job.prepared = None
            return self._not_started(case)
        try:
            job.prediction = self.predictor.predict(job.prepared)
        except Exception as exc:
            return self._failed(case, exc)
        finally:
            job.prepared = None
        return job

    def write(self, case: CaseSource, job: _Job | _Outcome) -> _Outcome:
        """Sidecar, statistics, exports, mask (writer lane)."""
        if isinstance(job, _Outcome):
            return job
        pred = job.prediction
        if case.kind == "nifti":
            warnings = [case.shown(str(w)) for w in pred.warnings]
        else:
            warnings = job.notes + [f"{case.shown(case.series.where)}: {w}" for w in pred.warnings]
        sidecar = {
            "case": case.name,
            "labels": pred.label_names,
            "source": case.source,
            "kind": case.kind,
            "checkpoints": [str(c) for c in self.checkpoints],
            "shape": list(pred.labels.shape),
            "warnings": warnings,
            **job.identity,
            "inference": pred.info,
            "mean_entropy": pred.info.get("mean_entropy", {}),
            "image_info": image_info(pred.reference).to_dict(),
            **job.extra,
        }
        t0 = time.monotonic()
        try:
            self._write_case(case, job.dst, sidecar, pred)
        except Exception as exc:
            return self._failed(case, exc)
        seconds = {**pred.info.get("seconds", {}), "write": round(time.monotonic() - t0, 3)}
        if warnings:
            self.report.warnings[case.source] = warnings
        self.report.written.append(job.dst)
        what = (
            case.label if case.kind == "nifti" else f"{case.label} (DICOM, {len(case.series.files)} slices)"
        )
        seconds["case"] = round(time.monotonic() - job.started, 3)
        line = f"{what} → {job.dst} ({seconds['case']:.1f} s)"
        if error := sidecar.get("export_error"):
            self.report.failed[case.source] = self.report.failed_exports[case.source] = error
            return _Outcome("failed-export", error, f"{line}; viewer export failed", seconds)
        return _Outcome("written", None, line, seconds)

    # ------------------------------------------------------------------ helpers

    def _failed(self, case: CaseSource, exc: BaseException) -> _Outcome:
        """Keep the batch going; name the file and the cause. Out of disk space: stop starting cases."""
        if no_space(exc):
            self.stopped = f"no space left on device in {self.folder}"
            reason = case.shown(f"{case.source}: cannot write its outputs: {self.stopped}")
        elif isinstance(exc, InputError):
            reason = case.shown(str(exc))
        else:
            reason = case.shown(f"{case.source}: {type(exc).__name__}: {_first_line(exc)}")
        self.report.failed[case.source] = reason
        return _Outcome("failed", reason, f"{case.label}: failed")

    @staticmethod
    def _source_key(case: CaseSource) -> str:
        return "source_file" if case.kind == "nifti" else "source_series"

    def _write_case(self, case: CaseSource, dst: Path, sidecar: dict, pred: Prediction) -> None:
        """Old mask and statistics out, sidecar in, statistics in, new mask in (module docstring of
        :mod:`medseg.batch.run`), previews; then the viewer files, whose failure is recorded in the
        sidecar's ``export_error`` and leaves the rest in place; the sidecar is rewritten last."""
        dst.unlink(missing_ok=True)
        statistics_path(dst).unlink(missing_ok=True)
        atomic_write_text(sidecar_path(dst), json.dumps(sidecar, indent=2, default=str))
        if self.outputs.statistics:
            image = np.asanyarray(pred.reference.dataobj)
            self._write_statistics(case, dst, pred.labels, image, pred.reference.affine, pred.label_names)
        for old in (*preview_paths(dst), uncertainty_path(dst)):
            old.unlink(missing_ok=True)
        t0 = time.monotonic()
        save_like(pred.labels, pred.reference, dst)
        if pred.uncertainty is not None:
            write_uncertainty(dst, pred)
        pred.info.setdefault("seconds", {})["write"] = round(time.monotonic() - t0, 3)
        atomic_write_text(sidecar_path(dst), json.dumps(sidecar, indent=2, default=str))
        if self.outputs.preview:
            write_previews(dst, pred.reference, pred.labels, pred.label_names)
        if self.outputs.attention:
            sidecar["warnings"].extend(write_attention(dst, self.predictor, pred))
        if self.outputs.viewer_files:
            try:
                sidecar["exports"], notes = write_case_exports(
                    case,
                    dst,
                    pred,
                    self.outputs.types,
                    self.outputs.split,
                    self.checkpoints[0],
                    self.identity["checkpoint_sha256"][0],
                )
                sidecar["warnings"].extend(case.shown(n) for n in notes)
            except Exception as exc:
                if no_space(exc):
                    raise
                text = (
                    str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {_first_line(exc)}"
                )
                sidecar["export_error"] = case.shown(f"{text} (mask written: {dst}; viewer files not)")
                for suffix in ("_seg.dcm", "_rtstruct.dcm"):  # not the old mask's SEG / RT Structure Set
                    (dst.parent / f"{case_name(dst)}{suffix}").unlink(missing_ok=True)
        atomic_write_text(sidecar_path(dst), json.dumps(sidecar, indent=2, default=str))

    def _complete_previews(self, case: CaseSource, dst: Path) -> str:
        """Previews for a complete case that has none yet (from its mask and scan, no inference)."""
        if not self.outputs.preview or all(p.is_file() for p in preview_paths(dst)):
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
        if not self.outputs.statistics or statistics_path(dst).is_file():
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
