"""TotalSegmentator's 117 CT structures (its ``total`` task, v2, as its ``map_to_binary.py`` names them — the
labels of the nnU-Net model folders a user brings, docs/nnunet.md) all get a SNOMED CT code in DICOM SEG, with
the laterality of ``_left`` / ``_right`` names; none falls back to the generic Tissue code."""

from __future__ import annotations

from medseg.export.codes import lookup

TOTALSEGMENTATOR_TOTAL = (
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "liver",
    "stomach",
    "pancreas",
    "adrenal_gland_right",
    "adrenal_gland_left",
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
    "esophagus",
    "trachea",
    "thyroid_gland",
    "small_bowel",
    "duodenum",
    "colon",
    "urinary_bladder",
    "prostate",
    "kidney_cyst_left",
    "kidney_cyst_right",
    "sacrum",
    "vertebrae_S1",
    "vertebrae_L5",
    "vertebrae_L4",
    "vertebrae_L3",
    "vertebrae_L2",
    "vertebrae_L1",
    "vertebrae_T12",
    "vertebrae_T11",
    "vertebrae_T10",
    "vertebrae_T9",
    "vertebrae_T8",
    "vertebrae_T7",
    "vertebrae_T6",
    "vertebrae_T5",
    "vertebrae_T4",
    "vertebrae_T3",
    "vertebrae_T2",
    "vertebrae_T1",
    "vertebrae_C7",
    "vertebrae_C6",
    "vertebrae_C5",
    "vertebrae_C4",
    "vertebrae_C3",
    "vertebrae_C2",
    "vertebrae_C1",
    "heart",
    "aorta",
    "pulmonary_vein",
    "brachiocephalic_trunk",
    "subclavian_artery_right",
    "subclavian_artery_left",
    "common_carotid_artery_right",
    "common_carotid_artery_left",
    "brachiocephalic_vein_left",
    "brachiocephalic_vein_right",
    "atrial_appendage_left",
    "superior_vena_cava",
    "inferior_vena_cava",
    "portal_vein_and_splenic_vein",
    "iliac_artery_left",
    "iliac_artery_right",
    "iliac_vena_left",
    "iliac_vena_right",
    "humerus_left",
    "humerus_right",
    "scapula_left",
    "scapula_right",
    "clavicula_left",
    "clavicula_right",
    "femur_left",
    "femur_right",
    "hip_left",
    "hip_right",
    "spinal_cord",
    "gluteus_maximus_left",
    "gluteus_maximus_right",
    "gluteus_medius_left",
    "gluteus_medius_right",
    "gluteus_minimus_left",
    "gluteus_minimus_right",
    "autochthon_left",
    "autochthon_right",
    "iliopsoas_left",
    "iliopsoas_right",
    "brain",
    "skull",
    "rib_left_1",
    "rib_left_2",
    "rib_left_3",
    "rib_left_4",
    "rib_left_5",
    "rib_left_6",
    "rib_left_7",
    "rib_left_8",
    "rib_left_9",
    "rib_left_10",
    "rib_left_11",
    "rib_left_12",
    "rib_right_1",
    "rib_right_2",
    "rib_right_3",
    "rib_right_4",
    "rib_right_5",
    "rib_right_6",
    "rib_right_7",
    "rib_right_8",
    "rib_right_9",
    "rib_right_10",
    "rib_right_11",
    "rib_right_12",
    "sternum",
    "costal_cartilages",
)


def test_every_totalsegmentator_structure_has_a_code():
    assert len(TOTALSEGMENTATOR_TOTAL) == 117 == len(set(TOTALSEGMENTATOR_TOTAL))
    generic = [n for i, n in enumerate(TOTALSEGMENTATOR_TOTAL, 1) if not lookup(n, i).known]
    assert not generic


def test_sides_become_laterality_modifiers_or_are_in_the_code():
    """``rib_left_3`` → Rib + Left; ``lung_middle_lobe_right`` → "Middle lobe of right lung" (the side is in the
    concept itself, so no modifier); names without a side get none."""
    for name in TOTALSEGMENTATOR_TOTAL:
        code = lookup(name)
        words = name.split("_")
        side = "Left" if "left" in words else "Right" if "right" in words else None
        modifier = code.modifier.meaning if code.modifier is not None else None
        if side is None:
            assert modifier is None, name
        else:
            assert modifier == side or (modifier is None and side.lower() in code.type.meaning.lower()), name
