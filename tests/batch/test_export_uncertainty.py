"""``medseg segment --uncertainty`` and ``medseg export`` through the real CLI.

* the entropy map is a float NIfTI in the scan's exact geometry, in [0, 1], and the sidecar's per-label mean
  entropy (computed on the model grid) agrees with the mean of that map inside each label;
* ``medseg export`` writes a DICOM SEG for a case segmented earlier without one — from the mask and sidecar
  only — that highdicom reads back with every segment's voxel count equal to the mask's; a case whose source
  series has gone fails alone in one line.
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.bad_inputs.cli import assert_no_temp_files, run_cli


@pytest.fixture(scope="module")
def liver_model(tiny_run, tmp_path_factory):
    """The tiny checkpoint with its head biased towards "liver", so masks are not empty."""
    from medseg.io.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(tiny_run / "best.pt")
    bias = torch.zeros_like(ckpt["model"]["head.bias"])
    bias[1] = 4.0
    ckpt["model"]["head.bias"] = ckpt["model"]["head.bias"] + bias
    out = tmp_path_factory.mktemp("liver_model") / "liver.pt"
    return save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "version")}, out)


@pytest.fixture(scope="module")
def segmented(liver_model, tiny_dataset, tmp_path_factory):
    """Two DICOM series (LPS descending, oblique) and a NIfTI case, segmented with --uncertainty, no SEG."""
    from medseg.data.phantoms import generate_phantom
    from medseg.testing.dicom_series import write_ct_series

    root = tmp_path_factory.mktemp("export")
    inp = root / "in"
    series = {}
    for pid, orientation, seed in (("P1", "LPS", 31), ("P2", "RAS", 32)):
        ph = generate_phantom(seed, (40, 40, 16), orientation=orientation)
        affine = ph.affine.copy()
        if pid == "P2":  # oblique: 20° about a skew axis
            axis = np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
            k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
            t = np.deg2rad(20.0)
            affine[:3, :3] = (np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k) @ affine[:3, :3]
        series[pid] = write_ct_series(
            ph.image, affine, inp / pid, patient_id=pid, series_number=3, descending=pid == "P1"
        )
    nifti = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]
    (inp / nifti.name).write_bytes(nifti.read_bytes())
    out = root / "out"
    result = run_cli("segment", "-i", inp, "-o", out, "-m", liver_model, "--device", "cpu", "--uncertainty")
    assert result.code == 0, result.output
    return root, out, series


def test_uncertainty_map_has_the_scan_geometry_and_matches_the_sidecar_means(segmented):
    _, out, _ = segmented
    masks = sorted(p for p in out.glob("*.nii.gz") if not p.name.endswith("_entropy.nii.gz"))
    assert len(masks) == 3
    for mask_path in masks:
        case = mask_path.name.removesuffix(".nii.gz")
        mask = nib.load(mask_path)
        ent = nib.load(out / f"{case}_entropy.nii.gz")
        assert ent.shape == mask.shape
        np.testing.assert_array_equal(ent.affine, mask.affine)
        assert ent.get_data_dtype() == np.float32
        values = np.asarray(ent.dataobj)
        assert values.min() >= 0.0 and values.max() <= 1.0 + 1e-6 and values.max() > 0
        side = json.loads((out / f"{case}.json").read_text())
        assert side["uncertainty"] is True
        assert set(side["image_info"]) >= {"spacing_mm", "obliquity_deg", "axcodes", "hu_min", "hu_max"}
        labels = np.asarray(mask.dataobj)
        assert (labels == 1).any(), "the biased model should segment liver"
        # model-grid mean (sidecar) vs the restored map's mean inside the written label: same quantity,
        # two grids — close, not equal
        restored = float(values[labels == 1].mean())
        assert side["mean_entropy"]["liver"] == pytest.approx(restored, abs=0.08)


def test_export_writes_dicom_seg_for_existing_outputs_and_a_moved_series_fails_alone(segmented, tmp_path):
    import highdicom as hd
    import pydicom

    root, out_src, series = segmented
    out = tmp_path / "out"
    shutil.copytree(out_src, out)
    assert not list(out.glob("*_seg.dcm"))
    moved = tmp_path / "P2_moved"
    shutil.move(root / "in" / "P2", moved)  # P2's source series is no longer where the sidecar says
    try:
        result = run_cli("export", out, "--output-type", "dicom-seg,slicer")
    finally:
        shutil.move(moved, root / "in" / "P2")
    assert result.code == 1, result.output
    errors = result.error_lines()
    assert len(errors) == 1 and "P2" in errors[0] and "not found" in errors[0], result.output
    assert "Traceback" not in result.output
    assert "no DICOM SEG: the input is NIfTI" in result.stderr
    p1 = next(p.name.removesuffix(".json") for p in out.glob("P1_*.json"))
    mask = np.asarray(nib.load(out / f"{p1}.nii.gz").dataobj)
    seg = hd.seg.segread(out / f"{p1}_seg.dcm")
    source = pydicom.dcmread(series["P1"].files[0], stop_before_pixels=True)
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    side = json.loads((out / f"{p1}.json").read_text())
    assert side["exports"]["dicom_seg"]["round_trip"] == "voxel for voxel identical"
    for desc in seg.SegmentSequence:
        value = side["labels"][desc.SegmentLabel]
        frames = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(series["P1"].sop_instance_uids),
            segment_numbers=[desc.SegmentNumber],
            ignore_spatial_locations=True,
        )
        assert int(frames.sum()) == int((mask == value).sum()), desc.SegmentLabel
    assert (out / f"{p1}.seg.nrrd").is_file() and (out / "itksnap_labels.txt").is_file()
    # a rerun of segment into the folder still finds every case complete (identity untouched)
    p2 = next(p.name.removesuffix(".json") for p in out.glob("P2_*.json"))
    assert not (out / f"{p2}_seg.dcm").exists()
    assert_no_temp_files(out)


def test_export_of_a_folder_without_cases_is_one_error(tmp_path):
    result = run_cli("export", tmp_path)
    assert result.code == 2
    assert len(result.error_lines()) == 1 and "no segmented case" in result.output
