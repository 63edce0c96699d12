"""Three lanes for a batch of cases: load the next case and write the last one while the network runs.

nnU-Net overlaps preprocessing and export with the network using worker processes; here two background
threads do it (the heavy parts — gzip, numpy, torch — release the GIL, and a thread shares the scan's memory
instead of pickling it to a worker):

====================  =============================  ==========================================
lane                  runs                           holds at most
====================  =============================  ==========================================
loader (thread)       ``load(item)``: read, decode,  one case *ahead* of the network
                      preprocess
main                  ``compute(item, loaded)``      the current case
writer (thread)       ``write(item, computed)``:     one case *behind* the network
                      restore, encode, write
====================  =============================  ==========================================

so at most three cases are in memory at once, whatever the batch size. With ``prefetch=0`` the three steps run
one after the other in the calling thread (the one-at-a-time loop). Results come back in the items' order.
The three functions are the caller's: they should turn a failed case into a result (the batch reports it and
goes on); an exception that escapes one stops the batch, after the background work in flight has finished.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")
Computed = TypeVar("Computed")
Result = TypeVar("Result")


def run_lanes(
    items: Sequence[Item],
    load: Callable[[Item], Loaded],
    compute: Callable[[Item, Loaded], Computed],
    write: Callable[[Item, Computed], Result],
    prefetch: int = 1,
) -> Iterator[tuple[Item, Result]]:
    """``(item, write(item, compute(item, load(item))))`` for each item in order (module docstring).

    Args:
        prefetch: 0 — one case at a time in this thread; 1 — the next case loads and the previous one writes
            in background threads while ``compute`` runs here (more cases ahead would only cost memory: the
            network is the slowest lane).
    """
    if prefetch < 0:
        raise ValueError(f"prefetch must be 0 or 1, got {prefetch}")
    if prefetch == 0 or len(items) < 2:
        for item in items:
            yield item, write(item, compute(item, load(item)))
        return
    with ThreadPoolExecutor(1, "medseg-load") as loader, ThreadPoolExecutor(1, "medseg-write") as writer:
        ahead: Future = loader.submit(load, items[0])
        behind: tuple[Item, Future] | None = None
        for i, item in enumerate(items):
            loaded = ahead.result()
            if i + 1 < len(items):
                ahead = loader.submit(load, items[i + 1])
            computed = compute(item, loaded)
            del loaded
            if behind is not None:  # the previous case is written before the next write is queued
                yield behind[0], behind[1].result()
            behind = (item, writer.submit(write, item, computed))
            del computed
        if behind is not None:
            yield behind[0], behind[1].result()
