"""RT Structure Set export: synthetic CT series on four grids → label maps with rings, islands, single voxels
and one-slice organs → RTSTRUCT → read back.

The references are independent of both the writer and its round-trip check: each contour is read with pydicom,
placed through the ImagePositionPatient / ImageOrientationPatient / PixelSpacing of the *source file it
references* (found by SOP Instance UID among the written files), and filled with scikit-image's
``polygon2mask`` (pixel centres), XOR per slice; the result must equal the label map voxel for voxel.
Colours are compared with the SEG's CIELab values of the same case; UIDs with the properties PACS rely on.
"""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from skimage.draw import polygon2mask

from medseg.data.phantoms import generate_phantom
from medseg.export import rtstruct as rtstruct_module
from medseg.export.codes import lookup, rgb_to_dicom_cielab
from medseg.export.dicom_seg import SegOptions, write_dicom_seg
from medseg.export.rtstruct import RtOptions, slice_contours, write_rtstruct
from medseg.export.rtstruct_check import (
    MAX_HD95_VOXELS,
    MIN_DICE,
    RtRoundTripError,
    check_rtstruct_round_trip,
    compare_rtstruct,
)
from medseg.export.seg_check import SegRoundTripError
from medseg.export.uids import derived_uids
from medseg.io.dicom import find_series, read_series
from medseg.testing.dicom_series import write_ct_series

SHAPE = (40, 32, 16)
NAMES = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4, "aorta": 5, "pancreas": 6}
SHA = "0123456789abcdef" * 4
REAL_CT = Path("/work/shared/data/real_ct")


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


AFFINES = {
    "ras": np.diag([0.8, 0.8, 2.5]),
    "lps": np.diag([-0.8, -0.8, 2.5]),
    "oblique": _rotation(np.array([1.0, 2.0, 0.5]), 30.0) @ np.diag([7.5, 9.0, 12.0]),
    "anisotropic": np.diag([0.6, -1.4, -4.0]),  # det > 0: k runs along the slice normal
}


def shapes() -> np.ndarray:
    """Labels with what contours make hard: a ring (hole), several islands on a slice, single voxels (two at
    the volume's corners), an organ on one slice only, diagonal-only contact, and ``kidney_right`` empty."""
    labels = np.zeros(SHAPE, np.uint8)
    i, j = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    ring = ((i - 12) ** 2 + (j - 14) ** 2 <= 64) & ((i - 12) ** 2 + (j - 14) ** 2 > 9)
    labels[:, :, 3:9][ring] = 1
    for ci, cj in ((30, 6), (33, 22), (25, 27)):  # three islands per slice
        labels[ci - 2 : ci + 2, cj - 2 : cj + 1, 2:11] = 2
    labels[36, 12, 5] = labels[22, 2, 5] = 2  # single-voxel islands
    labels[5:14, 26:30, 12] = 3  # one slice only
    labels[0, 0, 0] = labels[39, 31, 15] = 5  # single voxels at two corners of the volume
    labels[20, 20, 7] = labels[21, 21, 7] = 6  # touching diagonally only
    labels[14:18, 2:4, 7] = 6
    labels[14, 4:7, 7] = 6  # an L
    return labels


def _series(root: Path, kind: str, extra_slice: bool = False, **tags):
    """(WrittenSeries, DicomVolume, labels) of a phantom CT on the grid ``kind``."""
    ph = generate_phantom(4, SHAPE, noise_hu=0.0)
    image, labels = ph.image, shapes()
    if extra_slice:
        image, labels = np.concatenate([image, image[:, :, -1:]], 2), np.pad(labels, ((0, 0), (0, 0), (0, 1)))
    affine = np.eye(4)
    affine[:3, :3] = AFFINES[kind]
    affine[:3, 3] = [-150.0, 120.0, -90.0]
    options = {"descending": kind in ("lps", "anisotropic"), "shuffle_names": kind != "ras"}
    written = write_ct_series(image, affine, root, patient_id=f"P-{kind}", series_number=3, **options, **tags)
    (info,) = find_series(root)
    volume = read_series(info)
    assert np.allclose(volume.image.affine, affine, atol=1e-4)  # the labels lie on the reader's grid
    return written, volume, labels


