"""The node's workers: segment a claimed job version with the batch core, publish its outputs, send them.

**Segmenting** (:func:`segment_job`), for a version claimed by :meth:`medseg.node.store.Store.claim_job`:

1. its instances are hard-linked from the spool into ``jobs/<job>/input/`` (no copy; a later replacement of
   a spool file does not change them);
2. the series is checked by the batch core's DICOM reader (:func:`medseg.io.dicom.find_series`): a series
   it skips (not CT) or refuses (missing slices, gantry tilt, corrupt pixel module, …) ends ``refused``
   with the reader's one-line reason, before any model is loaded;
3. :func:`medseg.batch.run.segment_inputs` — the same inference core as ``medseg segment`` — segments it
   into ``jobs/<job>/out/`` with the node's :class:`~medseg.config.segment.SegmentOptions` and
   :class:`~medseg.config.segment.OutputSpec`; a case it reports failed ends the version ``failed``
   (``medseg node retry`` runs it again). The batch core loads the model at each call (it has no
   parameter to take a loaded predictor), measured in docs/node.md;
4. the case's files are published into ``outputs/`` under the node's case name (:func:`case_name_for`:
   stable per version), the JSON files rewritten to the new names, the mask renamed last — a case whose
   mask is in ``outputs/`` is complete, as in a ``medseg segment`` folder.

**Sending** (:func:`send_delivery`): each DICOM output (``<case>_seg.dcm``, ``<case>_rtstruct.dcm``, …) goes
to one destination per delivery with :func:`medseg.network.send.send_files` and one attempt; the retry
schedule lives in the store (:meth:`~medseg.node.store.Store.delivery_failed`), so it survives restarts; a
failure the sender calls permanent (``SendError.permanent``: the peer rejects our AE title, refuses the SOP
class, …) ends the delivery at once, since no retry can fix configuration.
A resend after a crash sends the same files again: their UIDs are derived from the source series and the
model (:mod:`medseg.export.uids`), so a PACS that keys on SOP Instance UID keeps one copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.config.segment import OutputSpec, SegmentOptions
from medseg.io import atomic_write_text
from medseg.node.store import Delivery, Job, Store
from medseg.node.workdir import WorkDir

Log = Callable[[dict], object]


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker does with a job.

    Attributes:
        checkpoints: the model (resolved ``-m`` files).
        options: how to segment.
        outputs: what to write (``nifti`` plus the ``--output-type`` values).
        destinations: where the DICOM outputs go (canonical destination strings).
        send_attempts: attempts per destination before ``send-failed``.
        send_backoff_s: the first retry's wait; doubled each time (:mod:`medseg.node.retry`).
        credentials: for DICOMweb destinations (:func:`medseg.network.credentials.load_credentials`).
        calling_ae: our AE title when we send (the node's own).
    """

    checkpoints: tuple[Path, ...]
    options: SegmentOptions = field(default_factory=SegmentOptions)
    outputs: OutputSpec = field(default_factory=lambda: OutputSpec(types=("nifti", "dicom-seg")))
    destinations: tuple[str, ...] = ()
    send_attempts: int = 6
    send_backoff_s: float = 30.0
    credentials: Any = None
    calling_ae: str = "MEDSEG"


def case_name_for(case: str, series_uid: str, version: int) -> str:
    """The node's case name: the reader's ``PatientID_StudyDate_SeriesNumber``, 8 hex digits of the SHA-1 of
    the SeriesInstanceUID (two series with equal tags stay apart) and the version, e.g.
    ``P1_20240101_2_1f0c3a9e_v1``."""
    return f"{case}_{hashlib.sha1(series_uid.encode()).hexdigest()[:8]}_v{version}"


