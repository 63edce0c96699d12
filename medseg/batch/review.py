"""The batch review page: ``OUTDIR/index.html``, one row per case, doubtful cases first.

A static, self-contained HTML file (inline CSS, no script, no server, no network): it works opened from a
file share or a zip. Images and files are referenced by paths relative to OUTDIR, so the folder can be moved
as a whole. Per case: the axial thumbnail (click: the full three-plane preview), volume and mean HU per
organ, the QA flags (:mod:`medseg.report.qa`, coloured by severity) and links to every file of the case.
The header counts cases by worst flag and by rule; a check box (pure CSS) hides the cases without errors or
warnings; the foot of the page documents the flag rules with the thresholds used and the volume reference
ranges with their citations.

Every text that comes from a case (names built from DICOM tags, warnings, file names) is HTML-escaped and
every path URL-quoted: a case named ``<script>…`` shows as text.

:func:`collect_cases` builds the rows from an existing output folder of ``medseg segment``, so
``medseg review OUTDIR`` is ``write_review_page(outdir, collect_cases(outdir))``. Per case ``<case>`` it reads:

===========================  ==========================================================================
``<case>.json``              the sidecar (every JSON object with a ``labels`` mapping is one): label names,
                             ``warnings``; optional ``image_info`` (:meth:`medseg.report.qa.ImageInfo.to_dict`)
                             and ``mean_entropy`` (label name → mean normalised entropy) for the QA rules
``<case>_stats.json``        organ statistics (``{"case", "rows"}``); without it the rows are measured on
                             the mask (volumes, components, border; no HU)
``<case>.nii.gz``            the mask (its header gives spacing and obliquity when the sidecar has no
                             ``image_info``)
``<case>_thumb.png``         thumbnail (:func:`medseg.report.preview.write_thumbnail`)
``<case>_preview.png``       full preview (:func:`medseg.report.preview.write_preview`)
any ``<case>.*``/``<case>_*``  linked (DICOM SEG, ``.seg.nrrd``, α maps ``_alpha_level<l>.nii.gz`` and their
                             ``.png`` overlays, ``_entropy.nii.gz``, split masks, …); a file belongs to the
                             longest case name it starts with
``manifest.jsonl``           cases whose last run failed and left no sidecar get a row with the reason
===========================  ==========================================================================
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import nibabel as nib
import numpy as np

from medseg.export.codes import lookup
from medseg.io import atomic_write_text
from medseg.report.qa import SEVERITIES, Flag, ImageInfo, QAConfig, describe_rules, image_info, qa_flags
from medseg.report.statistics import organ_statistics

#: File-name endings after ``<case>`` that medseg writes, and the link text they get (first match wins).
FILE_KINDS: tuple[tuple[str, str], ...] = (
    (r"\.nii\.gz", "mask"),
    (r"\.json", "sidecar"),
    (r"_stats\.json", "statistics"),
    (r"_preview\.png", "preview"),
    (r"_thumb\.png", "thumbnail"),
    (r"_alpha_level(\d+)\.nii\.gz", "α level {0}"),
    (r"_alpha_level(\d+)\.png", "α level {0} overlay"),
    (r"_entropy\.nii\.gz", "uncertainty"),
    (r"_corrected\.nii\.gz", "correction"),
    (r".*\.seg\.nrrd", "3D Slicer"),
    (r"_rtstruct\.dcm", "RT Structure Set"),
    (r".*\.dcm", "DICOM SEG"),
    (r".*(?:itksnap|label).*\.txt", "ITK-SNAP labels"),
)
MANIFEST = "manifest.jsonl"
#: Files of the folder, not of a case.
FOLDER_FILES = {"index.html", MANIFEST, "statistics.csv", "review.csv", "review.json", "review.jsonl"}
_BADGES = {"error": "with errors", "warning": "with warnings", "info": "with notes only", "clean": "clean"}
_RANK = {s: i for i, s in enumerate(SEVERITIES)}


@dataclass
class CaseReview:
    """One row of the page. Paths may be absolute or relative to OUTDIR; ``files`` maps link text → file."""

    name: str
    rows: list[dict] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)
    thumbnail: Path | None = None
    preview: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    verdict: str | None = None  # the reviewer's verdict and name from review.json (medseg review --serve)

    @property
    def severity(self) -> str | None:
        """The worst flag's severity, None without flags."""
        ranks = [_RANK.get(f.severity, len(SEVERITIES)) for f in self.flags]
        return SEVERITIES[min(ranks)] if ranks and min(ranks) < len(SEVERITIES) else None

    def sort_key(self) -> tuple:
        """Errors first, then warnings, then info, then clean cases; more flags first; then by name."""
        rank = _RANK[self.severity] if self.severity else len(SEVERITIES)
        return (rank, -len(self.flags), self.name)


