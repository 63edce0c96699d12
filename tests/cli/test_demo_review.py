"""``medseg demo`` end to end, shortened (2 training and 2 held-out phantoms, 3 iterations): it ends with the
batch review page of its held-out phantoms, which a real headless browser renders with a row, a thumbnail and flags per
case (the phantoms' coarse spacing alone is flagged on every one)."""

from __future__ import annotations

import json

import pytest

from tests.batch.test_review_browser import CHROMIUM, _chromium, _Dom


def test_demo_ends_with_a_review_page_a_browser_renders(tmp_path):
    from pipelines.demo import run_demo

    out = tmp_path / "demo"
    result = run_demo(
        out, cases=2, epochs=1, log=lambda *_: None, overrides=("train.iters_per_epoch=3",), test_cases=2
    )
    assert result["failed"] == []
    page = out / "pred" / "index.html"
    assert result["review_page"] == str(page) and page.is_file()
    sidecars = [p for p in (out / "pred").glob("phantom_*.json") if not p.name.endswith("_stats.json")]
    cases = sorted(p.name.removesuffix(".json") for p in sidecars)
    assert len(cases) == 2
    for case in cases:
        side = json.loads((out / "pred" / f"{case}.json").read_text())
        assert "mean_entropy" in side and "image_info" in side
        for suffix in (
            "_thumb.png",
            "_preview.png",
            "_stats.json",
            "_entropy.nii.gz",
            "_alpha_level2.nii.gz",
        ):
            assert (out / "pred" / f"{case}{suffix}").is_file(), suffix
    if CHROMIUM is None:
        pytest.skip(
            "chromium is not on PATH (apt-get install -y chromium): the page was written, not rendered"
        )
    dom = _Dom()
    dom.feed(_chromium("--dump-dom", page.resolve().as_uri(), profile=tmp_path / "profile").stdout)
    assert sorted(dom.rows) == cases
    assert sorted(dom.images) == [f"{c}_thumb.png" for c in cases]
    assert len(dom.flag_classes) >= 2  # at least the spacing flag on every phantom
