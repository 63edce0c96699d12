"""The review page as a person sees it: rendered by a real headless browser (Debian's ``chromium``).

Skipped when ``chromium`` is not on PATH (``.ci/run`` installs it; by hand: ``apt-get install -y chromium``).
The browser loads ``index.html`` from disk (``file://``, as from a file share), then the rendered DOM
(``--dump-dom``) must hold the rows in order, the flags and the thumbnails, and the screenshot must show the
thumbnails' pixels (a broken image would be an icon and its alt text) and the error colour.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest

from medseg.batch.review import collect_cases, write_review_page
from medseg.report.preview import write_preview, write_thumbnail
from medseg.report.statistics import organ_statistics

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not on PATH (apt-get install -y chromium): browser rendering not tested",
)

NAMES = {"liver": 1, "spleen": 2}


def _case(out: Path, case: str, spleen: bool) -> None:
    """A segmented case as ``medseg segment --statistics --preview`` leaves it (small synthetic scan)."""
    shape = (40, 40, 12)
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    image = np.full(shape, -1000, np.int16)
    image[5:35, 5:35, :] = 40
    labels = np.zeros(shape, np.uint8)
    labels[8:20, 8:24, 2:10] = 1
    if spleen:
        labels[24:32, 10:18, 3:9] = 2
    scan = nib.Nifti1Image(image, affine)
    nib.save(nib.Nifti1Image(labels, affine), out / f"{case}.nii.gz")
    (out / f"{case}.json").write_text(json.dumps({"case": case, "labels": {"background": 0, **NAMES}}))
    rows = organ_statistics(labels, image, affine, NAMES, case)
    (out / f"{case}_stats.json").write_text(json.dumps({"case": case, "rows": rows}))
    write_thumbnail(scan, labels, NAMES, out / f"{case}_thumb.png")
    write_preview(scan, labels, NAMES, out / f"{case}_preview.png")


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[str] = []
        self.images: list[str] = []
        self.flag_classes: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-case" in a:
            self.rows.append(a["data-case"])
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "li" and "data-code" in a:
            self.flag_classes.append(a["class"])


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def test_chromium_renders_rows_images_and_flags(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _case(out, "case_ok", spleen=True)
    _case(out, "case_no_spleen", spleen=False)
    page = write_review_page(out, collect_cases(out))
    url = page.resolve().as_uri()

    dom = _Dom()
    dom.feed(_chromium("--dump-dom", url, profile=tmp_path / "profile").stdout)
    assert dom.rows == ["case_no_spleen", "case_ok"]  # the flagged case first
    assert sorted(dom.images) == ["case_no_spleen_thumb.png", "case_ok_thumb.png"]
    assert "sev-error" in dom.flag_classes  # spleen missing

    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1200,900", url, profile=tmp_path / "profile")
    pixels = (mpimg.imread(shot)[..., :3] * 255).round()
    black = np.all(pixels < 16, axis=-1)  # the thumbnails' air; the page itself has no black
    assert black.sum() > 2 * 3000, "thumbnails not rendered"
    error_red = np.all(np.abs(pixels - [176, 0, 32]) < 12, axis=-1)  # the error rows' border and text
    assert error_red.sum() > 200
