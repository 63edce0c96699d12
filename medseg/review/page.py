"""The HTML of the review server: the case list and the viewer page's frame.

Every text that comes from a case (names, flag messages, comments, reviewer names) is HTML-escaped here; the
viewer's script (``static/viewer.js``) inserts data with ``textContent`` only. No inline script: the pages
pass the session token and the case name to the script in ``<meta>`` elements, and the server's
Content-Security-Policy forbids inline scripts (:mod:`medseg.review.server`).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

from medseg.batch.review import CaseReview
from medseg.review.store import VERDICTS, CaseState

VERDICT_TEXT = {"accept": "accept", "needs_correction": "needs correction", "reject": "reject"}


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _case_url(name: str) -> str:
    return "/case/" + quote(name, safe="")


def index_html(
    outdir: Path,
    cases: Sequence[CaseReview],
    states: Mapping[str, CaseState],
    verdict_filter: str = "",
    read_only: bool = False,
) -> str:
    """The case list: worst flags first, each case's verdict, a filter by verdict (``?verdict=``)."""
    choices = ["", *VERDICTS, "none"]
    if verdict_filter not in choices:
        verdict_filter = ""

    def keep(case: CaseReview) -> bool:
        verdict = states[case.name].verdict if case.name in states else None
        return not verdict_filter or (verdict or "none") == verdict_filter

    links = " · ".join(
        f'<a href="/?verdict={v}"{" class=current" if v == verdict_filter else ""}>'
        f"{_e(VERDICT_TEXT.get(v, v or 'all'))}</a>"
        for v in choices
    )
    rows = []
    for case in filter(keep, cases):
        state = states.get(case.name)
        verdict = state.verdict if state else None
        flags = "".join(f'<li class="sev-{_e(f.severity)}">{_e(f.message)}</li>' for f in case.flags)
        reviewed = (
            f'<span class="verdict v-{_e(verdict)}">{_e(VERDICT_TEXT.get(verdict or "", verdict or ""))}</span>'
            f'<div class="muted">{_e(state.reviewer)} · {_e(state.time)}</div>'
            f'<div class="comment">{_e(state.comment)}</div>'
            if state and verdict
            else '<span class="muted">not reviewed</span>'
        )
        thumb = case.thumbnail.name if case.thumbnail else None
        picture = f'<img class="thumb" src="/files/{_e(quote(thumb))}" alt="">' if thumb else ""
        rows.append(
            f'<tr data-case="{_e(case.name)}" data-verdict="{_e(verdict or "none")}">'
            f'<td><a class="case-link" href="{_e(_case_url(case.name))}">{_e(case.name)}</a></td>'
            f"<td>{picture}</td><td><ul class='flags'>{flags}</ul></td><td>{reviewed}</td></tr>"
        )
    mode = " (read-only)" if read_only else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>medseg review{mode}</title>
<link rel="stylesheet" href="/static/viewer.css"></head>
<body class="list">
<h1>medseg review{mode}</h1>
<p class="muted">{_e(outdir.resolve())} · {len(cases)} cases · exports:
<a href="/files/review.csv">review.csv</a> · <a href="/files/review.json">review.json</a> ·
<a href="/files/review.jsonl">review.jsonl</a> · <a href="/files/index.html">static page</a></p>
<p id="verdict-filter">show: {links}</p>
<table class="cases"><thead><tr><th>case</th><th></th><th>QA flags</th><th>verdict</th></tr></thead>
<tbody>
{"".join(rows)}
</tbody></table>
</body></html>
"""


def case_html(name: str, token: str, read_only: bool) -> str:
    """The viewer page's frame; ``static/viewer.js`` fills it from ``/api/case/<name>``."""
    verdicts = "".join(
        f'<label><input type="radio" name="verdict" id="verdict-{v}" value="{v}"> {_e(VERDICT_TEXT[v])}</label>'
        for v in VERDICTS
    )
    disabled = " disabled" if read_only else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(name)} · medseg review</title>
<meta name="medseg-case" content="{_e(name)}">
<meta name="medseg-token" content="{_e(token)}">
<meta name="medseg-read-only" content="{"1" if read_only else "0"}">
<link rel="stylesheet" href="/static/viewer.css">
<script src="/static/niivue.umd.js" defer></script>
<script src="/static/viewer.js" defer></script></head>
<body class="viewer">
<header><a href="/">◀ all cases</a> <h1 id="case-name">{_e(name)}</h1>
<span id="convention">Radiological convention: the patient's right is on the screen's left (R … L);
anterior up in axial views</span></header>
<main>
<section id="view">
<div id="toolbar">
<button id="view-axial">axial</button><button id="view-coronal">coronal</button>
<button id="view-sagittal">sagittal</button><button id="view-multi">multiplanar</button>
<label>window <select id="window-preset">
<option value="abdomen">abdomen (W400 L40)</option><option value="bone">bone (W1800 L400)</option>
<option value="lung">lung (W1500 L−600)</option><option value="custom">custom</option></select></label>
<input id="window-min" type="number" step="10" value="-160"> – <input id="window-max" type="number" step="10" value="240">
<label>label opacity <input id="opacity" type="range" min="0" max="1" step="0.05" value="0.6"></label>
<button id="full-res">full resolution</button>
</div>
<div id="canvas-box"><canvas id="gl" width="640" height="640"></canvas></div>
<div id="location" class="muted"></div>
<div id="status" class="muted">loading…</div>
</section>
<aside>
<h2>Organs</h2><ul id="organs"></ul>
<h2>Overlays</h2><ul id="overlays"><li class="muted">none</li></ul>
<h2>QA flags</h2><ul id="flags"></ul>
<h2>Verdict</h2>
<form id="verdict-form">
<div id="verdicts">{verdicts}</div>
<textarea id="comment" rows="3" placeholder="comment"{disabled}></textarea>
<input id="reviewer" type="text" placeholder="your name" maxlength="100"{disabled}>
<button id="save-verdict" type="button"{disabled}>save verdict</button>
<div id="verdict-status" role="status"></div>
</form>
<h2>Correction</h2>
<div id="correction">
<button id="edit-start" type="button"{disabled}>start correcting</button>
<label>paint <select id="pen-label"{disabled}></select></label>
<button id="save-correction" type="button" disabled>save correction</button>
<div id="correction-status" role="status"></div>
</div>
<h2>History</h2><ol id="history"></ol>
</aside>
</main>
</body></html>
"""
