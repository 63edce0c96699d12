"""The fast inference path computes what the slow one did: body crop before resampling, the separable restore,
the prepared network (channels-last, bf16), the default precision, the case prefetching and the stage profile.

References are the code each part replaces (MONAI's eager preset, MONAI's resampler, the plain float32 network),
run on small phantoms; nothing here is timed (timings are ``python -m pipelines.bench_vs_monai``).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medseg.data.phantoms import generate_phantom
from medseg.inference.preprocess import _crop_box, body_box, oriented_view, preprocess
from medseg.transforms import infer_transforms

PLAN = {
    "orientation": "RAS",
    "spacing": [2.1, 1.7, 3.3],
    "intensity": {"mode": "window", "a_min": -1100.0, "a_max": 3000.0},
    "crop_foreground": True,
    "patch_size": [32, 32, 16],
}


def _padded(orientation: str, pad: tuple[tuple[int, int], ...], seed: int = 5) -> nib.Nifti1Image:
    """A phantom with air (-1024 HU) around it: the body fills part of the field of view, as in a clinical CT."""
    ph = generate_phantom(seed, (40, 36, 18), orientation=orientation)
    data = np.pad(ph.image.astype(np.int16), pad, constant_values=-1024)
    affine = ph.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.array([p[0] for p in pad], dtype=float)
    return nib.Nifti1Image(data, affine)


def _eager(reference: nib.Nifti1Image) -> MetaTensor:
    data = torch.from_numpy(np.asarray(reference.dataobj, dtype=np.float32))[None]
    image = MetaTensor(data, affine=torch.as_tensor(reference.affine, dtype=torch.float64))
    return infer_transforms(PLAN, load=False)({"image": image})["image"]


@pytest.mark.parametrize(
    "orientation, pad",
    [
        ("LPS", ((20, 25), (18, 30), (6, 9))),  # air on every side
        ("RAS", ((0, 30), (25, 0), (0, 7))),  # body touching three edges (border padding reaches them)
        ("LPS", ((0, 0), (0, 0), (0, 0))),  # no air at all
    ],
)
def test_body_crop_before_resampling_equals_the_eager_preset(orientation, pad):
    ref = _padded(orientation, pad)
    old = _eager(ref)
    new = preprocess(ref, infer_transforms(PLAN, load=False), slab_voxels=4000)
    assert new.shape == old.shape
    assert np.allclose(new.affine.numpy(), old.affine.numpy(), rtol=0, atol=1e-9)
    assert torch.equal(new.as_tensor(), old.as_tensor())


def test_only_the_body_part_of_the_model_grid_is_resampled():
    ref = _padded("LPS", ((30, 30), (30, 30), (10, 10)))
    orientation, spacing, crop = list(infer_transforms(PLAN, load=False).transforms)[:3]
    data = np.asarray(ref.dataobj)
    scan = MetaTensor(torch.from_numpy(data)[None], affine=torch.as_tensor(ref.affine))
    oriented = orientation({"image": scan})["image"]
    oriented_affine = oriented.affine.numpy()
    view = oriented_view(data, ref.affine, oriented_affine)
    assert np.array_equal(view, oriented[0].numpy())  # the eager Orientationd's values, without a copy
    assert np.shares_memory(view, data)
    planned = spacing({"image": oriented}, lazy=True)["image"]
    dst_affine = np.asarray(planned.peek_pending_affine())
    dst_shape = tuple(int(n) for n in planned.peek_pending_shape())
    box = _crop_box(crop, view, oriented_affine, dst_affine, dst_shape)
    assert np.prod([b.stop - b.start for b in box]) < 0.5 * np.prod(dst_shape)  # the air is not resampled
    whole = tuple(slice(0, n) for n in dst_shape)
    assert _crop_box(None, view, oriented_affine, dst_affine, dst_shape) == whole
    with pytest.raises(ValueError, match="not an axis permutation"):
        rotated = ref.affine @ np.array([[0.8, -0.6, 0, 0], [0.6, 0.8, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        oriented_view(data, ref.affine, rotated)


def test_body_box_by_slabs():
    data = np.full((9, 8, 40), -1000, dtype=np.int16)
    assert body_box(data, -500.0, slab=7) is None
    data[2, 5, 33] = 10
    data[6, 1, 17] = -499
    data[4, 4, 20] = -500  # not above the threshold
    assert body_box(data, -500.0, slab=7) == [(2, 6), (1, 5), (17, 33)]
