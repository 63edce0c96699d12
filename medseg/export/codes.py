"""Label name → coded concept and display colour, for DICOM SEG segments and viewer label tables.

A DICOM Segmentation describes each segment by a *Segmented Property Category* and *Type* (DICOM PS3.3
C.8.20.2, Segment Description Macro; codes from PS3.16 CID 7150 "Segmentation Property Categories" and
CID 7151 / 7154 "Segmentation Property Types" / "Abdominal Segmentation Types"), an optional *Type Modifier*
for laterality (PS3.16 CID 244 "Laterality": SCT 24028007 Right, SCT 7771000 Left) and a *Recommended
Display CIELab Value* (PS3.3 C.10.7.1.1, CIELab scaled to unsigned 16 bit).

Every code here is taken from pydicom's copy of the DICOM code tables (``codes.SCT.<Name>``,
``codes.cid7150.<Name>``), never typed by hand: a name that pydicom does not know fails at import, and the
test suite checks the code values of the organs medseg ships with. Paired organs are *post-coordinated*
(Kidney 64033007 + modifier Right 24028007), as DICOM's tables and dcmqi / 3D Slicer / the Imaging Data
Commons SEGs do; the pre-coordinated SNOMED concepts "Right kidney structure" (9846003) and "Left kidney
structure" (18639004) exist in SNOMED CT but not in DICOM's code tables (CID 7151), so viewers that look
segments up in those tables would not find them.

Coverage: every one of TotalSegmentator v2's 117 CT class names (``lung_upper_lobe_left``, ``rib_right_7``,
``vertebrae_T4``, ``iliac_vena_left`` …) resolves to a specific concept, except the names in
:data:`GENERIC_FALLBACKS`: pydicom's tables hold no concept for them, so each maps *explicitly* to a
documented, more generic (or nearest) concept and its :attr:`SegmentCode.note` says why — numbered ribs
(``rib_left_1`` … ``rib_right_12`` → Rib 113197003 + laterality: pydicom has no per-rib codes), S1 (→ Sacrum),
kidney cysts (→ Cyst 367643001 in category "Morphologically Abnormal Structure", the kidney's side as
modifier), the portal-and-splenic-vein label (→ Portal vein), the gluteal and iliopsoas muscles (→ Muscle of
lower limb 102292000), the autochthonous back muscles (→ Erector spinae muscle 44947003) and the hip bone
(→ Hip 29836001, the hip region). None of them falls to "Tissue". Concepts that carry
their side (Middle lobe of right lung, Left auricular appendage) get no modifier.

Colours are 3D Slicer's *GenericAnatomyColors* lookup table (Halle, Talos, Kikinis et al.; the colours of
Slicer's "General Anatomy" terminology), so a structure has the colour radiologists see in Slicer. A
structure without its own entry here takes the colour of its family's entry (:data:`FAMILY_COLORS`: lung
lobes the lung's, arteries the common iliac artery's red, veins the venous blue, bones and the skull the
bone colour, costal cartilage the rib's, muscles the muscle colour, the atrial appendage the heart's); the
kidney cyst, a lesion, takes "region 3" (amber) of the palette below, so that it stands out from the kidney.

Name matching (:func:`lookup`) is case-insensitive; ``_``, ``-``, ``.`` and spaces are one separator;
``KidneyRight`` splits at the capital; a leading or trailing ``left``/``right``/``l``/``r``/``lt``/``rt``
is the laterality (``kidney_right``, ``Right Kidney``, ``kidney-R``, ``l_adrenal_gland``); ``L1`` …
``vertebrae_T12`` name single vertebrae; ``rib_left_3`` / ``left rib 3`` / ``rib 3 right`` numbered ribs.
Unknown names get the generic "Tissue" code (SCT 85756007) with
the label name as segment label, and a colour from Slicer's "region" palette chosen by label index.

:func:`segment_descriptions` and :func:`algorithm_identification` turn these into highdicom's Segment
Description items (algorithm type AUTOMATIC, family DCM 123110 "Artificial Intelligence" of CID 7162).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from medseg.export.names import ALIASES, normalise_name

#: Segmented Property Category of every known organ (CID 7150: SCT 91723000 "Anatomical Structure").
ANATOMICAL_STRUCTURE: Code = codes.cid7150.AnatomicalStructure
#: Category and type of a label name that is not in the table (CID 7150 / SCT 85756007 "Tissue").
GENERIC_CATEGORY: Code = codes.cid7150.Tissue
GENERIC_TYPE: Code = codes.SCT.Tissue
#: Laterality modifiers (CID 244).
RIGHT: Code = codes.cid244.Right
LEFT: Code = codes.cid244.Left

#: Colour of a structure family (Slicer GenericAnatomyColors), for structures without an entry of their own.
FAMILY_COLORS: dict[str, tuple[int, int, int]] = {
    "lung": (197, 165, 145), "artery": (216, 101, 79), "vein": (0, 151, 206), "bone": (241, 214, 145),
    "rib": (253, 232, 158), "muscle": (192, 104, 88), "heart": (206, 110, 84), "kidney": (185, 102, 83),
}  # fmt: skip
_F = FAMILY_COLORS

#: Canonical organ name → (pydicom ``codes.SCT`` attribute, Slicer GenericAnatomyColors RGB).
ORGANS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "liver": ("Liver", (221, 130, 101)),
    "spleen": ("Spleen", (157, 108, 162)),
    "kidney": ("Kidney", (185, 102, 83)),
    "aorta": ("Aorta", (224, 97, 76)),
    "pancreas": ("Pancreas", (249, 180, 111)),
    "stomach": ("Stomach", (216, 132, 105)),
    "gallbladder": ("Gallbladder", (139, 150, 98)),
    "esophagus": ("Esophagus", (211, 171, 143)),
    "adrenal gland": ("AdrenalGland", (249, 186, 150)),
    "duodenum": ("Duodenum", (255, 253, 229)),
    "small intestine": ("SmallIntestine", (205, 167, 142)),
    "colon": ("Colon", (204, 168, 143)),
    "large intestine": ("LargeIntestine", (204, 168, 143)),
    "rectum": ("Rectum", (204, 168, 143)),
    "urinary bladder": ("Bladder", (222, 154, 132)),
    "lung": ("Lung", (197, 165, 145)),
    "heart": ("Heart", (206, 110, 84)),
    "portal vein": ("PortalVein", (0, 151, 206)),
    "splenic vein": ("SplenicVein", (0, 151, 206)),
    "hepatic vein": ("HepaticVein", (0, 151, 206)),
    "inferior vena cava": ("InferiorVenaCava", (0, 151, 206)),
    "superior vena cava": ("SuperiorVenaCava", (0, 151, 206)),
    "pulmonary artery": ("PulmonaryArtery", (0, 122, 171)),
    "common iliac artery": ("CommonIliacArtery", (216, 101, 79)),
    "common iliac vein": ("CommonIliacVein", (0, 151, 206)),
    "vertebra": ("Vertebra", (241, 214, 145)),
    "spine": ("Spine", (241, 214, 145)),
    "sacrum": ("Sacrum", (241, 214, 145)),
    "rib": ("Rib", (253, 232, 158)),
    "sternum": ("Sternum", (244, 217, 154)),
    "femur": ("Femur", (255, 238, 170)),
    "bone": ("Bone", (241, 214, 145)),
    "muscle": ("Muscle", (192, 104, 88)),
    "trachea": ("Trachea", (182, 228, 255)),
    "thyroid": ("Thyroid", (62, 162, 114)),
    "spinal cord": ("SpinalCord", (244, 214, 49)),
    "brain": ("Brain", (250, 250, 225)),
    "prostate": ("Prostate", (230, 158, 140)),
    "uterus": ("Uterus", (255, 181, 158)),
    "ureter": ("Ureter", (247, 182, 164)),
    "urethra": ("Urethra", (124, 186, 223)),
    # TotalSegmentator's CT classes (colours by family, FAMILY_COLORS)
    "upper lobe of lung": ("UpperLobeOfLung", _F["lung"]),
    "lower lobe of lung": ("LowerLobeOfLung", _F["lung"]),
    "middle lobe of right lung": ("MiddleLobeOfRightLung", _F["lung"]),
    "pulmonary vein": ("PulmonaryVein", _F["vein"]),
    "brachiocephalic trunk": ("BrachiocephalicTrunk", _F["artery"]),
    "subclavian artery": ("SubclavianArtery", _F["artery"]),
    "common carotid artery": ("CommonCarotidArtery", _F["artery"]),
    "brachiocephalic vein": ("BrachiocephalicVein", _F["vein"]),
    "iliac artery": ("IliacArtery", _F["artery"]),
    "iliac vein": ("IliacVein", _F["vein"]),
    "left atrial appendage": ("LeftAuricularAppendage", _F["heart"]),
    "humerus": ("Humerus", _F["bone"]),
    "scapula": ("Scapula", _F["bone"]),
    "clavicle": ("Clavicle", _F["bone"]),
    "skull": ("Skull", _F["bone"]),
    "costal cartilage": ("CostalCartilage", _F["rib"]),
}


@dataclass(frozen=True)
class Fallback:
    """A documented generic concept for a name pydicom's tables hold no specific concept for."""

    attribute: str  # pydicom ``codes.SCT`` attribute
    rgb: tuple[int, int, int]
    note: str
    category: str = "AnatomicalStructure"  # pydicom ``codes.cid7150`` attribute


