"""The network side of one ``medseg segment`` run: a DICOMweb input to pull and destinations to send to.

:meth:`NetworkPlan.make` checks every network option before any data is read (one-line
:class:`~medseg.io.InputError`) and loads credentials only when a DICOMweb server is involved (or a
``--credentials`` file is named, which is then checked too). The command then wraps the batch in
:meth:`NetworkPlan.pulled` and ends with :meth:`NetworkPlan.deliver`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from medseg.io import InputError
from medseg.network.credentials import Credentials, load_credentials
from medseg.network.deliver import DeliveryReport, deliver_cases
from medseg.network.destinations import Destination, parse_destination
from medseg.network.dicomweb import PullLimits
from medseg.network.options import NetworkOptions
from medseg.network.pull import PullQuery, is_dicomweb_source, pulled_series
from medseg.network.send import SendPolicy

#: Output types that write a file :func:`medseg.network.deliver.deliver_cases` sends.
DICOM_OUTPUT_TYPES = ("dicom-seg", "dicom-seg-labelmap", "dicom-rtstruct")


@dataclass(frozen=True)
class NetworkPlan:
    """What to pull (``query`` None: a local input) and where to send (``destinations``)."""

    query: PullQuery | None
    limits: PullLimits
    destinations: tuple[Destination, ...]
    credentials: Credentials | None
    policy: SendPolicy = field(default_factory=SendPolicy)

    @classmethod
    def make(cls, options: NetworkOptions, output_types: Iterable[str]) -> NetworkPlan:
        query = None
        if is_dicomweb_source(options.input):
            query = PullQuery(
                options.input,
                study_uid=options.study,
                modality=options.modality,
                study_date=options.study_date,
            )
        elif options.study or options.study_date or options.limits:
            raise InputError("--study, --study-date and --dicomweb-limits need a dicomweb+http(s):// input")
        destinations = tuple(parse_destination(text) for text in options.send)
        if destinations and not set(DICOM_OUTPUT_TYPES) & set(output_types):
            raise InputError("--send needs a DICOM output: --output-type dicom-seg (or dicom-rtstruct)")
        web = query is not None or any(d.kind == "dicomweb" for d in destinations)
        creds = load_credentials(options.credentials) if (web or options.credentials) else None
        return cls(query, PullLimits.parse(options.limits), destinations, creds)

    @contextlib.contextmanager
    def input_folder(
        self, input: str, output: str | os.PathLike, log: Callable[[str], object] = print
    ) -> Iterator[Path]:
        """The batch's input: the pulled folder (removed when the block ends) or ``input`` itself."""
        if self.query is None:
            yield Path(input)
            return
        with pulled_series(
            self.query, output, credentials=self.credentials, limits=self.limits, log=log
        ) as folder:
            yield folder

    def deliver(
        self, masks: Iterable[Path], output: str | os.PathLike, log: Callable[[str], object] = print
    ) -> DeliveryReport:
        """Send the cases' DICOM outputs to every destination (nothing when there is none)."""
        if not self.destinations:
            return DeliveryReport()
        return deliver_cases(
            masks, self.destinations, Path(output), self.policy, credentials=self.credentials, log=log
        )
