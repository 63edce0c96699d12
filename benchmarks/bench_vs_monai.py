"""Benchmark: ``medseg segment`` against the MONAI recipe on a clinical-size CT, side by side in one run.

    python -m benchmarks.bench_vs_monai [--runs 2] [--threads 2] [--classes 7] [--precision auto]
                                       [--monai-precision fp32] [--agreement FILE] [--quick] [--keep DIR]

The CT: ``../shared/data/real_ct/ct_lps_1p5mm.nii.gz`` (a real CT, 1.5 mm) resampled with SimpleITK (linear) to
0.8×0.8×1.5 mm and padded with air (-1024 HU) to 512×512×300 voxels, int16, LPS, as a scanner would store a
clinical abdominal CT (``--quick``: 256×256×64 from its middle slices, one run each, for a smoke check).

The contestants, each a child process with ``OMP_NUM_THREADS = --threads``, run alternately ``--runs`` times
(so both see the same load); the median wall time and each child's peak RSS (``os.wait4``) are reported:

* medseg: the real command line, ``medseg segment -i ct.nii.gz -o out/ -m bench.pt --device cpu --profile``
  with a checkpoint of the default Attention U-Net (16..256, patch 96×96×64, overlap 0.5, window batch 2,
  7 classes, random weights: :func:`benchmarks.speed.random_checkpoint`), at ``--precision`` (the default);
* the MONAI recipe (``python -m benchmarks.monai_recipe``): MONAI's ``AttentionUnet`` with the same channels,
  ``sliding_window_inference`` with the same window, batch, overlap and Gaussian weighting, ``Invertd``,
  ``SaveImaged``; float32 unless ``--monai-precision bf16``.

Also measured in this run: the CPU's GEMM peak in fp32 and bf16 (:func:`benchmarks.speed.gemm_peak_gflops`),
each network's FLOPs per window (``torch.utils.flop_counter``) and forward throughput for one window batch as
medseg runs it (:func:`benchmarks.speed.network_throughput`), i.e. its percentage of the GEMM peak in the
precision used, and the Dice per label between medseg's default-precision mask and a ``--precision fp32`` run on
this CT. With random weights the logits of different classes are close everywhere, so that Dice is a harsh
bound; the bound on a trained model is ``python -m benchmarks.bench_precision`` (``--agreement`` prints its JSON).
It is a script, not a timed test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.speed import timed_child

REAL_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_ct" / "ct_lps_1p5mm.nii.gz"
SPACING = (0.8, 0.8, 1.5)
SHAPE = (512, 512, 300)
QUICK_SHAPE = (256, 256, 64)
PATCH = (96, 96, 64)


def windows(grid, patch=PATCH, overlap: float = 0.5) -> int:
    """Number of sliding windows MONAI places on ``grid`` (``dense_patch_slices``)."""
    count = 1
    for n, r in zip(grid, patch, strict=True):
        step = max(int(r * (1 - overlap)), 1)
        count *= 1 if n <= r else math.ceil((n - r) / step) + 1
    return count


def dice_per_label(a: np.ndarray, b: np.ndarray, labels: range) -> dict[int, float]:
    out = {}
    for v in labels:
        x, y = a == v, b == v
        total = int(x.sum()) + int(y.sum())
        out[v] = 1.0 if total == 0 else 2 * int((x & y).sum()) / total
    return out


def _network_lines(args, ckpt: Path, classes: int) -> tuple[list[str], dict]:
    """GEMM peaks and forward throughput of both networks, measured here (``--threads`` threads)."""
    import torch
    from monai.networks.nets import AttentionUnet

    from benchmarks.speed import forward_gflop, gemm_peak_gflops, network_throughput
    from medseg.inference.predictor import autocast_dtype, model_from_checkpoint
    from medseg.io.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype, name = autocast_dtype(args.precision, device)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}
    monai_half = "bf16" if device.type == "cpu" or name != "fp16" else "fp16"
    peaks = {
        p: gemm_peak_gflops(half.get(p, torch.float32), device=args.device)
        for p in {"fp32", name, monai_half}
    }
    ours = model_from_checkpoint(load_checkpoint(ckpt), device, ckpt)
    torch.manual_seed(0)
    theirs = (
        AttentionUnet(3, 1, classes, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2)).eval().to(device)
    )
    where = f"{args.threads} threads" if device.type == "cpu" else str(device)
    lines = [
        f"GEMM peak (torch.matmul 2048×2048, {where}): "
        + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in peaks.items())
    ]
    result = {"gemm_peak": peaks, "network": {}}
    patch = args.patch
    for label, net, runs in (
        (
            "medseg Attention U-Net",
            ours,
            [(None, "fp32"), (dtype, name)] if dtype is not None else [(None, "fp32")],
        ),
        ("MONAI AttentionUnet", theirs, [(None, "fp32"), (half[monai_half], monai_half)]),
    ):
        gflop = forward_gflop(net, patch)
        for precision, pname in runs:
            m = network_throughput(net, patch, 2, precision, repeats=args.repeats)
            share = 100 * m["gflops"] / peaks[pname]
            result["network"][f"{label} {pname}"] = {**m, "percent_of_peak": share}
            lines.append(
                f"  {label:<24} {gflop:5.1f} GFLOP/window, {pname}: {m['seconds']:.2f} s per 2 windows, "
                f"{m['gflops']:.0f} GFLOP/s = {share:.0f} % of the {pname} GEMM peak"
            )
    return lines, result


def setup(work: Path, args: argparse.Namespace) -> dict:
    """In a child process (so that this one stays small and the children's peak RSS is their own): build the CT,
    write the checkpoint, measure GEMM peaks and networks; returns the numbers (``setup.json``)."""
    if args.setup:
        shape = QUICK_SHAPE if args.quick else SHAPE
        from benchmarks.speed import clinical_size_ct, random_checkpoint

        ct = work / f"ct_{'x'.join(map(str, shape))}.nii.gz"
        if not ct.is_file():
            clinical_size_ct(REAL_CT, ct, shape, SPACING)

        ckpt = random_checkpoint(work / "bench.pt", args.classes)
        lines, numbers = _network_lines(args, ckpt, args.classes)
        numbers.update(ct=str(ct), checkpoint=str(ckpt), lines=lines)
        (work / "setup.json").write_text(json.dumps(numbers, indent=1))
        return numbers
    cmd = [sys.executable, "-m", "benchmarks.bench_vs_monai", "--setup", "--keep", str(work)]
    cmd += ["--threads", str(args.threads), "--classes", str(args.classes), "--precision", args.precision]
    cmd += ["--device", args.device]
    cmd += ["--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    timed_child(cmd, env, work / "setup.log")
    return json.loads((work / "setup.json").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="alternating runs of each contestant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--precision", default="auto", help="medseg's --precision (default: its default)")
    parser.add_argument("--monai-precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument(
        "--device", default="cpu", help="cpu | cuda (both contestants; GEMM peak of that device)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per network measurement")
    parser.add_argument("--agreement", type=Path, default=None, help="bench_precision JSON to print")
    parser.add_argument("--quick", action="store_true", help="256×256×64 CT, one run each: a smoke check")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep the files")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    parser.add_argument("--setup", action="store_true", help=argparse.SUPPRESS)  # the setup child
    args = parser.parse_args(argv)
    args.patch = PATCH
    if args.quick:
        args.runs, args.repeats = 1, 1
    if not REAL_CT.is_file():
        raise SystemExit(f"{REAL_CT}: not found (the real CT lives beside the project, see ../shared/data)")

    work = args.keep or Path(tempfile.mkdtemp(prefix="medseg_vs_monai_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    medseg = shutil.which("medseg", path=str(Path(sys.executable).parent))
    medseg_cmd = (
        [medseg] if medseg and "PYTHONPATH" not in os.environ else [sys.executable, "-m", "pipelines.cli"]
    )
    try:
        if args.setup:
            setup(work, args)
            return
        shape = QUICK_SHAPE if args.quick else SHAPE
        numbers = setup(work, args)
        ct, ckpt = Path(numbers["ct"]), Path(numbers["checkpoint"])
        print(
            f"CT: {ct.name}: {REAL_CT.name} resampled to {SPACING[0]}×{SPACING[1]}×{SPACING[2]} mm and padded "
            f"with air to {shape[0]}×{shape[1]}×{shape[2]} (int16, LPS); model: Attention U-Net 16..256, "
            f"{args.classes} classes, random weights, patch {PATCH}, overlap 0.5, window batch 2, Gaussian",
            flush=True,
        )
        print("\n".join(numbers.pop("lines")), flush=True)

        times: dict[str, list[float]] = {"medseg": [], "monai": []}
        peaks: dict[str, list[float]] = {"medseg": [], "monai": []}
        info, recipe = {}, {}
        for run in range(args.runs):
            for who in ("medseg", "monai"):
                out = work / f"{who}_{run}"
                shutil.rmtree(out, ignore_errors=True)
                if who == "medseg":
                    cmd = [*medseg_cmd, "segment", "-i", str(ct), "-o", str(out), "-m", str(ckpt)]
                    cmd += ["--device", args.device, "--precision", args.precision, "--profile"]
                else:
                    cmd = [sys.executable, "-m", "benchmarks.monai_recipe", str(ct), str(out)]
                    cmd += ["--classes", str(args.classes), "--threads", str(args.threads)]
                    cmd += ["--precision", args.monai_precision, "--device", args.device]
                wall, peak, output = timed_child(cmd, env, work / f"{who}_{run}.log")
                times[who].append(wall)
                peaks[who].append(peak)
                if who == "medseg":
                    info = json.loads(next(out.glob("*.json")).read_text())["inference"]
                else:
                    recipe = json.loads(next(s for s in output.splitlines() if s.startswith("RECIPE "))[7:])
                print(f"  run {run + 1} {who:<6} {wall:6.1f} s, peak RSS {peak:.2f} GB", flush=True)
        fp32_out = work / "medseg_fp32"
        shutil.rmtree(fp32_out, ignore_errors=True)
        cmd = [
            *medseg_cmd,
            "segment",
            "-i",
            str(ct),
            "-o",
            str(fp32_out),
            "-m",
            str(ckpt),
            "--device",
            args.device,
        ]
        wall32, peak32, _ = timed_child([*cmd, "--precision", "fp32"], env, work / "medseg_fp32.log")
        print(f"  medseg --precision fp32 {wall32:6.1f} s, peak RSS {peak32:.2f} GB", flush=True)

        import nibabel as nib

        ours, theirs = statistics.median(times["medseg"]), statistics.median(times["monai"])
        grid = info.get("model_grid", [])
        n_windows = windows(grid) if grid else 0
        net = numbers["network"][f"medseg Attention U-Net {info.get('precision', 'fp32')}"]
        in_run = n_windows * net["gflop"] / 2 / info["seconds"]["network"] if n_windows else float("nan")
        peak_used = numbers["gemm_peak"][info.get("precision", "fp32")]
        mask = np.asarray(nib.load(next((work / "medseg_0").glob("*.nii.gz"))).dataobj)
        exact = np.asarray(nib.load(next(fp32_out.glob("*.nii.gz"))).dataobj)
        dice = dice_per_label(mask, exact, range(1, args.classes))
        print()
        print(f"end to end, whole process, median of {args.runs} alternating run(s), {args.threads} threads:")
        print(
            f"  medseg segment ({info.get('precision')}): {ours:.1f} s, peak RSS {max(peaks['medseg']):.2f} GB; "
            f"stages (s): {json.dumps(info.get('seconds', {}))}"
        )
        print(
            f"  MONAI recipe ({args.monai_precision}): {theirs:.1f} s, peak RSS {max(peaks['monai']):.2f} GB; "
            f"stages (s): {json.dumps({k: round(v, 1) for k, v in recipe.items() if k != 'model_grid'})}"
        )
        print(f"  medseg is {theirs / ours:.2f}× faster than the MONAI recipe (target ≥ 2×)")
        print(
            f"  network stage in the run: {n_windows} windows on the model grid {grid} "
            f"(MONAI's {recipe.get('model_grid')}), {in_run:.0f} GFLOP/s = {100 * in_run / peak_used:.0f} % of "
            f"the {info.get('precision')} GEMM peak (forward alone: {net['percent_of_peak']:.0f} %, target ≥ 60 %)"
        )
        print(
            f"  Dice per label, medseg {info.get('precision')} vs medseg fp32 masks on this CT (random weights): "
            + ", ".join(f"{v}: {d:.4f}" for v, d in dice.items())
            + f"; min {min(dice.values()):.4f}"
        )
        if args.agreement:
            doc = json.loads(args.agreement.read_text())
            print(f"  trained-model agreement ({args.agreement}): {json.dumps(doc.get('summary', doc))}")
        else:
            print(
                "  trained-model agreement (the bound the default is held to): python -m benchmarks.bench_precision"
            )
        if args.json:
            numbers.update(
                medseg_seconds=times["medseg"], monai_seconds=times["monai"], medseg_peak_gb=peaks["medseg"],
                monai_peak_gb=peaks["monai"], ratio=theirs / ours, stages=info.get("seconds"), recipe=recipe,
                windows=n_windows, network_in_run_gflops=in_run, dice_vs_fp32=dice, fp32_seconds=wall32,
            )  # fmt: skip
            args.json.write_text(json.dumps(numbers, indent=1, default=str))
    finally:
        if args.keep is None and not args.setup:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
