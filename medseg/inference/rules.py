"""Postprocessing rules for a prediction: read them (recorded in a checkpoint, or given) and apply them.

Training records per label the connected-component cleanup that did not lower validation Dice
(:mod:`medseg.engine.validation`, nnU-Net's rule) as ``{"<index>": {"largest_only": bool, "min_ml": float}}``
in ``best.pt``; a user may give a mapping of label index or name to a :class:`ComponentRule`. The rules run on
the input grid after the argmax, with the input's voxel spacing (``min_ml`` is in mL of the scan), through
:func:`medseg.inference.postprocess.apply_component_rules`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medseg.inference.postprocess import ComponentRule, apply_component_rules
from medseg.io import InputError


def _label_index(key: Any, label_names: Mapping[str, int], source: str) -> int:
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        index = int(key)
    elif isinstance(key, str) and key.strip().isdigit():
        index = int(key)
    elif isinstance(key, str) and key in label_names:
        index = int(label_names[key])
    else:
        raise InputError(f"{source}: postprocessing rule for unknown label {key!r}")
    if index not in set(label_names.values()) or index == 0:
        raise InputError(f"{source}: postprocessing rule for label {index}, not an organ label of this model")
    return index


def _rule(value: Any, source: str, key: Any) -> ComponentRule:
    if isinstance(value, ComponentRule):
        return value
    if isinstance(value, Mapping) and set(value) <= {"largest_only", "min_ml"}:
        try:
            return ComponentRule(
                largest_only=bool(value.get("largest_only", False)), min_ml=float(value.get("min_ml", 0.0))
            )
        except (TypeError, ValueError) as exc:
            raise InputError(f"{source}: postprocessing rule for label {key!r}: {exc}") from None
    raise InputError(
        f"{source}: postprocessing rule for label {key!r} is not {{'largest_only': bool, 'min_ml': float}} "
        f"(found {value!r})"
    )


def component_rules(
    raw: Mapping[Any, Any] | None, label_names: Mapping[str, int], source: str
) -> dict[int, ComponentRule]:
    """Rules keyed by label index, from ``{label: rule}`` where a label is an index (int or digit string) or a
    label name and a rule a :class:`ComponentRule` or ``{"largest_only": bool, "min_ml": float}`` (the form
    training records in ``best.pt``). Inactive rules are dropped.

    Raises:
        InputError: an unknown label or a malformed rule, naming ``source``.
    """
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InputError(f"{source}: postprocessing rules are not a mapping of label to rule")
    rules = {_label_index(k, label_names, source): _rule(v, source, k) for k, v in raw.items()}
    return {k: r for k, r in rules.items() if r.active}


def clean_labels(
    labels: np.ndarray,
    rules: Mapping[int, ComponentRule],
    spacing: Sequence[float],
    label_names: Mapping[str, int],
) -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
    """Apply ``rules`` (label index → rule) with the scan's ``spacing``; return the map and the report.

    The report has one entry per rule, keyed by label name: ``{"label": index, "largest_only", "min_ml",
    "removed_voxels"}`` (what ``Prediction.info["postprocess"]`` holds). No rules: the map itself, ``{}``.
    """
    if not rules:
        return labels, {}
    cleaned, removed = apply_component_rules(labels, rules, spacing)
    names = {int(v): str(k) for k, v in label_names.items()}
    report = {
        names.get(index, str(index)): {
            "label": int(index),
            "largest_only": bool(rule.largest_only),
            "min_ml": float(rule.min_ml),
            "removed_voxels": int(removed.get(index, 0)),
        }
        for index, rule in sorted(rules.items())
    }
    return cleaned, report
