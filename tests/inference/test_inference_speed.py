"""The fast inference path computes what the slow one did: body crop before resampling, the separable restore,
the prepared network (channels-last, bf16), the default precision, the case prefetching and the stage profile.

References are the code each part replaces (MONAI's eager preset, MONAI's resampler, the plain float32 network),
run on small phantoms; nothing here is timed (timings are ``python -m benchmarks.bench_vs_monai``).
"""

from __future__ import annotations

import shutil
import threading

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medseg.batch.lanes import run_lanes
from medseg.batch.manifest import read_manifest
from medseg.batch.run import read_sidecar, segment_inputs
from medseg.config.segment import SegmentOptions
from medseg.data.phantoms import generate_phantom
from medseg.inference.fast import instance_norms_as_group_norms, prepare_network
from medseg.inference.preprocess import _crop_box, body_box, oriented_view, preprocess
from medseg.io import save_volume
from medseg.io.plan import Plan
from medseg.transforms import infer_transforms

PLAN = Plan.from_dict(
    {
        "orientation": "RAS",
        "spacing": [2.1, 1.7, 3.3],
        "intensity": {"mode": "window", "a_min": -1100.0, "a_max": 3000.0},
        "crop_foreground": True,
        "patch_size": [32, 32, 16],
    }
)


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


# ---------------------------------------------------------------- lanes: the next case loads while the network runs


def _recorded_lanes(prefetch: int, fail_load: int | None = None):
    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    started_next = {i: threading.Event() for i in range(6)}

    def note(what, i):
        with lock:
            events.append((what, i))

    def load(i):
        note("load", i)
        started_next[i].set()
        if i == fail_load:
            return "failed"
        return i * 10

    def compute(i, loaded):
        note("compute", i)
        if prefetch and i + 1 < 6:
            # the next case is being loaded while this one computes: wait for proof (bounded)
            assert started_next[i + 1].wait(10), f"load {i + 1} did not start during compute {i}"
        return loaded if loaded == "failed" else loaded + 1

    def write(i, computed):
        note("write", i)
        return computed

    results = list(run_lanes(list(range(6)), load, compute, write, prefetch))
    return results, events


@pytest.mark.parametrize("prefetch", [0, 1])
def test_lanes_keep_the_order_and_at_most_one_case_ahead(prefetch):
    results, events = _recorded_lanes(prefetch, fail_load=3)
    assert results == [(0, 1), (1, 11), (2, 21), (3, "failed"), (4, 41), (5, 51)]  # a failure is one case's
    for i in range(6):
        at = events.index(("compute", i))
        loads_before = {j for what, j in events[:at] if what == "load"}
        writes_before = {j for what, j in events[:at] if what == "write"}
        assert loads_before <= set(range(i + 2))  # never two cases ahead
        assert set(range(i - 1)) <= writes_before or prefetch == 0  # never two cases behind
        if prefetch == 0:
            assert loads_before == set(range(i + 1)) and writes_before == set(range(i))


def test_lanes_refuse_a_negative_prefetch():
    with pytest.raises(ValueError, match="prefetch"):
        list(run_lanes([1], lambda i: i, lambda i, x: x, lambda i, x: x, -1))


# ---------------------------------------------------------------- the batch: prefetching changes no output


def test_prefetch_changes_no_output_and_profile_prints_stages(tiny_run, tiny_dataset, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for i, src in enumerate(sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))):
        shutil.copyfile(src, inp / f"case_{i}.nii.gz")
    (inp / "broken.nii.gz").write_bytes(b"not a nifti file")
    outs = {}
    for prefetch in (0, 1):
        outs[prefetch] = tmp_path / f"out{prefetch}"
        lines: list[str] = []
        options = SegmentOptions(device="cpu", prefetch=prefetch, profile=True)
        report = segment_inputs(inp, outs[prefetch], tiny_run / "best.pt", options, log=lines.append)
        assert len(report.written) == 2 and list(report.failed) == [str(inp / "broken.nii.gz")]
        profiles = [line for line in lines if line.strip().startswith("profile ")]
        assert len(profiles) == 2, lines
        for name in ("read", "preprocess", "network", "restore", "write"):
            assert f"{name} " in profiles[0]
        side = read_sidecar(outs[prefetch] / "case_0.nii.gz")
        assert side["inference"]["seconds"]["write"] >= 0
    for name in ("case_0.nii.gz", "case_1.nii.gz"):
        a = np.asarray(nib.load(outs[0] / name).dataobj)
        b = np.asarray(nib.load(outs[1] / name).dataobj)
        assert np.array_equal(a, b)
    statuses = [[e["status"] for e in read_manifest(outs[p] / "manifest.jsonl")] for p in (0, 1)]
    assert statuses[0] == statuses[1] == ["failed", "written", "written"]


