"""medseg's run of an nnU-Net v2 model folder against nnU-Net's own ``nnUNetPredictor`` on the same scans.

The folders are written in nnU-Net's format (:mod:`tests.nnunet.folders`: hand-written plans of a tiny
configuration, a briefly trained network). nnU-Net's predictor runs on the CPU
(``perform_everything_on_device=False``) through ``predict_single_npy_array`` on the arrays its
``SimpleITKIO`` reads; medseg reads the NIfTI file itself. At ``precision="fp32"`` the softmax probabilities
must agree within 1e-4 and the label maps be identical; at the default precision Dice ≥ 0.99 per label.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.config.segment import SegmentOptions
from medseg.nnunet import NnunetPredictor, read_model_folder
from tests.nnunet.folders import write_model_folder, write_scan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for kind in ("iso", "aniso"):
        out[kind] = write_model_folder(tmp_path_factory.mktemp(kind), kind, folds=(0, 1))
    scans = tmp_path_factory.mktemp("scans")
    out["scans"] = {name: write_scan(scans, name) for name in ("ras", "lps", "thick", "ras_fine")}
    return out


def nnunet_reference(folder, folds, tta, scan):
    """nnU-Net's own prediction: label map and probabilities in its (z, y, x) array order."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        tile_step_size=0.5, use_gaussian=True, use_mirroring=tta, perform_everything_on_device=False,
        device=torch.device("cpu"), verbose=False, allow_tqdm=False,
    )  # fmt: skip
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=folds)
    data, props = SimpleITKIO().read_images([str(scan)])
    return predictor.predict_single_npy_array(data, props, None, None, True)


def dice(a, b, label):
    x, y = a == label, b == label
    total = x.sum() + y.sum()
    return 1.0 if total == 0 else 2 * (x & y).sum() / total


CASES = [  # the fast path's back ends checked per case (OpenVINO conversions cost time: two cases each)
    ("iso", "lps", (0,), False, ("torch",)),  # LPS with a zero border (cropped), transposed plan, no TTA
    ("iso", "ras", (0, 1), True, ("openvino", "torch")),  # RAS, two folds, mirroring
    ("aniso", "thick", (0,), True, ("openvino",)),  # 1.5×1.5×5 mm scan: separate z both ways
    ("aniso", "ras_fine", (0, 1), False, ("torch",)),  # RAS, two folds, in-plane resampling only
]


@pytest.mark.parametrize(("kind", "scan", "folds", "tta", "backends"), CASES)
def test_equal_to_nnunet_predictor(folders, kind, scan, folds, tta, backends):
    folder, path = folders[kind], folders["scans"][scan]
    seg, probs = nnunet_reference(folder, folds, tta, path)
    model = read_model_folder(folder, [str(f) for f in folds])
    exact = NnunetPredictor(model, SegmentOptions(device="cpu", precision="fp32", tta=tta))
    result = exact.predict(str(path), probabilities=True)
    import nibabel as nib

    reference = nib.load(str(path))
    assert result.labels.shape == reference.shape
    labels = result.labels.transpose(2, 1, 0)  # nibabel (x, y, z) → nnU-Net's (z, y, x)
    assert np.abs(result.probabilities.transpose(0, 3, 2, 1) - probs).max() < 1e-4
    assert np.array_equal(labels, seg)
    assert len(np.unique(seg)) > 1  # the comparison is not between two empty maps
    for backend in backends:  # the default precision (bf16 where native, else fp32) on each
        options = SegmentOptions(device="cpu", tta=tta, backend=backend)
        fast = NnunetPredictor(model, options).predict(str(path))
        assert fast.info["backend"] == backend
        fast_labels = fast.labels.transpose(2, 1, 0)
        for label in range(1, 7):
            assert dice(fast_labels, seg, label) >= 0.99, (label, backend, fast.info["precision"])