def file_kind(case: str, filename: str) -> str:
    """Link text of a file of ``case`` (:data:`FILE_KINDS`; otherwise the part of the name after the case)."""
    rest = filename[len(case) :]
    for pattern, text in FILE_KINDS:
        match = re.fullmatch(pattern, rest)
        if match:
            return text.format(*match.groups())
    return rest.lstrip("._") or filename


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _owner(filename: str, cases: set[str]) -> str | None:
    """The longest case name that ``filename`` starts with, followed by ``.`` or ``_``."""
    cuts = [m.start() for m in re.finditer(r"[._]", filename)]
    for cut in reversed(cuts):
        if filename[:cut] in cases:
            return filename[:cut]
    return None


def _failed_cases(outdir: Path) -> dict[str, str]:
    """case → error of the cases whose last manifest line says ``failed`` (bad lines are skipped)."""
    last: dict[str, dict] = {}
    try:
        lines = (outdir / MANIFEST).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("case"), str):
            last[entry["case"]] = entry
    return {c: str(e.get("error") or "failed") for c, e in last.items() if e.get("status") == "failed"}


def _mask_rows(mask: Path, label_names: Mapping[str, int], case: str) -> list[dict]:
    """Statistics rows measured on the mask alone (no scan at hand): HU fields empty."""
    img = nib.load(mask)
    labels = np.asarray(img.dataobj)
    rows = organ_statistics(labels, labels, img.affine, label_names, case)
    for row in rows:
        for key in ("hu_mean", "hu_std", "hu_median", "hu_min", "hu_max"):
            row[key] = None
    return rows


def collect_cases(outdir: str | os.PathLike, config: QAConfig | None = None) -> list[CaseReview]:
    """The cases of a ``medseg segment`` output folder with their QA flags (module docstring), by name."""
    outdir = Path(outdir)
    names = sorted(p.name for p in outdir.iterdir() if p.is_file() and not p.name.startswith("."))
    sidecars: dict[str, dict] = {}
    for name in names:
        if name.endswith(".json") and not name.endswith("_stats.json"):
            side = _read_json(outdir / name)
            if isinstance(side, dict) and isinstance(side.get("labels"), dict):
                sidecars[name[: -len(".json")]] = side
    failed = {c: e for c, e in _failed_cases(outdir).items() if c not in sidecars}
    files: dict[str, list[str]] = {c: [] for c in sidecars}
    for name in names:
        owner = None if name in FOLDER_FILES else _owner(name, set(sidecars))
        if owner is not None:
            files[owner].append(name)
    cases = []
    order = {text: i for i, (_, text) in enumerate(FILE_KINDS)}
    for case, side in sidecars.items():
        warnings = [str(w) for w in side.get("warnings") or []]
        if isinstance(side.get("export_error"), str):  # mask written, a viewer file (DICOM SEG) not
            warnings.append(f"viewer export failed: {side['export_error']}")
        review = CaseReview(name=str(case), warnings=warnings)
        for name in sorted(files[case], key=lambda n: (order.get(file_kind(case, n), len(order)), n)):
            kind = file_kind(case, name)
            if kind == "thumbnail":
                review.thumbnail = outdir / name
            else:
                review.files[kind if kind not in review.files else name] = outdir / name
        review.preview = review.files.get("preview")
        label_names = {str(k): int(v) for k, v in side["labels"].items()}
        stats = _read_json(outdir / f"{case}_stats.json")
        mask = outdir / f"{case}.nii.gz"
        if isinstance(stats, dict) and isinstance(stats.get("rows"), list):
            review.rows = [r for r in stats["rows"] if isinstance(r, dict)]
        elif mask.is_file():
            review.rows = _mask_rows(mask, label_names, case)
        info = None
        if isinstance(side.get("image_info"), dict):
            info = ImageInfo.from_dict(side["image_info"])
        elif mask.is_file():
            info = image_info(nib.load(mask), intensities=False)
        entropy = side.get("mean_entropy") if isinstance(side.get("mean_entropy"), dict) else None
        review.flags = qa_flags(review.rows, config, entropy=entropy, image_info=info)
        if not mask.is_file():
            review.flags.insert(0, Flag("no_mask", "error", f"{case}.nii.gz is missing"))
        cases.append(review)
    for case, error in failed.items():
        cases.append(CaseReview(name=case, flags=[Flag("failed", "error", f"segmentation failed: {error}")]))
    verdicts = _verdicts(outdir)
    for review in cases:
        review.verdict = verdicts.get(review.name)
    return sorted(cases, key=lambda c: c.name)


