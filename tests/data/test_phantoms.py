"""Synthetic phantoms: determinism, anatomy, HU realism, geometry variety, MSD layout."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from medseg.data.phantoms import LABELS, generate_phantom, write_msd_dataset
from medseg.io import voxel_spacing

SHAPE = (64, 64, 24)


def test_same_seed_is_bit_identical_and_seeds_differ():
    a, b = generate_phantom(3, SHAPE), generate_phantom(3, SHAPE)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert np.array_equal(a.affine, b.affine)
    c = generate_phantom(4, SHAPE)
    assert not np.array_equal(a.label, c.label)


def test_every_structure_present_with_realistic_hu():
    ph = generate_phantom(11, (96, 96, 40))
    assert ph.image.dtype == np.int16 and ph.label.dtype == np.uint8
    for name, idx in LABELS.items():
        if idx:
            assert (ph.label == idx).sum() > 20, name
    med = {name: float(np.median(ph.image[ph.label == idx])) for name, idx in LABELS.items() if idx}
    assert 90 < med["liver"] < 140 and 150 < med["aorta"] < 320 and 130 < med["kidney_left"] < 200
    assert 60 < med["pancreas"] < 130
    assert np.median(ph.image[0, 0, :]) < -900  # corner is air
    assert (ph.image < -700).sum() > 100  # lungs / gas


def test_pancreas_is_the_small_target():
    ph = generate_phantom(5, (96, 96, 40))
    counts = np.bincount(ph.label.ravel(), minlength=7)
    assert counts[LABELS["pancreas"]] < counts[LABELS["liver"]] / 10


def test_geometry_anisotropic_non_identity_both_orientations():
    codes = set()
    for seed in range(6):
        ph = generate_phantom(seed, SHAPE)
        codes.add("".join(nib.aff2axcodes(ph.affine)))
        sp = voxel_spacing(ph.affine)
        assert sp[2] > 1.5 * sp[0]  # anisotropic: thick slices
        direction = ph.affine[:3, :3] / sp
        assert not np.allclose(np.abs(direction), np.eye(3))  # oblique, not identity
        assert np.array_equal(ph.affine, ph.affine.astype(np.float32).astype(np.float64))
    assert codes == {"RAS", "LPS"}
    forced = generate_phantom(0, SHAPE, orientation="LPS")
    assert nib.aff2axcodes(forced.affine) == ("L", "P", "S")


def test_msd_layout(tmp_path):
    write_msd_dataset(tmp_path, num_train=2, num_test=1, shape=(32, 32, 16), seed=1)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["labels"]["6"] == "pancreas" and meta["numTraining"] == 2
    for entry in meta["training"]:
        img = nib.load(tmp_path / entry["image"])
        lab = nib.load(tmp_path / entry["label"])
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        assert np.array_equal(img.affine, lab.affine) and img.shape == lab.shape == (32, 32, 16)
    assert (tmp_path / meta["test"][0]).exists()
    assert len(list((tmp_path / "labelsTs").glob("*.nii.gz"))) == 1
    # what was written is what was generated (affine survives the float32 header exactly)
    ph = generate_phantom(100_000, (32, 32, 16))
    img = nib.load(tmp_path / "imagesTr" / "phantom_000.nii.gz")
    assert np.array_equal(img.affine, ph.affine) and np.array_equal(np.asanyarray(img.dataobj), ph.image)
