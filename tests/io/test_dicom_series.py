"""DICOM CT series in: NIfTI → synthetic series (clean and messy) → find_series / read_series.

Round trips must give the same int16 voxels and the same world coordinates as the source NIfTI; world
coordinates are also checked against the tags of each file, read with pydicom here, so a wrong axis or
sign convention shared by writer and reader cannot pass. Every messy class is either handled as
documented in :mod:`medseg.io.dicom` or refused with one line naming the series.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medseg.data.phantoms import generate_phantom
from medseg.io.dicom import SeriesInfo, find_series, read_series, series_case_name
from medseg.io.nifti import InputError
from medseg.testing.dicom_series import SeriesEncoding, SeriesFaults, SeriesTags, write_ct_series

REAL_CT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real_ct" / "ct_lps_1p5mm.nii.gz"
PYDICOM_FILES = Path(get_testdata_file("CT_small.dcm", download=False)).parent


def _only(folder: Path) -> SeriesInfo:
    found = find_series(folder)
    assert len(found) == 1, [(s.case, s.skipped, s.error) for s in found]
    return found[0]


def _voxels(image: nib.Nifti1Image) -> np.ndarray:
    return np.asanyarray(image.dataobj)


def _tag_world_ras(path: Path, i: int, j: int) -> np.ndarray:
    """World (RAS mm) of column i, row j of one file, from its tags alone (DICOM PS3.3 C.7.6.2.1.1)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ipp = np.array(ds.ImagePositionPatient, dtype=float)
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    lps = ipp + i * col_spacing * iop[:3] + j * row_spacing * iop[3:]
    return lps * np.array([-1.0, -1.0, 1.0])


def _tag_hu(path: Path, i: int, j: int) -> float:
    ds = pydicom.dcmread(path)
    return float(ds.pixel_array[j, i]) * float(ds.get("RescaleSlope", 1)) + float(
        ds.get("RescaleIntercept", 0)
    )


def _assert_round_trip(
    folder: Path, volume: np.ndarray, affine: np.ndarray, rng: np.random.Generator
) -> None:
    """Same voxels, same affine, and world points / HU from the files' own tags agree with the source."""
    info = _only(folder)
    assert info.usable, (info.skipped, info.error)
    image = read_series(info).image
    assert image.get_data_dtype() == np.int16
    assert image.shape == volume.shape
    assert np.array_equal(_voxels(image), volume)
    np.testing.assert_allclose(image.affine, affine, atol=1e-4)
    shape = np.array(volume.shape)
    corners = np.array([[0, 0, 0], shape - 1, [shape[0] - 1, 0, shape[2] - 1], [0, shape[1] - 1, 1]])
    for ijk in [*corners, *rng.integers(0, shape, size=(4, 3))]:
        i, j, k = (int(v) for v in ijk)
        expected = affine[:3, :3] @ ijk + affine[:3, 3]
        np.testing.assert_allclose(_tag_world_ras(info.files[k], i, j), expected, atol=1e-4)
        np.testing.assert_allclose(image.affine[:3, :3] @ ijk + image.affine[:3, 3], expected, atol=1e-4)
        assert _tag_hu(info.files[k], i, j) == volume[i, j, k]


@pytest.fixture(scope="module")
def small() -> tuple[np.ndarray, np.ndarray]:
    """A 32×24×12 phantom (anisotropic in-plane, slightly oblique) for the messy cases."""
    ph = generate_phantom(3, (32, 24, 12), orientation="RAS", noise_hu=0.0)
    return ph.image, ph.affine


