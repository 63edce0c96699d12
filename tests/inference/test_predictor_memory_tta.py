"""Inference in bounded memory, mirroring, ensembles, postprocessing, precision and the CUDA fallback.

References are independent: the slab restore and the slab preprocessing are compared with MONAI's whole-volume
resampling (the code they replace); the left/right swap with a toy network whose output is known by
construction; postprocessing with scipy's connected components; the ensemble with the single model.
"""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from medseg.data.phantoms import generate_phantom, phantom_affine
from medseg.inference import ComponentRule, Predictor, restore_labels
from medseg.inference.preprocess import preprocess
from medseg.inference.rules import clean_labels, component_rules
from medseg.inference.sliding import (
    CPU_STITCHING_WARNING,
    SlidingWindow,
    sliding_window_logits,
    softmax_,
    with_cpu_stitching,
)
from medseg.inference.tta import (
    SwapTableError,
    average_probabilities,
    choose_flips,
    sagittal_axis,
    swap_table,
)
from medseg.io import InputError, save_volume
from medseg.io.checkpoint import load_checkpoint, save_checkpoint
from medseg.io.plan import Plan
from medseg.transforms import infer_transforms
from medseg.transforms.resample import resample_to_reference

NAMES = {"background": 0, "liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4}
PLAN = Plan.from_dict(
    {
        "orientation": "RAS",
        "spacing": [2.1, 1.7, 3.3],
        "intensity": {
            "mode": "window",
            "a_min": -1100.0,
            "a_max": 3000.0,
        },  # wide: no clipping hides a change
        "crop_foreground": True,
        "patch_size": [32, 32, 16],
    }
)


def _scan(kind: str) -> nib.Nifti1Image:
    """Phantom scans: RAS, LPS, strongly oblique LPS, and very anisotropic RAS."""
    if kind in ("RAS", "LPS"):
        ph = generate_phantom(5, (56, 50, 22), orientation=kind)
        return nib.Nifti1Image(ph.image.astype(np.int16), ph.affine)
    rng = np.random.default_rng(3)
    ph = generate_phantom(6, (56, 50, 22), orientation="LPS")
    if kind == "oblique":
        affine = phantom_affine((56, 50, 22), (1.1, 0.9, 2.7), "LPS", rng, max_oblique_deg=25)
    else:  # anisotropic
        affine = phantom_affine((56, 50, 22), (0.6, 1.4, 5.0), "RAS", rng, max_oblique_deg=0)
    return nib.Nifti1Image(ph.image.astype(np.int16), affine)


def _eager(reference: nib.Nifti1Image, plan: Plan) -> MetaTensor:
    """The inference preset run the old way: whole volume, float32 copy of the scan."""
    data = torch.from_numpy(np.asarray(reference.dataobj, dtype=np.float32))[None]
    image = MetaTensor(data, affine=torch.as_tensor(reference.affine, dtype=torch.float64))
    return infer_transforms(plan, load=False)({"image": image})["image"]


@pytest.mark.parametrize("kind", ["RAS", "LPS", "oblique", "anisotropic"])
def test_slab_preprocessing_equals_the_eager_preset(kind):
    ref = _scan(kind)
    old = _eager(ref, PLAN)
    for slab_voxels in (2**21, 3000):  # one slab; many slabs of a few slices
        new = preprocess(ref, infer_transforms(PLAN, load=False), slab_voxels=slab_voxels)
        assert new.shape == old.shape and new.dtype == torch.float32
        assert np.allclose(new.affine.numpy(), old.affine.numpy(), rtol=0, atol=1e-9)
        assert torch.equal(new.as_tensor(), old.as_tensor())


@pytest.mark.parametrize("kind", ["RAS", "LPS", "oblique", "anisotropic"])
def test_slab_restore_equals_whole_volume_restore(kind):
    """Labels identical to resampling all channels at once (the old restore), for any slab size."""
    ref = _scan(kind)
    image = _eager(ref, PLAN)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((7, *image.shape[1:]), generator=gen) * 4
    probs = torch.softmax(torch.nn.functional.avg_pool3d(logits[None], 3, 1, 1)[0], 0)
    whole = resample_to_reference(probs, image.affine, ref.affine, ref.shape).argmax(0).numpy()
    assert len(np.unique(whole)) == 7  # every class occurs: the comparison means something
    for slab_voxels in (2**21, ref.shape[0] * ref.shape[1], 100):
        labels = restore_labels(probs, image.affine, ref.affine, ref.shape, slab_voxels=slab_voxels)
        assert labels.dtype == np.uint8 and labels.shape == ref.shape
        assert np.array_equal(labels, whole), (slab_voxels, int((labels != whole).sum()))


def test_restore_outside_the_model_grid_is_background():
    ref = _scan("LPS")
    affine = np.asarray(_eager(ref, PLAN).affine)
    probs = torch.zeros((3, 4, 4, 4))
    probs[2] = 1.0  # class 2 everywhere on a small model grid
    labels = restore_labels(probs, affine, ref.affine, ref.shape)
    whole = resample_to_reference(probs, affine, ref.affine, ref.shape).argmax(0).numpy()
    assert np.array_equal(labels, whole) and 0 < (labels == 2).sum() < labels.size


# ---------------------------------------------------------------- mirroring: the left/right swap


def test_swap_table_pairs_sides_case_insensitively():
    names = {
        "background": 0,
        "Kidney_Left": 1,
        "kidney_right": 2,
        "left_lung": 3,
        "right-lung": 4,
        "adrenal_l": 5,
    }
    names["ADRENAL_R"] = 6
    names["liver"] = 7
    assert swap_table(names) == {0: 0, 1: 2, 2: 1, 3: 4, 4: 3, 5: 6, 6: 5, 7: 7}
    with pytest.raises(SwapTableError, match=r"kidney_left.*'right' partner"):
        swap_table({"background": 0, "kidney_left": 1, "liver": 2})
    with pytest.raises(SwapTableError, match="more than one side"):
        swap_table({"left_right": 1})


def test_flips_never_swap_sides_silently():
    paired = {"background": 0, "kidney_right": 1, "kidney_left": 2}
    assert choose_flips(paired, "RAS", [])[:2] == ([(), (0,)], {0: 0, 1: 2, 2: 1})
    flips, swap, _ = choose_flips(paired, "RAS", [1, 2])
    assert flips == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)] and swap is not None
    lone = {"background": 0, "kidney_left": 1}
    flips, swap, note = choose_flips(lone, "RAS", [0, 1, 2])  # trained with flips, yet lateralised labels
    assert flips == [(), (1,), (2,), (1, 2)] and swap is None and "kidney_left" in note
    assert sagittal_axis("ASR") == 2 and choose_flips(lone, "ASR", [])[0] == [()]


