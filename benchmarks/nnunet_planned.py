"""Benchmark set-up: an nnU-Net v2 model folder **planned by nnU-Net's own planner** for a 512×512×300 CT, for
:mod:`benchmarks.nnunet_speed` (issue 23: nnU-Net's default 3d_fullres networks are large, so the comparison
uses the network nnU-Net would plan for this CT's spacing, not a hand-written one).

    python -m benchmarks.nnunet_planned [--root /work/nnbench] [--probe] [--compare ROUNDS] [--threads 2] [--seed 0] [--force]

What it does, all under ``--root`` (kept, so that the benchmark can be run later; ``--force`` rewrites it):

1. **The CT**: ``ct_0000.nii.gz``, the body-filling 512×512×300 CT at 0.8×0.8×1.5 mm of
   :func:`benchmarks.openvino_speed.body_filling_ct` (the real CT resampled and mirror-tiled);
2. **The plan**: a throwaway nnU-Net raw dataset ``Dataset999_CT`` in a temporary folder (``nnUNet_raw``,
   ``nnUNet_preprocessed`` and ``nnUNet_results`` point there, set before nnunetv2 is imported) holding that CT
   as ``imagesTr/CT_000_0000.nii.gz`` and a label map of :data:`LABELS` (HU thresholds of the CT smoothed by a
   Gaussian of σ = 1 voxel: fat, soft tissue, bone — plausible classes; the planner reads only the spacing,
   shape and the foreground intensities); nnU-Net's ``extract_fingerprints`` and ``plan_experiments``
   (default ``ExperimentPlanner``, plans ``nnUNetPlans``, default 8 GB GPU memory target) write
   ``nnUNetPlans.json``, which is read back;
3. **The model folder**: ``Dataset999_CT/nnUNetTrainer__nnUNetPlans__3d_fullres/`` with that ``plans.json``
   unchanged, a ``dataset.json`` of :data:`LABELS` and ``fold_0/checkpoint_final.pth`` in nnU-Net's exact
   checkpoint format (:func:`tests.nnunet.folders.checkpoint_dict`) holding **random weights** of the planned
   network (built by nnU-Net's ``get_network_from_plans`` with its He initialisation, ``torch.manual_seed
   (--seed)``) — untrained, fine for timing, meaningless as a segmentation;
4. **Printed**: the planned 3d_fullres configuration (patch, spacing, features per stage, stages, batch size);
   the number of sliding windows nnU-Net runs on this CT at tile step 0.5 (nnU-Net's
   ``compute_steps_for_sliding_window`` on the CT's shape after nnU-Net's transpose, nonzero crop and
   resampling to the planned spacing); the GFLOP of one forward pass of one window (``FlopCounterMode``, on
   the meta device: no arithmetic is done; multiply-add = 2 FLOP); then the ``benchmarks.nnunet_speed``
   command that runs the comparison. The comparison itself is not run here.

``--probe`` also times **one forward pass** of the planned network (float32, ``--threads`` torch threads,
``eval``, ``torch.inference_mode`` as nnU-Net's predictor uses, after one untimed warm-up) and prints an
estimate of nnU-Net's wall time: windows × s/forward with TTA off, × 8 (every mirror of three axes) with TTA
on. The estimate leaves out reading, preprocessing, Gaussian-weighted accumulation, resampling back and
writing, so it is a lower bound; the load average is printed with it (another job on the cores slows it).

``--compare ROUNDS`` times the network part both ways on this folder (:func:`compare`): nnU-Net's way (PyTorch
float32, one window per pass — medseg's exact path) against medseg's default window network (OpenVINO, the CPU's
default precision, two windows per pass), alternating, seconds per window. The network is ~90 % of either
predictor's time at this size; the whole-process comparison is ``benchmarks.nnunet_speed``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_vs_monai import REAL_CT

DATASET_ID = 999
DATASET = f"Dataset{DATASET_ID}_CT"
TRAINER_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"
#: Label map classes and their HU ranges [low, high) on the smoothed CT.
LABELS = {"background": 0, "fat": 1, "soft_tissue": 2, "bone": 3}
HU_RANGES = {"fat": (-190.0, -30.0), "soft_tissue": (-30.0, 200.0), "bone": (200.0, 4000.0)}


def write_label_map(ct: Path, out: Path) -> Path:
    """:data:`LABELS` from HU thresholds of ``ct`` smoothed by a Gaussian of σ = 1 voxel, same affine."""
    import nibabel as nib
    import numpy as np
    from scipy.ndimage import gaussian_filter

    image = nib.load(ct)
    smooth = gaussian_filter(np.asarray(image.dataobj, dtype=np.float32), sigma=1.0)
    label = np.zeros(smooth.shape, dtype=np.uint8)
    for name, (low, high) in HU_RANGES.items():
        label[(smooth >= low) & (smooth < high)] = LABELS[name]
    nib.save(nib.Nifti1Image(label, image.affine), out)
    return out


def dataset_json(num_training: int = 1) -> dict:
    return {
        "channel_names": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": num_training,
        "file_ending": ".nii.gz",
    }


def plan(ct: Path, work: Path) -> dict:
    """nnU-Net's fingerprint and ``ExperimentPlanner`` on a one-case raw dataset of ``ct``: ``nnUNetPlans.json``."""
    if "nnunetv2.paths" in sys.modules:
        raise RuntimeError(
            "nnunetv2 was imported before its paths were set; run this script in its own process"
        )
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[key] = str(work / key)
        (work / key).mkdir(parents=True, exist_ok=True)
    raw = work / "nnUNet_raw" / DATASET
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    shutil.copy(ct, raw / "imagesTr" / "CT_000_0000.nii.gz")
    write_label_map(ct, raw / "labelsTr" / "CT_000.nii.gz")
    (raw / "dataset.json").write_text(json.dumps(dataset_json(), indent=2))

    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True)
    plans_name = plan_experiments([DATASET_ID])
    return json.loads((work / "nnUNet_preprocessed" / DATASET / f"{plans_name}.json").read_text())