def gather(instances: list[tuple[str, str]], folder: Path) -> None:
    """Hard-link each ``(sop_uid, spool path)`` into ``folder/<sop_uid>.dcm`` (the folder is made anew)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for sop, path in instances:
        os.link(path, folder / f"{sop}.dcm")


def _case_files(folder: Path, case: str) -> list[Path]:
    """The files of case ``case`` (``<case>.nii.gz``, ``<case>.json``, ``<case>_seg.dcm``, ``<case>_organs/``…);
    a case name may hold dots (``P.1_20240101_2``), so names are matched by prefix, not split."""
    return [p for p in folder.iterdir() if p.name.startswith((f"{case}.", f"{case}_"))]


def _renamed(value: Any, old: tuple[str, str], new: tuple[str, str]) -> Any:
    """``value`` (JSON) with the case name ``old[0]`` → ``new[0]`` and the path prefix ``old[1]`` → ``new[1]``."""
    if isinstance(value, dict):
        return {k: _renamed(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed(v, old, new) for v in value]
    if isinstance(value, str):
        return new[0] if value == old[0] else value.replace(old[1], new[1])
    return value


def publish(staging: Path, case: str, outputs: Path, name: str) -> list[Path]:
    """Move case ``case``'s files from ``staging`` to ``outputs`` as case ``name``; return the DICOM files.

    Order (kill-safe like the batch core's): viewer files and statistics first, the sidecar, the mask last.
    Each move is a rename on one file system; JSON files are rewritten (atomically) to the new names.
    """
    files = _case_files(staging, case)
    mask, sidecar = staging / f"{case}.nii.gz", staging / f"{case}.json"
    old, new = (case, str(staging / case)), (name, str(outputs / name))
    for path in sorted(files, key=lambda p: (p == sidecar, p == mask)):
        target = outputs / (name + path.name[len(case) :])
        if path.suffix == ".json":
            atomic_write_text(target, json.dumps(_renamed(json.loads(path.read_text()), old, new), indent=2))
            path.unlink()
            continue
        if path.is_dir() and target.exists():
            shutil.rmtree(target)
        os.replace(path, target)
    return sorted(outputs / (name + p.name[len(case) :]) for p in files if p.name.endswith(".dcm"))


def _reason(text: str, folder: Path, series_uid: str) -> str:
    """A one-line message with the job's input folder shown as the series it holds."""
    return " ".join(text.replace(str(folder), f"series {series_uid}").split())


def segment_job(store: Store, job: Job, workdir: WorkDir, config: WorkerConfig, log: Log) -> str:
    """Segment a claimed version and publish it (module docstring); return its new state."""
    from medseg.batch.run import read_sidecar, segment_inputs
    from medseg.io import InputError
    from medseg.io.dicom import find_series

    inputs, staging = workdir.job_input(job.id), workdir.job_staging(job.id)
    try:
        gather(store.job_instances(job.id), inputs)
        found = find_series(inputs)
    except (OSError, InputError) as exc:
        store.end_job(
            job.id, "failed", _reason(f"cannot read the received instances: {exc}", inputs, job.series_uid)
        )
        return "failed"
    refusal = None
    if not found:
        refusal = "no readable CT image among the received instances"
    elif len(found) > 1:
        refusal = f"the instances form {len(found)} series (conflicting tags within one SeriesInstanceUID)"
    elif found[0].skipped or found[0].error:
        refusal = found[0].skipped or found[0].error
    if refusal:
        store.end_job(job.id, "refused", _reason(refusal, inputs, job.series_uid))
        return "refused"

    def batch_log(line: str) -> None:
        log({"event": "batch", "job": job.id, "line": _reason(line, inputs, job.series_uid)})

    try:
        report = segment_inputs(
            inputs, staging, list(config.checkpoints), config.options, config.outputs, log=batch_log
        )
    except InputError as exc:
        store.end_job(job.id, "failed", _reason(str(exc), inputs, job.series_uid))
        return "failed"
    if report.failed or report.skipped_modality:
        message = next(iter({**report.failed, **report.skipped_modality}.values()))
        state = "failed" if report.failed else "refused"
        store.end_job(job.id, state, _reason(message, inputs, job.series_uid))
        return state
    masks = [*report.written, *report.skipped]
    case = masks[0].name[: -len(".nii.gz")]
    name = case_name_for(found[0].case, job.series_uid, job.version)
    if (read_sidecar(masks[0]) or {}).get("export_error"):
        store.end_job(
            job.id, "failed", _reason(read_sidecar(masks[0])["export_error"], inputs, job.series_uid)
        )
        return "failed"
    sent = publish(staging, case, workdir.outputs, name)
    state = store.segmented(job.id, name, [str(p) for p in sent], list(config.destinations))
    shutil.rmtree(staging, ignore_errors=True)  # the batch's manifest and claims; the outputs are published
    return state


def send_delivery(store: Store, delivery: Delivery, config: WorkerConfig, log: Log) -> bool:
    """One attempt to send a job's DICOM outputs to one destination; the result recorded in the store."""
    from medseg.network.destinations import parse_destination
    from medseg.network.send import SendError, SendPolicy, send_files

    def send_log(line: str) -> None:
        log({"event": "send", "job": delivery.job_id, "destination": delivery.destination, "line": str(line)})

    try:
        destination = parse_destination(delivery.destination)
        result = send_files(
            [Path(p) for p in delivery.outputs],
            destination,
            SendPolicy(attempts=1, calling_ae=config.calling_ae),
            credentials=config.credentials,
            log=send_log,
        )
    except Exception as exc:  # SendError, a missing file, a broken peer: a failed attempt, retried later
        error = " ".join(str(exc).split()) or type(exc).__name__
        permanent = isinstance(exc, SendError) and exc.permanent  # e.g. our AE title unknown to the peer
        attempts = 1 if permanent else config.send_attempts
        store.delivery_failed(delivery.job_id, delivery.destination, error, attempts, config.send_backoff_s)
        return False
    store.delivered(delivery.job_id, delivery.destination, list(result.delivered))
    return True


def work_once(store: Store, workdir: WorkDir, config: WorkerConfig, log: Log) -> bool:
    """Do one unit of work — a due delivery first (results reach the PACS soon), else one queued job;
    return whether there was any."""
    delivery = store.claim_delivery()
    if delivery is not None:
        send_delivery(store, delivery, config, log)
        return True
    job = store.claim_job()
    if job is None:
        return False
    try:
        segment_job(store, job, workdir, config, log)
    except Exception as exc:  # a bug or a full disk: this job fails, the worker goes on
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        store.end_job(job.id, "failed", error)
    return True
