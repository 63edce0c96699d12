"""Splitting one batch over several processes or jobs that write into the same output folder.

>>> part = resolve_part(num_parts=4, part_id=1)
>>> part.select(["a", "b", "c", "d", "e", "f"])
['b', 'f']

The split is a pure function of the sorted case names: case ``i`` (0-based, in name order) belongs to part
``i % N``. Every part lists the same input the same way, so the parts are disjoint and together cover every
case, without talking to each other. Parts may run at once into one output folder (see
:mod:`medseg.batch.run` for why they do not clash).

Where the part comes from (:func:`resolve_part`), first match wins:

1. ``--num-parts N --part-id K`` (both or neither);
2. ``torchrun`` (``python -m torch.distributed.run --nproc_per_node N ...``): ``RANK`` and ``WORLD_SIZE``;
3. a Slurm job array (``sbatch --array=1-8``): part ``(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) //
   SLURM_ARRAY_TASK_STEP`` of ``SLURM_ARRAY_TASK_COUNT`` (so ``--array=1-8`` and ``--array=0-14:2`` work;
   an irregular list such as ``--array=1,5,9`` does not map to parts and is refused);
4. otherwise one part: everything.

torchrun inside a Slurm array (each array task a torchrun of W processes) gives ``COUNT × W`` parts, part
``slurm_index × W + RANK``. No process group is created: segmentation needs none, only the numbers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


class ShardingError(ValueError):
    """The part cannot be determined: inconsistent flags or environment variables (one line)."""


@dataclass(frozen=True)
class Part:
    """Part ``index`` of ``count`` (0-based), and where that came from (for the log)."""

    index: int = 0
    count: int = 1
    origin: str = "single run"

    def select(self, items: Sequence[T]) -> list[T]:
        """The items of this part: item ``i`` of ``items`` (already in a fixed order) when ``i % count ==
        index``."""
        return [item for i, item in enumerate(items) if i % self.count == self.index]

    def __str__(self) -> str:
        return f"part {self.index} of {self.count} ({self.origin})"


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ShardingError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _check(index: int, count: int, origin: str) -> Part:
    if count < 1:
        raise ShardingError(f"{origin}: number of parts must be at least 1, got {count}")
    if not 0 <= index < count:
        raise ShardingError(f"{origin}: part {index} is outside 0..{count - 1}")
    return Part(index, count, origin)


def _torchrun(env: Mapping[str, str]) -> Part | None:
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return None
    if "WORLD_SIZE" not in env or "RANK" not in env:
        raise ShardingError("torchrun environment incomplete: RANK and WORLD_SIZE must both be set")
    return _check(_int(env, "RANK"), _int(env, "WORLD_SIZE"), "torchrun RANK/WORLD_SIZE")


def _slurm_array(env: Mapping[str, str]) -> Part | None:
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    origin = "Slurm array SLURM_ARRAY_TASK_ID/COUNT"
    if "SLURM_ARRAY_TASK_COUNT" not in env:
        raise ShardingError(f"{origin}: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not")
    task, count = _int(env, "SLURM_ARRAY_TASK_ID"), _int(env, "SLURM_ARRAY_TASK_COUNT")
    low = _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
    step = _int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
    if step < 1 or (task - low) % step:
        raise ShardingError(
            f"{origin}: task {task} is not on the grid {low}, {low}+{step}, …; use a regular array "
            "(--array=A-B or A-B:S) or pass --num-parts/--part-id"
        )
    return _check((task - low) // step, count, origin)


def resolve_part(
    num_parts: int | None = None, part_id: int | None = None, env: Mapping[str, str] | None = None
) -> Part:
    """The part this process runs, from the flags or else the launcher's environment (module docstring).

    Raises:
        ShardingError: only one of the two flags, a part outside ``0..N-1``, or launcher variables that are
            incomplete, not integers or inconsistent.
    """
    if (num_parts is None) != (part_id is None):
        raise ShardingError("--num-parts and --part-id go together: give both or neither")
    if num_parts is not None:
        return _check(part_id, num_parts, "--num-parts/--part-id")
    env = os.environ if env is None else env
    torchrun, slurm = _torchrun(env), _slurm_array(env)
    if torchrun and slurm:
        origin = f"{slurm.origin} × {torchrun.origin}"
        return Part(slurm.index * torchrun.count + torchrun.index, slurm.count * torchrun.count, origin)
    return torchrun or slurm or Part()
