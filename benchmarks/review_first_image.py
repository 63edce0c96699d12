"""Time to first image of ``medseg review --serve`` for a 512×512×300 CT case, in headless Chromium.

``python -m benchmarks.review_first_image [--work DIR] [--runs 3]``

The case is the real CT of ``shared/data/real_ct`` (120×126×164 at 1.5 mm, abdomen, LPS) resampled
(trilinear; its aorta mask nearest-neighbour) onto 512×512×300 voxels over the same field of view, so the body
fills the grid as in a clinical scan (0.35×0.37×0.82 mm). It is written as a batch would leave it: the CT
(int16 ``.nii.gz``) outside the output folder, ``<case>.nii.gz`` + sidecar inside.

Measured in the browser (``performance.now()`` from the navigation's start to the first animation frame after
NiiVue has drawn the CT with the label overlay, ``window.medsegViewer.firstImageMs``):

* **cold** — first visit: the server reads the CT and makes the display copy (int16, block-averaged 2×2×1 to
  256×256×300, :mod:`medseg.review.display`) before sending it;
* **warm** — later visits (the copy cached in ``OUTDIR/.medseg_review``), median of ``--runs``;
* **full resolution** (``--full``) — the "full resolution" button: the 512×512×300 copies (int16 scan,
  uint8 labels) made and loaded, from the click until NiiVue reports them.

Prints one line per number and the CPU model (``lscpu``). WebGL runs on SwiftShader (software) in headless
Chromium here; a workstation's GPU draws faster, the server's share is the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

REAL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_ct"
SHAPE = (512, 512, 300)


def make_case(work: Path) -> Path:
    """The 512×512×300 case (module docstring); returns the output folder."""
    out, scans = work / "out", work / "scans"
    if (out / "ct512.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    scans.mkdir(exist_ok=True)
    ct = nib.load(REAL_CT / "ct_lps_1p5mm.nii.gz")
    aorta = nib.load(REAL_CT / "aorta_lps_1p5mm.nii.gz")
    factors = np.array(SHAPE) / np.array(ct.shape)
    volume = ndimage.zoom(np.asarray(ct.dataobj, np.float32), factors, order=1)
    labels = ndimage.zoom(np.asarray(aorta.dataobj, np.uint8), factors, order=0)
    affine = ct.affine.copy()
    affine[:3, :3] = ct.affine[:3, :3] / factors  # same field of view, finer voxels
    affine[:3, 3] = ct.affine[:3, 3] + ct.affine[:3, :3] @ ((1 / factors - 1) / 2)  # corners kept
    for data, path, dtype in (
        (np.rint(volume), scans / "ct512.nii.gz", np.int16),
        (labels, out / "ct512.nii.gz", np.uint8),
    ):
        img = nib.Nifti1Image(data.astype(dtype), affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, str(path))
    scan = str(scans / "ct512.nii.gz")
    side = {"case": "ct512", "labels": {"background": 0, "aorta": 1}, "kind": "nifti", "source": scan,
            "source_file": {"path": scan}}  # fmt: skip
    (out / "ct512.json").write_text(json.dumps(side))
    return out


def cpu_model() -> str:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def first_image_ms(browser, url: str) -> float:
    browser.goto(url)
    browser.wait("document.body.dataset.ready", 300)
    if browser.eval("window.medsegViewer.error"):
        raise RuntimeError(browser.eval("window.medsegViewer.error"))
    return float(browser.eval("window.medsegViewer.firstImageMs"))


def full_resolution_ms(browser) -> float:
    t0 = time.monotonic()
    browser.click("#full-res")
    browser.wait("document.getElementById('status').textContent.startsWith('full resolution')", 300)
    return (time.monotonic() - t0) * 1000


def main() -> None:
    from medseg.review import make_server
    from tests.review.cdp import Browser

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for the case (default: a temp folder)"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="also time the full-resolution button (minutes)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="review-bench-"))
    t0 = time.monotonic()
    out = make_case(work)
    print(f"case: {out / 'ct512.nii.gz'} {SHAPE} (made in {time.monotonic() - t0:.0f} s)")
    cache = out / ".medseg_review"
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    server = make_server(out, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    browser = Browser(work / "profile", timeout=600)
    url = f"{server.url}case/ct512"
    print(f"cpu: {cpu_model()}", flush=True)
    try:
        cold = first_image_ms(browser, url)
        print(f"time to first image, cold (display copy made): {cold / 1000:.2f} s", flush=True)
        warm = [first_image_ms(browser, url) for _ in range(args.runs)]
        median = statistics.median(warm) / 1000
        print(f"time to first image, warm (cached copy), median of {args.runs}: {median:.2f} s", flush=True)
        if args.full:
            full = full_resolution_ms(browser)
            print(f"full resolution on demand (copies made): {full / 1000:.1f} s", flush=True)
    finally:
        browser.close()
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
