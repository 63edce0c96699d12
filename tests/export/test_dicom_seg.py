"""DICOM SEG export: synthetic CT series → read_series → phantom labels as the prediction → SEG → read back.

The reference is independent of medseg's SEG code: each SEG frame is read with pydicom alone, placed by its
ReferencedSOPInstanceUID → that source file's ImagePositionPatient → slice k of the *phantom's* affine, and its
pixels are compared with the phantom's label map. Codes are checked against SNOMED CT values written out here,
colours against a hand-written sRGB → CIELab conversion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medseg.data.phantoms import LABELS, generate_phantom
from medseg.export.codes import ORGANS, algorithm_identification, lookup, normalise_name, rgb_to_dicom_cielab
from medseg.export.dicom_seg import (
    SegOptions,
    SegRoundTripError,
    build_segmentation,
    check_seg_round_trip,
    label_frames,
    segment_descriptions,
    source_datasets,
    write_dicom_seg,
)
from medseg.io.dicom import find_series, read_series
from medseg.io.nifti import InputError
from medseg.testing.dicom_series import write_ct_series

SHAPE = (40, 32, 16)
SHA = "0123456789abcdef" * 4
SEG_SOP_CLASS = {"BINARY": "1.2.840.10008.5.1.4.1.1.66.4", "LABELMAP": "1.2.840.10008.5.1.4.1.1.66.7"}


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def _case(root: Path, kind: str):
    """(folder, WrittenSeries, labels, affine, DicomVolume) for one synthetic series."""
    ph = generate_phantom(4, SHAPE, orientation="LPS" if kind == "lps" else "RAS", noise_hu=0.0)
    affine = ph.affine
    options = {"descending": kind != "ras", "shuffle_names": kind != "ras"}
    if kind == "oblique":  # 30° about a skew axis, anisotropic
        affine = np.eye(4)
        affine[:3, :3] = _rotation(np.array([1.0, 2.0, 0.5]), 30.0) @ np.diag([7.5, 9.0, 12.0])
        affine[:3, 3] = [-150.0, 120.0, -90.0]
    folder = root / kind
    written = write_ct_series(ph.image, affine, folder, patient_id=f"P-{kind}", series_number=3, **options)
    (info,) = find_series(folder)
    return folder, written, ph.label, affine, read_series(info)


@pytest.fixture(scope="module", params=["ras", "lps", "oblique"])
def case(request, tmp_path_factory):
    return _case(tmp_path_factory.mktemp("series"), request.param)


def _slice_of(path: Path, affine: np.ndarray) -> int:
    """k of a source file from its ImagePositionPatient and the phantom's affine (pixel (0, 0) = voxel (0, 0, k))."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ras = np.array([-1.0, -1.0, 1.0]) * np.asarray(ds.ImagePositionPatient, float)
    ijk = np.linalg.solve(affine[:3, :3], ras - affine[:3, 3])
    np.testing.assert_allclose(ijk, np.rint(ijk), atol=1e-3)
    assert ijk[0] == pytest.approx(0, abs=1e-3) and ijk[1] == pytest.approx(0, abs=1e-3)
    return int(np.rint(ijk[2]))