@pytest.mark.parametrize(
    ("orientation", "options"),
    [
        ("RAS", {}),
        ("LPS", {"descending": True, "shuffle_names": True, "backwards_instance_numbers": True}),
        ("RAS", {"descending": True, "shuffle_names": True}),
        ("LPS", {"backwards_instance_numbers": True, "signed": True}),
    ],
)
def test_phantom_round_trip(tmp_path, orientation, options):
    ph = generate_phantom(11, (64, 48, 40), orientation=orientation)
    write_ct_series(ph.image, ph.affine, tmp_path, **options)
    _assert_round_trip(tmp_path, ph.image, ph.affine, np.random.default_rng(0))
    # The mess was really there: instance numbers and file names do not follow the slices.
    files = _only(tmp_path).files
    numbers = [int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in files]
    backwards = options.get("descending", False) != options.get("backwards_instance_numbers", False)
    assert numbers == (list(range(40, 0, -1)) if backwards else list(range(1, 41)))
    names = [f.name for f in files]
    assert (names != sorted(names)) == (
        options.get("descending", False) or options.get("shuffle_names", False)
    )


def test_written_files_carry_ct_tags(tmp_path, small):
    volume, affine = small
    written = write_ct_series(volume, affine, tmp_path, patient_id="P7", series_number=4)
    ds = pydicom.dcmread(written.files[2])
    assert (
        ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    )
    assert (ds.Modality, ds.PatientID, ds.SeriesNumber, ds.InstanceNumber) == ("CT", "P7", 4, 3)
    assert (ds.SOPInstanceUID, ds.SeriesInstanceUID) == (written.sop_instance_uids[2], written.series_uid)
    assert (ds.Rows, ds.Columns) == (volume.shape[1], volume.shape[0])
    assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 12, 0)
    assert (ds.PhotometricInterpretation, ds.RescaleIntercept, ds.RescaleSlope) == ("MONOCHROME2", -1024, 1)
    assert float(ds.SliceThickness) == pytest.approx(np.linalg.norm(affine[:3, 2]))
    sheared = affine.copy()
    sheared[:3, 2] += affine[:3, 0]
    with pytest.raises(ValueError, match="sheared"):
        write_ct_series(volume, sheared, tmp_path / "no")


def test_option_groups_and_keywords_write_the_same_files(tmp_path, small):
    """The dataclass groups and the keyword shorthand are one thing; a keyword overrides its group's field;
    a misspelt option or a bad value fails before anything is written."""
    volume, affine = small
    uids = {
        f"{n}_uid": f"1.2.826.0.1.3680043.8.498.9{i}"
        for i, n in enumerate(("study", "series", "frame_of_reference"))
    }
    grouped = write_ct_series(
        volume, affine, tmp_path / "a",
        tags=SeriesTags(patient_id="P9", series_number=2, **uids),
        encoding=SeriesEncoding(signed=True),
        faults=SeriesFaults(shuffle_names=True, drop_slices=(4,), descending=False),
        descending=True,
    )  # fmt: skip
    keywords = write_ct_series(
        volume, affine, tmp_path / "b", patient_id="P9", series_number=2, signed=True, shuffle_names=True,
        drop_slices=(4,), descending=True, **uids,
    )  # fmt: skip
    assert grouped.files[4] is None and grouped.sop_instance_uids == keywords.sop_instance_uids
    for a, b in zip(grouped.files, keywords.files, strict=True):
        assert (a is None and b is None) or (a.name == b.name and a.read_bytes() == b.read_bytes())
    assert int(pydicom.dcmread(grouped.files[0], stop_before_pixels=True).InstanceNumber) == 12  # descending
    with pytest.raises(TypeError, match=r"unknown option.* shuffle_name;.* Did you mean 'shuffle_names'"):
        write_ct_series(volume, affine, tmp_path / "c", shuffle_name=True)
    with pytest.raises(ValueError, match="transfer_syntax must be one of"):
        write_ct_series(volume, affine, tmp_path / "d", transfer_syntax="jpeg2000")
    with pytest.raises(ValueError, match="localizer must be"):
        SeriesFaults(localizer="scout")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def test_strongly_oblique_anisotropic_round_trip(tmp_path):
    """Cosines far from the axes (35° about a skew axis) and spacing 0.7 × 0.9 × 2.5 mm."""
    ph = generate_phantom(5, (48, 40, 16), orientation="LPS", noise_hu=0.0)
    affine = np.eye(4)
    affine[:3, :3] = _rotation(np.array([1.0, 2.0, 0.5]), 35.0) @ np.diag([0.7, 0.9, 2.5])
    affine[:3, 3] = [-20.0, 31.5, -12.25]
    write_ct_series(ph.image, affine, tmp_path, descending=True, shuffle_names=True)
    _assert_round_trip(tmp_path, ph.image, affine, np.random.default_rng(1))