_LIMB_MUSCLE = (
    "no {} concept in pydicom's SCT tables; Muscle of lower limb (a hip muscle, Terminologia Anatomica)"
)
#: Canonical name → its documented generic concept (see the module docstring). ``numbered rib`` stands for
#: ``rib_left_1`` … ``rib_right_12`` (matched by pattern).
GENERIC_FALLBACKS: dict[str, Fallback] = {
    "numbered rib": Fallback("Rib", _F["rib"], "no per-rib concepts in pydicom's SCT tables; Rib + side"),
    "vertebrae s1": Fallback("Sacrum", _F["bone"], "no S1 vertebra concept in pydicom's SCT tables; Sacrum"),
    "kidney cyst": Fallback(
        "Cyst", (230, 169, 29), "no kidney-cyst concept in pydicom's SCT tables; Cyst, side of the kidney",
        "MorphologicallyAbnormalStructure",
    ),
    "portal vein and splenic vein": Fallback(
        "PortalVein", _F["vein"], "one label for two veins; Portal vein, which the splenic vein joins"
    ),
    "gluteus maximus": Fallback("MuscleOfLowerLimb", _F["muscle"], _LIMB_MUSCLE.format("gluteus maximus")),
    "gluteus medius": Fallback("MuscleOfLowerLimb", _F["muscle"], _LIMB_MUSCLE.format("gluteus medius")),
    "gluteus minimus": Fallback("MuscleOfLowerLimb", _F["muscle"], _LIMB_MUSCLE.format("gluteus minimus")),
    "iliopsoas": Fallback("MuscleOfLowerLimb", _F["muscle"], _LIMB_MUSCLE.format("iliopsoas")),
    "autochthon": Fallback(
        "ErectorSpinaeMuscle", _F["muscle"],
        "no autochthonous-back-muscle concept in pydicom's SCT tables; Erector spinae, its main part",
    ),
    "hip": Fallback(
        "Hip", (177, 122, 101), "no hip-bone (os coxae) concept in pydicom's SCT tables; Hip (region)",
    ),
}  # fmt: skip