class ToySides(torch.nn.Module):
    """Logits known by construction: bright voxels are ``kidney_right`` (channel 1) in the lower half of axis 0
    and ``kidney_left`` (channel 2) in the upper half; the rest background (channel 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x[:, 0] > 0.5).float()
        upper = (torch.arange(x.shape[2]) >= x.shape[2] // 2).float()[None, :, None, None]
        return 8 * torch.stack([1 - bright, bright * (1 - upper), bright * upper], dim=1)


def test_sagittal_flip_swaps_the_channels_of_each_pair():
    """Flipped, the toy sees the right kidney in the upper half and calls it left; flipping back *and swapping*
    restores the unmirrored answer exactly. Without the swap, left and right would be averaged into a tie."""
    image = (torch.rand((1, 16, 10, 6), generator=torch.Generator().manual_seed(1)) > 0.6).float()
    toy = ToySides()

    def predict(img: torch.Tensor) -> torch.Tensor:
        return torch.softmax(toy(img[None])[0], 0)

    plain = predict(image)
    table = swap_table({"background": 0, "kidney_right": 1, "kidney_left": 2})
    mirrored = average_probabilities(image, [predict], [(), (0,)], table, lr_axis=0)
    assert torch.allclose(mirrored, plain, atol=1e-6)
    unswapped = average_probabilities(image, [predict], [(), (0,)], None, lr_axis=0)
    bright = image[0] > 0.5
    assert torch.allclose(unswapped[1][bright], unswapped[2][bright])  # what the swap prevents


def test_average_weights_every_pass_equally():
    image = torch.zeros((1, 4, 4, 4))
    a = torch.softmax(torch.randn((3, 4, 4, 4), generator=torch.Generator().manual_seed(2)), 0)
    b = torch.softmax(torch.randn((3, 4, 4, 4), generator=torch.Generator().manual_seed(3)), 0)
    mean = average_probabilities(image, [lambda _: a.clone(), lambda _: b.clone()], [()])
    assert torch.allclose(mean, (a + b) / 2, atol=1e-7)


# ---------------------------------------------------------------- sliding window, precision, CUDA fallback


def test_in_place_softmax_matches_torch():
    x = torch.randn((5, 6, 7, 3), generator=torch.Generator().manual_seed(4)) * 20
    assert torch.allclose(softmax_(x.clone()), torch.softmax(x, 0), atol=1e-7)


def test_out_of_memory_on_cuda_retries_with_cpu_stitching():
    """No GPU here: the fallback's control flow with a stand-in for the sliding window (the one stand-in)."""
    calls = []

    def run(out_device: torch.device) -> str:
        calls.append(out_device.type)
        if out_device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.5 GiB")
        return "stitched"

    assert with_cpu_stitching(run, torch.device("cuda")) == ("stitched", [CPU_STITCHING_WARNING])
    assert calls == ["cuda", "cpu"]
    calls.clear()
    assert with_cpu_stitching(run, torch.device("cpu")) == ("stitched", []) and calls == ["cpu"]

    def always(out_device: torch.device) -> str:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        with_cpu_stitching(always, torch.device("cuda"))