# ---------------------------------------------------------------- the prepared network


def _nets():
    from medseg.config import ModelConfig
    from medseg.nets.registry import build_network

    torch.manual_seed(0)
    yield "attention_unet", build_network(ModelConfig(filters=[4, 8, 16, 32, 64]), 1, 3).eval()
    yield (
        "unet_batch_norm",
        build_network(ModelConfig(name="unet", norm="batch", filters=[4, 8, 16]), 1, 3).eval(),
    )


@pytest.mark.parametrize("name, net", list(_nets()))
def test_group_norm_copy_computes_what_the_network_computes(name, net):
    x = torch.randn((2, 1, 32, 24, 16), generator=torch.Generator().manual_seed(1)) * 3 + 1
    copy = instance_norms_as_group_norms(net)
    kinds = {type(m).__name__ for m in copy.modules()}
    assert "InstanceNorm3d" not in kinds and ("GroupNorm" in kinds) == (name == "attention_unet")
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules()) == (name == "attention_unet")
    with torch.no_grad():  # the same function: equal to float64 round-off; float32 channels-last to its own
        assert torch.allclose(copy.double()(x.double()), net.double()(x.double()), rtol=0, atol=1e-10)
        ref, cl = net.float()(x), copy.float().to(memory_format=torch.channels_last_3d)
        assert torch.allclose(cl(x.contiguous(memory_format=torch.channels_last_3d)), ref, rtol=0, atol=1e-3)


def test_running_statistics_are_not_replaced():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.InstanceNorm3d(4, track_running_stats=True))
    assert isinstance(instance_norms_as_group_norms(net)[1], torch.nn.InstanceNorm3d)


def test_prepared_network_layout_precision_and_output():
    from medseg.config import ModelConfig
    from medseg.nets.registry import build_network

    torch.manual_seed(0)
    net = build_network(ModelConfig(filters=[4, 8, 16, 32, 64]), 1, 3).eval()
    x = torch.randn((2, 1, 32, 32, 16), generator=torch.Generator().manual_seed(2))
    cpu = torch.device("cpu")
    exact = prepare_network(net, cpu, None)
    fast = prepare_network(net, cpu, torch.bfloat16)
    assert not exact.channels_last and fast.channels_last  # bf16 on the CPU runs channels-last
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules())  # the model is left as it was
    with torch.no_grad():
        ref = net(x)
    out32, out16 = exact(x), fast(x)
    assert out32.dtype == out16.dtype == torch.float32 and out16.is_contiguous()
    assert torch.equal(out32, ref)  # fp32 is the network's own float32 path
    assert torch.allclose(out16, ref, atol=0.1) and not torch.equal(out16, ref)  # bf16 really ran
    assert (out16.argmax(1) == ref.argmax(1)).float().mean() > 0.98


def test_pools_in_bf16_give_the_float32_pools_numbers_bit_for_bit():
    from medseg.config import ModelConfig
    from medseg.inference.fast import PoolInInputPrecision
    from medseg.nets.registry import build_network

    torch.manual_seed(0)
    net = build_network(ModelConfig(filters=[4, 8, 16, 32, 64]), 1, 3).eval()
    x = torch.randn((2, 1, 32, 32, 16), generator=torch.Generator().manual_seed(3))
    fast = prepare_network(net, torch.device("cpu"), torch.bfloat16)
    wrapped = [m for m in fast.modules() if isinstance(m, PoolInInputPrecision)]
    assert len(wrapped) == 4 and not any(isinstance(m, PoolInInputPrecision) for m in net.modules())
    pooled = fast(x)
    for parent in list(fast.modules()):  # back to autocast's float32 pools
        for name, child in list(parent.named_children()):
            if isinstance(child, PoolInInputPrecision):
                setattr(parent, name, child.pool)
    assert torch.equal(pooled, fast(x))


# ---------------------------------------------------------------- the benchmarks' helpers


