"""The review server over real sockets on 127.0.0.1: routes, refusals (traversal, token, origin, host,
read-only), verdicts with optimistic concurrency, and the display copies."""

from __future__ import annotations

import csv
import http.client
import json
import os
import sqlite3

import nibabel as nib
import numpy as np
import pytest

from medseg.review.display import block_factors, block_mean, subsample, to_grid

from .conftest import SHAPE, Running, ras_affine


def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), response
    finally:
        conn.close()


def post_verdict(server, case: str, version: int, verdict="accept", token=None, extra=None, **fields):
    body = json.dumps(
        {"verdict": verdict, "comment": "ok", "reviewer": "Dr. A", "version": version, **fields}
    )
    headers = {
        "Content-Type": "application/json",
        "X-Review-Token": server.app.token if token is None else token,
    }
    headers.update(extra or {})
    return request(server, "POST", f"/api/case/{case}/verdict", body.encode(), headers)


def test_pages_and_case_data(server):
    status, body, response = request(server, "GET", "/")
    assert status == 200 and b"/case/ras" in body and b"/case/lps" in body
    assert "script-src 'self'" in response.getheader("Content-Security-Policy")
    assert response.getheader("X-Content-Type-Options") == "nosniff"
    status, body, _ = request(server, "GET", "/case/ras")
    assert status == 200 and server.app.token.encode() in body and b"niivue.umd.js" in body
    data = json.loads(request(server, "GET", "/api/case/ras")[1])
    assert [lab["name"] for lab in data["labels"]] == ["liver", "spleen"]
    assert data["overlays"][0]["file"] == "ras_alpha_level2.nii.gz" and data["state"]["version"] == 0
    status, body, _ = request(server, "GET", "/static/niivue.umd.js")
    assert status == 200 and len(body) > 1_000_000
    assert b"BSD 2-Clause" in request(server, "GET", "/static/NIIVUE_LICENSE.txt")[1]


@pytest.mark.parametrize(
    "path",
    [
        "/files/../scans/ras.nii.gz",
        "/files/..%2Fscans%2Fras.nii.gz",
        "/files/%2Fetc%2Fpasswd",
        "/files/review.sqlite",
        "/files/.medseg_review",
        "/files/link_out.nii.gz",
        "/case/..%2F..%2Fetc",
        "/display/ras/..%2F..%2Fscans%2Fras.nii.gz",
        "/static/..%2Fserver.py",
        "/api/case/%2E%2E",
    ],
)
def test_traversal_and_links_out_are_refused(server, outdir, path):
    os.symlink(outdir.parent / "scans" / "ras.nii.gz", outdir / "link_out.nii.gz")
    status, body, _ = request(server, "GET", path)
    assert status == 404, body


def test_a_file_of_the_folder_is_served_byte_for_byte(server, outdir):
    status, body, _ = request(server, "GET", "/files/ras.nii.gz")
    assert status == 200 and body == (outdir / "ras.nii.gz").read_bytes()


def test_writes_need_the_token_and_the_same_origin(server):
    assert post_verdict(server, "ras", 0, token="")[0] == 403
    assert post_verdict(server, "ras", 0, token="wrong")[0] == 403
    status, body, _ = post_verdict(server, "ras", 0, extra={"Origin": "http://evil.example"})
    assert status == 403 and b"cross-origin" in body
    assert post_verdict(server, "ras", 0, extra={"Sec-Fetch-Site": "cross-site"})[0] == 403
    assert server.app.store.history() == []  # nothing refused was recorded
    status, body, _ = post_verdict(server, "ras", 0, extra={"Origin": server.app.origin})
    assert status == 200 and json.loads(body)["state"]["version"] == 1


def test_a_foreign_host_header_is_refused(server):
    """DNS rebinding: a page of evil.example resolved to 127.0.0.1 sends Host: evil.example."""
    assert request(server, "GET", "/api/case/ras", headers={"Host": f"evil.example:{server.port}"})[0] == 403


def test_two_reviewers_stale_save_is_refused(server, outdir):
    """Both open version 0; the first save wins, the second gets 409 with who changed it, nothing lost."""
    assert post_verdict(server, "ras", 0, "accept", reviewer="Dr. A")[0] == 200
    status, body, _ = post_verdict(server, "ras", 0, "reject", reviewer="Dr. B")
    assert status == 409
    message = json.loads(body)
    assert "Dr. A" in message["error"] and "reload" in message["error"] and message["state"]["version"] == 1
    assert post_verdict(server, "ras", 1, "reject", reviewer="Dr. B", comment="cut off")[0] == 200
    with sqlite3.connect(outdir / "review.sqlite") as db:
        rows = db.execute(
            "SELECT version, verdict, reviewer FROM history WHERE case_name='ras' ORDER BY id"
        ).fetchall()
        assert rows == [(1, "accept", "Dr. A"), (2, "reject", "Dr. B")]
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE history SET verdict='accept'")
    table = list(csv.DictReader((outdir / "review.csv").open()))
    assert [(r["case"], r["verdict"], r["reviewer"], r["comment"]) for r in table] == [
        ("ras", "reject", "Dr. B", "cut off")
    ]
    lines = [json.loads(line) for line in (outdir / "review.jsonl").read_text().splitlines()]
    assert [(x["case"], x["status"], x["version"]) for x in lines] == [
        ("ras", "reviewed", 1),
        ("ras", "reviewed", 2),
    ]
    assert json.loads((outdir / "review.json").read_text())["cases"][0]["version"] == 2


