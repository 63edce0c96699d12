"""Benchmark: peak memory and wall time of ``medseg segment`` on a clinical-size CT, in a child process.

    python -m benchmarks.bench_segment [--shape 512 512 300] [--classes 7] [--threads 2] [--precision auto|fp32|bf16]
                                      [--tta] [--overlap 0.5] [--body-fill] [--keep DIR]

Builds a synthetic abdominal CT of ``--shape`` voxels (int16 HU, LPS, 0.8×0.8×1.5 mm: a body ellipse with fat,
muscle, spine, liver, spleen, kidneys, aorta and lung bases, plus noise), written as ``ct.nii.gz``; a checkpoint
of the default Attention U-Net (filters 16..256, patch 96×96×64, overlap 0.5, ``--classes`` outputs) with
**random weights** (nothing is trained: the numbers measure memory and time, not accuracy) and the plan
``medseg.planning.fingerprint.make_plan`` would write for 1.5 mm isotropic spacing, the CT window, body crop. Then it runs
the real command line in a child process,

    medseg segment -i ct.nii.gz -o mask.nii.gz -m bench.pt --device cpu --precision P [--tta]

with ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` = ``--threads``, and prints the child's peak resident memory
(the child's own ``ru_maxrss`` from ``os.wait4``, :func:`benchmarks.speed.timed_child`: the largest RSS it
reached, i.e. what ``/usr/bin/time -v`` calls "Maximum resident set size") and its wall time. Stage times and the running peak
RSS after each stage are ``Prediction.info`` as the command records it in the mask's JSON sidecar
(``"inference"``); when a sidecar lacks them a second child calls :class:`medseg.inference.Predictor` directly on
the same files to print them (``--no-stages`` skips that). It is a script, not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.speed import timed_child

SPACING = (0.8, 0.8, 1.5)


def lps_affine(shape: tuple[int, int, int], spacing=SPACING) -> np.ndarray:
    """LPS-stored affine (voxel → RAS mm): i runs to patient left, j to posterior, k to superior."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [spacing[0] * (shape[0] - 1) / 2, spacing[1] * (shape[1] - 1) / 2, -200.0]
    return affine


