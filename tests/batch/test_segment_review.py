"""``medseg segment --preview`` and ``medseg review`` through the real CLI: previews per case, the review page
listing every case with its thumbnail, rendered by a headless browser when one is installed."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from tests.bad_inputs.cli import assert_no_temp_files, run_cli


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))


def _images(page: Path) -> list[str]:
    parser = _Page()
    parser.feed(page.read_text())
    return parser.images


def test_segment_preview_writes_previews_and_the_review_page(tiny_run, tiny_dataset, tmp_path):
    out = tmp_path / "out"
    result = run_cli("segment", "-i", tiny_dataset / "imagesTs", "-o", out, "-m", tiny_run / "best.pt",
                     "--device", "cpu", "--statistics", "--preview")  # fmt: skip
    assert result.code == 0, result.output
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (tiny_dataset / "imagesTs").glob("*.nii.gz"))
    for case in cases:
        preview = mpimg.imread(out / f"{case}_preview.png")
        assert preview.shape[0] > 100 and preview.shape[1] > 200  # three panels side by side
        assert (out / f"{case}_thumb.png").is_file()
    page = out / "index.html"
    assert f"review page: {page}" in result.stdout
    html = page.read_text()
    assert all(case in html for case in cases)
    images = _images(page)
    assert len(images) == len(cases) and all((out / src).is_file() for src in images)
    assert_no_temp_files(out)

    # previews are made for complete cases without inference; `medseg review` rewrites the page
    for case in cases:
        (out / f"{case}_preview.png").unlink()
    again = run_cli("segment", "-i", tiny_dataset / "imagesTs", "-o", out, "-m", tiny_run / "best.pt",
                    "--device", "cpu", "--preview")  # fmt: skip
    assert again.code == 0 and again.stdout.count("preview added") == len(cases), again.output
    page.unlink()
    review = run_cli("review", out)
    assert review.code == 0 and page.is_file() and f"{len(cases)} cases" in review.stdout, review.output

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip(
            "chromium is not on PATH: the rendered page is checked in tests/batch/test_review_browser.py"
        )
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert all(case in dom for case in cases) and dom.count("<img") >= len(cases)


def test_review_of_a_folder_without_cases_is_one_error(tmp_path):
    result = run_cli("review", tmp_path)
    assert result.code == 2 and result.error_lines() == [
        f"error: {tmp_path}: no segmented case found (no <case>.json sidecar)"
    ]


def test_segment_attention_writes_gate_maps_on_the_scan_grid(tiny_run, tiny_dataset, tmp_path):
    import nibabel as nib
    import numpy as np

    src = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]
    out = tmp_path / "out"
    result = run_cli(
        "segment", "-i", src, "-o", out, "-m", tiny_run / "best.pt", "--device", "cpu", "--attention"
    )
    assert result.code == 0, result.output
    case = src.name.removesuffix(".nii.gz")
    maps = sorted(out.glob(f"{case}_alpha_level*.nii.gz"))
    assert len(maps) == 3  # the tiny network has 5 levels: gates on skip levels 2, 3 and 4
    scan = nib.load(src)
    for path in maps:
        alpha = nib.load(path)
        assert alpha.shape == scan.shape and np.allclose(alpha.affine, scan.affine, atol=1e-6)
        values = np.asarray(alpha.dataobj)
        assert values.dtype == np.float32 and 0.0 <= values.min() and values.max() <= 1.0
        assert path.with_name(path.name.replace(".nii.gz", ".png")).is_file()
    assert_no_temp_files(out)


def test_segment_exports_dicom_seg_and_viewer_files(tiny_run, tiny_dataset, tmp_path):
    """A DICOM series → DICOM SEG (read back with highdicom, referencing the source instances), a Slicer
    .seg.nrrd, per-organ masks and the ITK-SNAP label file; a NIfTI input in the same batch gets no SEG and
    a warning saying why."""
    import highdicom as hd
    import nibabel as nib
    import numpy as np
    import pydicom
    import torch

    from medseg.data.phantoms import generate_phantom
    from medseg.io.checkpoint import load_checkpoint, save_checkpoint
    from medseg.testing.dicom_series import write_ct_series

    # the tiny network barely trained: bias its head towards "liver" so the masks are not empty
    ckpt = load_checkpoint(tiny_run / "best.pt")
    ckpt["model"]["head.bias"] = ckpt["model"]["head.bias"] + torch.tensor([0.0, 50.0, 0, 0, 0, 0, 0])
    model = save_checkpoint(
        {k: v for k, v in ckpt.items() if k not in ("format", "version")}, tmp_path / "liver.pt"
    )
    inp = tmp_path / "in"
    ph = generate_phantom(31, (40, 40, 16), orientation="LPS")
    series = write_ct_series(
        ph.image, ph.affine, inp / "P9", patient_id="P9", series_number=3, descending=True
    )
    nifti = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]
    (inp / nifti.name).write_bytes(nifti.read_bytes())
    out = tmp_path / "out"
    result = run_cli("segment", "-i", inp, "-o", out, "-m", model, "--device", "cpu",
                     "--output-type", "nifti,dicom-seg,slicer", "--split")  # fmt: skip
    assert result.code == 0, result.output
    assert "no DICOM SEG: the input is NIfTI" in result.stderr
    empty = [line for line in result.stderr.splitlines() if "empty segment" in line]
    assert len(empty) == 1 and "not written" in empty[0], result.stderr  # said once, not twice
    dicom_case = next(p.name.removesuffix(".json") for p in out.glob("P9_*.json"))
    mask = np.asarray(nib.load(out / f"{dicom_case}.nii.gz").dataobj)
    seg = hd.seg.segread(out / f"{dicom_case}_seg.dcm")
    source = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    referenced = {
        r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced <= set(series.sop_instance_uids)
    written = {d.SegmentLabel for d in seg.SegmentSequence}
    side = __import__("json").loads((out / f"{dicom_case}.json").read_text())
    present = {name for name, idx in side["labels"].items() if idx > 0 and (mask == idx).any()}
    assert "liver" in present and written == present
    assert side["exports"]["dicom_seg"]["round_trip"] == "voxel for voxel identical"
    for case in (dicom_case, nifti.name.removesuffix(".nii.gz")):
        assert (out / f"{case}.seg.nrrd").is_file()
        organs = sorted((out / f"{case}_organs").glob("*.nii.gz"))
        assert len(organs) == len(side["labels"]) - 1
    assert not (out / f"{nifti.name.removesuffix('.nii.gz')}_seg.dcm").exists()
    assert (out / "itksnap_labels.txt").is_file()
    assert_no_temp_files(out)
