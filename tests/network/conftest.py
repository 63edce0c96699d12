"""Fixtures for the network tests: a real Orthanc per test (started and stopped by PID) and a small phantom
CT series written as DICOM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg.testing.orthanc import OrthancServer, orthanc_available, start_orthanc


@pytest.fixture
def orthanc(tmp_path) -> OrthancServer:
    """A fresh Orthanc (HTTP + DICOM on free localhost ports, DICOMweb at ``.dicomweb_url``); the test is
    skipped with the reason when Orthanc or its DICOMweb plugin is not installed."""
    reason = orthanc_available()
    if reason:
        pytest.skip(reason)
    server = start_orthanc(tmp_path / "orthanc")
    yield server
    server.stop(timeout_s=0.5)  # its data is thrown away: no need to wait ~3 s for a graceful shutdown


@pytest.fixture
def phantom_ct(tmp_path):
    """A small phantom CT series (32×32×8, 1.5 mm, RAS, liver label 1 / spleen label 2) written as DICOM.

    Returns ``(written, labels, affine)``: the :class:`~medseg.testing.dicom_series.WrittenSeries`, a
    uint8 label map on the same grid and the RAS affine.
    """
    from medseg.testing.dicom_series import write_ct_series

    shape = (32, 32, 8)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = [-20.0, -30.0, 10.0]
    i, j, k = np.indices(shape)
    labels = np.zeros(shape, np.uint8)
    labels[((i - 12) ** 2 + (j - 14) ** 2 < 50) & (k >= 1) & (k <= 6)] = 1
    labels[((i - 24) ** 2 + (j - 20) ** 2 < 16) & (k >= 2) & (k <= 5)] = 2
    volume = np.full(shape, -900, np.int16)
    volume[labels == 1] = 60
    volume[labels == 2] = 45
    written = write_ct_series(volume, affine, Path(tmp_path) / "ct", patient_id="NET001")
    return written, labels, affine


@pytest.fixture
def phantom_seg(phantom_ct, tmp_path):
    """A DICOM SEG (BINARY) written by medseg for :func:`phantom_ct`'s label map.

    Returns ``(seg_report, written, labels, affine, label_names)``.
    """
    from medseg.export.dicom_seg import write_dicom_seg
    from medseg.io.dicom import find_series, read_series

    written, labels, affine = phantom_ct
    volume = read_series(find_series(written.files[0].parent)[0])
    np.testing.assert_array_equal(volume.image.affine, affine)  # the label map is on the read grid
    names = {"liver": 1, "spleen": 2}
    report = write_dicom_seg(labels, volume, names, Path(tmp_path) / "out" / "case_seg.dcm")
    return report, written, labels, affine, names