def network(plans: dict, deep_supervision: bool, seed: int | None = None, device: str = "cpu"):
    """The planned 3d_fullres network, built as nnU-Net builds it (``get_network_from_plans``)."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    if seed is not None:
        torch.manual_seed(seed)
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    with torch.device(device):
        return get_network_from_plans(
            arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, len(LABELS),
            allow_init=device != "meta", deep_supervision=deep_supervision,
        )  # fmt: skip


def write_model_folder(root: Path, plans: dict, seed: int) -> Path:
    """``root/Dataset999_CT/nnUNetTrainer__nnUNetPlans__3d_fullres`` with fold 0 of random weights."""
    import numpy as np
    import torch

    from tests.nnunet.folders import checkpoint_dict

    folder = root / DATASET / TRAINER_FOLDER
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json(), indent=2))
    # the trainer saves the network it trains: deep supervision on (the state dict's keys do not depend on it)
    weights = network(plans, deep_supervision=True, seed=seed).state_dict()
    ckpt = checkpoint_dict(plans, 0, weights)
    ckpt["init_args"]["dataset_json"] = dataset_json()
    ckpt["logging"]["dice_per_class_or_region"] = [[np.float32(0.4)] * (len(LABELS) - 1)]
    torch.save(ckpt, folder / "fold_0" / "checkpoint_final.pth")
    return folder


def sliding_windows(plans: dict, ct: Path) -> tuple[list[int], list[list[int]]]:
    """The CT's shape as nnU-Net's predictor sees it (transposed, nonzero-cropped, resampled to the planned
    spacing) and its sliding-window steps per axis at tile step 0.5."""
    import numpy as np
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    config = plans["configurations"]["3d_fullres"]
    data, props = SimpleITKIO().read_images([str(ct)])
    forward = plans["transpose_forward"]
    data = data[0].transpose(forward)
    spacing = [props["spacing"][i] for i in forward]
    # nnU-Net's crop_to_nonzero: the bounding box of voxels != 0 (filling holes does not change it)
    nonzero = data != 0
    shape = []
    for axis in range(3):
        kept = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != axis)))
        shape.append(int(kept[-1] - kept[0]) + 1)
    shape = [int(n) for n in compute_new_shape(shape, spacing, config["spacing"])]
    padded = [max(n, p) for n, p in zip(shape, config["patch_size"], strict=True)]
    return shape, compute_steps_for_sliding_window(padded, config["patch_size"], 0.5)


def forward_gflop(plans: dict) -> float:
    """GFLOP of one inference forward pass on one patch, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    net = network(plans, deep_supervision=False, device="meta").eval()
    patch = plans["configurations"]["3d_fullres"]["patch_size"]
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(torch.zeros(1, 1, *patch, device="meta"))
    return counter.get_total_flops() / 1e9


def probe(plans: dict, threads: int, seed: int) -> float:
    """Seconds of one float32 forward pass of one patch with ``threads`` threads, after one warm-up."""
    import torch

    torch.set_num_threads(threads)
    net = network(plans, deep_supervision=False, seed=seed).eval()
    x = torch.randn(1, 1, *plans["configurations"]["3d_fullres"]["patch_size"])
    with torch.inference_mode():
        net(x)
        start = time.perf_counter()
        net(x)
        return time.perf_counter() - start


