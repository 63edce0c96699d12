"""Connected-component postprocessing of label maps: keep the largest component, drop small blobs.

As in nnU-Net (Isensee et al., Nat. Methods 2021, "postprocessing"): an organ is one connected structure, so
components other than the largest are usually false positives; tiny isolated blobs below a volume are
noise. Both are applied per label, on the label's own mask (26-connectivity, i.e. voxels that share a face,
an edge or a corner are connected), and removed voxels become background (0).

Rules are data, one :class:`ComponentRule` per label, so training can decide them on validation cases and
record them in the checkpoint, and a user can override them per label. Work is done inside each label's
bounding box (found for all labels in one pass), so a 512×512×300 map costs about one pass plus the work near
each structure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medseg.metrics.overlap import label_boxes

#: 26-connectivity: face, edge and corner neighbours.
STRUCTURE = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class ComponentRule:
    """What to keep of one label: only its largest component, and/or components of at least ``min_ml`` mL."""

    largest_only: bool = False
    min_ml: float = 0.0

    def __post_init__(self) -> None:
        if self.min_ml < 0:
            raise ValueError(f"min_ml must be >= 0, got {self.min_ml}")

    @property
    def active(self) -> bool:
        return self.largest_only or self.min_ml > 0


def component_sizes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(components, sizes)``: the 26-connected component index of every voxel (0 outside) and the voxel
    count of each component (``sizes[0]`` is the background and set to 0)."""
    components, n = ndimage.label(mask, structure=STRUCTURE)
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    sizes[0] = 0
    return components, sizes


def _keep(sizes: np.ndarray, rule: ComponentRule, voxel_ml: float) -> np.ndarray:
    """Boolean per component index: which components survive ``rule``."""
    keep = sizes > 0
    if rule.min_ml > 0:
        keep &= sizes * voxel_ml >= rule.min_ml
    if rule.largest_only and sizes.max(initial=0) > 0:
        keep &= np.arange(sizes.size) == int(np.argmax(sizes))
    return keep


def apply_component_rules(
    labels: np.ndarray, rules: Mapping[int, ComponentRule], spacing: Sequence[float]
) -> tuple[np.ndarray, dict[int, int]]:
    """Apply each label's rule; return the new label map and the number of voxels removed per label.

    Args:
        labels: integer label map (not modified).
        rules: label → rule; labels without a rule (or with an inactive one) are left alone.
        spacing: voxel size in mm along the array axes (for ``min_ml``).
    """
    out = labels.copy()
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
    active = {int(k): r for k, r in rules.items() if r.active and int(k) > 0}
    removed = dict.fromkeys(active, 0)
    if not active:
        return out, removed
    boxes = label_boxes(labels, max(active))
    for label, rule in active.items():
        box = boxes[label - 1]
        if box is None:
            continue
        mask = labels[box] == label
        components, sizes = component_sizes(mask)
        keep = _keep(sizes, rule, voxel_ml)
        drop = mask & ~keep[components]
        removed[label] = int(drop.sum())
        out[box][drop] = 0
    return out, removed
