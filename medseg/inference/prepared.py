"""A scan read and preprocessed ahead of the network, and the seconds and peak memory of each stage
(:class:`medseg.inference.Prediction` ``info``)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import nibabel as nib
from monai.data import MetaTensor


def peak_rss_gb() -> float | None:
    """The process's peak resident memory so far in GB (``getrusage``), or None where unavailable."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**30 if sys.platform == "darwin" else 2**20), 3)  # bytes on macOS, KiB on Linux


class _Stages:
    """Seconds per stage and the running peak RSS after each (``Prediction.info``); ``earlier``: the stages
    of a :class:`Prepared` scan, counted in the total."""

    def __init__(self, earlier: _Stages | None = None) -> None:
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = dict(earlier.seconds) if earlier else {}
        self.peak: dict[str, float | None] = dict(earlier.peak) if earlier else {}
        self.start -= sum(self.seconds.values())

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self.last, 3)
        self.peak[stage] = peak_rss_gb()
        self.last = now

    def info(self) -> dict[str, Any]:
        return {
            "seconds": {**self.seconds, "total": round(time.perf_counter() - self.start, 3)},
            "peak_rss_gb": self.peak,
        }


@dataclass
class Prepared:
    """A scan read and preprocessed ahead of the network (:meth:`Predictor.prepare`, e.g. in a loader thread
    while the network works on the previous scan); :meth:`Predictor.predict` takes it instead of a path and
    releases its model-space image (``dataclasses.replace(prepared)`` hands it a copy that keeps the image,
    as training's validation does to predict a cached case every epoch)."""

    reference: nib.spatialimages.SpatialImage
    image: MetaTensor | None
    stages: _Stages
