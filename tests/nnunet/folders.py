"""nnU-Net v2 model folders for the tests, written in nnU-Net's exact on-disk format.

``plans.json`` and ``dataset.json`` are written by hand for a tiny 3d_fullres configuration (a
``PlainConvUNet`` of 4 stages, 4…16 features — nnU-Net's planner would plan a far larger network for these
phantoms); the network is built by ``dynamic-network-architectures`` from that ``architecture`` entry with
nnU-Net's own ``get_network_from_plans``, its weights are **random but fixed** (seeded He initialisation, the
then **trained for a few dozen Adam steps** on two phantoms (our loop, cross-entropy on random patches in
nnU-Net's array order and normalisation, not nnU-Net's trainer) so that its labels follow the organs; fold 1
is fold 0's weights perturbed by 5 % seeded noise), and each ``fold_<f>/checkpoint_final.pth`` holds
what ``nnUNetTrainer.save_checkpoint`` writes: ``network_weights``, ``optimizer_state``, ``grad_scaler_state``,
``logging`` (with numpy scalars, as nnU-Net's logger has), ``_best_ema``, ``current_epoch``, ``init_args``
(plans, configuration, fold, dataset.json, a ``torch.device``), ``trainer_name`` and
``inference_allowed_mirroring_axes``. The tests compare predictions with nnU-Net's, so accuracy does not matter; the short training makes the
labels confident enough to compare bf16 with fp32 meaningfully.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medseg.data.phantoms import LABELS, generate_phantom

ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 4,
        "features_per_stage": [4, 8, 16, 16],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 4,
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2, 2],
        "n_conv_per_stage_decoder": [2, 2, 2],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}

#: name → (spacing and patch in the array order after transpose_forward, transpose_forward, backward)
PLANS = {
    # isotropic target; a transpose that is not its own inverse
    "iso": ([5.0, 5.0, 5.0], [32, 32, 32], [1, 2, 0], [2, 0, 1]),
    # anisotropic target (z first, 5 mm): the separate-z rule both ways
    "aniso": ([5.0, 2.0, 2.0], [16, 48, 48], [0, 1, 2], [0, 1, 2]),
}


def plans_json(kind: str) -> dict:
    spacing, patch, forward, backward = PLANS[kind]
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": patch,
        "median_image_size_in_voxels": [64, 64, 40],
        "spacing": spacing,
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {
            "is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None,
        },
        "architecture": ARCH,
        "batch_dice": False,
    }  # fmt: skip
    return {
        "dataset_name": "Dataset901_Phantoms",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": [40, 64, 64],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": forward,
        "transpose_backward": backward,
        "configurations": {"3d_fullres": config},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 900.0, "mean": 120.0, "median": 115.0, "min": -900.0,
                "percentile_00_5": -120.0, "percentile_99_5": 400.0, "std": 70.0,
            }
        },
    }  # fmt: skip


def dataset_json() -> dict:
    return {
        "channel_names": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": 4,
        "file_ending": ".nii.gz",
    }


def _network(plans: dict, seed: int) -> torch.nn.Module:
    """The plans' network built by nnU-Net's ``get_network_from_plans`` (seeded), briefly trained."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.manual_seed(seed)
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    net = get_network_from_plans(
        arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, len(LABELS),
        allow_init=True, deep_supervision=True,
    )  # fmt: skip
    _train(net, plans)
    return net


