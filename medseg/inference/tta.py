"""Test-time mirroring and model ensembles: class probabilities averaged over flips and checkpoints.

Mirroring (as in nnU-Net, Isensee et al., Nat. Methods 2021, "test-time augmentation"): the model-space image
is flipped along a set of axes, predicted, and the probabilities flipped back; the softmax outputs of every flip
(the identity included) are averaged. Only flips that do not change what a label means are used:

* an axis in the plan's ``mirror_axes`` — the model saw that mirror in training, with the labels unchanged;
* the sagittal flip (the model-space axis whose orientation letter is L or R) when a left/right partner
  table can be built from the label names (:func:`swap_table`): after flipping back, channel ``kidney_left``
  takes the ``kidney_right`` probabilities and vice versa, because in the mirrored image the patient's left
  kidney lies where a right kidney does. Labels without a side are their own partner.

With lateralised labels and no complete table (``kidney_left`` without ``kidney_right``) the sagittal flip is
never used — not even when it is in ``mirror_axes`` — since it would silently swap left and right organs. All
combinations of the allowed axes are used (``2^n`` passes for ``n`` axes), the identity first.

Ensembles (fold ensembles, nnU-Net's ``predict`` with several folds): each model's mirrored passes are averaged
and the models weighted equally — every pass has weight ``1 / (models × flips)``. Probabilities are added in
place into one float32 accumulator, one channel at a time (:func:`accumulate`), so averaging costs one extra
``K × model grid`` buffer whatever the number of passes.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

#: Side words and their mirror images (lower case, whole tokens of a label name).
SIDES = {"left": "right", "right": "left", "l": "r", "r": "l"}


class SwapTableError(ValueError):
    """A lateralised label has no partner of the other side (or names two sides)."""


def _tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[^0-9a-z]+", name.lower()) if t]


def side_of(name: str) -> str | None:
    """``"left"``/``"right"``/``"l"``/``"r"`` when exactly one token of ``name`` is a side word, else None.

    >>> side_of("kidney_left"), side_of("Left-Lung"), side_of("adrenal_L"), side_of("liver")
    ('left', 'left', 'l', None)
    """
    sides = [t for t in _tokens(name) if t in SIDES]
    return sides[0] if len(sides) == 1 else None


def is_lateralised(label_names: Mapping[str, int]) -> bool:
    """Whether any label name carries a side token (``left``, ``right``, ``l``, ``r``)."""
    return any(t in SIDES for name in label_names for t in _tokens(name))


def swap_table(label_names: Mapping[str, int]) -> dict[int, int]:
    """Label index → index of its left/right partner (itself for labels without a side).

    Names are matched case-insensitively on their tokens, with the side token mirrored: ``kidney_left`` ↔
    ``kidney_right``, ``left_lung`` ↔ ``right_lung``, ``adrenal_l`` ↔ ``Adrenal_R``.

    Raises:
        SwapTableError: a label with a side has no partner, or a name holds two side tokens.
    """
    by_tokens = {tuple(_tokens(name)): index for name, index in label_names.items()}
    table = {}
    for name, index in label_names.items():
        tokens = _tokens(name)
        sided = [i for i, t in enumerate(tokens) if t in SIDES]
        if not sided:
            table[int(index)] = int(index)
            continue
        if len(sided) > 1:
            raise SwapTableError(f"label {name!r} names more than one side")
        mirrored = list(tokens)
        mirrored[sided[0]] = SIDES[tokens[sided[0]]]
        partner = by_tokens.get(tuple(mirrored))
        if partner is None:
            raise SwapTableError(f"label {name!r} has no {SIDES[tokens[sided[0]]]!r} partner")
        table[int(index)] = int(partner)
    return table


def sagittal_axis(orientation: str) -> int:
    """The model-space axis across the sagittal plane: where the plan's orientation code has L or R."""
    for axis, code in enumerate(orientation.upper()):
        if code in "LR":
            return axis
    raise ValueError(f"orientation {orientation!r} has no left/right axis")


def choose_flips(
    label_names: Mapping[str, int], orientation: str, mirror_axes: Sequence[int]
) -> tuple[list[tuple[int, ...]], dict[int, int] | None, str | None]:
    """Flips for test-time mirroring (module docstring): ``(flips, swap, note)``.

    ``flips`` are tuples of model-space axes, the identity ``()`` first; ``swap`` is the partner table applied
    to flips across the sagittal axis (None when no such flip is used); ``note`` says why the sagittal flip is
    not used, when it is not.
    """
    lr = sagittal_axis(orientation)
    allowed = {int(a) for a in mirror_axes}
    note = None
    try:
        swap: dict[int, int] | None = swap_table(label_names)
        allowed.add(lr)
    except SwapTableError as exc:
        swap = None
        allowed.discard(lr)
        note = f"sagittal flip not used: {exc}"
    axes = sorted(allowed)
    flips = [c for n in range(len(axes) + 1) for c in itertools.combinations(axes, n)]
    return flips, (swap if lr in allowed else None), note


def channel_order(
    swap: Mapping[int, int] | None, flip: Sequence[int], lr_axis: int, classes: int
) -> list[int]:
    """Which channel of a flipped-back prediction feeds each output channel (identity unless the flip crosses
    the sagittal plane)."""
    if swap is None or lr_axis not in flip:
        return list(range(classes))
    return [swap.get(c, c) for c in range(classes)]


def accumulate(total: torch.Tensor, probs: torch.Tensor, flip: Sequence[int], order: Sequence[int]) -> None:
    """``total[c] += flip(probs)[order[c]]`` in place, channel by channel (no full-size temporary).

    ``flip`` lists spatial axes (0-based, of the ``(K, X, Y, Z)`` tensors' spatial part); numpy's negative-stride
    views do the flip without copying.
    """
    acc, src = total.numpy(), probs.numpy()
    axes = tuple(int(a) for a in flip)
    for c, source in enumerate(order):
        acc[c] += np.flip(src[source], axis=axes) if axes else src[source]


def average_probabilities(
    image: torch.Tensor,
    passes: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    flips: Sequence[Sequence[int]],
    swap: Mapping[int, int] | None = None,
    lr_axis: int = 0,
) -> torch.Tensor:
    """Mean softmax over models × flips (module docstring), float32 ``(K, X, Y, Z)`` on the CPU.

    Args:
        image: model-space image ``(C, X, Y, Z)``.
        passes: one callable per model, ``image (C, X, Y, Z) → probabilities (K, X, Y, Z)`` (CPU, float32).
        flips: spatial axes to flip for each pass (``[()]`` for no mirroring).
        swap: partner table for flips that contain ``lr_axis``.
    """
    total: torch.Tensor | None = None
    for predict in passes:
        for flip in flips:
            dims = [1 + int(a) for a in flip]
            probs = predict(torch.flip(image, dims) if dims else image)
            if total is None and not flip:
                total = probs  # the first identity pass is the accumulator: no extra buffer
                continue
            if total is None:
                total = torch.zeros_like(probs)
            accumulate(total, probs, flip, channel_order(swap, flip, lr_axis, probs.shape[0]))
            del probs
    if total is None:
        raise ValueError("no model or no flip to average")
    n = len(passes) * len(flips)
    if n > 1:
        total /= n
    return total
