"""The review application in a real browser: headless Chromium (Debian ``chromium``, WebGL 2 on SwiftShader)
driven over the DevTools protocol (:mod:`tests.review.cdp`) against a server on a free 127.0.0.1 port.

* the screenshot shows each organ's colour at the screen position the test computes from the organ's
  centroid (its own affine, radiological convention: patient's right on the screen's left, anterior up) —
  for a case stored RAS and one stored LPS, so a flip in either direction fails;
* a verdict and a comment given with clicks and typing survive a reload, and land in the SQLite history,
  ``review.csv`` and the case list's filter;
* a correction painted with the mouse is saved as ``<case>_corrected.nii.gz`` on the mask's exact grid, the
  painted voxels changed and nothing else, the original mask untouched.

Skipped when ``chromium`` is not on PATH (``.ci/run`` installs it).
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest

from .cdp import CHROMIUM, Browser
from .conftest import LABELS, ORGANS_RAS, Running, make_outdir, ras_affine, voxel_centres_ras

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH (apt-get install -y chromium)"),
]

RGB = {"liver": (221, 130, 101), "spleen": (157, 108, 162)}  # medseg.export.codes.lookup(name).rgb
OPACITY = 0.6  # the viewer's default label opacity
WINDOW = (-160.0, 240.0)  # the abdomen preset


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("review_browser")
    outdir = make_outdir(root)
    running = Running(outdir)
    browser = Browser(root / "profile")
    yield running, browser, outdir
    browser.close()
    running.stop()


def open_case(browser: Browser, running: Running, case: str) -> None:
    browser.goto(f"{running.url}/case/{case}")
    browser.wait("document.body.dataset.ready", 60)
    assert browser.eval("window.medsegViewer.error") is None


def screen_position(browser: Browser, ras: np.ndarray, affine: np.ndarray) -> tuple[float, float]:
    """Where the RAS point ``ras`` is drawn in the axial view: the slice's field of view (voxel corners) fills
    the square canvas; radiological: screen x grows towards the patient's left (−x), screen y towards
    posterior (−y)."""
    corners = np.array([[i, j, 0, 1] for i in (-0.5, 63.5) for j in (-0.5, 63.5)]) @ affine.T
    xmin, xmax = corners[:, 0].min(), corners[:, 0].max()
    ymin, ymax = corners[:, 1].min(), corners[:, 1].max()
    left, top, width, height = browser.eval(
        "(() => { const r = document.getElementById('gl').getBoundingClientRect();"
        " return [r.left, r.top, r.width, r.height]; })()"
    )
    return left + (xmax - ras[0]) / (xmax - xmin) * width, top + (ymax - ras[1]) / (ymax - ymin) * height


def blend(rgb, hu: float) -> np.ndarray:
    gray = 255 * np.clip((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)
    return OPACITY * np.array(rgb, float) + (1 - OPACITY) * gray


@pytest.mark.parametrize("case", ["ras", "lps"])
def test_each_organ_is_drawn_at_its_centroid(app, case):
    running, browser, outdir = app
    open_case(browser, running, case)
    index = browser.eval(
        "[...document.querySelectorAll('#flags li')].findIndex(li => li.textContent.startsWith('liver'))"
    )
    browser.click(f"#flags li:nth-child({index + 1}) .flag-jump")  # the crosshair (and slice) to the liver
    browser.wait("window.medsegViewer.nv.scene.crosshairPos[2] > 0")
    affine = ras_affine(case)
    labels = np.asarray(nib.load(outdir / f"{case}.nii.gz").dataobj)
    xyz = voxel_centres_ras(affine)
    body = np.full(3, 255 * (40 - WINDOW[0]) / (WINDOW[1] - WINDOW[0]))  # CT alone, no label
    candidates = {"liver": blend(RGB["liver"], 60), "spleen": blend(RGB["spleen"], 50), "body": body}
    shot = mpimg.imread(io.BytesIO(browser.screenshot()))[..., :3] * 255
    for organ in ("liver", "spleen"):
        centroid = xyz[labels == LABELS[organ]].mean(axis=0)
        assert np.allclose(centroid[:2], ORGANS_RAS[organ][:2], atol=2)
        x, y = screen_position(browser, centroid, affine)
        pixel = shot[int(y) + 12, int(x) + 12]  # beside the crosshair lines, well inside the 30 mm organ
        nearest = min(candidates, key=lambda k: np.abs(candidates[k] - pixel).sum())
        assert nearest == organ, f"{case}: at {organ}'s centroid ({x:.0f}, {y:.0f}) the pixel is {pixel}"


def test_verdict_and_comment_given_in_the_page_survive_a_reload(app):
    running, browser, outdir = app
    open_case(browser, running, "ras")
    browser.click("#verdict-needs_correction")
    browser.type_text("#comment", "liver border <b>cut</b> on slice 12")
    browser.type_text("#reviewer", "Dr. Browser")
    browser.click("#save-verdict")
    browser.wait("document.getElementById('verdict-status').textContent.startsWith('saved')")
    open_case(browser, running, "ras")  # reload
    assert browser.eval("document.getElementById('verdict-needs_correction').checked")
    assert browser.eval("document.getElementById('comment').value") == "liver border <b>cut</b> on slice 12"
    assert "Dr. Browser" in browser.eval("document.getElementById('history').textContent")
    assert browser.eval("document.querySelector('#history b')") is None  # text, not markup
    with sqlite3.connect(outdir / "review.sqlite") as db:
        rows = db.execute(
            "SELECT case_name, version, action, verdict, reviewer, comment FROM history"
        ).fetchall()
    assert rows == [
        ("ras", 1, "verdict", "needs_correction", "Dr. Browser", "liver border <b>cut</b> on slice 12")
    ]
    table = list(csv.DictReader((outdir / "review.csv").open()))
    assert [(r["case"], r["verdict"], r["version"]) for r in table] == [("ras", "needs_correction", "1")]
    browser.goto(f"{running.url}/?verdict=needs_correction")
    assert browser.eval("[...document.querySelectorAll('tr[data-case]')].map(r => r.dataset.case)") == ["ras"]
    assert browser.eval("document.querySelector('.comment b')") is None


def test_a_correction_painted_with_the_mouse_is_saved_on_the_mask_grid(app):
    running, browser, outdir = app
    case = "lps"
    mask_path = outdir / f"{case}.nii.gz"
    original_bytes = mask_path.read_bytes()
    open_case(browser, running, case)
    browser.type_text("#reviewer", "Dr. Paint")
    browser.click("#edit-start")
    browser.wait("!document.getElementById('save-correction').disabled", 60)
    browser.eval("(() => { const s = document.getElementById('pen-label'); s.value = '2';"
                 " s.dispatchEvent(new Event('change')); })()")  # fmt: skip
    affine = ras_affine(case)
    line = [np.array([x, -60.0, 0.0]) for x in np.linspace(40.0, -10.0, 11)]  # posterior body: background
    browser.drag([screen_position(browser, p, affine) for p in line])
    browser.click("#save-correction")
    browser.wait("document.getElementById('correction-status').textContent.startsWith('saved')", 60)

    assert mask_path.read_bytes() == original_bytes
    mask = nib.load(mask_path)
    corrected = nib.load(outdir / f"{case}_corrected.nii.gz")
    assert corrected.shape == mask.shape and corrected.get_data_dtype() == mask.get_data_dtype()
    assert np.array_equal(corrected.affine, mask.affine)
    assert np.array_equal(corrected.get_sform(), mask.get_sform())
    assert np.array_equal(corrected.get_qform(), mask.get_qform())
    before, after = np.asarray(mask.dataobj), np.asarray(corrected.dataobj)
    changed = np.argwhere(before != after)
    assert len(changed) >= 10 and np.all(after[before != after] == 2)
    assert len(set(changed[:, 2])) == 1  # one slice painted
    ras = changed @ affine[:3, :3].T + affine[:3, 3]
    assert np.all(np.abs(ras[:, 1] + 60) <= 9) and ras[:, 0].min() >= -19 and ras[:, 0].max() <= 49
    assert ras[:, 0].max() - ras[:, 0].min() >= 30  # the stroke, not a dot
    from medseg.review.corrections import read_label_table

    assert read_label_table(outdir / f"{case}_corrected.nii.gz") == LABELS
    with sqlite3.connect(outdir / "review.sqlite") as db:
        row = db.execute(
            "SELECT action, reviewer, correction FROM history WHERE case_name = ?", (case,)
        ).fetchone()
    assert row == ("correction", "Dr. Paint", f"{case}_corrected.nii.gz")
    assert json.loads((outdir / "review.json").read_text())["cases"][0]["case"] == case
