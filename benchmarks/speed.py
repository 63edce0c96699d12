"""Measuring inference speed: a random-weights checkpoint, the CPU's GEMM peak, a network's FLOPs and throughput.

The benchmark scripts (``python -m benchmarks.bench_segment``, ``python -m benchmarks.bench_vs_monai``) use these
so that every ratio they print is measured in the same run, on the same machine, under the same load:

* :func:`clinical_size_ct` — a real CT resampled to clinical voxels and padded with air to a clinical size;
* :func:`random_checkpoint` — a checkpoint of a registered network with random weights and a hand-made plan
  (nothing trained: it measures time and memory, not accuracy);
* :func:`gemm_peak_gflops` — the best of a few ``torch.matmul`` of two large square matrices in a dtype: the
  practical peak of this CPU (or GPU) for dense work in that precision;
* :func:`forward_gflop` — FLOPs of one forward pass (``torch.utils.flop_counter``: multiply–add = 2 FLOPs,
  convolutions and matrix products only);
* :func:`network_throughput` — seconds per forward of a window batch through the network as the predictor runs
  it (:func:`medseg.inference.fast.prepare_network`, the same autocast), and the GFLOP/s that gives;
* :func:`timed_child` — a command in a child process: its wall time, its own peak RSS and its output.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

#: Label names of the benchmarks' checkpoints, in index order; ``classes`` takes the first K.
ORGANS = ("background", "liver", "spleen", "kidney_right", "kidney_left", "aorta", "pancreas", "stomach")


def clinical_size_ct(
    source: Path,
    out: Path,
    shape: Sequence[int] = (512, 512, 300),
    spacing: Sequence[float] = (0.8, 0.8, 1.5),
    shift: Sequence[int] = (0, 0, 0),
) -> Path:
    """``source`` resampled (SimpleITK, linear, int16) to ``spacing`` mm and padded with air (-1024 HU) — or
    cropped — to ``shape`` voxels, centred then moved by ``shift`` voxels; written to ``out`` (NIfTI). The
    voxel axes keep the source's order and directions (an LPS-stored CT stays LPS-stored)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source))
    spacing = tuple(float(s) for s in spacing)
    size = [round(n * s / t) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing, strict=True)]
    image = sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing, image.GetDirection(), -1024,
        sitk.sitkInt16,
    )  # fmt: skip
    crop_lo = [max(n - t, 0) // 2 for n, t in zip(size, shape, strict=True)]
    crop_hi = [max(n - t, 0) - lo for n, t, lo in zip(size, shape, crop_lo, strict=True)]
    image = sitk.Crop(image, crop_lo, crop_hi)
    size = image.GetSize()
    pad_lo = [min(max((t - n) // 2 + d, 0), t - n) for n, t, d in zip(size, shape, shift, strict=True)]
    pad_hi = [t - n - lo for n, t, lo in zip(size, shape, pad_lo, strict=True)]
    sitk.WriteImage(sitk.ConstantPad(image, pad_lo, pad_hi, -1024), str(out))
    return out


def random_checkpoint(
    path: Path,
    classes: int,
    spacing: float = 1.5,
    seed: int = 0,
    overrides: Sequence[str] = (),
) -> Path:
    """Write a checkpoint of the default network (or ``overrides`` of the default config) with random weights.

    The plan is what :func:`medseg.planning.fingerprint.make_plan` would write for ``spacing`` mm isotropic voxels, the
    config's CT window, body crop, the config's patch; ``classes`` labels from :data:`ORGANS` (then
    ``organ_<i>``). Returns the path written.
    """
    from medseg.config import config_to_dict, load_config
    from medseg.io.checkpoint import save_checkpoint
    from medseg.nets.registry import build_network

    names = list(ORGANS[:classes]) + [f"organ_{i}" for i in range(len(ORGANS), classes)]
    labels = {name: i for i, name in enumerate(names)}
    cfg = load_config(None, [f"preprocess.spacing=[{spacing}, {spacing}, {spacing}]", *overrides])
    torch.manual_seed(seed)
    model = build_network(cfg.model, 1, classes)
    lo, hi = cfg.preprocess.intensity.window
    plan = {
        "orientation": cfg.preprocess.orientation,
        "spacing": [float(spacing)] * 3,
        "intensity": {"mode": "window", "a_min": float(lo), "a_max": float(hi)},
        "crop_foreground": True,
        "patch_size": [int(p) for p in cfg.augment.patch_size],
        "labels": labels,
        "in_channels": 1,
        "mirror_axes": [],
    }
    state = {"model": model.state_dict(), "config": config_to_dict(cfg), "plan": plan, "labels": labels}
    return save_checkpoint(state, path)


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, oneDNN primitive creation, weight casts
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_peak_gflops(
    dtype: torch.dtype, n: int | None = None, repeats: int = 20, device: str = "cpu"
) -> float:
    """GFLOP/s of the fastest of ``repeats`` ``n×n @ n×n`` products in ``dtype`` (``2 n³`` FLOPs each);
    ``n`` defaults to 2048 on the CPU and 8192 on a GPU (large enough to keep it busy). Twenty products by
    default, so that a moment of load from another process cannot halve the peak and inflate every
    percentage computed from it (the measurement behind that choice: ``docs/speed.md``, section
    ``benchmarks.speed``)."""
    n = n or (2048 if torch.device(device).type == "cpu" else 8192)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn((n, n), generator=gen, device=device).to(dtype)
    b = torch.randn((n, n), generator=gen, device=device).to(dtype)

    def product() -> None:
        torch.matmul(a, b)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    return 2 * n**3 / _best_seconds(product, repeats) / 1e9


def forward_gflop(model: torch.nn.Module, patch: Sequence[int], in_channels: int = 1) -> float:
    """GFLOP of one forward pass of ``model`` on one ``patch`` (batch 1), counted, not timed."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters())
    x = torch.zeros((1, in_channels, *patch), device=param.device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() / 1e9


def network_throughput(
    model: torch.nn.Module,
    patch: Sequence[int],
    batch: int,
    precision: torch.dtype | None,
    repeats: int = 3,
    in_channels: int = 1,
) -> dict[str, float]:
    """``{"seconds", "gflop", "gflops"}``: the fastest of ``repeats`` forwards of ``batch`` windows of ``patch``.

    The network runs as the predictor runs it (:func:`medseg.inference.fast.prepare_network` for the device
    and ``precision``, the autocast dtype or None for float32); ``gflop`` is the whole batch's count.
    """
    from medseg.inference.fast import prepare_network

    device = next(model.parameters()).device
    gflop = forward_gflop(model, patch, in_channels) * batch
    net = prepare_network(model, device, precision)
    x = torch.randn((batch, in_channels, *patch), generator=torch.Generator().manual_seed(0)).to(device)

    def forward() -> None:
        net(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    seconds = _best_seconds(forward, repeats)
    return {"seconds": seconds, "gflop": gflop, "gflops": gflop / seconds}


#: The small process between a benchmark and the command it times (see :func:`timed_child`).
_RSS_WRAPPER = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, status, usage = os.wait4(p.pid, 0); "
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(status))"
)


def timed_child(cmd: Sequence[str], env: dict[str, str], log: Path) -> tuple[float, float, str]:
    """Run ``cmd`` with its output in ``log``; return (wall seconds, the command's own peak RSS in GB, its output).

    The wall time is what a user of the command waits, start-up and exit included (plus the start of the small
    wrapper process below). The peak is the command's ``ru_maxrss`` from ``os.wait4``, read by a fresh, small
    Python process that starts the command: Linux counts a forked child's resident set from the moment of the
    fork, before ``exec``, so a child forked straight from this process would report at least this process's
    own RSS (measured in ``docs/speed.md``, section ``benchmarks.speed``).

    Raises:
        SystemExit: the command failed; the message holds its exit code and output.
    """
    rss_file = Path(f"{log}.maxrss")
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(
            [sys.executable, "-c", _RSS_WRAPPER, str(rss_file), *cmd],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    wall = time.perf_counter() - t0
    output = Path(log).read_text()
    peak = rss_file.read_text() if rss_file.is_file() else ""
    rss_file.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{output}")
    return wall, int(peak) / 2**20, output  # ru_maxrss is in KiB on Linux
