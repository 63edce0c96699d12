"""Windows of constant input run the network once: the answer for the first is reused for the rest.

CT normalisation clips intensities (the plan's ``a_min``), so every voxel of air outside the body becomes the
same value, and a sliding-window position that lies wholly in air is a constant window. The network is a
deterministic function of its input, so every constant window of the same value gets the same logits: the
first such window is run, its logits are kept, and later ones — in the same pass, in a mirrored pass (a flipped
constant window is the same window) or in the next case — take them without a forward pass. Nothing is
approximated: a skipped window's logits are the network's own answer for that input (bit for bit where the
back end computes a sample independently of the others in its batch; within float round-off where batch
composition changes its kernels). How many windows were skipped is counted per case
(``info["windows_skipped"]``).

This is exactly the "skip windows whose input lies entirely outside the body" of the speed issue, without
assuming background there; measured effect: ``docs/speed.md``, section ``medseg.inference.skipping``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: Distinct constant values remembered per network (each entry holds ``K × window`` float32 logits).
MAX_ENTRIES = 4


class ConstantWindows:
    """Wraps a window network ``windows (b, C, *roi) → logits (b, K, *roi)`` (module docstring).

    Attributes:
        skipped: constant windows answered from memory since the last :meth:`take_count`.

    Example:
        >>> net = ConstantWindows(lambda w: w.repeat(1, 2, 1, 1, 1) * 2)
        >>> out = net(torch.zeros(3, 1, 4, 4, 4))
        >>> out.shape, net.take_count()
        (torch.Size([3, 2, 4, 4, 4]), 2)
    """

    def __init__(self, network: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.network = network
        self.memory: dict[tuple[float, ...], torch.Tensor] = {}
        self.skipped = 0

    def take_count(self) -> int:
        """The number of skipped windows so far, and reset it to 0."""
        count, self.skipped = self.skipped, 0
        return count

    def _keys(self, windows: torch.Tensor) -> list[tuple[float, ...] | None]:
        flat = windows.detach().reshape(*windows.shape[:2], -1)
        low, high = flat.amin(-1), flat.amax(-1)
        constant = (low == high).all(1).tolist()
        return [tuple(low[i].tolist()) if constant[i] else None for i in range(len(constant))]

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        keys = self._keys(windows)
        # the first window of each unseen constant value runs; later ones (this batch included) reuse it
        run, first = [], set()
        for i, key in enumerate(keys):
            if key is None or (key not in self.memory and key not in first):
                run.append(i)
                if key is not None:
                    first.add(key)
        if len(run) == len(keys):
            out = self.network(windows)
        else:
            computed = self.network(windows[run]) if run else None
            parts: list[torch.Tensor | None] = [None] * len(keys)
            for j, i in enumerate(run):
                parts[i] = computed[j]  # type: ignore[index]
            for i, key in enumerate(keys):
                if parts[i] is None:
                    parts[i] = self.memory.get(key)  # type: ignore[arg-type]
                    if parts[i] is None:  # the first of its value in this very batch
                        parts[i] = parts[next(r for r in run if keys[r] == key)]
                    self.skipped += 1
            out = torch.stack(parts)  # type: ignore[arg-type]
        for i in run:
            key = keys[i]
            if key is not None and key not in self.memory and len(self.memory) < MAX_ENTRIES:
                self.memory[key] = out[i].detach().clone()
        return out
