"""Validation during training: the validation cases segmented as ``medseg segment`` segments them, scored in
each scan's own geometry; and the postprocessing decided on those predictions.

The predictions come from the one inference path, :meth:`medseg.inference.Predictor.predict`, on a predictor
made from the network being trained (:func:`validation_predictor`, :meth:`Predictor.from_network`) with the
run's plan, label names and ``infer`` settings: the scan is read and preprocessed as ``medseg segment`` does
(:meth:`Predictor.prepare`), slid in ``segment``'s default precision (``auto``,
:func:`medseg.device.resolve_precision`: bf16 where the CPU or GPU has it), without mirroring, restored to the
scan's grid and compared there with the label file as stored — so the validation Dice of ``best.pt`` is the
Dice of ``medseg segment -m best.pt --postprocess none`` on those cases (tested). Before, validation ran on the
training cache's model-space volumes (resampled label, float32 or fp16 windows) and measured something else.

:class:`ValidationCases` reads and preprocesses each case once and keeps it (``data.cache: memory``, the
default: the model-space image, the scan's header and affine — not its voxels — and its label map on the scan's
grid) or reads it again at every validation (``disk`` and ``none``: nothing kept).

Postprocessing (nnU-Net's rule, Isensee et al., Nat. Methods 2021): for each label, connected-component
cleanup is kept only when it does not lower the label's mean validation Dice. The candidates per label are

* ``none``;
* ``min_ml``: remove components smaller than 5 % of the median reference volume of that label (small blobs);
* ``largest_only``: keep only the largest 26-connected component.

The candidate with the highest mean Dice wins; on a tie the stronger cleanup is kept (it did not lower Dice and
removes what a reviewer would delete by hand). The candidates are tried on the scan-grid predictions with each
scan's spacing — where ``medseg segment`` applies them. The decision is recorded in ``best.pt`` under
``"postprocess"`` as ``{label: {"largest_only": bool, "min_ml": float}}`` and applied by the predictor by
default (``--postprocess auto``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, replace

import nibabel as nib
import numpy as np
import torch

from medseg.config.segment import SegmentOptions
from medseg.inference.postprocess import ComponentRule, apply_component_rules
from medseg.inference.predictor import Predictor
from medseg.inference.prepared import Prepared
from medseg.io import InputError, load_volume, voxel_spacing
from medseg.io.plan import Plan
from medseg.metrics import check_label_map, dice_per_label

#: Small-blob threshold, as a fraction of the label's median reference volume on the validation cases.
SMALL_BLOB_FRACTION = 0.05
#: The precision validation predicts in: ``medseg segment``'s default.
VALIDATION_PRECISION = "auto"


def reference_labels(path, reference) -> np.ndarray:
    """The label map of ``path`` as stored (unsigned integers), checked to lie on the scan ``reference``'s grid.

    Raises:
        InputError: unreadable, not a label map, or another shape than the scan's.
    """
    try:
        labels = check_label_map(np.asanyarray(load_volume(path).dataobj), str(path))
    except ValueError as exc:  # InputError too
        raise InputError(str(exc)) from None
    if labels.shape != tuple(reference.shape[:3]):
        raise InputError(
            f"{path}: label map shape {labels.shape} differs from its scan's {tuple(reference.shape[:3])}"
        )
    return labels


class ValidationCases:
    """The validation cases of a run (``{"image", "label", "case"}`` dicts, :func:`medseg.data.datasets.
    training_cases`) as the predictor reads them; ``keep``: hold each case once read (module docstring)."""

    def __init__(self, cases: Sequence[dict], keep: bool = True) -> None:
        self.cases = list(cases)
        self.keep = keep
        self._kept: dict[int, tuple[Prepared, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def name(self, index: int) -> str:
        return self.cases[index]["case"]

    def load(self, index: int, predictor: Predictor) -> tuple[Prepared, np.ndarray]:
        """``(scan prepared by predictor, label map on the scan's grid)`` of case ``index``; a kept case is
        handed over as a copy that :meth:`Predictor.predict` may release."""
        if index not in self._kept:
            case = self.cases[index]
            prepared = predictor.prepare(case["image"])
            ref = reference_labels(case["label"], prepared.reference)
            if not self.keep:
                return prepared, ref
            self._kept[index] = (replace(prepared, reference=_geometry_only(prepared)), ref)
        prepared, ref = self._kept[index]
        return replace(prepared), ref


def _geometry_only(prepared: Prepared):
    """The scan's header and affine without its voxels, which :meth:`Predictor.predict` reads only for a scan
    with no body on the model grid (then the scan is kept as it is): what a kept case need not hold."""
    reference = prepared.reference
    if min(prepared.image.shape[1:]) == 0:
        return reference
    nothing = np.broadcast_to(np.zeros((), np.uint8), tuple(reference.shape[:3]))  # no memory behind it
    return nib.Nifti1Image(nothing, reference.affine, header=reference.header)


def validation_predictor(model: torch.nn.Module, cfg, plan: Plan, device: torch.device) -> Predictor:
    """The predictor validation runs: ``model`` as it is now, the run's plan, labels and ``infer`` settings,
    ``medseg segment``'s default precision, no mirroring, raw argmax (no postprocessing)."""
    options = SegmentOptions(precision=VALIDATION_PRECISION)
    return Predictor.from_network(model, plan, plan.labels, options, device=device, config=cfg)


@torch.no_grad()
def validation_predictions(
    model: torch.nn.Module,
    cases: ValidationCases,
    cfg,
    plan: Plan,
    device: torch.device,
    indices: Sequence[int] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(prediction, reference, spacing)`` per validation case (or per case of ``indices``, e.g. one rank's
    share): label maps on the scan's grid, as ``medseg segment --postprocess none`` writes them, and the
    scan's voxel spacing in mm."""
    predictor = validation_predictor(model, cfg, plan, device)
    for i in range(len(cases)) if indices is None else indices:
        prepared, ref = cases.load(i, predictor)
        spacing = voxel_spacing(prepared.reference.affine)
        yield predictor.predict(prepared).labels, ref, spacing


def validate(
    model, cases: ValidationCases, cfg, plan: Plan, device: torch.device, replicas=None
) -> dict[str, float]:
    """Mean Dice per label over the validation cases (scan grids), via :func:`medseg.metrics.dice_per_label`.

    With several training processes (``replicas``, a :class:`medseg.engine.distributed.Replicas`) each
    predicts its share of the cases and the per-case scores are gathered: every rank returns the same
    means, taken in case order as one process would.
    """
    labels = {name: idx for name, idx in plan.labels.items() if idx > 0}
    indices = list(range(len(cases))) if replicas is None else replicas.shard(len(cases))
    local = []
    for i, (pred, ref, _) in zip(
        indices, validation_predictions(model, cases, cfg, plan, device, indices), strict=True
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
    pairs: Iterable[tuple], labels: dict[str, int], spacing=None
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per label, the component rule that does not lower validation Dice (see module docstring).

    Args:
        pairs: ``(prediction, reference, spacing)`` label maps of one grid and its voxel size in mm, or
            ``(prediction, reference)`` pairs (or a spacing of None: folders saved before the scan-grid
            validation) on a grid of voxel size ``spacing``; iterated once per label and candidate.
        labels: ``{name: index}``; background 0 is skipped.
        spacing: the voxel size of the pairs that bring none.

    Returns:
        ``(rules, report)``: rules as ``{str(index): {"largest_only", "min_ml"}}`` (only labels where cleanup
        was kept) and per label name the mean Dice of every candidate and the choice.
    """

    def spaced(pair: tuple) -> tuple:
        own = pair[2] if len(pair) > 2 else None
        return pair[0], pair[1], spacing if own is None else own

    def voxel_ml(size) -> float:
        return float(np.prod(np.asarray(size, dtype=np.float64))) / 1000.0

    rules: dict[str, dict] = {}
    report: dict[str, dict] = {}
    for name, index in sorted(labels.items(), key=lambda kv: kv[1]):
        if index <= 0:
            continue
        volumes = [float((ref == index).sum()) * voxel_ml(size) for _, ref, size in map(spaced, pairs)]
        present = [v for v in volumes if v > 0]
        candidates = {"none": ComponentRule(), "largest_only": ComponentRule(largest_only=True)}
        if present:
            candidates["min_ml"] = ComponentRule(min_ml=SMALL_BLOB_FRACTION * float(np.median(present)))
        scores = {}
        for key, rule in candidates.items():
            dice = []
            for pred, ref, size in map(spaced, pairs):
                cleaned, _ = apply_component_rules(pred, {index: rule}, size)
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
