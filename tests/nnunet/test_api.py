"""The Python API takes an nnU-Net v2 model folder as ``medseg segment -m`` does: ``medseg.load_model`` →
``medseg.segment`` gives the batch's mask; ``folds`` chooses the folds."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

import medseg
from medseg.config.segment import SegmentOptions
from medseg.nnunet import NnunetPredictor, read_model_folder
from tests.nnunet.folders import write_model_folder, write_scan

pytestmark = pytest.mark.slow


def test_load_model_and_segment_an_nnunet_folder(tmp_path):
    folder = write_model_folder(tmp_path / "model", "iso", folds=(0, 1))
    scan = write_scan(tmp_path, "lps")
    model = medseg.load_model(folder, device="cpu", precision="fp32", folds=[0])
    assert isinstance(model, NnunetPredictor) and len(model.checkpoints) == 1
    mask = medseg.segment(scan, model)
    reference = NnunetPredictor(
        read_model_folder(folder, ("0",)), SegmentOptions(device="cpu", precision="fp32")
    ).predict(scan)
    image = nib.load(scan)
    assert mask.shape == image.shape and np.array_equal(mask.affine, image.affine)
    assert np.array_equal(np.asarray(mask.dataobj), reference.labels)
    assert len(medseg.load_model(folder, device="cpu", precision="fp32").checkpoints) == 2  # every fold


def test_folds_without_an_nnunet_folder_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--folds and --checkpoint apply to nnU-Net"):
        medseg.load_model(tmp_path / "best.pt", folds=[0])
