"""Quality flags for a segmented case: find the few doubtful cases among hundreds before anyone looks.

:func:`qa_flags` reads what a batch already measured — the organ statistics rows
(:func:`medseg.report.statistics.organ_statistics`), optionally the mean softmax entropy per label
(:func:`medseg.inference.maps.entropy_map` + :func:`~medseg.inference.maps.label_means`) and a description
of the scan (:class:`ImageInfo`) — and returns :class:`Flag` objects. Every threshold is a field of
:class:`QAConfig`; :func:`describe_rules` turns a config into the sentences the review page prints, so the
page always documents the rules that made its flags.

=================  ========  ==========================================================================
code               severity  rule (defaults)
=================  ========  ==========================================================================
missing            error     an expected label has no voxel (expected: ``QAConfig.expected_labels``,
                             default every label the model knows)
not_ct             error     the scan's minimum is above -500 HU (no air) or its maximum below 200 HU
                             (no bone or contrast): not a CT in HU, the masks mean nothing
volume_range       warning   volume outside the label's adult reference range
                             (:mod:`medseg.report.reference_ranges`)
fragmented         warning   more than 3 connected components (26-connectivity)
truncated          warning   the structure touches the scan border: cut off by the field of view, its
                             volume is a lower bound
low_confidence     warning   mean normalised softmax entropy inside the structure above 0.15 (the demo's
                             model: 0.02 liver … 0.06–0.08 pancreas at Dice 0.68; calibrate on yours)
oblique            info      a voxel axis more than 3° from the nearest patient axis (pictures show
                             the closest canonical axes)
spacing            info      a voxel spacing above 5 mm (thick slices) or below 0.3 mm
hu_out_of_range    info      values below -2000 or above 5000 HU (often a scanner's padding value
                             outside the reconstruction circle, or metal)
=================  ========  ==========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import nibabel as nib
import numpy as np
from nibabel.affines import obliquity

from medseg.io import voxel_spacing
from medseg.report.reference_ranges import DEFAULT_RANGES, ReferenceRange, reference_range

#: Severities, worst first (the review page sorts cases by their worst flag).
SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Flag:
    """One finding: a short ``code`` (table above), its ``severity``, the label it concerns (None for the
    whole case) and a one-line message for people."""

    code: str
    severity: str
    message: str
    label: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class QAConfig:
    """The QA rules' thresholds (module docstring). Every field is one rule's switch.

    Args:
        expected_labels: label names that must be present; None: every named label in the statistics rows
            (the checkpoint's labels).
        ranges: organ volume ranges by name (:data:`medseg.report.reference_ranges.DEFAULT_RANGES`).
        max_components: ``fragmented`` when a structure has more connected components.
        check_border: whether ``truncated`` is reported.
        entropy_threshold: ``low_confidence`` when the label's mean normalised entropy (0–1) is above.
        max_obliquity_deg: ``oblique`` above this angle.
        min_spacing_mm, max_spacing_mm: ``spacing`` outside these.
        ct_min_hu, ct_max_hu: ``not_ct`` when the scan's minimum is above ``ct_min_hu`` or its maximum
            below ``ct_max_hu``.
        hu_limits: ``hu_out_of_range`` when values fall outside.
    """

    expected_labels: tuple[str, ...] | None = None
    ranges: Mapping[str, ReferenceRange] = field(default_factory=lambda: dict(DEFAULT_RANGES))
    max_components: int = 3
    check_border: bool = True
    entropy_threshold: float = 0.15
    max_obliquity_deg: float = 3.0
    min_spacing_mm: float = 0.3
    max_spacing_mm: float = 5.0
    ct_min_hu: float = -500.0
    ct_max_hu: float = 200.0
    hu_limits: tuple[float, float] = (-2000.0, 5000.0)


@dataclass(frozen=True)
class ImageInfo:
    """What the input rules need to know about a scan. ``hu_min`` / ``hu_max`` None: not measured (e.g. only
    the mask's header was at hand), and the intensity rules are skipped."""

    spacing_mm: tuple[float, float, float]
    obliquity_deg: float
    axcodes: str
    hu_min: float | None = None
    hu_max: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> ImageInfo:
        """From :meth:`to_dict`'s output (e.g. a sidecar's ``image_info``)."""
        return cls(
            spacing_mm=tuple(float(v) for v in data["spacing_mm"]),  # type: ignore[arg-type]
            obliquity_deg=float(data["obliquity_deg"]),
            axcodes=str(data["axcodes"]),
            hu_min=None if data.get("hu_min") is None else float(data["hu_min"]),
            hu_max=None if data.get("hu_max") is None else float(data["hu_max"]),
        )


def obliquity_degrees(affine: np.ndarray) -> float:
    """Largest angle (degrees) between a voxel axis and its nearest patient axis (0 for a plain RAS/LPS grid;
    nibabel's :func:`nibabel.affines.obliquity`)."""
    return float(np.degrees(np.abs(obliquity(np.asarray(affine, dtype=np.float64)))).max())


def image_info(image: nib.spatialimages.SpatialImage, intensities: bool = True) -> ImageInfo:
    """Spacing, obliquity and axis codes from the header; minimum and maximum voxel value (HU for CT) when
    ``intensities`` (reads the voxels)."""
    affine = np.asarray(image.affine, dtype=np.float64)
    hu_min = hu_max = None
    if intensities:
        data = np.asanyarray(image.dataobj)
        if data.size:
            hu_min, hu_max = float(np.nanmin(data)), float(np.nanmax(data))
    return ImageInfo(
        spacing_mm=tuple(round(float(s), 4) for s in voxel_spacing(affine)),  # type: ignore[arg-type]
        obliquity_deg=round(obliquity_degrees(affine), 3),
        axcodes="".join(nib.aff2axcodes(affine)),
        hu_min=hu_min,
        hu_max=hu_max,
    )


def _ml(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _organ_flags(row: Mapping, config: QAConfig, entropy: Mapping[str, float | None]) -> Iterable[Flag]:
    name = str(row.get("name", row.get("label", "?")))
    volume = float(row.get("volume_ml") or 0.0)
    truncated = bool(row.get("touches_border"))
    ref = reference_range(name, config.ranges)
    if ref is not None and not ref.contains(volume):
        side = "below" if volume < ref.low_ml else "above"
        bound = " (touches the border: a lower bound)" if truncated and side == "below" else ""
        yield Flag(
            "volume_range",
            "warning",
            f"{name}: {_ml(volume)} mL {side} the adult range {_ml(ref.low_ml)}–{_ml(ref.high_ml)} mL{bound}",
            name,
        )
    components = int(row.get("components") or 0)
    if components > config.max_components:
        yield Flag(
            "fragmented",
            "warning",
            f"{name}: {components} separate pieces (more than {config.max_components})",
            name,
        )
    if config.check_border and truncated:
        yield Flag(
            "truncated",
            "warning",
            f"{name}: touches the scan border, probably cut off by the field of view (volume is a lower bound)",
            name,
        )
    value = entropy.get(name)
    if value is not None and math.isfinite(value) and value > config.entropy_threshold:
        yield Flag(
            "low_confidence",
            "warning",
            f"{name}: mean softmax entropy {value:.2f} above {config.entropy_threshold:g} (model unsure)",
            name,
        )


def _input_flags(info: ImageInfo, config: QAConfig) -> Iterable[Flag]:
    if info.obliquity_deg > config.max_obliquity_deg:
        yield Flag(
            "oblique",
            "info",
            f"oblique scan: {info.obliquity_deg:.1f}° from the patient axes (pictures show the closest axes)",
        )
    spacing = "×".join(f"{s:.2f}" for s in info.spacing_mm)
    if max(info.spacing_mm) > config.max_spacing_mm:
        yield Flag(
            "spacing", "info", f"thick slices: spacing {spacing} mm (above {config.max_spacing_mm:g} mm)"
        )
    if min(info.spacing_mm) < config.min_spacing_mm:
        yield Flag("spacing", "info", f"very fine spacing {spacing} mm (below {config.min_spacing_mm:g} mm)")
    if info.hu_min is None or info.hu_max is None:
        return
    lo, hi = info.hu_min, info.hu_max
    if lo > config.ct_min_hu or hi < config.ct_max_hu:
        yield Flag(
            "not_ct",
            "error",
            f"intensities {lo:g} to {hi:g} do not look like CT in HU (expected a minimum below "
            f"{config.ct_min_hu:g} and a maximum above {config.ct_max_hu:g})",
        )
    if lo < config.hu_limits[0] or hi > config.hu_limits[1]:
        yield Flag(
            "hu_out_of_range",
            "info",
            f"values {lo:g} to {hi:g} HU reach beyond {config.hu_limits[0]:g} to {config.hu_limits[1]:g} "
            "(padding value or metal?)",
        )


def qa_flags(
    stat_rows: Sequence[Mapping],
    config: QAConfig | None = None,
    *,
    entropy: Mapping[str, float | None] | None = None,
    image_info: ImageInfo | None = None,
) -> list[Flag]:
    """The flags of one case (module docstring), worst severity first, then in label order.

    Args:
        stat_rows: the case's organ statistics rows (``name``, ``voxels``, ``volume_ml``, ``components``,
            ``touches_border``; one row per named label, as :func:`organ_statistics` writes them).
        config: thresholds (:class:`QAConfig`; default the documented defaults).
        entropy: mean normalised softmax entropy per label name (computing it is the predictor's job:
            :mod:`medseg.inference.maps`); None skips ``low_confidence``.
        image_info: the scan's description (:func:`image_info`); None skips the input rules.
    """
    config = config or QAConfig()
    entropy = entropy or {}
    rows = {str(r.get("name")): r for r in stat_rows}
    expected = list(config.expected_labels) if config.expected_labels is not None else list(rows)
    flags: list[Flag] = []
    for name in expected:
        row = rows.get(name)
        if row is None or not int(row.get("voxels") or 0):
            flags.append(Flag("missing", "error", f"{name}: expected but not found (empty)", name))
    for row in rows.values():
        if int(row.get("voxels") or 0):
            flags.extend(_organ_flags(row, config, entropy))
    if image_info is not None:
        flags.extend(_input_flags(image_info, config))
    return sorted(flags, key=lambda f: SEVERITIES.index(f.severity))


def worst_severity(flags: Iterable[Flag]) -> str | None:
    """The worst severity among ``flags`` (``"error"`` before ``"warning"`` before ``"info"``), None if none."""
    ranks = [SEVERITIES.index(f.severity) for f in flags]
    return SEVERITIES[min(ranks)] if ranks else None


def describe_rules(config: QAConfig | None = None) -> list[tuple[str, str, str]]:
    """``(code, severity, rule)`` for every rule, in the words and with the thresholds of ``config``."""
    c = config or QAConfig()
    expected = (
        ", ".join(c.expected_labels) if c.expected_labels is not None else "every label the model knows"
    )
    return [
        ("missing", "error", f"an expected label has no voxel (expected: {expected})"),
        (
            "not_ct",
            "error",
            f"the scan's minimum is above {c.ct_min_hu:g} HU or its maximum below {c.ct_max_hu:g} HU: "
            "not a CT in Hounsfield units",
        ),
        ("volume_range", "warning", "volume outside the label's adult reference range (table below)"),
        ("fragmented", "warning", f"more than {c.max_components} connected components (26-connectivity)"),
        (
            "truncated",
            "warning",
            "the structure touches the scan border: cut off by the field of view, its volume is a lower bound"
            + ("" if c.check_border else " (rule switched off)"),
        ),
        (
            "low_confidence",
            "warning",
            f"mean normalised softmax entropy (0 = certain, 1 = uniform) inside the structure above "
            f"{c.entropy_threshold:g}",
        ),
        ("oblique", "info", f"a voxel axis more than {c.max_obliquity_deg:g}° from the nearest patient axis"),
        (
            "spacing",
            "info",
            f"a voxel spacing above {c.max_spacing_mm:g} mm or below {c.min_spacing_mm:g} mm",
        ),
        (
            "hu_out_of_range",
            "info",
            f"values below {c.hu_limits[0]:g} or above {c.hu_limits[1]:g} HU (padding value or metal)",
        ),
    ]