def _verdicts(outdir: Path) -> dict[str, str]:
    """case → "verdict (reviewer, time)" from ``review.json`` (written by ``medseg review --serve``)."""
    review = _read_json(outdir / "review.json")
    entries = review.get("cases") if isinstance(review, dict) else None
    return {
        str(
            e["case"]
        ): f"{str(e['verdict']).replace('_', ' ')} ({e.get('reviewer', '')}, {e.get('time', '')})"
        for e in entries or []
        if isinstance(e, dict) and e.get("case") and e.get("verdict")
    }


# --------------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.15em;margin-top:2em}
table{border-collapse:collapse;background:#fff}
td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f0f0f0}
table.cases>tbody>tr>td{padding:6px 8px}
table.organs td,table.organs th{border:none;padding:1px 8px 1px 0;font-size:13px}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.swatch{display:inline-block;width:.8em;height:.8em;border:1px solid #666;margin-right:4px}
img.thumb{width:200px;height:auto;border:1px solid #ccc;background:#000}
ul.flags{margin:0;padding-left:1.1em}
.sev-error{color:#b00020;font-weight:600}.sev-warning{color:#a15c00}.sev-info{color:#33658a}
tr.row-error>td:first-child{border-left:6px solid #b00020}
tr.row-warning>td:first-child{border-left:6px solid #e69500}
tr.row-info>td:first-child{border-left:6px solid #5b9bd5}
tr.row-clean>td:first-child{border-left:6px solid #3c9a5f}
td.flagged{background:#fff1e0}
.badge{display:inline-block;padding:1px 8px;border-radius:9px;color:#fff;margin-right:6px}
.b-error{background:#b00020}.b-warning{background:#e69500}.b-info{background:#5b9bd5}.b-clean{background:#3c9a5f}
.muted{color:#777;font-size:12px}.case-name{font-weight:600;min-width:10em;overflow-wrap:anywhere}
table.organs td:first-child{white-space:nowrap}
#only-flagged:checked~table.cases tr.row-info,#only-flagged:checked~table.cases tr.row-clean{display:none}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _href(path: Path, outdir: Path) -> str:
    """A path as a relative, URL-quoted reference from ``outdir`` (HTML-escaped for an attribute)."""
    path = Path(path)
    rel = os.path.relpath(path if path.is_absolute() else outdir / path, outdir)
    return _e(quote(Path(rel).as_posix(), safe="/"))


def _number(value: object, digits: int) -> str:
    if value is None or value == "":
        return "–"
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return _e(value)


def _organ_table(case: CaseReview) -> str:
    if not case.rows:
        return '<span class="muted">no statistics</span>'
    flagged = {f.label for f in case.flags if f.label}
    out = ['<table class="organs"><tr><th>organ</th><th>mL</th><th>mean HU</th></tr>']
    for row in case.rows:
        name = str(row.get("name", row.get("label", "")))
        rgb = lookup(name, int(row.get("label") or 0)).rgb
        cls = ' class="flagged"' if name in flagged else ""
        out.append(
            f'<tr{cls}><td><span class="swatch" style="background:rgb{rgb}"></span>{_e(name)}</td>'
            f'<td class="num">{_number(row.get("volume_ml"), 1)}</td>'
            f'<td class="num">{_number(row.get("hu_mean"), 0)}</td></tr>'
        )
    out.append("</table>")
    return "".join(out)


def _case_row(case: CaseReview, outdir: Path) -> str:
    severity = case.severity or "clean"
    image = case.thumbnail or case.preview
    if image is not None:
        img = f'<img class="thumb" src="{_href(image, outdir)}" alt="{_e(case.name)} preview" loading="lazy">'
        picture = f'<a href="{_href(case.preview, outdir)}">{img}</a>' if case.preview else img
    else:
        picture = '<span class="muted">no preview</span>'
    flags = (
        '<ul class="flags">'
        + "".join(
            f'<li class="sev-{_e(f.severity)}" data-code="{_e(f.code)}">{_e(f.message)}</li>'
            for f in case.flags
        )
        + "</ul>"
        if case.flags
        else '<span class="sev-clean">no flags</span>'
    )
    notes = "".join(f'<div class="muted">{_e(w)}</div>' for w in case.warnings)
    if case.verdict:
        notes += f'<div class="verdict">reviewed: {_e(case.verdict)}</div>'
    links = "<br>".join(f'<a href="{_href(p, outdir)}">{_e(text)}</a>' for text, p in case.files.items())
    return (
        f'<tr class="row-{severity}" data-case="{_e(case.name)}" data-severity="{severity}">'
        f'<td><div class="case-name">{_e(case.name)}</div>{notes}</td>'
        f"<td>{picture}</td><td>{_organ_table(case)}</td><td>{flags}</td><td>{links}</td></tr>"
    )


def _summary(cases: Sequence[CaseReview]) -> str:
    by_severity = Counter(c.severity or "clean" for c in cases)
    by_code = Counter(code for c in cases for code in {f.code for f in c.flags})
    badges = "".join(
        f'<span class="badge b-{s}" data-severity="{s}">{by_severity.get(s, 0)} {text}</span>'
        for s, text in _BADGES.items()
    )
    codes = ", ".join(
        f"{_e(code)}: {n}" for code, n in sorted(by_code.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    return (
        f'<p id="summary"><strong>{len(cases)} cases</strong> &nbsp; {badges}</p>'
        f'<p class="muted">cases per flag: {codes or "none"}</p>'
    )


def _rules(config: QAConfig) -> str:
    rows = "".join(
        f'<tr><td><code>{_e(code)}</code></td><td class="sev-{_e(sev)}">{_e(sev)}</td><td>{_e(text)}</td></tr>'
        for code, sev, text in describe_rules(config)
    )
    ranges = "".join(
        f"<tr><td>{_e(name)}</td><td class='num'>{r.low_ml:g} – {r.high_ml:g}</td><td>{_e(r.source)}</td></tr>"
        for name, r in config.ranges.items()
    )
    return (
        '<h2 id="rules">Flag rules</h2><table><tr><th>code</th><th>severity</th><th>rule</th></tr>'
        f"{rows}</table>"
        '<h2 id="ranges">Adult organ volume reference ranges (mL)</h2>'
        "<p class='muted'>Approximate and deliberately wide: for flagging cases to look at, not for diagnosis; "
        "configurable (<code>QAConfig.ranges</code>). Organs without a range get no volume flag.</p>"
        f"<table><tr><th>label</th><th>range (mL)</th><th>source</th></tr>{ranges}</table>"
    )


def review_html(
    outdir: str | os.PathLike,
    cases: Iterable[CaseReview],
    config: QAConfig | None = None,
    title: str = "medseg review",
) -> str:
    """The page's HTML (see :func:`write_review_page`)."""
    outdir = Path(outdir)
    config = config or QAConfig()
    ordered = sorted(cases, key=CaseReview.sort_key)
    rows = "\n".join(_case_row(c, outdir) for c in ordered)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<p class="muted">{_e(str(outdir.resolve()))} · written {stamp} · flagged cases first ·
<a href="#rules">flag rules</a> · <a href="#ranges">reference ranges</a> · viewer, verdicts and
corrections: <code>medseg review {_e(str(outdir))} --serve</code></p>
{_summary(ordered)}
<input type="checkbox" id="only-flagged"> <label for="only-flagged">show only cases with errors or warnings</label>
<table class="cases">
<thead><tr><th>case</th><th>preview (click: full size)</th><th>organs</th><th>QA flags</th><th>files</th></tr>
</thead>
<tbody>
{rows}
</tbody></table>
{_rules(config)}
</body></html>
"""


def write_review_page(
    outdir: str | os.PathLike,
    cases: Iterable[CaseReview],
    config: QAConfig | None = None,
    title: str = "medseg review",
) -> Path:
    """Write ``OUTDIR/index.html`` atomically (module docstring) and return its path.

    Args:
        outdir: the output folder; image and file references are relative to it.
        cases: the rows (e.g. :func:`collect_cases`); sorted here, flagged first.
        config: the QA rules the flags were made with (documented at the foot of the page).
        title: page title.
    """
    path = Path(outdir) / "index.html"
    atomic_write_text(path, review_html(outdir, cases, config, title))
    return path