_SIDES = {"left": LEFT, "l": LEFT, "lt": LEFT, "right": RIGHT, "r": RIGHT, "rt": RIGHT}
#: Slicer GenericAnatomyColors "region 0" … "region 15": colours for names not in the table.
REGION_COLORS: tuple[tuple[int, int, int], ...] = (
    (185, 232, 61), (0, 226, 255), (251, 159, 255), (230, 169, 29), (0, 194, 113), (104, 160, 249),
    (221, 108, 158), (137, 142, 0), (230, 70, 0), (0, 147, 0), (0, 147, 248), (231, 0, 206),
    (129, 78, 0), (0, 116, 0), (0, 0, 255), (157, 0, 0),
)  # fmt: skip
_VERTEBRA = re.compile(r"(?:vertebrae? )?([ctl])\s?(\d{1,2})(?: vertebrae?)?")
_VERTEBRA_COUNT = {"c": 7, "t": 12, "l": 5}
_SIDE = r"(left|right|lt|rt|l|r)"
_RIB = re.compile(rf"(?:{_SIDE} )?ribs? (?:{_SIDE} )?(\d{{1,2}})(?: {_SIDE})?")


@dataclass(frozen=True)
class SegmentCode:
    """How one label is described: category, type, optional laterality modifier, and display colour.

    ``known`` is False for a name the table does not hold (generic Tissue code); ``note`` says why a name
    got a documented generic concept (:data:`GENERIC_FALLBACKS`), None for a specific one.
    """

    category: Code
    type: Code
    modifier: Code | None
    rgb: tuple[int, int, int]
    known: bool = True
    note: str | None = None

    @property
    def cielab(self) -> hd.color.CIELabColor:
        """The colour as highdicom's CIELab (D65) for RecommendedDisplayCIELabValue."""
        return hd.color.CIELabColor.from_rgb(*self.rgb)

    @property
    def rgb_float(self) -> tuple[float, float, float]:
        """The colour as 0–1 floats (3D Slicer's ``Segment<i>_Color``)."""
        return tuple(v / 255.0 for v in self.rgb)  # type: ignore[return-value]


