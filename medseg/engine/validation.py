"""Validation during training: mean Dice per label, and the postprocessing decided on the validation cases.

Both work in model space (the plan's orientation and spacing) on the cached validation volumes, with the
same sliding window as inference.

Postprocessing (nnU-Net's rule, Isensee et al., Nat. Methods 2021): for each label, connected-component
cleanup is kept only when it does not lower the label's mean validation Dice. The candidates per label are

* ``none``;
* ``min_ml``: remove components smaller than 5 % of the median reference volume of that label (small blobs);
* ``largest_only``: keep only the largest 26-connected component.

The candidate with the highest mean Dice wins; on a tie the stronger cleanup is kept (it did not lower Dice and
removes what a reviewer would delete by hand). The decision is recorded in ``best.pt`` under
``"postprocess"`` as ``{label: {"largest_only": bool, "min_ml": float}}`` and applied by the predictor by
default (``--postprocess auto``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict

import numpy as np
import torch

from medseg.config.schema import plan_roi_size
from medseg.inference.postprocess import ComponentRule, apply_component_rules
from medseg.inference.sliding import sliding_window_logits
from medseg.metrics import dice_per_label

#: Small-blob threshold, as a fraction of the label's median reference volume on the validation cases.
SMALL_BLOB_FRACTION = 0.05


@torch.no_grad()
def validation_predictions(
    model,
    val_ds,
    cfg,
    device: torch.device,
    indices: Sequence[int] | None = None,
    roi_size: Sequence[int] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(prediction, reference)`` label maps in model space, one pair per validation volume (or per volume of
    ``indices``, e.g. one rank's share); the window is ``roi_size`` (the plan's,
    :func:`medseg.config.schema.plan_roi_size`) or the config's."""
    infer = cfg.infer
    roi = roi_size or cfg.roi_size
    mixed_precision = cfg.train.precision != "fp32"  # fp16 windows on CUDA, as before train.precision existed
    for i in range(len(val_ds)) if indices is None else indices:
        item = val_ds[i]
        image = torch.as_tensor(item["image"])[None].to(device)
        logits = sliding_window_logits(
            model, image, roi, infer.overlap, infer.sw_batch_size, infer.mode, mixed_precision
        )
        pred = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
        ref = torch.as_tensor(item["label"])[0].cpu().numpy().astype(np.int64)
        yield pred, ref


def validate(model, val_ds, cfg, plan: dict, device: torch.device, replicas=None) -> dict[str, float]:
    """Mean Dice per label over the validation volumes (model space), via :func:`medseg.metrics.dice_per_label`.

    With several training processes (``replicas``, a :class:`medseg.engine.distributed.Replicas`) each
    predicts its share of the volumes and the per-volume scores are gathered: every rank returns the same
    means, taken in volume order as one process would.
    """
    labels = {name: idx for name, idx in plan["labels"].items() if idx > 0}
    indices = list(range(len(val_ds))) if replicas is None else replicas.shard(len(val_ds))
    roi = plan_roi_size(cfg, plan)
    local = []
    for i, (pred, ref) in zip(
        indices, validation_predictions(model, val_ds, cfg, device, indices, roi), strict=True
    ):
        scores = dice_per_label(pred, ref, list(labels.values()))
        local.append((i, {name: float(scores[idx]) for name, idx in labels.items()}))
    per_label: dict[str, list[float]] = {name: [] for name in labels}
    for _, scores in sorted(local if replicas is None else replicas.gather(local), key=lambda s: s[0]):
        for name in labels:
            per_label[name].append(scores[name])
    means = {name: float(np.mean(v)) for name, v in per_label.items()}
    means["mean"] = float(np.mean(list(means.values()))) if means else float("nan")
    return means


def decide_postprocessing(
    pairs: list[tuple[np.ndarray, np.ndarray]], labels: dict[str, int], spacing
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per label, the component rule that does not lower validation Dice (see module docstring).

    Args:
        pairs: ``(prediction, reference)`` label maps in model space.
        labels: ``{name: index}``; background 0 is skipped.
        spacing: model-space voxel size in mm.

    Returns:
        ``(rules, report)``: rules as ``{str(index): {"largest_only", "min_ml"}}`` (only labels where cleanup
        was kept) and per label name the mean Dice of every candidate and the choice.
    """
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
    rules: dict[str, dict] = {}
    report: dict[str, dict] = {}
    for name, index in sorted(labels.items(), key=lambda kv: kv[1]):
        if index <= 0:
            continue
        volumes = [float((ref == index).sum()) * voxel_ml for _, ref in pairs]
        present = [v for v in volumes if v > 0]
        candidates = {"none": ComponentRule(), "largest_only": ComponentRule(largest_only=True)}
        if present:
            candidates["min_ml"] = ComponentRule(min_ml=SMALL_BLOB_FRACTION * float(np.median(present)))
        scores = {}
        for key, rule in candidates.items():
            dice = []
            for pred, ref in pairs:
                cleaned, _ = apply_component_rules(pred, {index: rule}, spacing)
                dice.append(float(dice_per_label(cleaned, ref, [index])[index]))
            scores[key] = float(np.mean(dice)) if dice else float("nan")
        strength = {"none": 0, "min_ml": 1, "largest_only": 2}
        best = max(scores, key=lambda k: (scores[k], strength[k]))
        if scores[best] < scores["none"]:  # never lower Dice (guards NaN comparisons too)
            best = "none"
        report[name] = {"dice": scores, "chosen": best}
        if best != "none":
            rules[str(index)] = asdict(candidates[best])
    return rules, report