def _training_arrays(plans: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two phantoms in nnU-Net's array order (transposed) and CT normalisation, with their labels."""
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    forward = plans["transpose_forward"]
    out = []
    for seed in (11, 12):
        ph = generate_phantom(seed, shape=(64, 64, 40), fov_mm=(300.0, 300.0, 200.0))
        image = ph.image.transpose(2, 1, 0).transpose(forward).astype(np.float32)
        image = (np.clip(image, props["percentile_00_5"], props["percentile_99_5"]) - props["mean"]) / props[
            "std"
        ]
        out.append((image, ph.label.transpose(2, 1, 0).transpose(forward).astype(np.int64)))
    return out


def _train(net: torch.nn.Module, plans: dict, steps: int = 40) -> None:
    patch = plans["configurations"]["3d_fullres"]["patch_size"]
    arrays = _training_arrays(plans)
    rng = np.random.default_rng(0)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    net.train()
    for _ in range(steps):
        images, labels = [], []
        for image, label in arrays:
            corner = [
                int(rng.integers(0, max(1, n - p + 1))) for n, p in zip(image.shape, patch, strict=True)
            ]
            window = tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True))
            pad = [(0, max(0, p - (n - c))) for n, p, c in zip(image.shape, patch, corner, strict=True)]
            images.append(np.pad(image[window], pad, constant_values=image.min()))
            labels.append(np.pad(label[window], pad))
        out = net(torch.from_numpy(np.stack(images))[:, None])
        out = out[0] if isinstance(out, list | tuple) else out
        loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(np.stack(labels)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()


def checkpoint_dict(
    plans: dict, fold: int | str, weights: dict, mirror=(0, 1, 2), trainer: str = "nnUNetTrainer"
) -> dict:
    """What ``nnUNetTrainer.save_checkpoint`` writes, for the network ``weights``."""
    params = [torch.nn.Parameter(w.clone().float()) for w in weights.values() if w.is_floating_point()]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.99, nesterov=True)
    return {
        "network_weights": weights,
        "optimizer_state": optimizer.state_dict(),
        "grad_scaler_state": None,
        "logging": {
            "mean_fg_dice": [np.float64(0.41)],
            "ema_fg_dice": [np.float64(0.41)],
            "dice_per_class_or_region": [[np.float32(0.4)] * (len(LABELS) - 1)],
            "train_losses": [np.float32(0.9)],
            "val_losses": [np.float32(0.8)],
            "lrs": [0.01],
            "epoch_start_timestamps": [1.0],
            "epoch_end_timestamps": [2.0],
        },
        "_best_ema": np.float64(0.41),
        "current_epoch": 1,
        "init_args": {
            "plans": plans,
            "configuration": "3d_fullres",
            "fold": fold,
            "dataset_json": dataset_json(),
            "device": torch.device("cpu"),
        },
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": mirror,
    }


def fold_weights(kind: str, count: int) -> list[dict]:
    """``count`` state dicts: a trained network, then seeded 5 % perturbations of it (cached per process)."""
    key = (kind, count)
    if key not in _CACHE:
        base = _network(plans_json(kind), 0).state_dict()
        gen = torch.Generator().manual_seed(1)
        folds = [base]
        for _ in range(1, count):
            folds.append(
                {
                    k: v * (1 + 0.05 * torch.randn(v.shape, generator=gen)) if v.is_floating_point() else v
                    for k, v in base.items()
                }
            )
        _CACHE[key] = folds
    return _CACHE[key]


_CACHE: dict = {}


def write_model_folder(root: Path, kind: str, folds=(0, 1), checkpoint: dict | None = None) -> Path:
    """``root/Dataset901_Phantoms/nnUNetTrainer__nnUNetPlans__3d_fullres`` with ``folds`` (``checkpoint``:
    replaces every fold's checkpoint dict)."""
    folder = root / "Dataset901_Phantoms" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True)
    plans = plans_json(kind)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json(), indent=2))
    weights = fold_weights(kind, len(folds))
    for fold, w in zip(folds, weights, strict=True):
        (folder / f"fold_{fold}").mkdir()
        ckpt = checkpoint if checkpoint is not None else checkpoint_dict(plans, fold, w)
        torch.save(ckpt, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


#: scan name → (generate_phantom arguments): 64×64×40 voxels, LPS and RAS; "thick" has 1.5×1.5×5 mm voxels
SCANS = {
    "ras": {"seed": 3, "shape": (64, 64, 40), "fov_mm": (300.0, 300.0, 200.0), "orientation": "RAS"},
    "lps": {"seed": 4, "shape": (64, 64, 40), "fov_mm": (300.0, 300.0, 200.0), "orientation": "LPS"},
    "thick": {"seed": 5, "shape": (64, 64, 40), "fov_mm": (96.0, 96.0, 200.0), "orientation": "LPS"},
    # RAS at 2.5 mm in-plane: the anisotropic plan (2 mm) resamples it to 80×80, not the 150×150 of "ras"
    "ras_fine": {"seed": 6, "shape": (64, 64, 40), "fov_mm": (160.0, 160.0, 200.0), "orientation": "RAS"},
}


def write_scan(folder: Path, name: str) -> Path:
    """``<name>_0000.nii.gz``; the LPS scan has a border of exact zeros (scanner padding: nnU-Net crops it)."""
    ph = generate_phantom(**SCANS[name])
    image = ph.image.copy()
    if name == "lps":
        image[:5] = 0
        image[:, :, -3:] = 0
    path = folder / f"{name}_0000.nii.gz"
    nib.save(nib.Nifti1Image(image, ph.affine), path)
    return path
