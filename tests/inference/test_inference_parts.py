"""Direct tests of inference parts that the batch tests only exercise end to end: slab-wise resampling
(:mod:`medseg.inference.slabs`), the ensemble compatibility rules (:mod:`medseg.inference.ensemble`) and the
three lanes (:mod:`medseg.batch.lanes`)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from medseg.batch.lanes import run_lanes
from medseg.inference.ensemble import check_ensemble, check_single_channel, ensemble_mismatch
from medseg.inference.slabs import slab_ranges, slabs, source_window, translation
from medseg.io import InputError
from medseg.io.plan import Plan
from medseg.transforms.resample import resample_to_reference

# ------------------------------------------------------------------------------------------------ slabs


@pytest.mark.parametrize(("shape", "voxels", "expected"), [
    ((4, 4, 10), 16 * 3, [(0, 3), (3, 6), (6, 9), (9, 10)]),
    ((4, 4, 10), 1, [(k, k + 1) for k in range(10)]),  # at least one slice per slab
    ((4, 4, 10), 10**9, [(0, 10)]),
])  # fmt: skip
def test_slab_ranges_cover_the_last_axis_once(shape, voxels, expected):
    assert list(slab_ranges(shape, voxels)) == expected


def _oblique(spacing, origin, angle_deg: float) -> np.ndarray:
    a = np.radians(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def test_window_holds_every_source_voxel_the_slab_reads():
    """Hand-checkable case: a destination that is the source shifted by 3 voxels along x reads source
    columns 3..3+n-1, widened by the margin and clipped."""
    src = np.eye(4)
    dst = translation((3, 0, 0))
    window = source_window(src, (20, 10, 8), dst, (5, 10, 8), margin=2)
    assert window == (slice(1, 10), slice(0, 10), slice(0, 8))
    # a destination far outside the source still gets a non-empty window at the nearest edge
    far = source_window(src, (20, 10, 8), translation((100, 0, 0)), (5, 10, 8))
    assert far[0] == slice(19, 20)


def test_slab_by_slab_resampling_equals_the_whole_volume():
    """The property the module promises, checked against the whole-volume resampling (MONAI's
    ``SpatialResample`` through :func:`resample_to_reference`) on an oblique, anisotropic pair of grids."""
    rng = np.random.default_rng(0)
    src_shape, dst_shape = (23, 19, 11), (17, 21, 14)
    src_aff = np.diag([-1.3, -1.1, 2.5, 1.0]) @ translation((-20, -15, 0))
    dst_aff = _oblique((1.7, 1.4, 1.9), (8.0, 6.0, 1.0), 11.0)
    volume = rng.normal(size=(2, *src_shape)).astype(np.float32)

    def onto(data, affine, target_affine, shape):
        return resample_to_reference(data, affine, target_affine, shape).numpy()

    whole = onto(volume, src_aff, dst_aff, dst_shape)
    pieced = np.zeros_like(whole)
    count = 0
    for k0, k1, window, window_aff, slab_aff in slabs(
        src_aff, src_shape, dst_aff, dst_shape, slab_voxels=17 * 21 * 3
    ):
        pieced[..., k0:k1] = onto(
            volume[(slice(None), *window)], window_aff, slab_aff, (*dst_shape[:2], k1 - k0)
        )
        count += 1
    assert count == 5
    assert np.abs(whole).max() > 0.5, "the grids overlap: a real comparison"
    np.testing.assert_allclose(pieced, whole, rtol=0, atol=1e-5)  # float32 output


# --------------------------------------------------------------------------------------------- ensemble


def _ckpt(**plan):
    window = {"mode": "window", "a_min": -200.0, "a_max": 300.0}
    base = {"orientation": "RAS", "spacing": [1.5, 1.5, 2.0], "intensity": window, "patch_size": [16, 16, 8]}
    return {"labels": {"background": 0, "liver": 1}, "plan": Plan.from_dict({**base, **plan})}


def test_ensemble_members_must_share_labels_and_plan_entries():
    assert ensemble_mismatch(_ckpt(), _ckpt(spacing=[1.5, 1.5, 2.0 + 1e-12])) is None  # float noise is equal
    assert ensemble_mismatch(_ckpt(), _ckpt(mirror_axes=[0])) is None  # may differ
    assert ensemble_mismatch(_ckpt(), _ckpt(crop_foreground=True)) is None  # the default when absent
    assert "plans differ in spacing" in ensemble_mismatch(_ckpt(), _ckpt(spacing=[2.0, 2.0, 2.0]))
    assert "plans differ in in_channels" in ensemble_mismatch(_ckpt(), _ckpt(in_channels=2))
    other = {**_ckpt(), "labels": {"background": 0, "spleen": 1}}
    assert ensemble_mismatch(_ckpt(), other) == "label names differ (liver=1 vs spleen=1)"
    with pytest.raises(InputError, match=r"^a\.pt and c\.pt cannot be averaged: plans differ in orientation"):
        check_ensemble([("a.pt", _ckpt()), ("b.pt", _ckpt()), ("c.pt", _ckpt(orientation="LPS"))])


def test_multi_channel_models_are_refused_naming_input_checkpoint_and_channels():
    one = _ckpt()["plan"]
    check_single_channel(one, "m.pt", "ct.nii.gz")
    plan = replace(one, in_channels=2, channel_names=("CT", "native"))
    with pytest.raises(
        InputError, match=r"^ct\.nii\.gz: m\.pt was trained on 2 input channels \(CT, native\)"
    ):
        check_single_channel(plan, "m.pt", "ct.nii.gz")


# ------------------------------------------------------------------------------------------------ lanes


@pytest.mark.parametrize("prefetch", [0, 1])
def test_lanes_keep_order_and_overlap_only_with_prefetch(prefetch):
    """Results come back in order; with prefetch the loader and writer run while ``compute`` does, and no
    more than one case is ahead of the network."""
    events: list[tuple[str, int]] = []
    lock = threading.Lock()

    def note(what, item):
        with lock:
            events.append((what, item))

    def load(i):
        note("load", i)
        return i * 10

    def compute(i, loaded):
        note("compute", i)
        time.sleep(0.02)
        return loaded + 1

    def write(i, computed):
        note("write", i)
        return computed

    out = list(run_lanes(list(range(5)), load, compute, write, prefetch))
    assert out == [(i, i * 10 + 1) for i in range(5)]
    loads_before_compute = [
        sum(1 for e in events[: events.index(("compute", i))] if e[0] == "load") for i in range(5)
    ]
    if prefetch:
        assert all(n <= i + 2 for i, n in enumerate(loads_before_compute))  # at most one case ahead
        assert events.index(("load", 1)) < events.index(("write", 0))  # overlapped
    else:
        assert events == [(w, i) for i in range(5) for w in ("load", "compute", "write")]


def test_an_escaping_error_stops_the_lanes_after_the_work_in_flight():
    written = []

    def compute(i, loaded):
        if i == 2:
            raise RuntimeError("boom")
        return loaded

    with pytest.raises(RuntimeError, match="boom"):
        for _ in run_lanes(list(range(5)), lambda i: i, compute, lambda i, c: written.append(i), 1):
            pass
    assert written == [0, 1]
