"""The organ-code table covers TotalSegmentator v2's 117 CT class names, each with a specific concept or an
explicitly documented generic one (never the "Tissue" code of unknown names)."""

from __future__ import annotations

import pytest
from pydicom.sr.codedict import codes

from medseg.export.codes import GENERIC_FALLBACKS, lookup

#: TotalSegmentator v2, task "total" (CT): the 117 class names.
TOTALSEGMENTATOR_CT = [
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
    "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus", "trachea",
    "thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate", "kidney_cyst_left",
    "kidney_cyst_right", "sacrum", "vertebrae_S1",
    *(f"vertebrae_L{i}" for i in range(5, 0, -1)),
    *(f"vertebrae_T{i}" for i in range(12, 0, -1)),
    *(f"vertebrae_C{i}" for i in range(7, 0, -1)),
    "heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right",
    "subclavian_artery_left", "common_carotid_artery_right", "common_carotid_artery_left",
    "brachiocephalic_vein_left", "brachiocephalic_vein_right", "atrial_appendage_left", "superior_vena_cava",
    "inferior_vena_cava", "portal_vein_and_splenic_vein", "iliac_artery_left", "iliac_artery_right",
    "iliac_vena_left", "iliac_vena_right", "humerus_left", "humerus_right", "scapula_left", "scapula_right",
    "clavicula_left", "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "spinal_cord",
    "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right",
    "gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left", "autochthon_right", "iliopsoas_left",
    "iliopsoas_right", "brain", "skull",
    *(f"rib_left_{i}" for i in range(1, 13)),
    *(f"rib_right_{i}" for i in range(1, 13)),
    "sternum", "costal_cartilages",
]  # fmt: skip

#: The names that get a documented generic concept, and the GENERIC_FALLBACKS entry each uses.
DOCUMENTED_GENERIC = {
    **{f"rib_{side}_{i}": "numbered rib" for side in ("left", "right") for i in range(1, 13)},
    "vertebrae_S1": "vertebrae s1",
    "kidney_cyst_left": "kidney cyst", "kidney_cyst_right": "kidney cyst",
    "portal_vein_and_splenic_vein": "portal vein and splenic vein",
    **{f"gluteus_{m}_{s}": f"gluteus {m}" for m in ("maximus", "medius", "minimus") for s in ("left", "right")},
    "iliopsoas_left": "iliopsoas", "iliopsoas_right": "iliopsoas",
    "autochthon_left": "autochthon", "autochthon_right": "autochthon",
    "hip_left": "hip", "hip_right": "hip",
}  # fmt: skip

S, R, L = codes.SCT, codes.cid244.Right, codes.cid244.Left
#: name → (expected type, expected modifier), every value read from pydicom's tables.
EXACT = {
    "lung_upper_lobe_left": (S.UpperLobeOfLung, L),
    "lung_lower_lobe_right": (S.LowerLobeOfLung, R),
    "lung_middle_lobe_right": (S.MiddleLobeOfRightLung, None),
    "kidney_left": (S.Kidney, L),
    "adrenal_gland_right": (S.AdrenalGland, R),
    "thyroid_gland": (S.Thyroid, None),
    "small_bowel": (S.SmallIntestine, None),
    "urinary_bladder": (S.Bladder, None),
    "sacrum": (S.Sacrum, None),
    "vertebrae_S1": (S.Sacrum, None),
    "vertebrae_L5": (S.L5Vertebra, None),
    "vertebrae_T7": (S.T7Vertebra, None),
    "vertebrae_C1": (S.C1Vertebra, None),
    "pulmonary_vein": (S.PulmonaryVein, None),
    "brachiocephalic_trunk": (S.BrachiocephalicTrunk, None),
    "subclavian_artery_right": (S.SubclavianArtery, R),
    "common_carotid_artery_left": (S.CommonCarotidArtery, L),
    "brachiocephalic_vein_left": (S.BrachiocephalicVein, L),
    "atrial_appendage_left": (S.LeftAuricularAppendage, None),
    "portal_vein_and_splenic_vein": (S.PortalVein, None),
    "iliac_artery_right": (S.IliacArtery, R),
    "iliac_vena_left": (S.IliacVein, L),
    "clavicula_right": (S.Clavicle, R),
    "humerus_left": (S.Humerus, L),
    "skull": (S.Skull, None),
    "rib_left_1": (S.Rib, L),
    "rib_right_12": (S.Rib, R),
    "costal_cartilages": (S.CostalCartilage, None),
    "gluteus_maximus_left": (S.MuscleOfLowerLimb, L),
    "iliopsoas_right": (S.MuscleOfLowerLimb, R),
    "autochthon_left": (S.ErectorSpinaeMuscle, L),
    "kidney_cyst_right": (S.Cyst, R),
}