def test_bad_entries_are_refused_with_a_message(server):
    status, body, _ = post_verdict(server, "ras", 0, "maybe")
    assert status == 422 and b"accept, needs_correction, reject" in body
    assert post_verdict(server, "ras", 0, reviewer="")[0] == 422
    assert post_verdict(server, "nope", 0)[0] == 404
    headers = {"X-Review-Token": server.app.token, "Content-Length": str(10**9)}
    assert request(server, "POST", "/api/case/ras/verdict", b"{}", headers)[0] == 413


def test_read_only_refuses_every_write(outdir):
    running = Running(outdir, read_only=True)
    try:
        status, body, _ = post_verdict(running, "ras", 0)
        assert status == 403 and b"read-only" in body
        assert request(running, "GET", "/case/ras")[0] == 200
    finally:
        running.stop()
    assert not (outdir / "review.sqlite").exists()


def _inputs(outdir):
    return {
        p.name: p.read_bytes() for p in outdir.iterdir() if p.is_file() and not p.name.startswith("review")
    }


def test_inputs_are_never_modified(server, outdir):
    before = _inputs(outdir)
    scans = {p.name: p.stat().st_mtime_ns for p in (outdir.parent / "scans").iterdir()}
    post_verdict(server, "lps", 0)
    for kind in ("scan_display", "labels_display", "scan_full", "labels_scan_grid"):
        assert request(server, "GET", f"/display/lps/{kind}.nii")[0] == 200
    assert before == _inputs(outdir)
    assert scans == {p.name: p.stat().st_mtime_ns for p in (outdir.parent / "scans").iterdir()}


def test_display_copies_keep_patient_space(server, outdir):
    """scan_full: the scan as int16 on its grid; labels_scan_grid: the mask, voxel for voxel."""
    status, body, _ = request(server, "GET", "/display/lps/scan_full.nii")
    assert status == 200
    full = nib.Nifti1Image.from_bytes(body)
    scan = nib.load(outdir.parent / "scans" / "lps.nii.gz")
    assert full.get_data_dtype() == np.int16 and np.allclose(full.affine, ras_affine("ras"))  # RAS+ order
    assert np.array_equal(np.asarray(full.dataobj), np.asarray(scan.dataobj)[::-1, ::-1, :])
    labels = nib.Nifti1Image.from_bytes(request(server, "GET", "/display/lps/labels_scan_grid.nii")[1])
    mask = np.asarray(nib.load(outdir / "lps.nii.gz").dataobj)
    assert np.array_equal(np.asarray(labels.dataobj), mask[::-1, ::-1, :])
    small = nib.Nifti1Image.from_bytes(request(server, "GET", "/display/lps/labels_display.nii")[1])
    assert small.shape == SHAPE  # below the display budget: the full grid
    assert np.array_equal(np.asarray(small.dataobj), mask[::-1, ::-1, :])


def test_block_mean_keeps_voxel_centres_in_place():
    """A 512×512×300 grid is reduced towards cubic voxels within the budget; each reduced voxel's centre is
    the mean of its block's."""
    assert block_factors((512, 512, 300), (0.35, 0.37, 0.82)) == (3, 3, 2)
    assert block_factors((512, 512, 100), (0.7, 0.7, 5.0)) == (2, 2, 1)
    assert block_factors((96, 96, 40)) == (1, 1, 1)
    affine = np.diag([-0.7, -0.7, 2.0, 1.0])
    affine[:3, 3] = [100, 50, -20]
    data = np.arange(6 * 4 * 2, dtype=np.float32).reshape(6, 4, 2)
    small, small_affine = block_mean(data, affine, (2, 2, 1))
    assert small.shape == (3, 2, 2) and small[1, 1, 0] == data[2:4, 2:4, 0].mean()
    centres = [affine @ [i, j, 0, 1] for i in (2, 3) for j in (2, 3)]
    assert np.allclose(small_affine @ [1, 1, 0, 1], np.mean(centres, axis=0))
    labels = np.arange(6 * 4 * 2).reshape(6, 4, 2)
    assert subsample(labels, (2, 2, 1))[1, 1, 0] == labels[3, 3, 0]  # the voxel nearest the block centre


def test_to_grid_permutes_exactly_and_refuses_other_grids():
    data = np.random.default_rng(0).integers(0, 3, SHAPE).astype(np.uint8)
    moved = to_grid(data, ras_affine("ras"), ras_affine("lps"), SHAPE, "x")
    assert np.array_equal(moved, data[::-1, ::-1, :])
    from medseg.io import InputError

    shifted = ras_affine("lps")
    shifted[0, 3] += 3.0
    with pytest.raises(InputError, match="not on the scan's grid"):
        to_grid(data, ras_affine("ras"), shifted, SHAPE, "x")
