"""Send a batch's DICOM outputs (``<case>_seg.dcm``, ``<case>_rtstruct.dcm``) to destinations, and record it.

After ``medseg segment … --send DEST`` has run, :func:`deliver_cases` sends each case's DICOM outputs
that exist to every destination (:func:`medseg.network.send.send_files`, one call per case and
destination, with the retry policy given) and records each outcome:

* one line on the log: ``sent <case>: 2 instance(s) to dimse://PACS@host:104 (attempt 1)`` or the failure;
* one JSON line appended to ``OUT/deliveries.jsonl`` — case, destination (never credentials), files,
  SOP Instance UIDs delivered, attempts, warnings, ``ok`` and ``error``, UTC time — so what reached which
  PACS can be audited after the fact (each line is written with one ``write`` to a file opened in append
  mode, so parts of a sharded run may share the file).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medseg.io import case_name
from medseg.network.credentials import Credentials
from medseg.network.destinations import Destination
from medseg.network.send import SendError, SendPolicy, SendResult, send_files

#: The DICOM files a case may have, in the order they are sent.
DICOM_OUTPUT_SUFFIXES = ("_seg.dcm", "_rtstruct.dcm")
DELIVERIES_LOG = "deliveries.jsonl"


@dataclass
class DeliveryReport:
    """Per case: the results, and the failures (case → one line per destination that failed)."""

    sent: list[tuple[str, SendResult]] = field(default_factory=list)
    failed: dict[str, list[str]] = field(default_factory=dict)
    nothing: list[str] = field(default_factory=list)


def case_outputs(masks: Iterable[Path]) -> dict[str, list[Path]]:
    """Case name → its DICOM outputs that exist, from the masks a batch wrote or found complete."""
    found = {}
    for mask in masks:
        name = case_name(mask)
        found[name] = [
            mask.parent / f"{name}{s}"
            for s in DICOM_OUTPUT_SUFFIXES
            if (mask.parent / f"{name}{s}").is_file()
        ]
    return found


def _record(log_path: Path, entry: dict) -> None:
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def deliver_cases(
    masks: Iterable[Path],
    destinations: Sequence[Destination],
    output: Path,
    policy: SendPolicy = SendPolicy(),
    *,
    credentials: Credentials | None = None,
    log: Callable[[str], object] = print,
) -> DeliveryReport:
    """Send every case's DICOM outputs to every destination; record each outcome (module docstring).

    A case without DICOM outputs is listed in ``nothing``. A failed delivery does not stop the others.
    """
    report = DeliveryReport()
    for case, files in sorted(case_outputs(masks).items()):
        if not files:
            report.nothing.append(case)
            continue
        for dest in destinations:
            entry = {"case": case, "destination": str(dest), "files": [f.name for f in files]}
            try:
                result = send_files(files, dest, policy, credentials=credentials, log=log)
            except SendError as exc:
                report.failed.setdefault(case, []).append(f"{case}: send to {dest} failed: {exc}")
                entry |= {
                    "ok": False,
                    "error": str(exc),
                    "attempts": exc.attempts,
                    "delivered": list(exc.delivered),
                }
            except (OSError, ValueError) as exc:  # a file vanished or is no DICOM (InputError)
                report.failed.setdefault(case, []).append(f"{case}: send to {dest} failed: {exc}")
                entry |= {"ok": False, "error": str(exc), "attempts": 0, "delivered": []}
            else:
                report.sent.append((case, result))
                entry |= {"ok": True, "attempts": result.attempts, "delivered": list(result.delivered)}
                entry["warnings"] = list(result.warnings)
                tries = f"attempt {result.attempts}" if result.attempts > 1 else "first attempt"
                log(f"sent {case}: {len(result.delivered)} instance(s) to {dest} ({tries})")
                for warning in result.warnings:
                    log(f"warning: {case}: {dest}: {warning}")
            entry["time"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            _record(output / DELIVERIES_LOG, entry)
    return report
