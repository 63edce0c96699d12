"""The network options of ``medseg segment`` as given on the command line (no heavy import: the command reads
its defaults from here, like :mod:`medseg.config.segment`); :mod:`medseg.network.plan` checks them."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class NetworkOptions:
    """The command line's network options, as given."""

    input: str
    study: str | None = None
    modality: str = "CT"
    study_date: str | None = None
    limits: str | None = None
    send: tuple[str, ...] = ()
    credentials: str | os.PathLike | None = None
