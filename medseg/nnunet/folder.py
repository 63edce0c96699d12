"""An nnU-Net v2 trained-model folder (``plans.json``, ``dataset.json``, ``fold_*/checkpoint_final.pth``) read
and checked without loading a network: what ``medseg models FOLDER`` lists and ``medseg segment -m FOLDER`` runs.

>>> model = read_model_folder("Dataset001_X/nnUNetTrainer__nnUNetPlans__3d_fullres", folds=["0", "1"])  # doctest: +SKIP
>>> model.configuration_name, model.label_names, [str(p) for p in model.checkpoints]                      # doctest: +SKIP

The folder's name is nnU-Net's ``<trainer>__<plans>__<configuration>``; the configuration it names is the one
run (nnU-Net's predictor reads it from the first checkpoint's ``init_args``, which
:func:`medseg.nnunet.weights.load_fold` checks against it). A configuration's ``inherits_from`` is resolved
as nnU-Net's ``PlansManager`` does (the child's keys over its parent's); plans written before nnU-Net 2.4 (no
``architecture`` entry, ``UNet_class_name`` instead) are translated the way nnU-Net's
``ConfigurationManager`` does for ``PlainConvUNet`` and ``ResidualEncoderUNet``.

Every problem is an :class:`~medseg.io.InputError` of one line naming the file and the cause.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg.io import InputError

PLANS = "plans.json"
DATASET = "dataset.json"
DEFAULT_CHECKPOINT = "checkpoint_final.pth"
#: The readers nnU-Net may record as ``image_reader_writer`` whose array order medseg reproduces.
READERS = ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient")
#: The intensity normalisations reproduced (nnU-Net's ``default_normalization_schemes``).
NORMALIZATIONS = ("CTNormalization", "ZScoreNormalization", "NoNormalization")
#: The resampling functions of nnU-Net's ``default_resampling`` reproduced (:mod:`medseg.nnunet.resample`).
RESAMPLING = ("resample_data_or_seg_to_shape",)


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``-m path`` means an nnU-Net model folder: a folder holding ``plans.json`` or ``dataset.json``,
    or ``fold_*/*.pth`` (a folder of medseg checkpoints holds ``*.pt``)."""
    path = Path(path)
    if not path.is_dir():
        return False
    return (
        (path / PLANS).is_file()
        or (path / DATASET).is_file()
        or any(path.glob(f"fold_*/{DEFAULT_CHECKPOINT}"))
        or any(path.glob("fold_*/*.pth"))
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: not found (an nnU-Net v2 model folder holds {PLANS} and {DATASET})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable as JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _architecture_from_old_plans(config: dict, where: str) -> dict:
    """The ``architecture`` entry of plans written before nnU-Net 2.4, built as nnU-Net's
    ``ConfigurationManager.__init__`` builds it (``PlainConvUNet`` / ``ResidualEncoderUNet`` only)."""
    name = config.get("UNet_class_name")
    classes = {
        "PlainConvUNet": (
            "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "n_conv_per_stage",
        ),
        "ResidualEncoderUNet": (
            "dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet",
            "n_blocks_per_stage",
        ),
    }
    if name not in classes:
        raise InputError(
            f"{where}: no 'architecture' entry and UNet_class_name {name!r} is not one nnU-Net converts"
        )
    try:
        stages = len(config["n_conv_per_stage_encoder"])
        dim = len(config["patch_size"])
        kwargs = {
            "n_stages": stages,
            "features_per_stage": [
                min(config["UNet_base_num_features"] * 2**i, config["unet_max_num_features"])
                for i in range(stages)
            ],
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": config["conv_kernel_sizes"],
            "strides": config["pool_op_kernel_sizes"],
            classes[name][1]: config["n_conv_per_stage_encoder"],
            "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"],
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        }
    except (KeyError, TypeError) as exc:
        raise InputError(f"{where}: old-format plans without {exc}") from None
    return {
        "network_class_name": classes[name][0],
        "arch_kwargs": kwargs,
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def resolve_configuration(plans: dict, name: str, where: str, seen: tuple[str, ...] = ()) -> dict:
    """The configuration ``name`` of ``plans`` with ``inherits_from`` resolved (nnU-Net's
    ``PlansManager._internal_resolve_configuration_inheritance``) and an ``architecture`` entry."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or name not in configurations:
        valid = ", ".join(configurations) if isinstance(configurations, dict) else "none"
        raise InputError(f"{where}: no configuration {name!r} (configurations: {valid})")
    config = dict(configurations[name])
    parent = config.get("inherits_from")
    if parent is not None:
        if parent in (*seen, name):
            raise InputError(f"{where}: configuration {name!r} inherits from itself through {parent!r}")
        config = {**resolve_configuration(plans, parent, where, (*seen, name)), **config}
    if not seen and "architecture" not in config:
        config["architecture"] = _architecture_from_old_plans(config, f"{where}: configuration {name!r}")
    return config


def _labels(dataset: dict, where: str) -> tuple[dict[str, int], int]:
    """``dataset.json``'s labels as name → index (the ``ignore`` label left out) and the network's outputs.

    Raises:
        InputError: region-based labels (a label given as a list of indices), which medseg does not run.
    """
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise InputError(f"{where}: no 'labels' mapping")
    regions = [k for k, v in labels.items() if isinstance(v, list | tuple)]
    if regions:
        raise InputError(
            f"{where}: region-based labels ({', '.join(regions[:3])}: lists of label values) are not supported; "
            "medseg runs models with one softmax output per label"
        )
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        raise InputError(f"{where}: 'labels' values must be whole numbers")
    names = {str(k): int(v) for k, v in labels.items() if k != "ignore"}
    if sorted(names.values()) != list(range(len(names))):
        raise InputError(
            f"{where}: label values must be 0..{len(names) - 1} without gaps, found {sorted(names.values())}"
        )
    return dict(sorted(names.items(), key=lambda kv: kv[1])), len(names)


@dataclass(frozen=True)
class ModelFolder:
    """An nnU-Net v2 model folder as medseg runs it (nothing loaded but the two JSON files).

    Attributes:
        path: the folder.
        plans, dataset: ``plans.json`` and ``dataset.json`` as read.
        trainer, plans_name, configuration_name: from the folder's name ``trainer__plans__configuration``.
        configuration: the resolved configuration (``spacing``, ``patch_size``, ``architecture``, …).
        label_names: name → index from ``dataset.json`` (without ``ignore``); ``outputs`` the network's.
        folds: the folds run, as nnU-Net names them (``"0"``, ``"1"``, …, ``"all"``).
        checkpoints: ``fold_<f>/<checkpoint name>`` of each fold, in order.
    """

    path: Path
    plans: dict
    dataset: dict
    trainer: str
    plans_name: str
    configuration_name: str
    configuration: dict
    label_names: dict[str, int]
    outputs: int
    folds: tuple[str, ...]
    checkpoints: tuple[Path, ...]

    @property
    def in_channels(self) -> int:
        channels = self.dataset.get("channel_names") or self.dataset.get("modality") or {"0": "CT"}
        return len(channels)

    @property
    def reader(self) -> str:
        return str(self.plans.get("image_reader_writer", "SimpleITKIO"))

    def describe(self) -> list[str]:
        """What ``medseg models`` prints: one ``key: value`` line each."""
        cfg = self.configuration
        arch = cfg["architecture"]
        kwargs = arch.get("arch_kwargs", {})
        channels = self.dataset.get("channel_names") or {}
        names = [f"{v}={k}" for k, v in self.label_names.items()]
        return [
            f"folder: {self.path}",
            f"task: {self.plans.get('dataset_name', self.path.parent.name)}",
            f"trainer: {self.trainer}",
            f"plans: {self.plans_name}",
            f"configuration: {self.configuration_name}",
            f"channels: {', '.join(str(v) for v in channels.values()) or 'CT'}",
            f"labels ({len(self.label_names) - 1} + background): {', '.join(names)}",
            f"folds: {', '.join(self.folds)}",
            f"checkpoints: {', '.join(str(p.relative_to(self.path)) for p in self.checkpoints)}",
            f"spacing: {' x '.join(f'{s:g}' for s in cfg['spacing'])} mm (array order after transpose "
            f"{list(self.plans.get('transpose_forward', [0, 1, 2]))})",
            f"patch: {' x '.join(str(int(p)) for p in cfg['patch_size'])}",
            f"network: {arch['network_class_name'].rsplit('.', 1)[-1]}, "
            f"features {kwargs.get('features_per_stage', '?')}",
            f"normalization: {', '.join(cfg.get('normalization_schemes', []))}",
            f"reader: {self.reader}",
        ]


def _split_name(path: Path) -> tuple[str, str, str | None]:
    parts = path.name.split("__")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return "nnUNetTrainer", "nnUNetPlans", None


def available_folds(path: Path, checkpoint: str) -> list[str]:
    """The folds of ``path`` holding ``checkpoint`` (nnU-Net's ``auto_detect_available_folds``): numbered folds
    in order, else ``all``."""
    found = [p.parent.name[5:] for p in path.glob(f"fold_*/{checkpoint}") if p.is_file()]
    numbered = sorted((f for f in found if f.isdigit()), key=int)
    return numbered or [f for f in found if f == "all"]


def _check_configuration(config: dict, plans: dict, where: str) -> None:
    """The parts of a configuration medseg reproduces; anything else refused in one line."""
    for key in ("spacing", "patch_size", "normalization_schemes", "architecture"):
        if key not in config:
            raise InputError(f"{where}: configuration has no {key!r}")
    if len(config["spacing"]) != 3 or len(config["patch_size"]) != 3:
        raise InputError(f"{where}: only 3D configurations are run (spacing {config['spacing']})")
    if config.get("previous_stage"):
        raise InputError(
            f"{where}: cascade configurations are not supported; run the 3d_fullres configuration"
        )
    for scheme in config["normalization_schemes"]:
        if scheme not in NORMALIZATIONS:
            raise InputError(
                f"{where}: normalization {scheme!r} is not reproduced (valid: {', '.join(NORMALIZATIONS)})"
            )
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if config.get(key, RESAMPLING[0]) not in RESAMPLING:
            raise InputError(
                f"{where}: {key} {config[key]!r} is not reproduced (valid: {', '.join(RESAMPLING)})"
            )
    reader = str(plans.get("image_reader_writer", "SimpleITKIO"))
    if reader not in READERS:
        raise InputError(
            f"{where}: image_reader_writer {reader!r} is not reproduced (valid: {', '.join(READERS)})"
        )
    for key in ("transpose_forward", "transpose_backward"):
        if sorted(plans.get(key, [0, 1, 2])) != [0, 1, 2]:
            raise InputError(f"{where}: {key} {plans.get(key)!r} is not a permutation of 0, 1, 2")
    if (
        "foreground_intensity_properties_per_channel" not in plans
        and "CTNormalization" in config["normalization_schemes"]
    ):
        raise InputError(f"{where}: CTNormalization needs foreground_intensity_properties_per_channel")


def read_model_folder(
    path: str | os.PathLike,
    folds: Sequence[str | int] | None = None,
    checkpoint: str | None = None,
    configuration: str | None = None,
) -> ModelFolder:
    """Read and check an nnU-Net v2 model folder.

    Args:
        path: the folder holding ``plans.json``, ``dataset.json`` and ``fold_*``.
        folds: the folds to run (``0``, ``1``, …, ``all``); None: every fold holding ``checkpoint``.
        checkpoint: the file name in each fold folder (default ``checkpoint_final.pth``).
        configuration: the configuration to run; None: the one the folder's name gives.

    Raises:
        InputError: a missing or malformed JSON file, a configuration medseg does not reproduce, region-based
            labels, a requested fold without its checkpoint, no fold at all.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(
            f"{path}: not a folder (an nnU-Net v2 model folder holds {PLANS}, {DATASET}, fold_*)"
        )
    checkpoint = checkpoint or DEFAULT_CHECKPOINT
    if Path(checkpoint).name != checkpoint:
        raise InputError(f"--checkpoint {checkpoint!r}: give a file name inside fold_*/, not a path")
    plans = _read_json(path / PLANS)
    dataset = _read_json(path / DATASET)
    trainer, plans_name, named = _split_name(path)
    name = configuration or named
    if name is None:
        raise InputError(
            f"{path}: the folder name is not <trainer>__<plans>__<configuration>, so the configuration is unknown"
        )
    where = str(path / PLANS)
    config = resolve_configuration(plans, name, where)
    _check_configuration(config, plans, where)
    label_names, outputs = _labels(dataset, str(path / DATASET))
    chosen = [str(f) for f in folds] if folds else available_folds(path, checkpoint)
    if not chosen:
        raise InputError(f"{path}: no fold_*/{checkpoint} found")
    for fold in chosen:
        if not (fold.isdigit() or fold == "all"):
            raise InputError(f"--folds {fold!r}: a fold is a number or 'all'")
        file = path / f"fold_{fold}" / checkpoint
        if not file.is_file():
            what = "fold folder" if not file.parent.is_dir() else "checkpoint"
            raise InputError(f"{file}: {what} not found (fold {fold} requested)")
    if len(set(chosen)) != len(chosen):
        raise InputError(f"--folds {' '.join(chosen)}: a fold given twice")
    return ModelFolder(
        path=path,
        plans=plans,
        dataset=dataset,
        trainer=trainer,
        plans_name=str(plans.get("plans_name", plans_name)),
        configuration_name=name,
        configuration=config,
        label_names=label_names,
        outputs=outputs,
        folds=tuple(chosen),
        checkpoints=tuple(path / f"fold_{f}" / checkpoint for f in chosen),
    )