def test_speed_helpers_count_and_time(tmp_path):
    from benchmarks.speed import (
        clinical_size_ct,
        forward_gflop,
        gemm_peak_gflops,
        network_throughput,
        random_checkpoint,
    )
    from medseg.inference import model_from_checkpoint
    from medseg.io.checkpoint import load_checkpoint

    conv = torch.nn.Conv3d(1, 2, 3, padding=1)
    assert forward_gflop(conv, (4, 4, 4)) == pytest.approx(2 * 2 * 27 * 64 / 1e9)  # 2 FLOPs per MAC
    assert gemm_peak_gflops(torch.float32, n=64, repeats=1) > 0
    m = network_throughput(conv, (4, 4, 4), 2, None, repeats=1)
    assert m["gflop"] == pytest.approx(2 * forward_gflop(conv, (4, 4, 4))) and m["gflops"] > 0

    ckpt = random_checkpoint(tmp_path / "r.pt", 3, overrides=["model.filters=[4, 8, 16]"])
    net = model_from_checkpoint(load_checkpoint(ckpt), torch.device("cpu"), ckpt)
    assert sum(p.numel() for p in net.parameters()) > 0

    ph = generate_phantom(3, (30, 28, 12), orientation="LPS")
    src = save_volume(ph.image, ph.affine, tmp_path / "src.nii.gz", np.int16)
    spacing = np.sqrt((ph.affine[:3, :3] ** 2).sum(0))
    out = clinical_size_ct(src, tmp_path / "big.nii.gz", (64, 60, 20), spacing / 2)
    big = nib.load(out)
    data = np.asarray(big.dataobj)
    assert big.shape == (64, 60, 20) and data.dtype == np.int16
    assert np.allclose(np.sqrt((big.affine[:3, :3] ** 2).sum(0)), spacing / 2, atol=1e-4)
    assert data[0, 0, 0] == -1024 and data.max() > 0  # air around, the body inside


# ---------------------------------------------------------------- the separable restore


@pytest.mark.parametrize("orientation", ["LPS", "RAS"])
def test_separable_restore_equals_monai_where_the_model_grid_reaches(orientation):
    """Same labels as MONAI's sampler wherever the probabilities are more than round-off; outside the model
    grid MONAI's float64 sampler leaves ~1e-17 that its argmax turns into labels, the separable one exact 0."""
    from medseg.inference.restore import axis_zoom, restore_labels
    from medseg.transforms.resample import resample_to_reference

    oblique = _padded(orientation, ((14, 9), (11, 13), (4, 5)), seed=7)
    sign = -1.0 if orientation == "LPS" else 1.0  # as a scanner stores it: no rotation, LPS or RAS
    ref = nib.Nifti1Image(np.asarray(oblique.dataobj), np.diag([sign * 1.3, sign * 1.1, 2.9, 1.0]))
    image = preprocess(ref, infer_transforms(PLAN, load=False))
    assert axis_zoom(np.asarray(image.affine), ref.affine) is not None  # the plan's grids are an axis zoom
    assert (
        axis_zoom(np.asarray(preprocess(oblique, infer_transforms(PLAN, load=False)).affine), oblique.affine)
        is None
    )
    logits = torch.randn((5, *image.shape[1:]), generator=torch.Generator().manual_seed(3)) * 4
    probs = torch.softmax(torch.nn.functional.avg_pool3d(logits[None], 3, 1, 1)[0], 0)
    fast = restore_labels(probs, image.affine, ref.affine, ref.shape, slab_voxels=3000)
    slow = restore_labels(probs, image.affine, ref.affine, ref.shape, slab_voxels=3000, separable=False)
    resampled = resample_to_reference(probs, image.affine, ref.affine, ref.shape)
    largest = resampled.amax(0).numpy()
    reached = largest > 1e-6
    assert reached.sum() > 1000 and len(np.unique(fast[reached])) == 5
    assert np.array_equal(fast[reached], slow[reached])
    assert not fast[largest < 1e-12].any()  # beyond the model grid (MONAI: round-off) the separable gives 0


def test_timed_child_reports_its_own_peak_and_output(tmp_path):
    import os
    import sys

    from benchmarks.speed import timed_child

    big = "import numpy as np; a = np.ones(150 * 2**20 // 8); print('held', a.nbytes)"
    wall, peak_gb, output = timed_child([sys.executable, "-c", big], dict(os.environ), tmp_path / "a.log")
    assert output.startswith("held") and wall > 0 and 0.15 < peak_gb < 2
    small = [sys.executable, "-c", "print('small')"]
    _, small_gb, _ = timed_child(small, dict(os.environ), tmp_path / "b.log")
    assert small_gb < peak_gb - 0.1  # this child's own peak, not the largest child's so far
    with pytest.raises(SystemExit, match="exit 3"):
        timed_child([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), tmp_path / "c.log")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.log", "b.log", "c.log"]  # no .maxrss left