def test_sliding_window_devices_and_autocast_on_cpu():
    conv = torch.nn.Conv3d(1, 3, 3, padding=1)
    image = torch.randn((1, 1, 20, 18, 9), generator=torch.Generator().manual_seed(5))
    window = SlidingWindow((16, 16, 8), overlap=0.25, sw_batch_size=3)
    fp32 = sliding_window_logits(conv, image, window, sw_device="cpu", out_device="cpu")
    bf16 = sliding_window_logits(conv, image, window, autocast_dtype=torch.bfloat16)
    assert fp32.dtype == bf16.dtype == torch.float32 and fp32.shape == (1, 3, 20, 18, 9)
    assert torch.allclose(fp32, bf16, atol=0.1) and not torch.equal(fp32, bf16)  # bf16 really ran
    # a bare roi_size is a window with the default overlap / batch / mode
    default = sliding_window_logits(conv, image, [16, 16, 8])
    assert torch.equal(default, sliding_window_logits(conv, image, SlidingWindow((16, 16, 8), 0.5, 2)))
    with pytest.raises(TypeError):
        sliding_window_logits(conv, image, window, 0.25)  # overlap is a field of the window


# ---------------------------------------------------------------- the predictor on the tiny trained model


@pytest.fixture(scope="module")
def case(tiny_run, tmp_path_factory):
    ph = generate_phantom(41, (48, 44, 22), orientation="LPS")
    return save_volume(ph.image, ph.affine, tmp_path_factory.mktemp("case") / "lps.nii.gz", np.int16)


@pytest.fixture(scope="module")
def single(tiny_run, case):
    predictor = Predictor(tiny_run / "best.pt", device="cpu", postprocess="none")
    return predictor, predictor.predict(case)


def _variant(tiny_run, tmp_path, name, edit) -> object:
    ckpt = load_checkpoint(tiny_run / "best.pt")
    edit(ckpt)
    return save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "version")}, tmp_path / name)


def test_ensemble_of_one_checkpoint_twice_is_that_checkpoint(tiny_run, case, single):
    predictor, alone = single
    pair = Predictor([tiny_run / "best.pt"] * 2, device="cpu", postprocess="none")
    twice = pair.predict(case)
    assert np.array_equal(twice.labels, alone.labels)
    digest = hashlib.sha256((tiny_run / "best.pt").read_bytes()).hexdigest()
    assert pair.checkpoint_sha256 == [digest, digest] and predictor.checkpoint_sha256 == [digest]
    assert twice.info["checkpoints"] == [str(tiny_run / "best.pt")] * 2


def test_ensemble_members_may_differ_in_architecture_not_in_labels_or_plan(tiny_run, case, tmp_path):
    from medseg.config import load_config
    from medseg.nets.registry import build_network

    def as_unet(ckpt):
        ckpt["config"]["model"]["name"] = "unet"
        cfg = load_config(None, ["model.name=unet", "model.filters=[4, 8, 16, 32, 64]"])
        ckpt["model"] = build_network(cfg.model, 1, len(ckpt["labels"])).state_dict()

    unet = _variant(tiny_run, tmp_path, "unet.pt", as_unet)
    pred = Predictor([tiny_run / "best.pt", unet], device="cpu").predict(case)
    assert pred.labels.shape == (48, 44, 22)

    def rename(ckpt):
        ckpt["labels"] = {("kidney_l" if k == "kidney_left" else k): v for k, v in ckpt["labels"].items()}

    def respace(ckpt):
        ckpt["plan"]["spacing"] = [s * 1.5 for s in ckpt["plan"]["spacing"]]

    for name, edit, cause in (("names.pt", rename, "label names differ"), ("space.pt", respace, "spacing")):
        other = _variant(tiny_run, tmp_path, name, edit)
        with pytest.raises(InputError, match=f"best.pt and .*{name} cannot be averaged: .*{cause}"):
            Predictor([tiny_run / "best.pt", other], device="cpu")


def test_mirroring_keeps_the_geometry_and_records_the_flips(tiny_run, case):
    pred = Predictor(tiny_run / "best.pt", device="cpu", tta=True).predict(case)
    ref = nib.load(case)
    assert pred.labels.shape == ref.shape and np.array_equal(pred.reference.affine, ref.affine)
    assert pred.labels.dtype == np.uint8 and pred.labels.max() < 7
    assert pred.info["tta_flips"] == [[], [0]]  # no mirror axes in training; kidneys pair up: sagittal only


