"""Segment a scan with a checkpoint: preprocess with its plan, slide, restore to the scan's geometry.

>>> predictor = Predictor("runs/demo/best.pt")            # doctest: +SKIP
>>> result = predictor.predict("ct.nii.gz")                 # doctest: +SKIP
>>> result.labels.shape == result.reference.shape           # doctest: +SKIP
True
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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
from medseg.transforms.resample import resample_to_reference


@dataclass
class Prediction:
    """A label map in the input's voxel grid, the input image it belongs to, and the label names."""

    labels: np.ndarray
    reference: nib.Nifti1Image
    label_names: dict[str, int]


def model_from_checkpoint(
    ckpt: dict, device: torch.device, path: str | os.PathLike = "checkpoint"
) -> torch.nn.Module:
    """Rebuild the network recorded in a checkpoint (config migrated if older) and load its weights (eval)."""
    cfg = checkpoint_config(ckpt, path)
    model = build_network(cfg.model, ckpt["plan"].get("in_channels", 1), len(ckpt["labels"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
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
        """Segment one NIfTI file; raises :class:`medseg.io.InputError` for unusable input."""
        reference = load_volume(path)
        image = self.preprocess(reference)
        probs = self.probabilities(image)
        restored = resample_to_reference(probs, image.affine, reference.affine, reference.shape[:3])
        labels = torch.argmax(restored, dim=0).numpy().astype(np.uint8)
        return Prediction(labels=labels, reference=reference, label_names=self.label_names)
