"""Segment a scan with a checkpoint: preprocess with its plan, slide, restore to the scan's geometry.

>>> predictor = Predictor("runs/demo/best.pt")            # doctest: +SKIP
>>> result = predictor.predict("ct.nii.gz")                 # doctest: +SKIP
>>> result.labels.shape == result.reference.shape           # doctest: +SKIP
True
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from medseg.config import checkpoint_config
from medseg.device import resolve_device
from medseg.inference.sliding import sliding_window_logits
from medseg.io import InputError, load_volume
from medseg.io.checkpoint import load_checkpoint
from medseg.nets.registry import build_network
from medseg.transforms import infer_transforms
from medseg.transforms.presets import BODY_HU_THRESHOLD, body_mask
from medseg.transforms.resample import resample_to_reference


@dataclass
class Prediction:
    """A label map in the input's voxel grid, the input image it belongs to, and the label names."""

    labels: np.ndarray
    reference: nib.Nifti1Image
    label_names: dict[str, int]
    # One-line human-readable notes about this case (e.g. no body found); batch code prints them.
    warnings: list[str] = field(default_factory=list)


def _shape(tensor: torch.Tensor) -> str:
    return "[" + ",".join(str(n) for n in tensor.shape) + "]"


def state_dict_differences(saved: dict, expected: dict) -> list[str]:
    """Where saved weights do not fit a network's ``state_dict``: one phrase per tensor, network order.

    A tensor differs when its shape differs, when the network has it and the file does not, or the file has
    it and the network does not — what makes ``load_state_dict`` fail, counted here instead of parsed from
    PyTorch's error text.
    """
    out = []
    for key, tensor in expected.items():
        if key not in saved:
            out.append(f"{key} {_shape(tensor)} missing from the file")
        elif tuple(saved[key].shape) != tuple(tensor.shape):
            out.append(f"{key} {_shape(saved[key])} vs {_shape(tensor)}")
    out += [f"{key} {_shape(saved[key])} not in the network" for key in saved if key not in expected]
    return out


def model_from_checkpoint(
    ckpt: dict, device: torch.device, path: str | os.PathLike = "checkpoint"
) -> torch.nn.Module:
    """Rebuild the network recorded in a checkpoint (config migrated if older) and load its weights (eval).

    Raises:
        ConfigError: the recorded config is incomplete or invalid (from :func:`checkpoint_config`).
        InputError: the weights do not fit the recorded network, e.g. ``best.pt: weights do not match the
            recorded network: 85 tensors differ, first encoder.0.0.0.weight [4,1,3,3,3] vs [8,1,3,3,3]``
            (shape in the file vs shape in the network).
    """
    cfg = checkpoint_config(ckpt, path)
    model = build_network(cfg.model, ckpt["plan"].get("in_channels", 1), len(ckpt["labels"]))
    differ = state_dict_differences(ckpt["model"], model.state_dict())
    if differ:
        count = f"{len(differ)} tensor{'s differ' if len(differ) > 1 else ' differs'}"
        raise InputError(f"{path}: weights do not match the recorded network: {count}, first {differ[0]}")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:  # same names and shapes, yet refused (e.g. a dtype torch cannot copy)
        raise InputError(
            f"{path}: weights do not match the recorded network ({str(exc).splitlines()[0]})"
        ) from None
    return model.to(device).eval()


class Predictor:
    """Checkpoint → label maps for new scans, in each scan's exact shape and affine.

    Args:
        checkpoint: path to a medseg checkpoint (``best.pt``/``last.pt``).
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        overlap, sw_batch_size, roi_size: sliding-window settings; default from the checkpoint's config.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        device: str = "auto",
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        roi_size: list[int] | None = None,
    ) -> None:
        self.device = resolve_device(device)
        ckpt = load_checkpoint(checkpoint)
        self.checkpoint = Path(checkpoint)
        self.config = checkpoint_config(ckpt, checkpoint)
        self.plan = ckpt["plan"]
        self.label_names = {str(k): int(v) for k, v in ckpt["labels"].items()}
        self.model = model_from_checkpoint(ckpt, self.device, checkpoint)
        infer = self.config.infer
        self.roi_size = roi_size or infer.roi_size or self.plan["patch_size"]
        self.overlap = infer.overlap if overlap is None else overlap
        self.sw_batch_size = sw_batch_size or infer.sw_batch_size
        self.mode = infer.mode
        self.transforms = infer_transforms(self.plan, load=False)

    def preprocess(self, reference: nib.Nifti1Image) -> MetaTensor:
        """Channel-first model-space image (MetaTensor with the model-space affine)."""
        data = np.asarray(reference.dataobj, dtype=np.float32)[None]
        image = MetaTensor(
            torch.from_numpy(data), affine=torch.as_tensor(reference.affine, dtype=torch.float64)
        )
        return self.transforms({"image": image})["image"]

    def probabilities(self, image: MetaTensor) -> torch.Tensor:
        """Softmax probabilities ``(K, ...)`` on the model-space grid."""
        batch = image.as_tensor()[None].to(self.device)
        logits = sliding_window_logits(
            self.model, batch, self.roi_size, self.overlap, self.sw_batch_size, self.mode
        )
        return torch.softmax(logits[0], dim=0).cpu()

    def predict(self, path: str | os.PathLike) -> Prediction:
        """Segment one NIfTI file; raises :class:`medseg.io.InputError` for unusable input.

        A scan with no body (the plan crops to voxels above :data:`BODY_HU_THRESHOLD` HU and none is left:
        all air, or the few dense voxels vanish when resampled to the model grid) has nothing to segment:
        the result is an all-background map of the scan's shape with a line in ``warnings``, not a
        sliding window over an empty image.
        """
        reference = load_volume(path)
        image = self.preprocess(reference)
        if min(image.shape[1:]) == 0:
            dense = np.any(body_mask(np.asarray(reference.dataobj)))
            cause = (
                f"no body left on the model grid (voxels above {BODY_HU_THRESHOLD:g} HU vanish when "
                "resampled)"
                if dense
                else f"no body found (no voxel above {BODY_HU_THRESHOLD:g} HU)"
            )
            return Prediction(
                labels=np.zeros(reference.shape[:3], dtype=np.uint8),
                reference=reference,
                label_names=self.label_names,
                warnings=[f"{cause}: empty mask written"],
            )
        probs = self.probabilities(image)
        restored = resample_to_reference(probs, image.affine, reference.affine, reference.shape[:3])
        labels = torch.argmax(restored, dim=0).numpy().astype(np.uint8)
        return Prediction(labels=labels, reference=reference, label_names=self.label_names)
