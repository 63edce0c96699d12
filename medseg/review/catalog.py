"""The cases of an output folder as the review server sees them: names, sidecars, files, flags and where
each flag points.

:func:`medseg.batch.review.collect_cases` already turns a ``medseg segment`` output folder into rows with
QA flags (:mod:`medseg.report.qa`). :class:`Catalog` keeps those rows by name — a URL names a case, never a
path: anything that is not one of these names is refused — plus each case's sidecar, and answers what the
viewer needs: label names with their display colours (:func:`medseg.export.codes.lookup`, the colours of
the static page, DICOM SEG and Slicer files), the optional overlays (α attention maps
``<case>_alpha_level<l>.nii.gz``, the uncertainty map ``<case>_entropy.nii.gz``, a saved correction) and
a location in patient space (RAS mm) for every flag about one structure (:func:`flag_location`).
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from medseg.batch.review import CaseReview, collect_cases
from medseg.export.codes import lookup

_STRUCTURE = np.ones((3, 3, 3), bool)
#: Overlay values below these are transparent: the gates' low coefficients (α, 0…1) and near-certain voxels
#: (normalised entropy, 0…1) would otherwise tint the whole scan.
ALPHA_SHOWN = 0.25
ENTROPY_SHOWN = 0.1


def corrected_name(case: str) -> str:
    return f"{case}_corrected.nii.gz"


def _centroid_ras(voxels: np.ndarray, affine: np.ndarray) -> list[float]:
    centre = voxels.mean(axis=0)
    return [round(float(v), 2) for v in (affine @ np.append(centre, 1.0))[:3]]


def flag_location(labels: np.ndarray, affine: np.ndarray, value: int, code: str) -> list[float] | None:
    """Where a flag about label ``value`` points, in RAS mm (None when the label is empty).

    ``truncated``: the centroid of the largest connected component (26-connectivity) that touches the scan
    border — what is cut off; ``fragmented``: the centroid of the largest component but one — the stray
    piece; any other code: the centroid of the whole structure.
    """
    boxes = ndimage.find_objects((labels == value).astype(np.uint8))
    if not boxes or boxes[0] is None:
        return None
    box = boxes[0]
    offset = np.array([s.start for s in box])
    inside = labels[box] == value
    if code in ("truncated", "fragmented"):
        components, count = ndimage.label(inside, structure=_STRUCTURE)
        sizes = np.bincount(components.ravel())[1:]
        order = list(np.argsort(-sizes) + 1)
        if code == "truncated":
            edge = [
                c
                for c in order
                if any(
                    (idx := np.nonzero(components == c)[axis]).min() + offset[axis] == 0
                    or idx.max() + offset[axis] == labels.shape[axis] - 1
                    for axis in range(3)
                )
            ]
            pick = edge[0] if edge else order[0]
        else:
            pick = order[1] if count > 1 else order[0]
        return _centroid_ras(np.argwhere(components == pick) + offset, affine)
    return _centroid_ras(np.argwhere(inside) + offset, affine)


class Catalog:
    """The cases of ``outdir`` (module docstring); :meth:`refresh` reads the folder again."""

    def __init__(self, outdir: str | os.PathLike) -> None:
        self.outdir = Path(outdir)
        self._lock = threading.Lock()
        self._cases: dict[str, CaseReview] = {}
        self._locations: dict[str, tuple[float, list]] = {}
        self.refresh()

    def refresh(self) -> None:
        cases = {c.name: c for c in collect_cases(self.outdir)}
        with self._lock:
            self._cases = cases

    @property
    def names(self) -> list[str]:
        return list(self._cases)

    def cases(self) -> list[CaseReview]:
        return sorted(self._cases.values(), key=CaseReview.sort_key)

    def get(self, name: str) -> CaseReview | None:
        """The case called ``name`` exactly, or None (never a path lookup)."""
        return self._cases.get(name) if isinstance(name, str) else None

    def sidecar(self, name: str) -> dict:
        try:
            side = json.loads((self.outdir / f"{name}.json").read_text())
        except (OSError, ValueError):
            return {}
        return side if isinstance(side, dict) else {}

    def labels(self, name: str) -> dict[str, int]:
        labels = self.sidecar(name).get("labels") or {}
        return {str(k): int(v) for k, v in labels.items() if isinstance(v, int) and 0 <= v <= 255}

    def overlays(self, name: str) -> list[dict]:
        """Optional overlays present for the case: α maps (coarsest level last) and the uncertainty map."""
        found = []
        for path in sorted(self.outdir.glob(f"{glob_escape(name)}_alpha_level*.nii.gz")):
            match = re.fullmatch(re.escape(name) + r"_alpha_level(\d+)\.nii\.gz", path.name)
            if match:
                found.append({"name": f"α attention, level {match.group(1)}", "file": path.name,
                              "colormap": "warm", "range": [ALPHA_SHOWN, 1.0]})  # fmt: skip
        entropy = self.outdir / f"{name}_entropy.nii.gz"
        if entropy.is_file():
            found.append({"name": "uncertainty (entropy)", "file": entropy.name, "colormap": "winter",
                          "range": [ENTROPY_SHOWN, 1.0]})  # fmt: skip
        return found

    def flags(self, name: str) -> list[dict]:
        """The case's flags, each with ``location`` (RAS mm) when it concerns one structure."""
        case = self.get(name)
        if case is None:
            return []
        mask = self.outdir / f"{name}.nii.gz"
        labels = self.labels(name)
        try:
            stamp = mask.stat().st_mtime_ns
        except OSError:
            return [f.to_dict() | {"location": None} for f in case.flags]
        cached = self._locations.get(name)
        if cached and cached[0] == stamp:
            return cached[1]
        img, data = None, None
        out = []
        for flag in case.flags:
            location = None
            if flag.label in labels and flag.code != "missing":
                if data is None:
                    img = nib.load(str(mask))
                    data = np.asarray(img.dataobj)
                location = flag_location(data, img.affine, labels[flag.label], flag.code)
            out.append(flag.to_dict() | {"location": location})
        self._locations[name] = (stamp, out)
        return out

    def label_table(self, name: str) -> list[dict]:
        """``[{"name", "value", "rgb"}]`` in value order, background left out."""
        return [
            {"name": n, "value": v, "rgb": list(lookup(n, v).rgb)}
            for n, v in sorted(self.labels(name).items(), key=lambda kv: kv[1])
            if v != 0
        ]


def glob_escape(text: str) -> str:
    """``text`` with the glob characters ``*?[`` escaped."""
    return re.sub(r"([*?\[])", r"[\1]", text)
