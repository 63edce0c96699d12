"""Benchmark: cases per hour of ``medseg segment`` on a folder of clinical-size CTs, lanes on vs one at a time.

    python -m benchmarks.bench_batch [--cases 4] [--runs 1] [--threads 2] [--keep DIR]

The folder: ``--cases`` CTs of 512×512×300 int16 (LPS, 0.8×0.8×1.5 mm), each the real CT of
``../shared/data/real_ct`` resampled and padded with air (:func:`benchmarks.speed.clinical_size_ct`), moved
by a different offset per case so that no two files are equal. The model: the default Attention U-Net
(16..256, 7 classes, random weights). Then, alternately ``--runs`` times, in a child process each with
``OMP_NUM_THREADS = --threads``:

    medseg segment -i cts/ -o out/ -m bench.pt --device cpu --prefetch 0     # one case at a time
    medseg segment -i cts/ -o out/ -m bench.pt --device cpu --prefetch 1     # next case loads, last one writes

and prints each run's wall time, cases per hour (the whole process: start-up included) and peak RSS, and the
ratio of the medians. Both must write the same masks (checked). It is a script, not a timed test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.speed import timed_child

REAL_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_ct" / "ct_lps_1p5mm.nii.gz"


def _setup(work: Path, cases: int) -> tuple[Path, Path]:
    from benchmarks.speed import clinical_size_ct, random_checkpoint

    folder = work / "cts"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        ct = folder / f"ct_{i:02d}.nii.gz"
        if not ct.is_file():
            clinical_size_ct(REAL_CT, ct, shift=(17 * i - 25, 11 * i - 15, 9 * i - 12))
    return folder, random_checkpoint(work / "bench.pt", 7)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--runs", type=int, default=1, help="alternating runs of each mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=Path, default=None)
    parser.add_argument("--setup", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not REAL_CT.is_file():
        raise SystemExit(f"{REAL_CT}: not found (the real CT lives beside the project, see ../shared/data)")
    work = args.keep or Path(tempfile.mkdtemp(prefix="medseg_bench_batch_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.setup:
        _setup(work, args.cases)
        return
    try:  # the folder and checkpoint in a child, so that this process stays small
        timed_child([sys.executable, "-m", "benchmarks.bench_batch", "--setup", "--keep", str(work),
              "--cases", str(args.cases)], env, work / "setup.log")  # fmt: skip
        folder, ckpt = work / "cts", work / "bench.pt"
        print(
            f"{args.cases} CTs of 512×512×300 in {folder}; default Attention U-Net, 7 classes, random weights"
        )
        cli = [
            sys.executable,
            "-m",
            "pipelines.cli",
            "segment",
            "-i",
            str(folder),
            "-m",
            str(ckpt),
            "--device",
            "cpu",
        ]
        walls: dict[int, list[float]] = {0: [], 1: []}
        for run in range(args.runs):
            for prefetch in (0, 1):
                out = work / f"out_{prefetch}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = [*cli, "-o", str(out), "--prefetch", str(prefetch), "--profile"]
                wall, peak, _ = timed_child(cmd, env, work / f"run{run}_prefetch{prefetch}.log")
                walls[prefetch].append(wall)
                print(
                    f"  run {run + 1} --prefetch {prefetch}: {wall:.1f} s, {3600 * args.cases / wall:.0f} cases/h, "
                    f"peak RSS {peak:.2f} GB",
                    flush=True,
                )
        import nibabel as nib
        import numpy as np

        for mask in sorted((work / "out_0").glob("ct_*.nii.gz")):
            other = np.asarray(nib.load(work / "out_1" / mask.name).dataobj)
            assert np.array_equal(np.asarray(nib.load(mask).dataobj), other), f"{mask.name}: masks differ"
        one, lanes = statistics.median(walls[0]), statistics.median(walls[1])
        print(
            f"one at a time: {3600 * args.cases / one:.0f} cases/h; lanes (--prefetch 1): "
            f"{3600 * args.cases / lanes:.0f} cases/h; {one / lanes:.2f}× (median of {args.runs}, "
            f"{args.threads} threads; same masks)"
        )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
