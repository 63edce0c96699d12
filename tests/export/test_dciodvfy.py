"""David Clunie's ``dciodvfy`` (dicom3tools) checks the files medseg writes against the IODs of the standard.

A BINARY DICOM SEG (Segmentation IOD, PS3.3 A.51) and an RT Structure Set (PS3.3 A.19) written by medseg from a
phantom series must give no line starting with ``Error``; its warnings are shown in the assertion message.
The dicom3tools packaged here (2022) does not know the Label Map Segmentation SOP Class (Supplement 243,
2024), so a LABELMAP SEG is not checked here (its round trip is, in test_dicom_seg.py). The source CT files
themselves are not checked: they come from the test series writer, not from medseg's exports.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from medseg.data.phantoms import LABELS, generate_phantom
from medseg.export.dicom_seg import SegOptions, write_dicom_seg
from medseg.export.rtstruct import RtOptions, write_rtstruct
from medseg.io.dicom import find_series, read_series
from medseg.testing.dicom_series import write_ct_series

pytestmark = pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) is not installed"
)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dciodvfy")
    ph = generate_phantom(4, (40, 32, 16), orientation="LPS", noise_hu=0.0)
    write_ct_series(ph.image, ph.affine, root / "ct", patient_id="P1", descending=True)
    (info,) = find_series(root / "ct")
    volume = read_series(info)
    sha = "0123456789abcdef" * 4
    seg = write_dicom_seg(
        ph.label, volume, LABELS, root / "seg.dcm", options=SegOptions(checkpoint_sha256=sha)
    )
    rt = write_rtstruct(ph.label, volume, LABELS, root / "rt.dcm", options=RtOptions(checkpoint_sha256=sha))
    return {"Segmentation": seg.path, "RTStructureSet": rt.path}


@pytest.mark.parametrize("iod", ["Segmentation", "RTStructureSet"])
def test_no_errors(written, iod):
    result = subprocess.run(["dciodvfy", str(written[iod])], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    assert lines and lines[0] == iod, lines  # the IOD it recognised
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    assert not errors, "\n".join(["dciodvfy errors:", *errors, "warnings:", *warnings])
