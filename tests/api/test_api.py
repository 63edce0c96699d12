"""The Python API (:mod:`medseg.api`): ``import medseg`` stays cheap, every registered network builds by name,
``medseg.segment`` in memory gives the masks ``medseg segment`` writes, wrong inputs get a clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import medseg
from medseg.data.phantoms import generate_phantom
from medseg.io import save_volume
from medseg.metrics import evaluate_pair
from medseg.nets.registry import NETWORKS, RegistryError, look_up
from tests.bad_inputs.cli import run_cli

ROOT = Path(__file__).resolve().parents[2]
#: A small network and patch: the forward of every registered network takes a fraction of a second.
SMALL = {"filters": [4, 8, 16]}


def test_import_medseg_is_cheap_and_offers_the_api():
    """``import medseg`` imports neither torch, MONAI, nibabel nor numpy: the API imports them when called
    (≈0.3 ms for ``medseg`` + ``medseg.api`` with cached bytecode, see the report of issue 18)."""
    code = (
        "import sys, medseg; print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'monai', 'nibabel', 'numpy'}), sorted(medseg.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split("] ")[0] == "["
    for name in ("segment", "load_model", "create_network", "list_networks", "evaluate", "__version__"):
        assert name in out.stdout


def test_create_network_attention_unet_with_one_channel_and_three_classes(one_thread):
    net = medseg.create_network("attention_unet", 1, 3).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 1, 32, 32, 16))
    assert out.shape == (1, 3, 32, 32, 16) and torch.isfinite(out).all()
    assert sum(p.numel() for p in net.parameters()) > 0 and hasattr(net, "gates")


@pytest.mark.parametrize("name", medseg.list_networks())
def test_every_listed_network_builds_and_runs_forward(name, one_thread):
    assert medseg.list_networks() == sorted(NETWORKS)
    net = medseg.create_network(name, 2, 4, **SMALL)
    net.train()
    out = net(torch.randn(1, 2, 16, 16, 8))
    logits = out["logits"][0] if isinstance(out, dict) else out
    assert logits.shape == (1, 4, 16, 16, 8) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 2, 16, 16, 8)).shape == (1, 4, 16, 16, 8)


@pytest.mark.parametrize("bottleneck", ["pam", "ema"])
def test_create_network_takes_model_config_fields(bottleneck, one_thread):
    net = medseg.create_network("unet", 1, 3, bottleneck=bottleneck, deep_supervision=False, **SMALL).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 16, 16, 8)).shape == (1, 3, 16, 16, 8)


def test_create_network_errors():
    with pytest.raises(RegistryError) as caught:
        medseg.create_network("atention_unet", 1, 3)
    with pytest.raises(RegistryError) as registry:
        look_up(NETWORKS, "atention_unet", "network")
    assert str(caught.value) == str(registry.value)  # the registry's one message
    assert "valid names: attention_unet, unet" in str(
        caught.value
    ) and "Did you mean 'attention_unet'" in str(caught.value)
    with pytest.raises(TypeError, match=r"unknown option.*bottlenek; valid: bottleneck"):
        medseg.create_network("unet", 1, 3, bottlenek="pam")
    with pytest.raises(ValueError, match=r"model\.bottleneck"):
        medseg.create_network("unet", 1, 3, bottleneck="pamm")
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        medseg.create_network("unet", 1, 0)


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    """An LPS and a RAS phantom on disk (int16 HU, as a scanner's NIfTI)."""
    folder = tmp_path_factory.mktemp("api_scans")
    out = {}
    for seed, orientation in ((41, "LPS"), (42, "RAS")):
        ph = generate_phantom(seed, (48, 44, 22), orientation=orientation)
        out[orientation] = save_volume(
            ph.image, ph.affine, folder / f"{orientation.lower()}.nii.gz", np.int16
        )
    return out


@pytest.fixture(scope="module")
def cli_masks(segmenting_run, scans, tmp_path_factory) -> Path:
    """What the real ``medseg segment`` writes for both scans (a fresh process, defaults)."""
    out = tmp_path_factory.mktemp("api_cli")
    folder = next(iter(scans.values())).parent
    result = run_cli("segment", "-i", folder, "-o", out, "-m", segmenting_run / "best.pt", "--device", "cpu")
    assert result.code == 0, result.output
    return out


@pytest.mark.parametrize("orientation", ["LPS", "RAS"])
def test_segment_in_memory_equals_the_cli(segmenting_run, scans, cli_masks, orientation):
    """An array + affine, a Nifti1Image and a path, with a loaded model and with a run folder: each mask is
    the CLI's file voxel for voxel, with the scan's shape and affine."""
    path = scans[orientation]
    written = nib.load(cli_masks / path.name)
    expected = np.asanyarray(written.dataobj)
    img = nib.load(path)
    assert nib.aff2axcodes(img.affine) == tuple(orientation)
    model = medseg.load_model(segmenting_run, device="cpu")
    masks = {
        "array": medseg.segment(np.asanyarray(img.dataobj), model, affine=img.affine),
        "tensor": medseg.segment(torch.from_numpy(np.asanyarray(img.dataobj)), model, affine=img.affine),
        "image": medseg.segment(img, model),
        "path": medseg.segment(path, segmenting_run, device="cpu"),
        "list": medseg.segment(path, [segmenting_run / "best.pt"], device="cpu"),
    }
    assert expected.any()
    for how, mask in masks.items():
        assert isinstance(mask, nib.Nifti1Image), how
        assert mask.shape == img.shape and np.array_equal(mask.affine, img.affine), how
        assert np.array_equal(np.asanyarray(mask.dataobj), expected), how
    assert np.allclose(written.affine, masks["image"].affine, atol=1e-6)


def test_segment_returns_probabilities_on_the_scan_grid(segmenting_run, scans):
    model = medseg.load_model(segmenting_run / "best.pt", device="cpu", postprocess="none")
    mask, probs = medseg.segment(scans["LPS"], model, return_probabilities=True)
    labels = np.asanyarray(mask.dataobj)
    assert probs.dtype == np.float32 and probs.shape == (len(model.label_names), *mask.shape)
    total = probs.sum(0)  # 1 on the model grid (the body crop), fading to 0 at its edge (zero padding)
    inside = np.isclose(total, 1.0, atol=1e-4)
    assert (total <= 1 + 1e-4).all() and inside.mean() > 0.5 and (labels[total < 1e-6] == 0).all()
    assert labels.any() and (probs.argmax(0)[inside] == labels[inside]).mean() > 0.999  # but for ties


@pytest.mark.parametrize(
    ("image", "kwargs", "error", "message"),
    [
        (3, {}, TypeError, "image must be a NIfTI file path, a nibabel Nifti1Image, a 3D numpy array"),
        ({"image": 1}, {}, TypeError, "got dict"),
        (np.zeros((8, 8, 8)), {}, ValueError, "an array needs affine="),
        (np.zeros((8, 8, 8)), {"affine": np.eye(3)}, ValueError, "affine must be a 4×4 matrix"),
        (np.zeros((8, 8, 8)), {"affine": np.diag([1, 1, 0, 1])}, ValueError, "affine is not invertible"),
        (np.zeros((8, 8, 8)), {"affine": np.full((4, 4), np.nan)}, ValueError, "affine must be finite"),
        (np.zeros((8, 8)), {"affine": np.eye(4)}, ValueError, "expected a 3D array"),
        (np.zeros((8, 8, 8), complex), {"affine": np.eye(4)}, ValueError, "integer or floating-point voxels"),
        ("scan.nii.gz", {"affine": np.eye(4)}, ValueError, "affine= is for arrays"),
        ("missing.nii.gz", {}, ValueError, "missing.nii.gz: file not found"),
    ],
)
def test_wrong_images_get_a_clear_error(segmenting_run, image, kwargs, error, message):
    model = medseg.load_model(segmenting_run / "best.pt", device="cpu")
    with pytest.raises(error, match=message):
        medseg.segment(image, model, **kwargs)


def test_wrong_models_get_a_clear_error(segmenting_run, scans):
    with pytest.raises(TypeError, match="model must be a checkpoint file, a run or cross-validation folder"):
        medseg.segment(scans["LPS"], 42)
    with pytest.raises(TypeError, match=r"a bare network has no preprocessing plan: use .*from_network"):
        medseg.segment(scans["LPS"], medseg.create_network("unet", 1, 3, **SMALL))
    with pytest.raises(ValueError, match=r"nowhere\.pt: checkpoint not found"):
        medseg.load_model(segmenting_run / "nowhere.pt")
    model = medseg.load_model(segmenting_run, device="cpu", precision="fp32")
    with pytest.raises(
        ValueError, match=r"already loaded; precision 'bf16' .* must be given to medseg\.load_model"
    ):
        medseg.segment(scans["LPS"], model, precision="bf16")
    assert medseg.segment(scans["LPS"], model, precision="fp32").shape == nib.load(scans["LPS"]).shape


def test_evaluate_is_evaluate_pair_with_the_geometry_of_the_files(segmenting_run, tiny_dataset, tmp_path):
    image = tiny_dataset / "imagesTr" / "phantom_000.nii.gz"
    label = tiny_dataset / "labelsTr" / "phantom_000.nii.gz"
    ref = nib.load(label)
    pred = np.asanyarray(ref.dataobj).copy()
    pred[pred == 2] = 0  # a missed spleen
    pred[:3] = 1  # spurious liver
    pred_img = nib.Nifti1Image(pred, ref.affine)
    spacing = np.sqrt((ref.affine[:3, :3] ** 2).sum(0))
    expected = evaluate_pair(pred, np.asanyarray(ref.dataobj), spacing, tolerance=2.0)
    assert medseg.evaluate(pred_img, label) == expected
    assert medseg.evaluate(pred, np.asanyarray(ref.dataobj), spacing) == expected
    assert medseg.evaluate(torch.from_numpy(pred), ref, labels=[1])[1] == expected[1]
    assert expected[2]["dice"] == 0.0 and 0 < expected[1]["dice"] < 1
    with pytest.raises(ValueError, match=r"spacing= .* is needed for arrays"):
        medseg.evaluate(pred, pred)
    with pytest.raises(ValueError, match="different grids"):
        medseg.evaluate(nib.Nifti1Image(pred, np.eye(4)), label)
    with pytest.raises(TypeError, match="pred must be a numpy array"):
        medseg.evaluate([1, 2], label)
    mask = medseg.segment(image, segmenting_run, device="cpu")
    assert set(medseg.evaluate(mask, label)) <= set(range(1, 7))