def test_left_handed_source_comes_back_ascending_along_the_normal(tmp_path, small):
    """A NIfTI whose k axis runs against the slice normal is the same scan as its k-flipped twin; the
    reader always returns slices ascending along the normal, i.e. that twin, voxel for voxel."""
    volume, affine = small
    flipped = affine.copy()
    flipped[:3, 2] = -affine[:3, 2]
    flipped[:3, 3] = affine[:3, :3] @ [0, 0, volume.shape[2] - 1] + affine[:3, 3]
    write_ct_series(volume[:, :, ::-1], flipped, tmp_path)
    _assert_round_trip(tmp_path, volume, affine, np.random.default_rng(2))


@pytest.mark.skipif(not REAL_CT.exists(), reason=f"real CT not present at {REAL_CT}")
@pytest.mark.parametrize("descending", [False, True])
def test_real_ct_round_trip(tmp_path, descending):
    img = nib.load(REAL_CT)
    volume = np.asanyarray(img.dataobj).astype(np.int16)
    write_ct_series(
        volume,
        img.affine,
        tmp_path,
        descending=descending,
        shuffle_names=True,
        backwards_instance_numbers=True,
    )
    _assert_round_trip(tmp_path, volume, img.affine, np.random.default_rng(3))


@pytest.mark.parametrize("syntax", ["implicit", "deflated", "rle", "jpegls"])
def test_transfer_syntaxes_read_by_simpleitk(tmp_path, small, syntax):
    volume, affine = small
    write_ct_series(volume, affine, tmp_path, transfer_syntax=syntax)
    info = _only(tmp_path)
    ts = pydicom.dcmread(info.files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert (
        ts
        == {
            "implicit": "1.2.840.10008.1.2",
            "deflated": "1.2.840.10008.1.2.1.99",
            "rle": "1.2.840.10008.1.2.5",
            "jpegls": "1.2.840.10008.1.2.4.80",
        }[syntax]
    )
    assert np.array_equal(_voxels(read_series(info).image), volume)


# Messy series that are handled: (writer options, a phrase of the note, or None when no note is due).
HANDLED = {
    "identical duplicate": ({"duplicate_slices": [3, 4]}, "dropped 2 duplicate file(s)"),
    "typed localizer": ({"localizer": "typed"}, "dropped 1 localizer image(s) (ImageType LOCALIZER)"),
    "untyped scout": ({"localizer": "untyped"}, "whose orientation differs from the other 12"),
    "no series UID": (
        {"omit_series_uid": True},
        "no SeriesInstanceUID; grouped by (folder, StudyInstanceUID",
    ),
    "thickness ≠ spacing": ({"slice_thickness": 1.0}, "SliceThickness 1 mm differs from the spacing"),
    "jitter within tolerance": ({"slice_offsets_mm": {5: 0.01}}, None),
    "intercept per slice": ({"varying_intercept": True}, None),
}


@pytest.mark.parametrize("case", list(HANDLED))
def test_messy_series_handled(tmp_path, small, case):
    options, note = HANDLED[case]
    volume, affine = small
    write_ct_series(volume, affine, tmp_path, shuffle_names=True, **options)
    info = _only(tmp_path)
    assert info.usable and len(info.files) == volume.shape[2]
    if note is None:
        assert info.notes == ()
    else:
        assert any(note in n for n in info.notes), info.notes
    image = read_series(info).image
    assert image.get_data_dtype() == np.int16 and np.array_equal(_voxels(image), volume)
    np.testing.assert_allclose(image.affine, affine, atol=1e-4)


# Messy series that are refused: (writer options, the cause's phrase).
REFUSED = {
    "missing slice": ({"drop_slices": [6]}, "missing slice(s): steps between slice positions"),
    "missing slices, two apart": ({"drop_slices": [3, 7]}, "missing slice(s)"),
    "unequal spacing": ({"slice_offsets_mm": {5: 1.5}}, "unequal spacing between slices: steps"),
    "conflicting duplicate": ({"conflicting_duplicates": [4]}, "with different pixel data"),
    "gantry tilt": (
        {"gantry_tilt_deg": 12.0},
        "gantry tilt: slice positions run 12.00° off the slice normal",
    ),
    "one slice": ({"drop_slices": list(range(1, 12))}, "1 slice; a 3D series needs at least 2"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_messy_series_refused_with_one_line(tmp_path, small, case):
    options, cause = REFUSED[case]
    volume, affine = small
    write_ct_series(volume, affine, tmp_path, **options)
    info = _only(tmp_path)
    assert not info.usable and cause in info.error, info.error
    with pytest.raises(InputError) as excinfo:
        read_series(info)
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith(f"{tmp_path} (series PHANTOM001_20240101_1): ")
    assert cause in message


def test_mixed_orientation_and_sizes_in_one_series_refused(tmp_path, small):
    volume, affine = small
    turned = affine.copy()
    turned[:3, :2] = affine[:3, [1, 0]]  # columns and rows swapped: another orientation, same series UID
    w = write_ct_series(volume[:, :, :6], affine, tmp_path / "a", series_uid="1.2.826.0.1.3680043.8.498.1")
    write_ct_series(volume[:, :, :6], turned, tmp_path / "a", series_uid=w.series_uid, file_prefix="t")
    assert "mixed orientation within the series: 6 with" in _only(tmp_path / "a").error
    write_ct_series(volume[:, :, :6], affine, tmp_path / "b", series_uid=w.series_uid)
    write_ct_series(volume[:20, :, :6], affine, tmp_path / "b", series_uid=w.series_uid, file_prefix="x")
    assert "images of different size or pixel spacing" in _only(tmp_path / "b").error


def test_several_series_in_one_folder(tmp_path, small):
    """Two CT series (one with a scout), an MR series, their files interleaved with non-DICOM files."""
    volume, affine = small
    study = "1.2.826.0.1.3680043.8.498.77"
    write_ct_series(
        volume,
        affine,
        tmp_path,
        study_uid=study,
        series_number=2,
        localizer="typed",
        shuffle_names=True,
        file_prefix="a",
    )
    write_ct_series(
        volume[:, :, :8],
        affine,
        tmp_path,
        study_uid=study,
        series_number=3,
        descending=True,
        shuffle_names=True,
        file_prefix="b",
    )
    write_ct_series(
        volume, affine, tmp_path, study_uid=study, series_number=4, modality="MR", file_prefix="c"
    )
    (tmp_path / "README.txt").write_text("exported by a PACS\n")
    (tmp_path / ".DS_Store").write_bytes(b"\0" * 300)
    found = {s.case: s for s in find_series(tmp_path)}
    assert sorted(found) == ["PHANTOM001_20240101_2", "PHANTOM001_20240101_3", "PHANTOM001_20240101_4"]
    two, three, mr = found.values()
    assert any("localizer" in n for n in two.notes) and len(two.files) == 12
    assert np.array_equal(_voxels(read_series(two).image), volume)
    assert np.array_equal(_voxels(read_series(three).image), volume[:, :, :8])
    assert mr.modality == "MR" and mr.skipped == "modality MR; only CT series are read"
    with pytest.raises(InputError, match=r"series PHANTOM001_20240101_4\): skipped: modality MR"):
        read_series(mr)
    assert {s.study_uid for s in found.values()} == {study}
    assert len({s.series_uid for s in found.values()}) == 3


def test_case_names_are_safe_and_unique(tmp_path, small):
    volume, affine = small
    for n in range(2):  # same patient, date and series number, different series: hash suffix
        write_ct_series(
            volume[:, :, :3], affine, tmp_path / f"s{n}", patient_id="../Müller Anna/", series_number=7
        )
    names = sorted(s.case for s in find_series(tmp_path))
    assert len(set(names)) == 2
    assert all(
        n.startswith("_M_ller_Anna__20240101_7_") and len(n) == len("_M_ller_Anna__20240101_7_") + 8
        for n in names
    )
    assert series_case_name("", "", None) == "unknown_unknown_unknown"
    assert series_case_name("...x", "2024.01", 3) == "x_2024.01_3"


def test_series_without_uid_split_by_series_number(tmp_path, small):
    volume, affine = small
    study = "1.2.826.0.1.3680043.8.498.78"
    for number in (5, 6):
        write_ct_series(
            volume,
            affine,
            tmp_path,
            study_uid=study,
            series_number=number,
            omit_series_uid=True,
            frame_of_reference_uid="1.2.826.0.1.3680043.8.498.79",
            file_prefix=f"n{number}_",
        )
    found = find_series(tmp_path)
    assert [s.case for s in found] == ["PHANTOM001_20240101_5", "PHANTOM001_20240101_6"]
    assert all(s.usable and s.series_uid == "" and len(s.files) == 12 for s in found)


def test_pydicom_single_ct_slice_refused():
    info = _only(PYDICOM_FILES / "CT_small.dcm")
    assert info.case == "1CT1_20040119_1" and info.modality == "CT"
    with pytest.raises(
        InputError, match=r"\(series 1CT1_20040119_1\): 1 slice; a 3D series needs at least 2$"
    ):
        read_series(info)


def test_pydicom_dicomdir_tree():
    """pydicom's DICOMDIR test tree: CR and MR series, a CT localizer pair, a 5-slice CT series stored
    top to bottom, and a 4-slice CT series with a 202.5 mm gap; plus DICOMDIR files (no image)."""
    found = find_series(PYDICOM_FILES / "dicomdirtests")
    by_folder = {s.folder.name: s for s in found if s.modality == "CT"}
    assert sorted(by_folder) == ["CT2", "CT2N", "CT5N"]
    assert {s.modality for s in found} == {"CT", "CR", "MR"}
    assert all(s.skipped.startswith(f"modality {s.modality}; only CT") for s in found if s.modality != "CT")
    assert by_folder["CT2N"].skipped == "localizer/scout images only (2), not a 3D volume"
    assert by_folder["CT2"].error.startswith(
        "missing slice(s): steps between slice positions 1.25 mm ×2, 202.5"
    )

    info = by_folder["CT5N"]
    assert [int(pydicom.dcmread(f).InstanceNumber) for f in info.files] == [10, 9, 8, 7, 6]  # z ascending
    image = read_series(info).image
    assert image.shape == (16, 16, 5) and image.get_data_dtype() == np.int16
    for k, path in enumerate(info.files):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(_voxels(image)[:, :, k], hu.T)
        for i, j in [(0, 0), (15, 0), (3, 11)]:
            world = image.affine[:3, :3] @ [i, j, k] + image.affine[:3, 3]
            np.testing.assert_allclose(world, _tag_world_ras(path, i, j), atol=1e-4)


def test_truncated_files(tmp_path, small):
    """A header cut short is named in a note (and its slice is missing: refused); pixel data cut short is
    refused when read, naming the file."""
    volume, affine = small
    written = write_ct_series(volume, affine, tmp_path / "header")
    written.files[5].write_bytes(written.files[5].read_bytes()[:600])
    info = _only(tmp_path / "header")
    assert any("0006.dcm: header ends before Rows/Columns (truncated?)" in n for n in info.notes), info.notes
    assert info.error.startswith("missing slice(s)")

    written = write_ct_series(volume, affine, tmp_path / "pixels", transfer_syntax="rle")
    written.files[7].write_bytes(written.files[7].read_bytes()[:-300])
    info = _only(tmp_path / "pixels")
    assert info.usable
    with pytest.raises(InputError, match=r"\): SimpleITK cannot read the series \(0008\.dcm: .+\)$"):
        read_series(info)


def test_missing_root_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        find_series(tmp_path / "nothing")
    assert find_series(tmp_path) == []
