"""Tables written for people and spreadsheets: per-case metric CSV, summary JSON, per-epoch training CSV.

Every file is written atomically (:mod:`medseg.io.atomic`). JSON has no NaN/inf literals: ``inf`` becomes the
string ``"inf"`` and NaN becomes ``null``, so any JSON reader accepts the file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from medseg.io import atomic_write_text
from medseg.metrics import METRIC_KEYS

#: Columns of the per-case evaluation CSV (one row per case and label).
CSV_COLUMNS = (
    "case",
    "label",
    "name",
    *(k for k in METRIC_KEYS if k not in ("vol_diff_ml", "asd_pred_to_ref", "asd_ref_to_pred")),
)


def json_safe(value: Any) -> Any:
    """``value`` with ``inf`` → ``"inf"`` / ``"-inf"`` and NaN → ``None``, recursively."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    return value


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Strict JSON (see :func:`json_safe`), indented, written atomically."""
    atomic_write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False))
    return Path(path)


def write_metrics_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Per-case, per-label metric rows in :data:`CSV_COLUMNS` order (floats at full precision)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([repr(row[c]) if isinstance(row[c], float) else row[c] for c in CSV_COLUMNS])
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def read_history(path: str | os.PathLike) -> list[dict]:
    """Rows of a per-epoch ``metrics.csv`` (empty when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def append_history(path: str | os.PathLike, row: dict) -> None:
    """Append one epoch's row; columns are the union over rows (validation columns appear when validated).

    A resumed run replaces rows of epochs it repeats, so the file always has one row per epoch.
    """
    rows = [r for r in read_history(path) if int(r["epoch"]) < int(row["epoch"])]
    rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
