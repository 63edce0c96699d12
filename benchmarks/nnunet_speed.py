"""Benchmark: nnU-Net's own predictor vs ``medseg segment`` on the same nnU-Net v2 model folder and CT, whole
process, alternating, 2 threads, wall time and peak RSS.

    python -m benchmarks.nnunet_speed --model FOLDER --ct CT.nii.gz [--folds 0] [--tta both|on|off]
        [--runs 2] [--threads 2] [--keep DIR] [--contestants nnunet,medseg,medseg-fp32]
    python -m benchmarks.nnunet_speed --demo [--size 64 64 40]     # a tiny folder and phantom, to check it runs

**Contestants**, each a child process with ``OMP_NUM_THREADS`` = ``--threads`` (peak RSS from ``os.wait4``,
:func:`benchmarks.speed.timed_child`), run in turn ``--runs`` times per TTA setting:

* ``nnunet``: ``nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=TTA,
  perform_everything_on_device=False, device=cpu)`` → ``initialize_from_trained_model_folder`` →
  ``predict_from_files_sequential`` (nnU-Net's default TTA is on; ``--disable_tta`` is off);
* ``medseg``: ``python -m pipelines.cli segment -i CT -m FOLDER -o OUT [--tta]`` (default precision: bf16 where
  native), and ``medseg-fp32`` (``--precision fp32``, the exact path).

``--demo`` writes the tests' tiny model folder (:mod:`tests.nnunet.folders`, anisotropic plan) and one phantom of
``--size`` voxels: for checking the script, not for a speed claim (the issue's figure is a 512×512×300 CT with a
network planned for it — too slow for the shared 2-core development machine; not run here).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.speed import timed_child

NNUNET_CHILD = """
import sys, torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
folder, ct, out, tta, folds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[5].split(",")
p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta, perform_everything_on_device=False,
                    device=torch.device("cpu"), verbose=False, allow_tqdm=False)
p.initialize_from_trained_model_folder(folder, use_folds=tuple(folds))
p.predict_from_files_sequential([[ct]], out, save_probabilities=False, overwrite=True)
"""


def commands(folder: Path, ct: Path, out: Path, folds: list[str], tta: bool) -> dict[str, list[str]]:
    (out / "nnunet").mkdir(parents=True, exist_ok=True)
    medseg = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "segment",
        "-i",
        str(ct),
        "-m",
        str(folder),
        "--folds",
        *folds,
    ]
    medseg += ["--overwrite", *(["--tta"] if tta else [])]
    return {
        "nnunet": [
            sys.executable,
            "-c",
            NNUNET_CHILD,
            str(folder),
            str(ct),
            str(out / "nnunet"),
            str(int(tta)),
            ",".join(folds),
        ],
        "medseg": [*medseg, "-o", str(out / "medseg")],
        "medseg-fp32": [*medseg, "--precision", "fp32", "-o", str(out / "medseg32")],
    }


def demo(root: Path, size: tuple[int, int, int]) -> tuple[Path, Path]:
    import nibabel as nib

    from medseg.data.phantoms import generate_phantom
    from tests.nnunet.folders import write_model_folder

    folder = write_model_folder(root / "model", "aniso", folds=(0,))
    ph = generate_phantom(5, shape=size, fov_mm=(300.0, 300.0, 200.0), orientation="LPS")
    ct = root / "ct_0000.nii.gz"
    nib.save(nib.Nifti1Image(ph.image, ph.affine), ct)
    return folder, ct


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--ct", type=Path)
    ap.add_argument("--folds", nargs="+", default=["0"])
    ap.add_argument("--tta", choices=("both", "on", "off"), default="both")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", type=Path)
    ap.add_argument(
        "--contestants",
        default="nnunet,medseg,medseg-fp32",
        help="Comma-separated subset of nnunet, medseg, medseg-fp32 (nnunet and medseg give the ratio).",
    )
    ap.add_argument("--demo", action="store_true")
    ap.add_argument("--size", type=int, nargs=3, default=[64, 64, 40])
    args = ap.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="nnunet_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.demo:
        args.model, args.ct = demo(work, tuple(args.size))
    if args.model is None or args.ct is None:
        ap.error("--model and --ct (or --demo) are required")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    env.setdefault("nnUNet_results", str(work))  # silences nnU-Net's path warnings; nothing is read there
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    settings = {"both": [True, False], "on": [True], "off": [False]}[args.tta]
    chosen = [c.strip() for c in args.contestants.split(",") if c.strip()]
    unknown = sorted(set(chosen) - {"nnunet", "medseg", "medseg-fp32"})
    if unknown or not chosen:
        ap.error(f"--contestants: unknown {', '.join(unknown) or '(none given)'}")
    print(f"model {args.model}, CT {args.ct}, folds {' '.join(args.folds)}, {args.threads} threads")
    print(f"{'TTA':<4} {'contestant':<12} {'wall s (median)':>16} {'peak RSS GB':>12}  runs")
    for tta in settings:
        results: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.runs):
            for name, cmd in commands(args.model, args.ct, work, args.folds, tta).items():
                if name not in chosen:
                    continue
                wall, peak, _ = timed_child(cmd, env, work / f"{name}.log")
                results.setdefault(name, []).append((wall, peak))
        for name, runs in results.items():
            wall = statistics.median(w for w, _ in runs)
            peak = max(p for _, p in runs)
            print(
                f"{'on' if tta else 'off':<4} {name:<12} {wall:>16.2f} {peak:>12.2f}  {[round(w, 2) for w, _ in runs]}"
            )
        if "nnunet" in results and "medseg" in results:
            ratio = statistics.median(w for w, _ in results["nnunet"]) / statistics.median(
                w for w, _ in results["medseg"]
            )
            print(f"{'on' if tta else 'off':<4} nnU-Net wall / medseg wall = {ratio:.2f}")


if __name__ == "__main__":
    main()
