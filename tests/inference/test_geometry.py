"""Geometry is sacred: restoring to the input grid is exact for RAS/LPS, oblique, anisotropic scans."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai import transforms as mt

from medseg.data.phantoms import generate_phantom
from medseg.inference import Predictor
from medseg.io import load_volume, save_volume, voxel_spacing
from medseg.transforms.presets import body_mask
from medseg.transforms.resample import resample_to_reference


def _model_space_label(path, spacing):
    """Label through the same MONAI chain as inference: orient to RAS, resample, crop to body."""
    keys = ["image", "label"]
    chain = mt.Compose(
        [
            mt.LoadImaged(keys, reader="NibabelReader", image_only=True),
            mt.EnsureChannelFirstd(keys),
            mt.Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            mt.Spacingd(keys, pixdim=spacing, mode=("bilinear", "nearest")),
            mt.CropForegroundd(keys, source_key="image", select_fn=body_mask, margin=2, allow_smaller=True),
        ]
    )
    return chain({"image": str(path[0]), "label": str(path[1])})["label"]


def _round_trip(tmp_path, orientation, spacing_factor):
    ph = generate_phantom(21, (64, 64, 24), orientation=orientation)
    img_p, lab_p = tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz"
    save_volume(ph.image, ph.affine, img_p, np.int16)
    save_volume(ph.label, ph.affine, lab_p, np.uint8)
    ornt = nib.orientations.io_orientation(ph.affine)
    native = voxel_spacing(ph.affine)[[int(np.argwhere(ornt[:, 0] == ax)[0, 0]) for ax in range(3)]]
    lab_model = _model_space_label((img_p, lab_p), list(native * spacing_factor))
    onehot = torch.nn.functional.one_hot(lab_model[0].long(), 7).permute(3, 0, 1, 2).float()
    ref = nib.load(lab_p)
    back = resample_to_reference(onehot, lab_model.affine, ref.affine, ref.shape).argmax(0).numpy()
    return back, np.asanyarray(ref.dataobj)


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_round_trip_at_native_spacing_is_exact(tmp_path, orientation):
    back, original = _round_trip(tmp_path, orientation, 1.0)
    assert back.shape == original.shape
    assert np.array_equal(back, original)


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_round_trip_through_coarser_grid_keeps_organs_in_place(tmp_path, orientation):
    back, original = _round_trip(tmp_path, orientation, 1.5)
    # a flip or shift would drop these to ~0; resampling small organs (~200 voxels) costs a few percent
    for label, bound in ((1, 0.9), (2, 0.75), (3, 0.75), (4, 0.75), (5, 0.75)):
        a, b = back == label, original == label
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > bound, label


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_prediction_has_input_shape_and_affine_exactly(tiny_run, tmp_path, orientation):
    ph = generate_phantom(33, (40, 44, 20), orientation=orientation)
    src = save_volume(ph.image, ph.affine, tmp_path / f"{orientation}.nii.gz", np.int16)
    pred = Predictor(tiny_run / "best.pt", device="cpu").predict(src)
    ref = load_volume(src)
    assert pred.labels.shape == ref.shape == (40, 44, 20)
    assert np.array_equal(pred.reference.affine, nib.load(src).affine)
    assert pred.labels.dtype == np.uint8 and pred.labels.max() < 7