@pytest.fixture(scope="module", params=sorted(AFFINES))
def case(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    written, volume, labels = _series(root / "series", request.param)
    report = write_rtstruct(labels, volume, NAMES, root / "rt.dcm", options=RtOptions(checkpoint_sha256=SHA))
    return written, volume, labels, report


def _read_back(path: Path, written) -> tuple[pydicom.Dataset, dict[str, np.ndarray]]:
    """{ROI name: (i, j, k) mask} from the file, each contour placed through the source file it references."""
    rt = pydicom.dcmread(path)
    files = {}
    for k, f in enumerate(written.files):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        files[str(ds.SOPInstanceUID)] = (k, ds)
    names = {int(r.ROINumber): str(r.ROIName) for r in rt.StructureSetROISequence}
    masks = {}
    for roi in rt.ROIContourSequence:
        mask = np.zeros(SHAPE, bool)
        for item in roi.ContourSequence:
            assert item.ContourGeometricType == "CLOSED_PLANAR"
            points = np.asarray(item.ContourData, float).reshape(-1, 3)
            assert len(points) == item.NumberOfContourPoints >= 3
            (image,) = item.ContourImageSequence
            k, src = files[str(image.ReferencedSOPInstanceUID)]
            assert image.ReferencedSOPClassUID == src.SOPClassUID
            iop = np.asarray(src.ImageOrientationPatient, float)
            d_row, d_col = (float(v) for v in src.PixelSpacing)
            offset = points - np.asarray(src.ImagePositionPatient, float)
            assert np.abs(offset @ np.cross(iop[:3], iop[3:])).max() < 1e-3  # in that image's plane
            rc = np.column_stack([offset @ iop[3:] / d_row, offset @ iop[:3] / d_col])
            mask[:, :, k] ^= polygon2mask((SHAPE[1], SHAPE[0]), rc).T  # pixel (r, c) is voxel (c, r, k)
        masks[names[int(roi.ReferencedROINumber)]] = mask
    return rt, masks


def test_contours_read_back_voxel_for_voxel(case):
    """On every grid the contours, filled by the even-odd rule at pixel centres, give the label map back
    exactly; the writer's own check measured Dice 1 and HD95 0; the empty label is omitted."""
    written, _, labels, report = case
    _, masks = _read_back(report.path, written)
    present = [n for n, v in NAMES.items() if (labels == v).any()]
    assert report.omitted == ("kidney_right",) and list(report.rois) == present
    assert sorted(masks) == sorted(present)
    for name in present:
        assert np.array_equal(masks[name], labels == NAMES[name]), name
        agreement = report.round_trip[name]
        assert (agreement.dice, agreement.hd95_voxels) == (1.0, 0.0)
        assert agreement.voxels == int((labels == NAMES[name]).sum())


def test_header_references_and_colours(case, tmp_path):
    """The header, read with pydicom, references the source study, series, Frame of Reference and every
    image; ROIs are numbered like the SEG's segments and coloured like them (SEG CIELab = RT RGB → CIELab)."""
    written, volume, labels, report = case
    rt = pydicom.dcmread(report.path)
    assert rt.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and rt.Modality == "RTSTRUCT"
    assert rt.file_meta.MediaStorageSOPClassUID == rt.SOPClassUID
    assert (rt.StudyInstanceUID, rt.FrameOfReferenceUID) == (
        written.study_uid,
        written.frame_of_reference_uid,
    )
    assert rt.PatientID == volume.series.patient_id and rt.SeriesInstanceUID != written.series_uid
    assert (rt.Manufacturer, rt.StructureSetLabel, rt.SeriesNumber) == ("medseg", "MEDSEG", 2003)
    assert rt.SoftwareVersions and rt.StructureSetDate and rt.SeriesDescription == "medseg structures"
    (frame,) = rt.ReferencedFrameOfReferenceSequence
    (study,) = frame.RTReferencedStudySequence
    (series,) = study.RTReferencedSeriesSequence
    assert frame.FrameOfReferenceUID == written.frame_of_reference_uid
    assert (
        study.ReferencedSOPInstanceUID == written.study_uid and series.SeriesInstanceUID == written.series_uid
    )
    listed = [str(i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence]
    assert sorted(listed) == sorted(written.sop_instance_uids)
    rois = [(int(r.ROINumber), str(r.ROIName), r.ROIGenerationAlgorithm) for r in rt.StructureSetROISequence]
    assert rois == [(n, name, "AUTOMATIC") for name, n in report.rois.items()]
    assert all(
        r.ReferencedFrameOfReferenceUID == written.frame_of_reference_uid for r in rt.StructureSetROISequence
    )
    observations = [(o.ReferencedROINumber, o.RTROIInterpretedType) for o in rt.RTROIObservationsSequence]
    assert observations == [(n, "ORGAN") for n in report.rois.values()]
    liver = rt.RTROIObservationsSequence[0].RTROIIdentificationCodeSequence[0]
    assert (liver.CodeValue, liver.CodingSchemeDesignator) == ("10200004", "SCT")
    seg = write_dicom_seg(labels, volume, NAMES, tmp_path / "seg.dcm").path
    lab = {
        int(s.SegmentNumber): tuple(s.RecommendedDisplayCIELabValue)
        for s in pydicom.dcmread(seg).SegmentSequence
    }
    for roi, name in zip(rt.ROIContourSequence, report.rois, strict=True):
        rgb = tuple(int(v) for v in roi.ROIDisplayColor)
        assert rgb == lookup(name, NAMES[name]).rgb
        assert rgb_to_dicom_cielab(rgb) == lab[report.rois[name]], name


def test_holes_islands_and_single_voxels(case):
    """A ring is two contours of opposite winding, the hole inside; three islands and two single voxels on one
    slice are five contours; a single voxel is a four-point diamond ½ pixel around its centre (also at the
    volume's corners); the one-slice organ has contours on that slice only."""
    _, volume, _, report = case
    rt = pydicom.dcmread(report.path)
    uids = volume.series.sop_instance_uids
    by_roi = {str(r.ROIName): int(r.ROINumber) for r in rt.StructureSetROISequence}

    def contours(name: str, k: int) -> list[np.ndarray]:
        (roi,) = [r for r in rt.ROIContourSequence if r.ReferencedROINumber == by_roi[name]]
        return [
            np.asarray(c.ContourData, float).reshape(-1, 3)
            for c in roi.ContourSequence
            if c.ContourImageSequence[0].ReferencedSOPInstanceUID == uids[k]
        ]

    outer, hole = sorted(contours("liver", 5), key=len, reverse=True)
    normal = np.cross(*np.asarray(volume.image.affine[:3, :2]).T)

    def signed_area(p: np.ndarray) -> float:
        return float(np.dot(normal, np.cross(p, np.roll(p, -1, axis=0)).sum(axis=0)))

    assert signed_area(outer) * signed_area(hole) < 0  # opposite winding: even-odd and non-zero agree
    assert len(contours("spleen", 5)) == 5 and len(contours("spleen", 4)) == 3
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.image.affine
    for k, voxel in ((0, (0, 0, 0)), (15, (39, 31, 15))):
        (diamond,) = contours("aorta", k)
        centre = (lps @ [*voxel, 1.0])[:3]
        assert len(diamond) == 4 and np.allclose(diamond.mean(axis=0), centre, atol=1e-3)
        half = np.sort(np.linalg.norm(diamond - centre, axis=1))
        steps = np.sort(np.linalg.norm(lps[:3, :2], axis=0)) / 2
        assert np.allclose(half, np.repeat(steps, 2), atol=1e-3)
    kidney = [k for k in range(SHAPE[2]) if contours("kidney_left", k)]
    assert kidney == [12]


def test_slice_contours_exact_on_random_masks():
    """Marching squares contours refilled at pixel centres (even-odd) give random masks back exactly."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((17, 23)) < 0.45
        back = np.zeros_like(mask)
        for polygon in slice_contours(mask):
            assert len(polygon) >= 3
            back ^= polygon2mask(mask.shape, polygon)
        assert np.array_equal(back, mask)


def test_empty_map_writes_nothing(tmp_path):
    _, volume, _ = _series(tmp_path / "s", "ras")
    report = write_rtstruct(np.zeros(SHAPE, np.uint8), volume, NAMES, tmp_path / "rt.dcm")
    assert (
        report.path is None
        and set(report.omitted) == set(NAMES)
        and "no labelled voxel" in report.warnings[-1]
    )
    assert not (tmp_path / "rt.dcm").exists()


@pytest.mark.parametrize("axis", [0, 1])
def test_a_mirrored_writer_is_refused_and_leaves_no_file(tmp_path, monkeypatch, axis):
    """A writer whose pixel → patient step mirrors the columns (left/right here) or rows fails the round
    trip: RtRoundTripError (a SegRoundTripError), and neither the file nor a temporary file is left."""
    _, volume, labels = _series(tmp_path / "s", "lps")
    real = rtstruct_module.frame_to_patient

    def mirrored(source, rows, columns):
        if axis == 0:
            return real(source, rows, int(source.Columns) - 1 - np.asarray(columns))
        return real(source, int(source.Rows) - 1 - np.asarray(rows), columns)

    monkeypatch.setattr(rtstruct_module, "frame_to_patient", mirrored)
    with pytest.raises(RtRoundTripError, match="Dice") as info:
        write_rtstruct(labels, volume, NAMES, tmp_path / "out" / "rt.dcm")
    assert isinstance(info.value, SegRoundTripError) and "no file written" in str(info.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_the_check_catches_wrong_geometry_and_references(case):
    """The checker fails a right file against a mirrored affine, a swapped slice reference, another Frame of
    Reference, or a label renamed; and reports Dice and HD95 per ROI."""
    written, volume, labels, report = case
    affine = volume.image.affine
    sources = volume.series
    names = {n: v for n, v in NAMES.items() if n in report.rois}
    good = check_rtstruct_round_trip(report.path, labels, affine, sources, names)
    assert {n: (a.dice, a.hd95_voxels) for n, a in good.items()} == {n: (1.0, 0.0) for n in names}
    flip = affine @ np.array([[-1, 0, 0, SHAPE[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    flipped = compare_rtstruct(report.path, np.flip(labels, 0), flip, sources, names)
    assert any(
        "source image 0 lies at voxel" in p for p in flipped.problems
    )  # the affine is not the sources'
    mirrored = compare_rtstruct(report.path, np.flip(labels, 1), affine, sources, names)
    worst = min(a.dice for a in mirrored.rois.values())
    assert worst < MIN_DICE and any("HD95" in p for p in mirrored.problems)
    rt = pydicom.dcmread(report.path)
    item = rt.ROIContourSequence[0].ContourSequence[0].ContourImageSequence[0]
    item.ReferencedSOPInstanceUID = next(
        u for u in written.sop_instance_uids if u != item.ReferencedSOPInstanceUID
    )
    with pytest.raises(RtRoundTripError, match="references"):
        check_rtstruct_round_trip(rt, labels, affine, sources, names)
    rt = pydicom.dcmread(report.path)
    rt.FrameOfReferenceUID = "1.2.3.4"
    with pytest.raises(RtRoundTripError, match="FrameOfReferenceUID"):
        check_rtstruct_round_trip(rt, labels, affine, sources, names)
    renamed = {("hepar" if n == "liver" else n): v for n, v in names.items()}
    with pytest.raises(RtRoundTripError, match="no ROI"):
        check_rtstruct_round_trip(report.path, labels, affine, [str(f) for f in written.files], renamed)
    assert MAX_HD95_VOXELS == 1.0


def _uids(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def test_uids_are_deterministic(tmp_path):
    """The same series (even copied to another folder, other file names) with the same model gives the same
    SEG (BINARY, LABELMAP) and RTSTRUCT UIDs; another model, another type or one slice more gives new ones."""
    tags = {"study_uid": "1.2.826.0.1.3680043.8.498.1", "series_uid": "1.2.826.0.1.3680043.8.498.2"}
    _, volume, labels = _series(tmp_path / "a", "ras", **tags)
    _, copy, _ = _series(tmp_path / "b", "lps", **tags)  # same UIDs, other grid and file names
    _, longer, longer_labels = _series(tmp_path / "c", "ras", extra_slice=True, **tags)

    def write(kind: str, vol, labels, sha: str, name: str) -> tuple[str, str]:
        path = tmp_path / "out" / name
        if kind == "rtstruct":
            write_rtstruct(labels, vol, NAMES, path, options=RtOptions(checkpoint_sha256=sha))
        else:
            write_dicom_seg(
                labels, vol, NAMES, path, options=SegOptions(segmentation_type=kind, checkpoint_sha256=sha)
            )
        return _uids(path)

    seen = set()
    for kind in ("rtstruct", "BINARY", "LABELMAP"):
        first = write(kind, volume, labels, SHA, f"{kind}1.dcm")
        assert write(kind, volume, labels, SHA, f"{kind}2.dcm") == first
        assert write(kind, copy, labels, SHA, f"{kind}3.dcm") == first
        other_model = write(kind, volume, labels, "f" * 64, f"{kind}4.dcm")
        more = write(kind, longer, longer_labels, SHA, f"{kind}5.dcm")
        for uids in (first, other_model, more):
            assert not set(uids) & seen
            seen |= set(uids)
    sops = list(volume.series.sop_instance_uids)
    expected = derived_uids("rtstruct", tags["series_uid"], sops[::-1], SHA)
    assert (expected.series_instance_uid, expected.sop_instance_uid) == _uids(
        tmp_path / "out" / "rtstruct1.dcm"
    )
    with pytest.raises(ValueError, match="kind"):
        derived_uids("seg", tags["series_uid"], sops, SHA)


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_CT / "ct_lps_1p5mm.nii.gz").is_file(), reason=f"real CT not in {REAL_CT}")
def test_real_ct(tmp_path):
    """The real CT (LPS, 1.5 mm) as a DICOM series, its aorta mask and two thresholded structures (bone,
    lung and other air: thousands of islands and holes) as labels: every ROI reads back with Dice 1 and HD95
    0, and the series' images are each referenced. Prints the numbers and the time of the write (with -s)."""
    ct = nib.load(REAL_CT / "ct_lps_1p5mm.nii.gz")
    hu = np.rint(np.asarray(ct.dataobj)).astype(np.int16)
    aorta = np.asarray(nib.load(REAL_CT / "aorta_lps_1p5mm.nii.gz").dataobj) > 0
    labels = np.zeros(hu.shape, np.uint8)
    labels[(hu > -950) & (hu < -500)] = 2  # lung (and other air-tissue mixtures)
    labels[hu > 250] = 1  # bone
    labels[aorta] = 3
    names = {"bone": 1, "lung": 2, "aorta": 3, "spleen": 4}
    written = write_ct_series(hu, ct.affine, tmp_path / "ct", patient_id="REAL")
    (info,) = find_series(tmp_path / "ct")
    volume = read_series(info)
    start = time.perf_counter()
    report = write_rtstruct(
        labels, volume, names, tmp_path / "rt.dcm", options=RtOptions(checkpoint_sha256=SHA)
    )
    seconds = time.perf_counter() - start
    measured = {n: (a.dice, a.hd95_voxels, a.contours) for n, a in report.round_trip.items()}
    print(
        f"\nreal CT {hu.shape}: (Dice, HD95 voxels, contours) {measured}; {report.points} points, "
        f"{report.size_bytes / 2**20:.1f} MiB, write + round trip {seconds:.1f} s"
    )
    assert report.omitted == ("spleen",)
    assert all(dice == 1.0 and hd95 == 0.0 for dice, hd95, _ in measured.values()), measured
    rt = pydicom.dcmread(report.path)
    (series,) = (
        rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence
    )
    assert sorted(i.ReferencedSOPInstanceUID for i in series.ContourImageSequence) == sorted(
        written.sop_instance_uids
    )


def test_nifti_case_gets_a_warning_not_a_file(tmp_path):
    """A NIfTI input has no series to reference: ``dicom-rtstruct`` writes nothing and says why."""
    from medseg.batch.exports import write_case_exports
    from medseg.batch.inputs import CaseSource
    from medseg.inference.predictor import Prediction

    scan = nib.Nifti1Image(np.zeros(SHAPE, np.int16), np.diag([0.8, 0.8, 2.5, 1.0]))
    pred = Prediction(labels=shapes(), reference=scan, label_names=NAMES)
    case = CaseSource("ct", "nifti", path=tmp_path / "ct.nii.gz")
    exports, warnings = write_case_exports(
        case, tmp_path / "ct.nii.gz", pred, ("nifti", "dicom-rtstruct"), False, Path("m.pt"), SHA
    )
    assert exports == {} and not list(tmp_path.iterdir())
    assert warnings == [
        "no DICOM RT Structure Set: the input is NIfTI, so there is no source series to reference"
    ]


def test_sidecar_schema_accepts_the_rtstruct_entry_and_names_a_broken_one():
    from medseg.batch.sidecar import sidecar_problems

    entry = {
        "path": "/out/c_rtstruct.dcm",
        "rois": {"liver": 1},
        "omitted": ["spleen"],
        "sop_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.4",
        "round_trip": {"liver": {"dice": 1.0, "hd95_voxels": 0.0}},
    }
    side = {
        "case": "c",
        "labels": {"liver": 1, "spleen": 2},
        "kind": "nifti",
        "exports": {"dicom_rtstruct": entry},
    }
    assert sidecar_problems(side, "c") == []
    broken = {**side, "exports": {"dicom_rtstruct": {**entry, "rois": ["liver"], "omitted": "spleen"}}}
    assert sidecar_problems(broken, "c") == [
        "exports.dicom_rtstruct.rois: expected an object, found list of 1",
        'exports.dicom_rtstruct.omitted: expected a list of strings, found string "spleen"',
    ]


def test_anonymised_source_gets_the_filled_uids(tmp_path):
    """A source without Study / Frame of Reference UIDs (in every image) gets them generated in the copies,
    named in the report, and the RTSTRUCT carries and references those values consistently."""
    _series(tmp_path / "s", "ras")
    for path in sorted((tmp_path / "s").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        del ds.StudyInstanceUID, ds.FrameOfReferenceUID
        ds.save_as(path)
    (info,) = find_series(tmp_path / "s")
    report = write_rtstruct(shapes(), read_series(info), NAMES, tmp_path / "rt.dcm")
    assert set(report.filled) >= {"StudyInstanceUID", "FrameOfReferenceUID"}
    assert any("lacks FrameOfReferenceUID" in w for w in report.warnings)
    rt = pydicom.dcmread(report.path)
    frame = rt.ReferencedFrameOfReferenceSequence[0]
    assert rt.FrameOfReferenceUID == frame.FrameOfReferenceUID == report.filled["FrameOfReferenceUID"]
    assert frame.RTReferencedStudySequence[0].ReferencedSOPInstanceUID == report.filled["StudyInstanceUID"]
    assert all(a.dice == 1.0 for a in report.round_trip.values())