@pytest.mark.parametrize("orientation", ["LPS", "RAS"])
@pytest.mark.parametrize("classes", [2, 7])
def test_restore_by_cells_equals_resampling_every_voxel(orientation, classes):
    """Interpolating only where the eight corners' labels disagree gives the label map of resampling every
    voxel (the separable sampler, slab by slab), everywhere: inside, at organ borders and beyond the model
    grid; and it did skip most voxels (the point of it)."""
    import medseg.inference.restore as restore

    oblique = _padded(orientation, ((14, 9), (11, 13), (4, 5)), seed=11)
    sign = -1.0 if orientation == "LPS" else 1.0
    ref = nib.Nifti1Image(np.asarray(oblique.dataobj), np.diag([sign * 0.7, sign * 0.9, 2.9, 1.0]))
    image = preprocess(ref, infer_transforms(PLAN, load=False))
    logits = torch.randn((classes, *image.shape[1:]), generator=torch.Generator().manual_seed(5)) * 4
    probs = torch.softmax(torch.nn.functional.avg_pool3d(logits[None], 5, 1, 2)[0], 0)
    by_cells = restore.restore_labels(probs, image.affine, ref.affine, ref.shape)
    every = restore.restore_labels(probs, image.affine, ref.affine, ref.shape, slab_voxels=3000, cells=False)
    assert len(np.unique(by_cells)) == classes and np.array_equal(by_cells, every)
    zoom = restore.axis_zoom(np.asarray(image.affine), ref.affine)
    corners = [
        restore._axis_corners(zoom[0][a], zoom[1][a], ref.shape[a], probs.shape[1 + a]) for a in range(3)
    ]
    mixed = restore._cell_labels(restore._argmax(probs), corners) == restore.MIXED
    assert 0 < mixed.mean() < 0.5


def test_restore_by_cells_slab_by_slab_noise_and_one_class_everywhere():
    import medseg.inference.restore as restore

    probs = torch.softmax(torch.randn((3, 9, 8, 7), generator=torch.Generator().manual_seed(2)) * 3, 0)
    scale, offset = np.array([0.45, 0.6, 1.0]), np.array([-0.7, 0.2, -1.0])
    whole = restore.restore_labels_by_cells(probs, scale, offset, (24, 15, 9))
    one_slice = restore.restore_labels_by_cells(probs, scale, offset, (24, 15, 9), slab_voxels=24 * 15)
    assert np.array_equal(whole, one_slice)
    resampled = restore.separable_resample(probs, scale, offset, (24, 15, 9))
    assert np.array_equal(whole, restore._argmax(resampled))
    assert not whole[:, :, 0].any()  # the slice at z = -1 lies beyond the model grid: background
    one = torch.zeros((3, 9, 8, 7))
    one[1] = 1.0
    labels = restore.restore_labels_by_cells(one, scale, offset, (24, 15, 9))
    assert set(np.unique(labels[:, :, 1:])) == {1} or set(np.unique(labels[:, :, 1:])) == {0, 1}


def test_restore_by_cells_resamples_noisy_slabs_whole():
    """Labels that change every voxel (an untrained network): most slabs take the whole-slab path, with the same
    labels as resampling every voxel."""
    import medseg.inference.restore as restore

    probs = torch.softmax(torch.randn((5, 20, 18, 12), generator=torch.Generator().manual_seed(4)) * 3, 0)
    scale, offset = np.array([0.5, 0.5, 0.8]), np.array([0.0, 0.25, 0.1])
    shape = (38, 34, 14)
    corners = [restore._axis_corners(scale[a], offset[a], shape[a], probs.shape[1 + a]) for a in range(3)]
    assert (restore._cell_labels(restore._argmax(probs), corners) == restore.MIXED).mean() > 0.5
    labels = restore.restore_labels_by_cells(probs, scale, offset, shape, slab_voxels=38 * 34 * 2)
    assert np.array_equal(labels, restore._argmax(restore.separable_resample(probs, scale, offset, shape)))


def test_banded_products_equal_the_dense_ones(monkeypatch):
    """The block-by-block interpolation products give the dense products' values (zoom, shift and zero padding
    at both ends; blocks smaller than the matrix), and an axis left alone is an exact gather."""
    import medseg.inference.restore as restore

    values = torch.rand((3, 40, 11), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    coords = 0.37 * np.arange(150) - 3.3  # rows before, on and after the source
    matrix = restore.interpolation_matrix(coords, 40)
    assert matrix[0].sum() == 0 and matrix[-1].sum() == 0 and 0 < (matrix.sum(1) > 0).sum() < 150
    for band in (7, 64, 1000):
        monkeypatch.setattr(restore, "BAND", band)
        left = restore._along(matrix, values, last=False)
        right = restore._along(matrix, values.transpose(1, 2).contiguous(), last=True)
        torch.testing.assert_close(left, matrix @ values, rtol=1e-15, atol=1e-15)
        torch.testing.assert_close(right, values.transpose(1, 2) @ matrix.T, rtol=1e-15, atol=1e-15)
    shift = restore.interpolation_matrix(np.arange(12) - 1.0, 11)  # one row beyond each end, the rest ones
    assert torch.equal(restore._along(shift, values, last=True), values @ shift.T)