def _pixel_voxel(seg: pydicom.Dataset, ipp: np.ndarray, r: int, c: int, affine: np.ndarray) -> np.ndarray:
    """Phantom voxel of SEG pixel (r, c) from the SEG's shared orientation and spacing (PS3.3 C.7.6.2.1.1)."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    spacing = np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, float)
    lps = ipp + c * spacing[1] * iop[:3] + r * spacing[0] * iop[3:]
    return np.linalg.solve(affine[:3, :3], lps * [-1.0, -1.0, 1.0] - affine[:3, 3])


def _read_back(seg_path: Path, folder: Path, affine: np.ndarray, n_slices: int) -> dict[str, np.ndarray]:
    """{segment label: (k, rows, columns) mask} rebuilt with pydicom only, frames placed via their source."""
    seg = pydicom.dcmread(seg_path)
    by_uid = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in folder.glob("*.dcm")
    }
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence if s.SegmentNumber}
    masks = {name: np.zeros((n_slices, seg.Rows, seg.Columns), bool) for name in names.values()}
    for item, pixels in zip(seg.PerFrameFunctionalGroupsSequence, frames, strict=True):
        source = by_uid[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        k = _slice_of(source, affine)
        src_ipp = np.asarray(pydicom.dcmread(source, stop_before_pixels=True).ImagePositionPatient, float)
        ipp = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        np.testing.assert_allclose(ipp, src_ipp)
        for (r, c), ijk in (((0, 1), (1, 0, k)), ((1, 0), (0, 1, k))):  # pixel (r, c) is voxel (c, r, k)
            np.testing.assert_allclose(_pixel_voxel(seg, ipp, r, c, affine), ijk, atol=1e-3)
        if seg.SegmentationType == "BINARY":
            name = names[int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
            assert not masks[name][k].any(), "two frames for one slice"
            masks[name][k] = pixels == 1
        else:
            for number, name in names.items():
                masks[name][k] = pixels == number
    return masks


def test_axis_mapping_matches_read_series(case):
    """pixel_array[r, c] of source file k equals the read_series voxel [c, r, k] (CT values), and
    label_frames uses that mapping."""
    _, written, labels, _, volume = case
    data = np.asanyarray(volume.image.dataobj)
    for k, path in enumerate(volume.series.files):
        ds = pydicom.dcmread(path)
        assert np.array_equal(ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept), data[:, :, k].T)
        assert str(ds.SOPInstanceUID) == written.sop_instance_uids[k]
    frames = label_frames(labels)
    assert frames.shape == (SHAPE[2], SHAPE[1], SHAPE[0])
    assert all(np.array_equal(frames[k], labels[:, :, k].T) for k in range(SHAPE[2]))


@pytest.mark.parametrize("seg_type", ["BINARY", "LABELMAP"])
def test_seg_round_trips_through_pydicom(case, tmp_path, seg_type):
    folder, written, labels, affine, volume = case
    np.testing.assert_allclose(volume.image.affine, affine, atol=1e-4)  # the phantom grid is the read grid
    options = SegOptions(segmentation_type=seg_type, checkpoint_name="best.pt", checkpoint_sha256=SHA)
    report = write_dicom_seg(labels, volume, LABELS, tmp_path / "seg.dcm", options=options)
    assert report.path == tmp_path / "seg.dcm" and report.omitted == () and report.round_trip
    assert report.segments == {n: v for n, v in LABELS.items() if v}
    masks = _read_back(report.path, folder, affine, SHAPE[2])
    for name, value in LABELS.items():
        if value:
            assert np.array_equal(masks[name], (labels == value).transpose(2, 1, 0)), name

    seg = pydicom.dcmread(report.path)
    assert seg.SOPClassUID == SEG_SOP_CLASS[seg_type] and seg.Modality == "SEG"
    assert str(seg.ContentCreatorName) == "medseg^automatic"  # Type 2 (0070,0084): present, dcmqi asks for it
    assert seg.FrameOfReferenceUID == written.frame_of_reference_uid
    assert seg.StudyInstanceUID == written.study_uid and seg.PatientID == volume.series.patient_id
    assert seg.SeriesInstanceUID != written.series_uid and seg.SeriesNumber == 1003
    (ref,) = seg.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == written.series_uid
    assert {i.ReferencedSOPInstanceUID for i in ref.ReferencedInstanceSequence} <= set(
        written.sop_instance_uids
    )
    by_label = {s.SegmentLabel: s for s in seg.SegmentSequence if s.SegmentNumber}
    kidney = by_label["kidney_right"].SegmentedPropertyTypeCodeSequence[0]
    assert (kidney.CodeValue, kidney.CodingSchemeDesignator) == ("64033007", "SCT")
    assert kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"  # Right
    left = by_label["kidney_left"].SegmentedPropertyTypeCodeSequence[0]
    assert left.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"  # Left
    liver = by_label["liver"]
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert liver.SegmentAlgorithmType == "AUTOMATIC"
    assert tuple(liver.RecommendedDisplayCIELabValue) == _cielab((221, 130, 101))
    algorithm = liver.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    assert algorithm.AlgorithmVersion.startswith("medseg ") and algorithm.AlgorithmVersion.endswith(
        f"best.pt {SHA[:12]}"
    )


def test_empty_segments_are_omitted_and_an_empty_map_writes_nothing(case, tmp_path):
    folder, _, labels, affine, volume = case
    names = {**LABELS, "urinary_bladder": 9}
    cut = np.where(labels == LABELS["pancreas"], 0, labels)
    report = write_dicom_seg(cut, volume, names, tmp_path / "seg.dcm")
    assert report.omitted == ("pancreas", "urinary_bladder")
    assert any("empty segment(s) not written: pancreas, urinary_bladder" in w for w in report.warnings)
    assert "pancreas" not in _read_back(report.path, folder, affine, SHAPE[2])
    assert report.segments["aorta"] == 5 and "pancreas" not in report.segments
    none = write_dicom_seg(np.zeros_like(labels), volume, LABELS, tmp_path / "none.dcm")
    assert none.path is None and not (tmp_path / "none.dcm").exists()
    assert any("no DICOM SEG written" in w for w in none.warnings)


def _strip(folder: Path, *keywords: str, only: int | None = None) -> None:
    for n, path in enumerate(sorted(folder.glob("*.dcm"))):
        if only is None or n == only:
            ds = pydicom.dcmread(path)
            for keyword in keywords:
                delattr(ds, keyword)
            ds.save_as(path)


def test_anonymised_source_gets_filled_uids_and_warnings(tmp_path):
    ph = generate_phantom(5, SHAPE, orientation="RAS", noise_hu=0.0)
    written = write_ct_series(ph.image, ph.affine, tmp_path / "s", omit_series_uid=True)
    _strip(tmp_path / "s", "StudyInstanceUID", "PatientName", "StudyID")
    (info,) = find_series(tmp_path / "s")
    volume = read_series(info)
    reports = [write_dicom_seg(ph.label, volume, LABELS, tmp_path / f"seg{n}.dcm") for n in (1, 2)]
    filled = reports[0].filled
    assert set(filled) == {"StudyInstanceUID", "SeriesInstanceUID", "PatientName", "StudyID"}
    assert filled == reports[1].filled  # generated from the SOP Instance UIDs: stable across exports
    assert all(any(k in w for w in reports[0].warnings) for k in filled)
    seg = pydicom.dcmread(reports[0].path)
    assert seg.StudyInstanceUID == filled["StudyInstanceUID"] != written.study_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == filled["SeriesInstanceUID"]
    assert seg.FrameOfReferenceUID == written.frame_of_reference_uid and seg.PatientName == ""
    masks = _read_back(reports[0].path, tmp_path / "s", ph.affine, SHAPE[2])  # still maps onto the images
    assert np.array_equal(masks["spleen"], (ph.label == 2).transpose(2, 1, 0))


def test_source_without_sop_instance_uids_is_refused(tmp_path):
    ph = generate_phantom(5, SHAPE, orientation="RAS", noise_hu=0.0)
    write_ct_series(ph.image, ph.affine, tmp_path / "s")
    _strip(tmp_path / "s", "SOPInstanceUID", only=3)
    (info,) = find_series(tmp_path / "s")
    with pytest.raises(InputError, match=r"1 of 16 image\(s\) have no SOPInstanceUID .*never invents"):
        write_dicom_seg(ph.label, read_series(info), LABELS, tmp_path / "seg.dcm")
    assert list(tmp_path.glob("seg*")) == [] and list(tmp_path.glob(".tmp-*")) == []


def _built(labels: np.ndarray, volume, seg_type: str = "BINARY"):
    """A SEG built the way write_dicom_seg builds it, from any frames (the phantom labels are 0…6)."""
    names = [(v, n) for n, v in LABELS.items() if v]
    descs = segment_descriptions([(v, n, lookup(n, v)) for v, n in names], _algorithm())
    sources = source_datasets(volume.series)
    frames = label_frames(labels.astype(np.uint8))
    return build_segmentation(
        frames, sources, descs, seg_type, series_number=1, series_description="t", software_version="t"
    )


def _algorithm():
    return algorithm_identification("medseg", "test", None, None)


@pytest.mark.parametrize("seg_type", ["BINARY", "LABELMAP"])
def test_round_trip_check_catches_mirrored_segs(case, seg_type):
    """A SEG built from a left-right or anterior-posterior mirrored map, or a right SEG compared through a
    mirrored affine, is refused; the right SEG through the right affine passes."""
    _, _, labels, affine, volume = case
    segments = {v: v for v in range(1, 7)}
    uids = volume.series.sop_instance_uids
    good = _built(labels, volume, seg_type)
    assert check_seg_round_trip(good, labels, affine, segments, uids).segments == 6
    for axis in (0, 1):
        mirrored = _built(np.flip(labels, axis), volume, seg_type)
        with pytest.raises(SegRoundTripError, match="pixels differ"):
            check_seg_round_trip(mirrored, labels, affine, segments, uids)
    flip_x = affine @ np.array([[-1, 0, 0, SHAPE[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    with pytest.raises(SegRoundTripError, match="pixels differ"):
        check_seg_round_trip(good, labels, flip_x, segments, uids)
    swapped = {**segments, 3: 4, 4: 3}  # right and left kidney exchanged
    with pytest.raises(SegRoundTripError, match="segment"):
        check_seg_round_trip(good, labels, affine, swapped, uids)


def test_slightly_irregular_slices_still_round_trip(tmp_path):
    """Slice positions off the uniform grid by what read_series tolerates (< 1 % of a step) still map."""
    ph = generate_phantom(5, SHAPE, orientation="LPS", noise_hu=0.0)
    step = float(np.linalg.norm(ph.affine[:3, 2]))
    write_ct_series(ph.image, ph.affine, tmp_path / "s", slice_offsets_mm={5: 0.009 * step, 9: -0.009 * step})
    (info,) = find_series(tmp_path / "s")
    labelmap = SegOptions(segmentation_type="LABELMAP")
    report = write_dicom_seg(ph.label, read_series(info), LABELS, tmp_path / "seg.dcm", options=labelmap)
    assert report.round_trip.segments == 6


def test_label_map_off_the_series_grid_or_unnamed_is_refused(case, tmp_path):
    _, _, labels, affine, volume = case
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, 0]  # one voxel along i
    with pytest.raises(InputError, match="does not lie on the series grid"):
        write_dicom_seg(labels, volume.series, LABELS, tmp_path / "a.dcm", affine=shifted)
    with pytest.raises(InputError, match="does not lie on the series grid"):
        write_dicom_seg(labels[:-1], volume, LABELS, tmp_path / "b.dcm")
    with pytest.raises(InputError, match=r"values \[6\] that label_names does not name"):
        write_dicom_seg(
            labels, volume, {k: v for k, v in LABELS.items() if k != "pancreas"}, tmp_path / "c.dcm"
        )
    report = write_dicom_seg(
        labels, volume.series, LABELS, tmp_path / "d.dcm", affine=affine
    )  # SeriesInfo path
    assert report.round_trip.segments == 6 and sorted(p.name for p in tmp_path.iterdir()) == ["d.dcm"]


# --- codes ------------------------------------------------------------------------------------------------

#: SNOMED CT concept ids written out by hand (the independent reference for the table).
SNOMED = {
    "liver": "10200004", "spleen": "78961009", "kidney": "64033007", "aorta": "15825003",
    "pancreas": "15776009", "stomach": "69695003", "gallbladder": "28231008", "esophagus": "32849002",
    "adrenal_gland": "23451007", "duodenum": "38848004", "small_bowel": "30315005", "colon": "71854001",
    "urinary_bladder": "89837001", "lung": "39607008", "heart": "80891009", "portal_vein": "32764006",
    "inferior_vena_cava": "64131007", "vertebrae": "51282000", "vertebrae_L1": "66794005",
}  # fmt: skip


@pytest.mark.parametrize(("name", "value"), sorted(SNOMED.items()))
def test_organ_codes(name, value):
    code = lookup(name)
    assert (code.type.scheme_designator, code.type.value, code.known) == ("SCT", value, True)
    assert code.category.value == "91723000" and code.modifier is None


@pytest.mark.parametrize(
    ("name", "organ", "side"),
    [
        ("kidney_right", "64033007", "24028007"), ("Right Kidney", "64033007", "24028007"),
        ("kidney-L", "64033007", "7771000"), ("KidneyLeft", "64033007", "7771000"),
        ("l_adrenal_gland", "23451007", "7771000"), ("lung_right", "39607008", "24028007"),
        ("Gall-Bladder", "28231008", None), ("IVC", "64131007", None), ("T12", "23215003", None),
    ],
)  # fmt: skip
def test_name_matching(name, organ, side):
    code = lookup(name)
    assert code.type.value == organ
    assert (code.modifier.value if code.modifier else None) == side


def test_unknown_names_get_the_generic_code_and_distinct_colours():
    tumour, cyst = lookup("tumour", 7), lookup("cyst", 8)
    assert not tumour.known and (tumour.type.value, tumour.category.value) == ("85756007", "85756007")
    assert tumour.rgb != cyst.rgb and lookup("tumour", 7) == tumour
    assert normalise_name(" Portal_Vein-and.splenic  vein ") == "portal vein and splenic vein"
    assert all(lookup(name).known for name in ORGANS)


def _cielab(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """sRGB → CIELab (D65) → DICOM 16-bit encoding, by hand (IEC 61966-2-1; CIE 15; PS3.3 C.10.7.1.1)."""
    c = np.asarray(rgb, float) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ linear / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    return (
        round(lab[0] * 65535 / 100),
        round((lab[1] + 128) * 65535 / 255),
        round((lab[2] + 128) * 65535 / 255),
    )


@pytest.mark.parametrize("rgb", [(221, 130, 101), (0, 151, 206), (255, 253, 229), (0, 0, 0)])
def test_cielab_encoding_matches_a_hand_conversion(rgb):
    got, want = rgb_to_dicom_cielab(rgb), _cielab(rgb)
    assert np.abs(np.subtract(got, want)).max() <= 65535 * 0.3 / 100  # within 0.3 L* units
