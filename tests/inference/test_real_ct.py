"""The real CT (../shared/data/real_ct, LPS, 1.5 mm) comes back with its exact shape and affine."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from tests.conftest import REAL_CT_DIR

REAL_CT = REAL_CT_DIR / "ct_lps_1p5mm.nii.gz"


@pytest.mark.skipif(
    not REAL_CT.exists(), reason=f"real CT not present at {REAL_CT} (see shared/data/README.md)"
)
def test_real_ct_segment_keeps_exact_geometry(tiny_run, tmp_path):
    out = tmp_path / "real_mask.nii.gz"
    result = CliRunner().invoke(
        app,
        ["segment", "-i", str(REAL_CT), "-o", str(out), "-m", str(tiny_run / "best.pt"), "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    src, mask = nib.load(REAL_CT), nib.load(out)
    assert nib.aff2axcodes(src.affine) == ("L", "P", "S")
    assert mask.shape == src.shape == (120, 126, 164)
    assert np.array_equal(mask.affine, src.affine)
    assert np.array_equal(mask.header.get_sform(), src.header.get_sform())
    assert np.array_equal(mask.header.get_qform(), src.header.get_qform())
    assert mask.get_data_dtype() == np.uint8
