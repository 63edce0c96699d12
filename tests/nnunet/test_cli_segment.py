"""``medseg segment -m NNUNET_FOLDER`` through the real CLI: a DICOM series in, mask + DICOM SEG + RTSTRUCT +
statistics out, the sidecar's labels from dataset.json; a re-run skips the finished case (resume identity)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medseg.data.phantoms import generate_phantom
from tests.nnunet.folders import write_model_folder

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _segment(*args):
    cmd = [sys.executable, "-m", "pipelines.cli", "segment", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def test_dicom_series_to_seg_and_rtstruct(tmp_path):
    import nibabel as nib
    import pydicom

    from medseg.testing.dicom_series import write_ct_series

    folder = write_model_folder(tmp_path / "model", "aniso", folds=(0, 1))
    ph = generate_phantom(5, shape=(64, 64, 40), fov_mm=(96.0, 96.0, 200.0), orientation="LPS")
    write_ct_series(ph.image, ph.affine, tmp_path / "dicom" / "series1", patient_id="P1")
    out = tmp_path / "out"
    args = ["-i", tmp_path / "dicom", "-m", folder, "--folds", "0", "1", "-o", out, "--precision", "fp32"]
    args += ["--output-type", "dicom-seg,dicom-rtstruct", "--statistics"]
    first = _segment(*args)
    assert first.returncode == 0, first.stderr
    masks = [p for p in out.glob("*.nii.gz") if not p.name.endswith("_entropy.nii.gz")]
    assert len(masks) == 1
    sidecar = json.loads(masks[0].with_name(masks[0].name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["labels"]["liver"] == 1 and len(sidecar["labels"]) == 7
    assert (
        len(
            sidecar["checkpoint_sha256"]
            if "checkpoint_sha256" in sidecar
            else sidecar["identity"]["checkpoint_sha256"]
        )
        == 2
    )
    mask = nib.load(masks[0])
    assert np.asarray(mask.dataobj).max() >= 1
    seg = pydicom.dcmread(next(out.glob("*_seg.dcm")))
    assert seg.Modality == "SEG"
    assert any(s.SegmentLabel.lower().startswith("liver") for s in seg.SegmentSequence)
    assert next(out.glob("*_rtstruct.dcm")).stat().st_size > 0
    assert (out / "statistics.csv").is_file()
    again = _segment(*args)
    assert again.returncode == 0 and "1 skipped" in again.stdout, again.stdout
