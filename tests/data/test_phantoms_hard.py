"""Hard phantoms (``kind="hard"``): determinism, labels, measured low contrast and low-dose noise, more varied
pancreas, the standard geometry, and ``medseg phantoms --kind``."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from medseg.data.check import check_dataset
from medseg.data.phantoms import LABELS, generate_phantom, write_msd_dataset
from medseg.data.phantoms_hard import generate_hard_phantom, low_dose_noise
from medseg.io import voxel_spacing
from pipelines.cli import app

SHAPE = (64, 64, 24)
SEEDS = range(10)
KINDS = ("standard", "hard")
runner = CliRunner()


@pytest.fixture(scope="module")
def cases():
    """Seeds 0–9 of both kinds at 64×64×24 (about 3 s)."""
    return {kind: [generate_phantom(seed, SHAPE, kind=kind) for seed in SEEDS] for kind in KINDS}


def contrast_and_noise(ph) -> tuple[float, float]:
    """Pancreas mean HU minus the mean of its 3-voxel neighbourhood (unlabelled voxels only), and the noise
    σ: the standard deviation of the liver interior (eroded by 2 voxels, a homogeneous region)."""
    image = ph.image.astype(float)
    pancreas = ph.label == LABELS["pancreas"]
    shell = ndimage.binary_dilation(pancreas, iterations=3) & ~pancreas & (ph.label == 0)
    liver = ndimage.binary_erosion(ph.label == LABELS["liver"], iterations=2)
    assert shell.sum() > 50 and liver.sum() > 200
    return float(image[pancreas].mean() - image[shell].mean()), float(image[liver].std())


def world_centroid_and_volume(ph) -> tuple[np.ndarray, float]:
    """Pancreas centroid in RAS mm and volume in ml."""
    ijk = np.argwhere(ph.label == LABELS["pancreas"])
    centroid = ijk.mean(0) @ ph.affine[:3, :3].T + ph.affine[:3, 3]
    return centroid, len(ijk) * float(np.prod(voxel_spacing(ph.affine))) / 1000


def test_same_seed_is_bit_identical_and_seeds_differ():
    a, b = generate_phantom(3, SHAPE, kind="hard"), generate_hard_phantom(3, SHAPE)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert np.array_equal(a.affine, b.affine) and a.orientation == b.orientation
    c = generate_phantom(4, SHAPE, kind="hard")
    assert not np.array_equal(a.label, c.label)


def test_every_label_in_every_case(cases):
    for seed, ph in zip(SEEDS, cases["hard"], strict=True):
        assert ph.image.dtype == np.int16 and ph.label.dtype == np.uint8 and ph.image.shape == SHAPE
        counts = np.bincount(ph.label.ravel(), minlength=7)
        assert len(counts) == 7, seed  # the standard label table, nothing more
        for name, idx in LABELS.items():
            assert counts[idx] > 10, (seed, name, counts[idx])


def test_pancreas_contrast_to_its_neighbourhood_is_low(cases):
    """Seeds 0–4 at 64×64×24 measured 21–45 HU (mean 31) hard against 64–114 HU (mean 90) standard."""
    hard = np.array([contrast_and_noise(ph)[0] for ph in cases["hard"][:5]])
    standard = np.array([contrast_and_noise(ph)[0] for ph in cases["standard"][:5]])
    assert np.all(standard > 55) and standard.mean() > 80, standard
    assert np.all(np.abs(hard) < 60) and np.abs(hard).mean() < 40, hard
    assert np.abs(hard).mean() < 0.5 * standard.mean(), (hard, standard)


def test_contrast_to_noise_ratio_is_below_about_one(cases):
    """Measured CNR 0.68–1.51 (mean 1.0) hard against 5.1–9.4 (mean 7.3) standard."""
    hard = np.array([abs(c) / n for c, n in map(contrast_and_noise, cases["hard"][:5])])
    standard = np.array([abs(c) / n for c, n in map(contrast_and_noise, cases["standard"][:5])])
    assert np.all(hard < 2.0) and hard.mean() < 1.3, hard
    assert np.all(standard > 4.0), standard


def test_noise_is_that_of_low_dose_ct(cases):
    """The liver interior: 29–31 HU hard (σ = 30 HU asked), 12 HU standard; an explicit σ is honoured."""
    hard = np.array([contrast_and_noise(ph)[1] for ph in cases["hard"]])
    standard = np.array([contrast_and_noise(ph)[1] for ph in cases["standard"]])
    assert np.all((hard > 25) & (hard < 35)), hard
    assert np.all((standard > 10) & (standard < 15)), standard
    quieter = contrast_and_noise(generate_phantom(0, SHAPE, noise_hu=20.0, kind="hard"))[1]
    assert 17 < quieter < 23


def test_noise_keeps_its_sigma_and_is_correlated_in_plane_only():
    noise = low_dose_noise(np.random.default_rng(0), (96, 96, 32), 30.0)
    assert noise.std() == pytest.approx(30.0, rel=0.02)

    def neighbour_correlation(axis: int) -> float:
        a, b = np.moveaxis(noise, axis, 0)[:-1].ravel(), np.moveaxis(noise, axis, 0)[1:].ravel()
        return float(np.corrcoef(a, b)[0, 1])

    assert 0.15 < neighbour_correlation(0) < 0.4 and 0.15 < neighbour_correlation(1) < 0.4  # 0.26 measured
    assert abs(neighbour_correlation(2)) < 0.03
    white = low_dose_noise(np.random.default_rng(0), (96, 96, 32), 30.0, correlation_voxels=0.0)
    assert abs(float(np.corrcoef(white[:-1].ravel(), white[1:].ravel())[0, 1])) < 0.03


def test_partial_volume_blur_is_a_gaussian_of_the_sharp_image_and_labels_stay_sharp():
    """Without noise, the image is the 1-voxel Gaussian of the unblurred one (to rounding); labels are equal."""
    sharp = generate_hard_phantom(2, SHAPE, noise_hu=0.0, blur_voxels=0.0)
    blurred = generate_hard_phantom(2, SHAPE, noise_hu=0.0)
    assert np.array_equal(sharp.label, blurred.label)
    expected = ndimage.gaussian_filter(sharp.image.astype(np.float64), 1.0)
    assert np.abs(blurred.image - expected).max() <= 1.0
    assert (
        np.abs(np.diff(blurred.image.astype(float), axis=0)).max()
        < 0.6 * np.abs(np.diff(sharp.image.astype(float), axis=0)).max()
    )


def test_pancreas_varies_more_than_standard(cases):
    """Seeds 0–9: centroid spread 16.8 mm hard, 11.1 mm standard; volume CV 0.47 against 0.13."""
    spread, cv = {}, {}
    for kind in KINDS:
        centroids, volumes = zip(*map(world_centroid_and_volume, cases[kind]), strict=True)
        spread[kind] = float(np.linalg.norm(np.std(centroids, axis=0)))
        cv[kind] = float(np.std(volumes) / np.mean(volumes))
    assert spread["hard"] > 14 and spread["hard"] > 1.25 * spread["standard"], spread
    assert cv["hard"] > 0.3 and cv["hard"] > 2.5 * cv["standard"], cv


def test_same_geometry_and_organs_as_standard_for_one_seed(cases):
    """One seed draws the same grid, affine and organs in both kinds; only the pancreas region differs."""
    codes = set()
    for standard, hard in zip(cases["standard"], cases["hard"], strict=True):
        assert np.array_equal(standard.affine, hard.affine) and standard.orientation == hard.orientation
        assert standard.image.shape == hard.image.shape == SHAPE
        for name in ("aorta", "kidney_right", "kidney_left"):
            assert np.array_equal(standard.label == LABELS[name], hard.label == LABELS[name]), name
        codes.add("".join(nib.aff2axcodes(hard.affine)))
    assert codes == {"RAS", "LPS"}
    forced = generate_phantom(0, SHAPE, orientation="LPS", kind="hard")
    assert nib.aff2axcodes(forced.affine) == ("L", "P", "S")


def test_an_unknown_kind_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown phantom kind 'hrd': valid are hard, standard; did you mean hard"
    ):
        generate_phantom(0, SHAPE, kind="hrd")
    with pytest.raises(ValueError, match="valid are hard, standard"):
        write_msd_dataset(tmp_path / "ds", 1, kind="difficult")
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("layout", ["msd", "nnunet"])
def test_cli_writes_a_hard_dataset(tmp_path, layout):
    out = tmp_path / "hard"
    args = ["phantoms", str(out), "--cases", "2", "--test", "1", "--shape", "48", "48", "20", "--seed", "3"]
    result = runner.invoke(app, [*args, "--layout", layout, "--kind", "hard"])
    assert result.exit_code == 0, result.output
    assert "(hard)" in result.stdout
    meta = json.loads((out / "dataset.json").read_text())
    assert "hard kind" in meta["description"]
    assert check_dataset(out, workers=1) == []
    name = "phantom_001.nii.gz" if layout == "msd" else "phantom_001_0000.nii.gz"
    img = nib.load(out / "imagesTr" / name)
    ph = generate_phantom(300_001, (48, 48, 20), kind="hard")
    assert np.array_equal(img.affine, ph.affine) and np.array_equal(np.asanyarray(img.dataobj), ph.image)


def test_cli_refuses_an_unknown_kind_with_one_line(tmp_path):
    result = runner.invoke(app, ["phantoms", str(tmp_path / "x"), "--cases", "1", "--kind", "hardest"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --kind: unknown phantom kind 'hardest'"), lines
    assert "valid are hard, standard" in lines[0]
    assert not (tmp_path / "x").exists()