def test_the_list_has_all_117_names():
    assert len(TOTALSEGMENTATOR_CT) == len(set(TOTALSEGMENTATOR_CT)) == 117


@pytest.mark.parametrize("name", TOTALSEGMENTATOR_CT)
def test_every_name_has_a_known_code_and_none_is_tissue(name):
    code = lookup(name)
    assert code.known and code.type.scheme_designator == "SCT"
    assert code.type != codes.SCT.Tissue and code.category != codes.cid7150.Tissue


@pytest.mark.parametrize(("name", "expected"), sorted(EXACT.items()))
def test_exact_codes_from_pydicoms_tables(name, expected):
    concept, modifier = expected
    code = lookup(name)
    assert (code.type.value, code.type.scheme_designator) == (concept.value, "SCT")
    assert (code.modifier.value if code.modifier else None) == (modifier.value if modifier else None)


def test_a_few_values_match_snomed_ct():
    """Spot checks against the SNOMED CT concept ids themselves (pydicom's tables are the source above)."""
    got = {n: lookup(n).type.value for n in ("lung_upper_lobe_left", "sacrum", "rib_left_3", "skull")}
    assert got == {"lung_upper_lobe_left": "45653009", "sacrum": "54735007", "rib_left_3": "113197003",
                   "skull": "89546000"}  # fmt: skip


def test_left_right_pairs_share_the_type_with_opposite_modifiers():
    pairs = [n[: -len("_left")] for n in TOTALSEGMENTATOR_CT if n.endswith("_left")]
    pairs += [f"rib_{{}}_{i}" for i in range(1, 13)]
    assert len(pairs) >= 30
    for stem in pairs:
        left_name, right_name = (
            (stem.format("left"), stem.format("right")) if "{}" in stem else (f"{stem}_left", f"{stem}_right")
        )
        if right_name not in TOTALSEGMENTATOR_CT:  # atrial_appendage_left has no right partner
            assert left_name == "atrial_appendage_left"
            continue
        left, right = lookup(left_name), lookup(right_name)
        assert (left.type, left.category, left.rgb) == (right.type, right.category, right.rgb)
        assert (left.modifier, right.modifier) == (codes.cid244.Left, codes.cid244.Right)
    for name in ("lung_upper_lobe", "lung_lower_lobe"):
        left, right = lookup(f"{name}_left"), lookup(f"{name}_right")
        assert left.type == right.type and (left.modifier, right.modifier) == (
            codes.cid244.Left,
            codes.cid244.Right,
        )


def test_generic_fallbacks_are_exactly_the_documented_ones():
    generic = {name: lookup(name) for name in TOTALSEGMENTATOR_CT if lookup(name).note is not None}
    assert set(generic) == set(DOCUMENTED_GENERIC)
    assert set(DOCUMENTED_GENERIC.values()) == set(GENERIC_FALLBACKS)
    for name, code in generic.items():
        entry = GENERIC_FALLBACKS[DOCUMENTED_GENERIC[name]]
        assert code.type == getattr(codes.SCT, entry.attribute) and code.note == entry.note
        assert code.category == getattr(codes.cid7150, entry.category)
    assert (len(TOTALSEGMENTATOR_CT) - len(generic), len(generic)) == (77, 40)


def test_kidney_cyst_is_a_morphologically_abnormal_structure():
    code = lookup("kidney_cyst_left")
    assert (
        code.category == codes.cid7150.MorphologicallyAbnormalStructure
        and code.rgb != lookup("kidney_left").rgb
    )


@pytest.mark.parametrize(
    ("name", "side"),
    [("left rib 3", "Left"), ("Rib-3-R", "Right"), ("ribs_12_left", "Left"), ("rib 7", None)],
)
def test_rib_spellings(name, side):
    code = lookup(name)
    assert code.type == codes.SCT.Rib and (code.modifier.meaning if code.modifier else None) == side


@pytest.mark.parametrize("name", ["rib_13_left", "rib_left_right_2", "cyst", "s1 lesion"])
def test_near_misses_stay_unknown(name):
    assert not lookup(name).known
