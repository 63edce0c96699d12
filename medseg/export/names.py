"""Organ names as users spell them: normalisation and aliases, shared by the DICOM codes and the QA ranges.

A module of its own, without pydicom or highdicom, so that the review rules (:mod:`medseg.report.qa`) that
every ``medseg segment`` run imports do not load pydicom's SNOMED CT dictionary — only DICOM SEG writing
(:mod:`medseg.export.codes`) needs that (its import time: ``docs/speed.md``, section ``medseg.export.names``).
"""

from __future__ import annotations

import re

__all__ = ["ALIASES", "normalise_name"]

#: Other spellings (after normalisation) → canonical organ name.
ALIASES: dict[str, str] = {
    "kidneys": "kidney",
    "gall bladder": "gallbladder",
    "oesophagus": "esophagus",
    "adrenal": "adrenal gland",
    "adrenal glands": "adrenal gland",
    "suprarenal gland": "adrenal gland",
    "small bowel": "small intestine",
    "bowel small": "small intestine",
    "large bowel": "large intestine",
    "bladder": "urinary bladder",
    "lungs": "lung",
    "ivc": "inferior vena cava",
    "vena cava inferior": "inferior vena cava",
    "svc": "superior vena cava",
    "vertebrae": "vertebra",
    "ribs": "rib",
    "thyroid gland": "thyroid",
    "iliac artery common": "common iliac artery",
    "iliac vein common": "common iliac vein",
    # TotalSegmentator v2 CT class names (after the side is split off)
    "lung upper lobe": "upper lobe of lung",
    "lung lower lobe": "lower lobe of lung",
    "lung middle lobe right": "middle lobe of right lung",
    "right lung middle lobe": "middle lobe of right lung",
    "atrial appendage left": "left atrial appendage",
    "iliac vena": "iliac vein",
    "clavicula": "clavicle",
    "costal cartilages": "costal cartilage",
    "vertebra s1": "vertebrae s1",
}


def normalise_name(name: str) -> str:
    """``"Kidney_Right"``, ``"kidney-right"``, ``"KidneyRight"`` → ``"kidney right"``."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", str(name))
    return " ".join(re.split(r"[\s_.\-]+", spaced.lower())).strip()