def rgb_to_dicom_cielab(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """sRGB (0–255) → the three unsigned 16-bit values DICOM stores (PS3.3 C.10.7.1.1): L* scaled from
    0–100, a* and b* shifted by 128 and scaled from 0–255, each to 0–65535."""
    return hd.color.CIELabColor.from_rgb(*rgb).value


def _split_side(words: list[str]) -> tuple[list[str], Code | None]:
    if len(words) > 1 and words[0] in _SIDES:
        return words[1:], _SIDES[words[0]]
    if len(words) > 1 and words[-1] in _SIDES:
        return words[:-1], _SIDES[words[-1]]
    return words, None


def _vertebra(base: str) -> Code | None:
    """``l1``, ``vertebrae t12``, ``c 7`` → that vertebra's code (``codes.SCT.L1Vertebra`` …)."""
    match = _VERTEBRA.fullmatch(base)
    if not match:
        return None
    region, number = match[1], int(match[2])
    if not 1 <= number <= _VERTEBRA_COUNT[region]:
        return None
    return getattr(codes.SCT, f"{region.upper()}{number}Vertebra")


def _fallback(name: str, modifier: Code | None) -> SegmentCode:
    entry = GENERIC_FALLBACKS[name]
    category = getattr(codes.cid7150, entry.category)
    return SegmentCode(category, getattr(codes.SCT, entry.attribute), modifier, entry.rgb, note=entry.note)


def _rib(key: str) -> SegmentCode | None:
    """``rib left 3``, ``left rib 3``, ``rib 3 r`` → Rib + laterality (the fallback ``numbered rib``)."""
    match = _RIB.fullmatch(key)
    sides = [s for s in match.groups()[0:2] + match.groups()[3:] if s] if match else []
    if not match or len(sides) > 1 or not 1 <= int(match[3]) <= 12:
        return None
    return _fallback("numbered rib", _SIDES[sides[0]] if sides else None)


def lookup(name: str, index: int = 0, extra: Mapping[str, SegmentCode] | None = None) -> SegmentCode:
    """The :class:`SegmentCode` for a label name; unknown names get the generic Tissue code.

    Args:
        name: the label name as the checkpoint or dataset spells it.
        index: the label value; picks the palette colour of an unknown name (stable across cases).
        extra: project-specific entries (normalised name → code) that take precedence over the table,
            e.g. built from a checkpoint's label names.

    Example:
        >>> code = lookup("Kidney_L")
        >>> (code.type.value, code.modifier.meaning)
        ('64033007', 'Left')
    """
    key = normalise_name(name)
    if extra:
        for other, code in extra.items():
            if normalise_name(other) == key:
                return code
    base_words, side = _split_side(key.split())
    for words, modifier in ((key.split(), None), (base_words, side)):
        base = " ".join(words)
        base = ALIASES.get(base, base)
        if base in ORGANS:
            attribute, rgb = ORGANS[base]
            return SegmentCode(ANATOMICAL_STRUCTURE, getattr(codes.SCT, attribute), modifier, rgb)
        if base in GENERIC_FALLBACKS:
            return _fallback(base, modifier)
        if (vertebra := _vertebra(base)) is not None:
            return SegmentCode(ANATOMICAL_STRUCTURE, vertebra, modifier, ORGANS["vertebra"][1])
    if (rib := _rib(key)) is not None:
        return rib
    rgb = REGION_COLORS[(index - 1) % len(REGION_COLORS)]
    return SegmentCode(GENERIC_CATEGORY, GENERIC_TYPE, None, rgb, known=False)


def long_string(value: str, limit: int = 64) -> str:
    """``value`` cut to fit a DICOM LO (Long String, at most 64 characters; the SEG's character set is the
    source's, often ISO_IR 100, so nothing is appended)."""
    return str(value)[:limit]


def algorithm_identification(
    name: str, version: str, checkpoint_name: str | None, checkpoint_sha256: str | None
) -> hd.AlgorithmIdentificationSequence:
    """PS3.3 C.8.20.2 algorithm identification: family AI, version ``medseg <ver> <ckpt> <sha256[:12]>``."""
    parts = [f"medseg {version}", *(p for p in (checkpoint_name, (checkpoint_sha256 or "")[:12]) if p)]
    parameters = {k: v for k, v in (("checkpoint", checkpoint_name), ("sha256", checkpoint_sha256)) if v}
    return hd.AlgorithmIdentificationSequence(
        name=long_string(name),
        family=codes.cid7162.ArtificialIntelligence,
        version=long_string(" ".join(parts)),
        parameters=parameters or None,
    )


def segment_descriptions(
    segments: Sequence[tuple[int, str, SegmentCode]], algorithm: hd.AlgorithmIdentificationSequence
) -> list[hd.seg.SegmentDescription]:
    """One Segment Description per ``(segment number, label name, code)``; laterality as the Segmented
    Property Type Modifier (PS3.3 C.8.20.2, CID 244)."""
    out = []
    for number, name, code in segments:
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=long_string(name),
            segmented_property_category=code.category,
            segmented_property_type=code.type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=code.cielab,
        )
        if code.modifier is not None:
            modifier = hd.sr.CodedConcept.from_code(code.modifier)
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
        out.append(desc)
    return out


def _check_table() -> None:
    """Every table entry names a concept pydicom's DICOM code tables hold (fails at import otherwise)."""
    attributes = [a for a, _ in ORGANS.values()] + [f.attribute for f in GENERIC_FALLBACKS.values()]
    missing = [a for a in attributes if getattr(codes.SCT, a, None) is None]
    missing += [
        f.category for f in GENERIC_FALLBACKS.values() if getattr(codes.cid7150, f.category, None) is None
    ]
    unknown_alias = sorted(set(ALIASES.values()) - set(ORGANS) - set(GENERIC_FALLBACKS))
    if missing or unknown_alias:
        raise ImportError(f"codes table: not in pydicom's SCT tables {missing}; bad aliases {unknown_alias}")


_check_table()