def compare(folder: Path, threads: int, rounds: int) -> dict[str, float]:
    """Seconds per window of the planned network as nnU-Net runs it on the CPU (PyTorch float32, one window per
    pass: medseg's exact path, ``precision="fp32"``) and as ``medseg segment`` runs it by default (its
    :class:`~medseg.nnunet.predict.NnunetPredictor` window network: OpenVINO with the CPU's default precision, two
    windows per pass), alternating ``rounds`` times after one warm-up each; medians."""
    import statistics

    import torch

    from medseg.config.segment import SegmentOptions
    from medseg.nnunet import read_model_folder
    from medseg.nnunet.predict import NnunetPredictor

    torch.set_num_threads(threads)
    model = read_model_folder(folder)
    start = time.perf_counter()
    fast = NnunetPredictor(model, SegmentOptions(device="cpu"))
    print(f"medseg default: {fast.backend} {fast.precision}, {fast.sw_batch_size} windows per pass "
          f"(graph ready in {time.perf_counter() - start:.0f} s)")  # fmt: skip
    exact = NnunetPredictor(model, SegmentOptions(device="cpu", precision="fp32"))
    patch = exact.patch
    contestants = {
        "nnU-Net / fp32 (PyTorch)": (exact.networks[0], torch.randn(1, 1, *patch)),
        f"medseg default ({fast.backend} {fast.precision})": (
            fast.networks[0],
            torch.randn(fast.sw_batch_size, 1, *patch),
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in contestants}
    with torch.inference_mode():
        for net, x in contestants.values():
            net(x)  # warm-up
        for _ in range(rounds):
            for name, (net, x) in contestants.items():
                start = time.perf_counter()
                net(x)
                times[name].append((time.perf_counter() - start) / x.shape[0])
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/work/nnbench"))
    ap.add_argument("--probe", action="store_true")
    ap.add_argument(
        "--compare",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="time nnU-Net's fp32 window vs medseg's default window network, alternating",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rewrite the CT, plan and model folder")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    ct, folder = root / "ct_0000.nii.gz", root / DATASET / TRAINER_FOLDER
    if args.force and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    if not ct.exists():
        from benchmarks.openvino_speed import body_filling_ct

        start = time.perf_counter()
        body_filling_ct(REAL_CT, ct)
        print(f"CT written: {ct} ({time.perf_counter() - start:.0f} s)")
    if (folder / "fold_0" / "checkpoint_final.pth").exists():
        plans = json.loads((folder / "plans.json").read_text())
        print(f"model folder exists (--force rewrites it): {folder}")
    else:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="nnunet_plan_") as work:
            plans = plan(ct, Path(work))
        folder = write_model_folder(root, plans, args.seed)
        print(f"planned and written ({time.perf_counter() - start:.0f} s): {folder}")

    config = plans["configurations"]["3d_fullres"]
    kwargs = config["architecture"]["arch_kwargs"]
    print(f"3d_fullres ({plans['experiment_planner_used']}, {plans['plans_name']}), transpose_forward "
          f"{plans['transpose_forward']}: patch {config['patch_size']}, spacing {config['spacing']}, "
          f"{kwargs['n_stages']} stages, features {kwargs['features_per_stage']}, batch size "
          f"{config['batch_size']}, median image {config['median_image_size_in_voxels']}, other configurations "
          f"{[c for c in plans['configurations'] if c != '3d_fullres']}")  # fmt: skip
    shape, steps = sliding_windows(plans, ct)
    count = len(steps[0]) * len(steps[1]) * len(steps[2])
    print(f"nnU-Net's input after crop and resampling: {shape}; windows at step 0.5: "
          f"{' × '.join(str(len(s)) for s in steps)} = {count}")  # fmt: skip
    gflop = forward_gflop(plans)
    print(f"one forward pass: {gflop:.1f} GFLOP; TTA off {count * gflop / 1e3:.1f} TFLOP, "
          f"TTA on (× 8) {8 * count * gflop / 1e3:.1f} TFLOP")  # fmt: skip
    if args.probe:
        seconds = probe(plans, args.threads, args.seed)
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"probe: {seconds:.2f} s per forward pass, fp32, {args.threads} threads "
              f"({gflop / seconds:.0f} GFLOP/s; load average {load})")  # fmt: skip
        print(f"estimated nnU-Net wall (forward passes only): TTA off {count * seconds / 60:.1f} min, "
              f"TTA on {8 * count * seconds / 60:.1f} min")  # fmt: skip
    if args.compare:
        per_window = compare(folder, args.threads, args.compare)
        first = next(iter(per_window.values()))
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        for name, seconds in per_window.items():
            print(f"{name:<36} {seconds:6.2f} s/window  {gflop / seconds:5.0f} GFLOP/s  {first / seconds:4.2f}×  "
                  f"(TTA off, {count} windows: {count * seconds / 60:.1f} min)")  # fmt: skip
        print(f"load average {load}")
    print("run the comparison with:")
    print(f"  python -m benchmarks.nnunet_speed --model {folder} --ct {ct} --tta off --runs 1")


if __name__ == "__main__":
    main()