def test_clean_labels_matches_scipy_components():
    labels = np.zeros((12, 10, 8), np.uint8)
    labels[0:3, 0:3, 0:3] = 1  # 27 voxels
    labels[6:8, 6:8, 0:2] = 1  # 8
    labels[11, 9, 7] = 1  # 1
    labels[0:2, 8:10, 5:8] = 2  # 12
    labels[9, 0, 0] = 2  # 1
    rules = component_rules(
        {"1": {"largest_only": True, "min_ml": 0.0}, "spleen": {"min_ml": 0.01}}, NAMES, "t"
    )
    assert rules == {1: ComponentRule(largest_only=True), 2: ComponentRule(min_ml=0.01)}
    cleaned, report = clean_labels(labels, rules, (2.0, 1.0, 1.0), NAMES)  # 0.002 mL per voxel
    expected = labels.copy()
    for value, keep in ((1, lambda sizes: sizes == sizes.max()), (2, lambda sizes: sizes * 0.002 >= 0.01)):
        comp, n = ndimage.label(labels == value, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
        for c in np.flatnonzero(~keep(sizes)) + 1:
            expected[comp == c] = 0
    assert np.array_equal(cleaned, expected)
    assert report == {
        "liver": {"label": 1, "largest_only": True, "min_ml": 0.0, "removed_voxels": 9},
        "spleen": {"label": 2, "largest_only": False, "min_ml": 0.01, "removed_voxels": 1},
    }
    with pytest.raises(InputError, match="t: postprocessing rule for unknown label 'lung'"):
        component_rules({"lung": {"largest_only": True}}, NAMES, "t")
    with pytest.raises(InputError, match="is not"):
        component_rules({1: {"largest": True}}, NAMES, "t")


def test_postprocessing_auto_none_and_override(tiny_run, case, tmp_path):
    """A network that says "liver" everywhere on its grid (head weights 0, bias for class 1): the rules it
    carries are applied by default, not with ``none``, and a mapping replaces them."""

    def liver_everywhere(ckpt):
        ckpt["model"]["head.weight"] = torch.zeros_like(ckpt["model"]["head.weight"])
        ckpt["model"]["head.bias"] = torch.tensor([0.0, 10, 0, 0, 0, 0, 0])
        ckpt["postprocess"] = {"1": {"largest_only": False, "min_ml": 1e9}}

    path = _variant(tiny_run, tmp_path, "liver.pt", liver_everywhere)
    raw = Predictor(path, device="cpu", postprocess="none").predict(case)
    liver = int((raw.labels == 1).sum())
    assert liver > 1000 and set(np.unique(raw.labels)) == {0, 1} and raw.info["postprocess"] == {}
    auto = Predictor(path, device="cpu").predict(case)
    assert not auto.labels.any()
    assert auto.info["postprocess"] == {
        "liver": {"label": 1, "largest_only": False, "min_ml": 1e9, "removed_voxels": liver}
    }
    kept = Predictor(path, device="cpu", postprocess={"liver": ComponentRule(largest_only=True)}).predict(
        case
    )
    assert np.array_equal(kept.labels, raw.labels)  # one component: the largest is all of it
    assert kept.info["postprocess"]["liver"]["removed_voxels"] == 0
    with pytest.raises(ValueError, match="valid values: auto, none"):
        Predictor(path, device="cpu", postprocess="largest")


def test_predict_accepts_an_image_already_read(case, single):
    predictor, from_path = single
    stored = nib.load(case)
    image = nib.Nifti1Image(np.asarray(stored.dataobj), stored.affine)  # in memory, as the DICOM reader gives
    pred = predictor.predict(image)
    assert pred.reference is image and np.array_equal(pred.labels, from_path.labels)
    with pytest.raises(InputError, match="expected a 3D volume"):
        predictor.predict(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)))


def test_bf16_agrees_with_fp32(tiny_run, case):
    fp32 = Predictor(tiny_run / "best.pt", device="cpu", precision="fp32", postprocess="none").predict(case)
    bf16 = Predictor(tiny_run / "best.pt", device="cpu", precision="bf16", postprocess="none").predict(case)
    assert bf16.info["precision"] == "bf16" and fp32.info["precision"] == "fp32"
    for v in range(1, 7):
        a, b = fp32.labels == v, bf16.labels == v
        if a.any() or b.any():
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.99, v
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Predictor(tiny_run / "best.pt", device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="valid values: auto, fp32, bf16, fp16"):
        Predictor(tiny_run / "best.pt", device="cpu", precision="fp8")


def test_info_reports_stages(single):
    _, pred = single
    assert set(pred.info["seconds"]) == {"read", "preprocess", "network", "restore", "postprocess", "total"}
    assert pred.info["tta_flips"] == [[]] and len(pred.info["model_grid"]) == 3
