"""Deterministic UIDs for the DICOM objects medseg derives from a source series (SEG, RT Structure Set).

A derived object's Series Instance UID and SOP Instance UID are hashed (``pydicom.uid.generate_uid`` with
``entropy_srcs``: SHA-512 of the sources, as a decimal under pydicom's UID root; PS3.5 §9 and B.2) from

* the output kind — one of :data:`DERIVED_KINDS` (``seg-BINARY``, ``seg-LABELMAP``, ``rtstruct``),
* the source Series Instance UID,
* the source SOP Instance UIDs, sorted (so file order does not matter),
* the model checkpoint's SHA-256 (empty when unknown),

so writing the same series with the same model twice gives the same UIDs: a DICOM node that sends again
after a crash *replaces* the object in the PACS instead of adding a duplicate. Another model, another kind,
or a slice more or less gives new UIDs. A re-segmentation of the same series with the same weights but other
post-processing keeps the UIDs on purpose: it replaces the earlier result.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.uid import generate_uid

#: The kinds of derived object that get their own UIDs.
DERIVED_KINDS = ("seg-BINARY", "seg-LABELMAP", "rtstruct")


@dataclass(frozen=True)
class DerivedUids:
    """The new series' and the one instance's UIDs of a derived object."""

    series_instance_uid: str
    sop_instance_uid: str


def derived_uids(
    kind: str, source_series_uid: str, source_sop_instance_uids: Iterable[str], checkpoint_sha256: str | None
) -> DerivedUids:
    """The Series and SOP Instance UIDs of a ``kind`` object derived from one source series by one model.

    >>> a = derived_uids("rtstruct", "1.2.3", ["1.2.3.2", "1.2.3.1"], "ab")
    >>> a == derived_uids("rtstruct", "1.2.3", ["1.2.3.1", "1.2.3.2"], "ab")
    True
    >>> a == derived_uids("rtstruct", "1.2.3", ["1.2.3.1", "1.2.3.2"], "cd")
    False

    Raises:
        ValueError: an unknown ``kind`` or no source SOP Instance UID.
    """
    if kind not in DERIVED_KINDS:
        raise ValueError(f"kind must be one of {DERIVED_KINDS}, got {kind!r}")
    sops = sorted(str(u) for u in source_sop_instance_uids)
    if not sops:
        raise ValueError("derived_uids: no source SOP Instance UID")
    base = ["medseg", kind, str(source_series_uid), *sops, checkpoint_sha256 or ""]
    return DerivedUids(
        series_instance_uid=generate_uid(entropy_srcs=[*base, "series"]),
        sop_instance_uid=generate_uid(entropy_srcs=[*base, "instance"]),
    )