def synthetic_ct(
    shape: tuple[int, int, int], seed: int = 0, slab: int = 16, fill: bool = False
) -> np.ndarray:
    """int16 HU volume (Fortran order, as nibabel stores it) of a body in air, built ``slab`` slices at a time.

    Patient coordinates in mm from the centre of each slice: x to the patient's left (array axis 0, LPS),
    y to posterior (axis 1), z along the slices. Organs are ellipsoids at realistic HU values.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * SPACING[0]
    y = (np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * SPACING[1]
    z_all = (np.arange(nz, dtype=np.float32) - (nz - 1) / 2) * SPACING[2]
    out = np.empty(shape, dtype=np.int16, order="F")
    # body semi-axes (mm): a typical abdomen, or (fill) an ellipse touching all four edges of the field of view,
    # so the body crop removes nothing (the model grid's worst case)
    bx, by = (
        (0.5 * nx * SPACING[0], 0.5 * ny * SPACING[1])
        if fill
        else (0.42 * nx * SPACING[0], 0.32 * ny * SPACING[1])
    )
    # organs: (centre x, y, z as a fraction of the z extent, semi-axes mm, HU); x > 0 is the patient's left
    zr = 0.5 * nz * SPACING[2]
    organs = [
        ((-0.35 * bx, -0.1 * by, 0.25 * zr), (0.35 * bx, 0.45 * by, 0.35 * zr), 60.0),  # liver (right)
        ((0.45 * bx, 0.25 * by, 0.3 * zr), (0.15 * bx, 0.25 * by, 0.15 * zr), 50.0),  # spleen (left)
        ((-0.3 * bx, 0.5 * by, -0.1 * zr), (0.1 * bx, 0.18 * by, 0.15 * zr), 30.0),  # right kidney
        ((0.3 * bx, 0.5 * by, -0.05 * zr), (0.1 * bx, 0.18 * by, 0.15 * zr), 30.0),  # left kidney
        ((0.05 * bx, 0.35 * by, 0.0), (12.0, 12.0, 0.9 * zr), 180.0),  # aorta
        ((0.1 * bx, 0.1 * by, -0.05 * zr), (0.25 * bx, 0.08 * by, 0.06 * zr), 40.0),  # pancreas
    ]
    xx, yy = np.meshgrid(x, y, indexing="ij")
    body = (xx / bx) ** 2 + (yy / by) ** 2
    for z0 in range(0, nz, slab):
        z = z_all[z0 : z0 + slab]
        hu = np.where(body <= 1.0, np.where(body > 0.8, -100.0, 40.0), -1000.0).astype(np.float32)
        hu = np.repeat(hu[:, :, None], z.size, axis=2)
        spine = ((xx / 18.0) ** 2 + ((yy - 0.7 * by) / 18.0) ** 2) <= 1.0
        hu[spine] = 450.0
        lungs = (z > 0.6 * zr)[None, None, :] & (
            ((np.abs(xx) - 0.45 * bx) / (0.35 * bx)) ** 2 + (yy / (0.7 * by)) ** 2 <= 1.0
        )[:, :, None]
        hu[lungs] = -850.0
        for (cx, cy, cz), (rx, ry, rz), value in organs:
            inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
            dz = ((z - cz) / rz) ** 2
            hu[(inside[:, :, None] + dz[None, None, :]) <= 1.0] = value
        hu += rng.normal(0.0, 15.0, size=hu.shape).astype(np.float32)
        out[:, :, z0 : z0 + slab] = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return out


def write_checkpoint(path: Path, classes: int, seed: int = 0) -> Path:
    """A checkpoint of the default Attention U-Net with random weights (:func:`benchmarks.speed.random_checkpoint`)."""
    from benchmarks.speed import random_checkpoint

    return random_checkpoint(path, classes, seed=seed)


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    return env


def _medseg_command() -> list[str]:
    exe = shutil.which("medseg", path=str(Path(sys.executable).parent)) or shutil.which("medseg")
    return [exe] if exe else [sys.executable, "-m", "pipelines.cli"]


def run_cli(ct: Path, ckpt: Path, out: Path, args: argparse.Namespace) -> tuple[float, float, str]:
    """Run ``medseg segment`` in a child; return (peak RSS of the child in GB, wall seconds, its output)."""
    cmd = [*_medseg_command(), "segment", "-i", str(ct), "-o", str(out), "-m", str(ckpt), "--device", "cpu"]
    cmd += ["--overlap", str(args.overlap), "--precision", args.precision]
    if args.tta:
        cmd += ["--tta"]
    print("$ " + " ".join(cmd), flush=True)
    wall, peak_gb, output = timed_child(cmd, _child_env(args.threads), out.parent / "segment.log")
    return peak_gb, wall, output


_STAGES = """
import json, sys, torch
torch.set_num_threads({threads})
from medseg.config.segment import SegmentOptions
from medseg.inference import Predictor
options = SegmentOptions(device="cpu", overlap={overlap}, tta={tta}, precision={precision!r})
pred = Predictor({ckpt!r}, options)
result = pred.predict({ct!r})
print("INFO " + json.dumps(result.info))
"""


def run_stages(ct: Path, ckpt: Path, args: argparse.Namespace) -> dict:
    """``Prediction.info`` of a direct :class:`Predictor` call in a child (stage times, running peak RSS)."""
    code = _STAGES.format(
        threads=args.threads,
        ckpt=str(ckpt),
        overlap=args.overlap,
        tta=args.tta,
        precision=args.precision,
        ct=str(ct),
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_child_env(args.threads), capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"Predictor child failed (exit {proc.returncode}):\n{proc.stderr}")
    line = next(s for s in proc.stdout.splitlines() if s.startswith("INFO "))
    return json.loads(line[5:])


def recorded_info(folder: Path) -> dict:
    """``Prediction.info`` as ``medseg segment`` wrote it into a sidecar of ``folder`` (empty if none)."""
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("inference"), dict) and "seconds" in doc["inference"]:
            return doc["inference"]
    return {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--tta", action="store_true", help="test-time mirroring")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument(
        "--body-fill", action="store_true", help="body spans the whole field of view (no crop: worst case)"
    )
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage child run")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep the files")
    args = parser.parse_args(argv)

    import nibabel as nib

    shape = tuple(args.shape)
    work = args.keep or Path(tempfile.mkdtemp(prefix="medseg_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        ct = work / "ct.nii.gz"
        image = nib.Nifti1Image(synthetic_ct(shape, fill=args.body_fill), lps_affine(shape))
        image.set_qform(image.affine, code=1)
        image.header.set_xyzt_units("mm")
        nib.save(image, str(ct))
        del image
        ckpt = write_checkpoint(work / "bench.pt", args.classes)
        print(
            f"input: {shape[0]}×{shape[1]}×{shape[2]} int16, LPS {SPACING[0]}×{SPACING[1]}×{SPACING[2]} mm "
            f"({np.prod(shape) / 1e6:.1f} M voxels, {ct.stat().st_size / 2**20:.0f} MiB .nii.gz); "
            f"model: attention_unet 16..256, {args.classes} classes, random weights "
            f"(setup {time.perf_counter() - t0:.0f} s){', body fills the field of view' if args.body_fill else ''}",
            flush=True,
        )
        out = work / "masks"
        peak_gb, wall, output = run_cli(ct, ckpt, out, args)
        print(output.strip())
        voxels = float(np.prod(shape))
        print(
            f"medseg segment: peak RSS {peak_gb:.2f} GB ({peak_gb * 2**30 / voxels:.1f} bytes per input voxel), "
            f"wall {wall:.0f} s, threads {args.threads}, precision {args.precision}, tta {args.tta}"
        )
        mask = nib.load(str(out / "ct.nii.gz"))
        assert mask.shape == shape and np.allclose(mask.affine, lps_affine(shape)), "mask geometry differs"
        info = recorded_info(out)
        if not info and not args.no_stages:
            info = run_stages(ct, ckpt, args)
        for key in ("model_grid", "tta_flips", "precision", "seconds", "peak_rss_gb"):
            if key in info:
                print(f"{key}: {json.dumps(info[key])}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
