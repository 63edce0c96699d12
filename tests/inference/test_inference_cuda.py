"""The CUDA path: windows on the GPU under fp16/bf16 autocast, stitching on the GPU when it fits, else on the CPU.

The tests marked ``cuda`` run whenever ``torch.cuda.is_available()`` (they compare the GPU's masks with the CPU's
on a small phantom) and are skipped with that reason otherwise; the choice of the stitching device is plain
arithmetic on reported free memory and is tested everywhere with the driver's answer stood in.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medseg.data.phantoms import generate_phantom
from medseg.inference import Predictor, sliding
from medseg.inference.predictor import autocast_dtype
from medseg.inference.sliding import CPU_STITCHING_WARNING, stitching_bytes, stitching_device
from medseg.io import save_volume
from medseg.metrics.overlap import dice_per_label

cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


def test_stitching_goes_to_the_cpu_when_the_gpu_is_too_small(monkeypatch):
    shape, classes = (200, 180, 160), 7
    need = stitching_bytes(shape, classes)
    assert need == 4 * (7 + 2) * 200 * 180 * 160
    gpu = torch.device("cuda", 0)
    for free, expected in [(need + sliding.ACTIVATION_RESERVE_BYTES, gpu), (need, torch.device("cpu"))]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 80 * 2**30))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
        assert stitching_device(gpu, shape, classes) == expected
    cpu = torch.device("cpu")
    assert stitching_device(cpu, shape, classes) == cpu  # never asks the driver on the CPU


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    ph = generate_phantom(43, (48, 44, 22), orientation="LPS")
    return save_volume(ph.image, ph.affine, tmp_path_factory.mktemp("cuda_case") / "lps.nii.gz", np.int16)


def _dice(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    return dice_per_label(a, b, range(1, int(max(a.max(), b.max())) + 1))


@cuda
def test_cuda_default_precision_is_a_half_type():
    dtype, name = autocast_dtype("auto", torch.device("cuda"))
    assert dtype in (torch.bfloat16, torch.float16) and name in ("bf16", "fp16")


@cuda
def test_cuda_masks_agree_with_the_cpu(tiny_run, case):
    cpu = Predictor(tiny_run / "best.pt", device="cpu", precision="fp32", postprocess="none").predict(case)
    exact = Predictor(tiny_run / "best.pt", device="cuda", precision="fp32", postprocess="none").predict(case)
    fast = Predictor(tiny_run / "best.pt", device="cuda", postprocess="none").predict(case)
    assert exact.labels.shape == fast.labels.shape == cpu.labels.shape
    assert np.array_equal(exact.reference.affine, cpu.reference.affine)
    assert min(_dice(exact.labels, cpu.labels).values()) >= 0.999  # fp32, no TF32: the CPU's masks
    assert min(_dice(fast.labels, cpu.labels).values()) >= 0.99  # the fast default's bound
    assert fast.info["precision"] in ("bf16", "fp16") and not fast.warnings


@cuda
def test_cuda_stitching_on_the_cpu_gives_the_same_result(tiny_run, case, monkeypatch):
    predictor = Predictor(tiny_run / "best.pt", device="cuda", precision="fp32", postprocess="none")
    on_gpu = predictor.predict(case)
    monkeypatch.setattr(
        "medseg.inference.predictor.stitching_device", lambda device, shape, classes: torch.device("cpu")
    )
    on_cpu = predictor.predict(case)
    assert on_cpu.warnings == [CPU_STITCHING_WARNING] and not on_gpu.warnings
    assert min(_dice(on_cpu.labels, on_gpu.labels).values()) >= 0.999


@cuda
def test_cuda_windows_stay_on_the_gpu(tiny_run):
    """GPU stitching: the image goes to the GPU once, the windows are cut there (no copy per window)."""
    predictor = Predictor(tiny_run / "best.pt", device="cuda", precision="fp32", postprocess="none")
    seen = []
    network = predictor.networks[0]
    forward = network.forward

    def spy(windows):
        seen.append(windows.device.type)
        return forward(windows)

    network.forward = spy
    image = MetaTensor(torch.rand((1, 70, 60, 40)))
    probs = predictor.probabilities(image)
    assert probs.device.type == "cpu" and probs.shape[1:] == image.shape[1:]
    assert len(seen) > 1 and set(seen) == {"cuda"}
    assert torch.allclose(probs.sum(0), torch.ones(()), atol=1e-4)
