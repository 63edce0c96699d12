"""DICOM CT series whose pixel module lies: refused from the headers, before SimpleITK reads a voxel.

Each bad series is written at test time (24×24×12 voxels, :func:`write_ct_series`) and then edited with
pydicom. Every class is checked through :func:`find_series` directly. The classes met in exports
(:data:`ROWS`: pixel data half as long as declared, 1-bit, RGB, zero / NaN slope, infinite intercept)
also go through one real ``medseg segment`` batch over a folder of them plus valid series (16-bit
BitsStored-12 unsigned and signed, MONOCHROME1 signed and JPEG-LS); a size declared far beyond the file
(65535 × 65535 over 1 KiB) goes through ``medseg segment`` alone, with the child's peak memory measured.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from medseg.data.phantoms import generate_phantom
from medseg.io import dicom_pixels
from medseg.io.dicom import find_series, read_series
from medseg.io.dicom_pixels import PixelExtent, check_pixel_module, check_series
from medseg.testing.dicom_series import write_ct_series
from tests.bad_inputs.cli import Result, assert_no_temp_files, assert_one_error, run_cli

SHAPE = (24, 24, 12)
SLICE_BYTES = 24 * 24 * 2


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray]:
    ph = generate_phantom(3, SHAPE, orientation="RAS", noise_hu=0.0)
    return ph.image, ph.affine


# Edits of one file's data set (pydicom), applied after write_ct_series.
def _half_pixel_data(ds: Dataset) -> None:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def _lying_size(ds: Dataset) -> None:
    ds.Rows = ds.Columns = 65535
    ds.PixelData = b"\0" * 1024


def _one_bit(ds: Dataset) -> None:
    bits = np.packbits(ds.pixel_array > 1024, bitorder="little")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelData = 1, 1, 0, bits.tobytes()


def _rgb(ds: Dataset) -> None:
    grey = (ds.pixel_array >> 4).astype(np.uint8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.repeat(grey[..., None], 3, axis=-1).tobytes()


def _raw(keyword: str, text: bytes):
    """Write ``text`` as the raw DS value of ``keyword`` (pydicom would refuse to set NaN or garbage)."""

    def edit(ds: Dataset) -> None:
        tag = Tag(keyword)
        ds._dict[tag] = RawDataElement(tag, "DS", len(text), text, 0, False, True)

    return edit


def _wide(ds: Dataset) -> None:
    """One row of 9000 pixels, all present: a size beyond the cap although the bytes agree."""
    ds.Rows, ds.Columns, ds.PixelData = 1, 9000, bytes(18000)


def _set(**values):
    def edit(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)

    return edit


def _monochrome1(ds: Dataset) -> None:
    ds.PhotometricInterpretation = "MONOCHROME1"


def _write(folder: Path, volume, affine, edit=None, slices=None, **options) -> list[Path]:
    """A series in ``folder`` with ``edit`` applied to the files of ``slices`` (all when None)."""
    files = write_ct_series(volume, affine, folder, **options).files
    for k in range(len(files)) if slices is None else slices:
        ds = pydicom.dcmread(files[k])
        edit(ds)
        ds.save_as(files[k])
    return files


# Refused through the CLI batch: name → (series number, edit, slices edited (None: all), file named, cause).
ROWS = {
    "half pixel data": (
        2,
        _half_pixel_data,
        [5],
        "0006.dcm",
        f"PixelData holds {SLICE_BYTES // 2} bytes, expected {SLICE_BYTES} (Rows 24 × Columns 24",
    ),
    "1-bit": (
        3,
        _one_bit,
        None,
        "0001.dcm",
        "BitsAllocated 1: expected 8, 16 or 32 (a bitmap, not a CT image)",
    ),
    "RGB": (
        4,
        _rgb,
        None,
        "0001.dcm",
        "PhotometricInterpretation RGB: expected MONOCHROME2 or MONOCHROME1 (not a CT image)",
    ),
    "slope 0": (
        5,
        _raw("RescaleSlope", b"0 "),
        [3],
        "0004.dcm",
        "RescaleSlope 0: expected a finite non-zero",
    ),
    "slope NaN": (
        6,
        _raw("RescaleSlope", b"NaN "),
        [7],
        "0008.dcm",
        "RescaleSlope NaN: expected a finite non-zero",
    ),
    "intercept inf": (
        7,
        _raw("RescaleIntercept", b"inf "),
        [2],
        "0003.dcm",
        "RescaleIntercept inf: expected a finite",
    ),
}
# Valid series the batch must segment: name → (series number, edit (all slices), writer options, HU added).
# "200 HU more" shows that the entropy map the batch writes tells HU apart.
GOOD = {
    "clean": (1, None, {}, 0),
    "signed": (11, None, {"signed": True}, 0),
    "MONOCHROME1 signed": (12, _monochrome1, {"signed": True}, 0),
    "MONOCHROME1 jpegls": (13, _monochrome1, {"transfer_syntax": "jpegls"}, 0),
    "200 HU more": (14, None, {}, 200),
}
LYING_SIZE_CAUSE = "PixelData holds 1024 bytes, expected 8589672450 (Rows 65535 × Columns 65535"

# More classes, checked through find_series only: name → (edit, slices, writer options, file, cause).
MORE = {
    "truncated file": (
        None,
        [4],
        {},
        "0005.dcm",
        f"PixelData holds {SLICE_BYTES - 300} bytes, expected {SLICE_BYTES} (Rows 24 × Columns 24",
    ),
    "pixel data too long": (
        lambda ds: setattr(ds, "PixelData", ds.PixelData + b"\0\0"),
        [0],
        {},
        "0001.dcm",
        f"PixelData holds {SLICE_BYTES + 2} bytes, expected {SLICE_BYTES}",
    ),
    "no pixel data": (
        lambda ds: delattr(ds, "PixelData"),
        [9],
        {},
        "0010.dcm",
        "no PixelData element: expected",
    ),
    "HighBit": (_set(HighBit=15), [0], {}, "0001.dcm", "HighBit 15: expected 11 (BitsStored 12 − 1)"),
    "BitsStored": (_set(BitsStored=17, HighBit=16), [0], {}, "0001.dcm", "BitsStored 17: expected 1 to 16"),
    "BitsAllocated 12": (
        _set(BitsAllocated=12),
        [0],
        {},
        "0001.dcm",
        "BitsAllocated 12: expected 8, 16 or 32",
    ),
    "PixelRepresentation": (
        _set(PixelRepresentation=2),
        [0],
        {},
        "0001.dcm",
        "PixelRepresentation 2: expected 0",
    ),
    "SamplesPerPixel": (
        _set(SamplesPerPixel=3),
        [0],
        {},
        "0001.dcm",
        "SamplesPerPixel 3: expected 1 (not a CT",
    ),
    "PALETTE COLOR": (
        _set(PhotometricInterpretation="PALETTE COLOR"),
        [0],
        {},
        "0001.dcm",
        "PhotometricInterpretation PALETTE COLOR: expected MONOCHROME2",
    ),
    "Rows 0": (_set(Rows=0), [0], {}, "0001.dcm", "Rows 0: expected 1 to 8192"),
    "Columns beyond the cap, data present": (
        _wide,
        [0],
        {},
        "0001.dcm",
        "Rows 1 × Columns 9000: expected at most 8192 each",
    ),
    "slope not a number": (_raw("RescaleSlope", b"abc "), [0], {}, "0001.dcm", "RescaleSlope abc: expected"),
    "slope 1\\2": (_raw("RescaleSlope", b"1\\2 "), [0], {}, "0001.dcm", "RescaleSlope [1, 2]: expected"),
    "compressed size lie": (
        _set(Rows=8192, Columns=8192),
        [0],
        {"transfer_syntax": "rle"},
        "0001.dcm",
        "PixelData declares 134217728 bytes (Rows 8192 × Columns 8192 × BitsAllocated 16/8) but holds",
    ),
    "deflated, half pixel data": (
        _half_pixel_data,
        [6],
        {"transfer_syntax": "deflated"},
        "0007.dcm",
        "PixelData holds 576 bytes, expected 1152",
    ),
    "implicit, lying size": (_lying_size, [0], {"transfer_syntax": "implicit"}, "0001.dcm", LYING_SIZE_CAUSE),
}


@pytest.mark.parametrize("name", [*ROWS, "lying size", *MORE])
def test_refused_by_find_series_naming_file_and_cause(tmp_path, phantom, name):
    volume, affine = phantom
    if name in ROWS:
        _, edit, slices, file, cause = ROWS[name]
        options = {}
    elif name == "lying size":
        edit, slices, options, file, cause = _lying_size, None, {}, "0001.dcm", LYING_SIZE_CAUSE
        volume = volume[:, :, :2]
    else:
        edit, slices, options, file, cause = MORE[name]
    if edit is None:  # truncated: cut the end of the file
        files = write_ct_series(volume, affine, tmp_path, **options).files
        files[slices[0]].write_bytes(files[slices[0]].read_bytes()[:-300])
    else:
        _write(tmp_path, volume, affine, edit, slices, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values it reads
        (info,) = find_series(tmp_path)
    assert info.error is not None and info.error.startswith(f"{file}: {cause}"), info.error
    assert "\n" not in info.error


def test_series_voxel_cap(tmp_path, phantom, monkeypatch):
    """The cap on declared voxels per series: a real 512 × 512 × 1000 CT passes, one voxel more than the cap
    is refused in find_series (cap lowered to this series' size − 1)."""
    real = _image(512, 512, 16, 12)
    extent = PixelExtent(0x7FE00010, 512 * 512 * 2, 512 * 512 * 2)
    assert check_series([(Path(f"{k:04d}.dcm"), real, extent) for k in range(1000)]) is None
    assert dicom_pixels.MAX_SERIES_VOXELS >= 1024 * 1024 * 1000

    volume, affine = phantom
    write_ct_series(volume, affine, tmp_path)
    monkeypatch.setattr(dicom_pixels, "MAX_SERIES_VOXELS", 24 * 24 * 12 - 1)
    (info,) = find_series(tmp_path)
    assert info.error == (
        "12 images of 24 × 24 declare 6912 voxels in all, more than medseg reads in one series (6911); "
        "header wrong?"
    )


def _image(rows: int, columns: int, allocated: int, stored: int) -> Dataset:
    """The Image Pixel module of a valid unsigned MONOCHROME2 image, in memory."""
    ds = Dataset()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, stored, stored - 1, 0
    return ds


@pytest.mark.parametrize(
    ("allocated", "stored", "found", "ok"),
    [
        (8, 8, 25, True),
        (8, 8, 26, True),
        (8, 8, 27, False),
        (8, 8, 24, False),
        (16, 12, 50, True),
        (32, 32, 100, True),
    ],
)
def test_byte_count_allows_only_the_even_padding(allocated, stored, found, ok):
    """5 × 5 pixels: 25 bytes at 8 bits may be padded to 26 (DICOM values have even length), no more."""
    cause = check_pixel_module(_image(5, 5, allocated, stored), PixelExtent(0x7FE00010, found, found))
    assert (cause is None) == ok, cause


def _hu(image: nib.Nifti1Image) -> np.ndarray:
    return np.asanyarray(image.dataobj)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"signed": True},
        {"transfer_syntax": "jpegls"},
        {"transfer_syntax": "deflated"},
        {"varying_intercept": True},
    ],
)
def test_monochrome1_reads_the_stored_hu(tmp_path, phantom, options):
    """MONOCHROME1 is display polarity only: HU = slope × stored + intercept. SimpleITK/GDCM inverts the
    stored values (or, signed 12-bit, cannot read them), so the reader relabels temporary copies; the
    volume equals the MONOCHROME2 source voxel for voxel and the copies are gone afterwards."""
    volume, affine = phantom
    files = _write(tmp_path / "s", volume, affine, _monochrome1, **options)
    (info,) = find_series(tmp_path / "s")
    assert info.usable and len(info.monochrome1) == 12
    before = set(Path(tempfile.gettempdir()).glob("medseg-monochrome1-*"))
    assert np.array_equal(_hu(read_series(info).image), volume)
    assert set(Path(tempfile.gettempdir()).glob("medseg-monochrome1-*")) <= before
    if options == {}:  # why the copies: SimpleITK alone returns 4095 − stored + intercept, not HU
        alone = sitk.GetArrayFromImage(sitk.ReadImage(str(files[0]), imageIO="GDCMImageIO"))[0].T
        assert np.array_equal(alone, 4095 - (volume[:, :, 0] + 1024) - 1024)


@pytest.mark.parametrize("options", [{}, {"signed": True}])
def test_16_bit_bits_stored_12_still_reads(tmp_path, phantom, options):
    volume, affine = phantom
    files = write_ct_series(volume, affine, tmp_path, **options).files
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
    assert ds.PixelRepresentation == int(options.get("signed", False))
    (info,) = find_series(tmp_path)
    assert info.usable and np.array_equal(_hu(read_series(info).image), volume)


def _case(number: int) -> str:
    return f"PHANTOM001_20240101_{number}"


@pytest.fixture(scope="module")
def batch(tmp_path_factory, tiny_run, phantom):
    """One real ``medseg segment`` over every table row's series and the valid series, each in its folder."""
    volume, affine = phantom
    root = tmp_path_factory.mktemp("dicom_pixels")
    for name, (number, edit, slices, _, _) in ROWS.items():
        _write(root / "in" / name.replace(" ", "_"), volume, affine, edit, slices, series_number=number)
    for name, (number, edit, options, more) in GOOD.items():
        folder = root / "in" / name.replace(" ", "_")
        if edit is None:
            write_ct_series(volume + more, affine, folder, series_number=number, **options)
        else:
            _write(folder, volume + more, affine, edit, series_number=number, **options)
    out = root / "out"
    model = tiny_run / "best.pt"
    result = run_cli("segment", "-i", root / "in", "-o", out, "-m", model, "--device", "cpu", "--uncertainty")
    return root, out, result


def test_batch_exit_code_and_no_leftovers(batch):
    _, out, result = batch
    assert result.code == 1, result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output, result.output
    assert len(result.error_lines()) == len(ROWS), result.output
    assert_no_temp_files(out)


@pytest.mark.parametrize("name", list(ROWS))
def test_batch_refuses_the_series_in_one_line_without_a_mask(batch, name):
    root, out, result = batch
    number, _, _, file, cause = ROWS[name]
    mine = [line for line in result.error_lines() if f"(series {_case(number)})" in line]
    assert len(mine) == 1, result.output
    folder = root / "in" / name.replace(" ", "_")
    assert mine[0].startswith(f"error: {folder} (series {_case(number)}): {file}: {cause}"), mine[0]
    assert not (out / f"{_case(number)}.nii.gz").exists() and not (out / f"{_case(number)}.json").exists()


def test_batch_segments_the_valid_series_alike(batch):
    """Signed, MONOCHROME1 and JPEG-LS MONOCHROME1 series of the clean series' HU give its mask and its
    softmax entropy map voxel for voxel (the tiny model's masks may be empty; the entropy map is not, and
    200 HU more changes it)."""
    _, out, _ = batch
    entropy = {}
    for name, (number, *_) in GOOD.items():
        mask = nib.load(out / f"{_case(number)}.nii.gz")
        assert mask.shape == SHAPE and (out / f"{_case(number)}.json").is_file()
        entropy[name] = nib.load(out / f"{_case(number)}_entropy.nii.gz").get_fdata()
        entropy[name, "mask"] = np.asanyarray(mask.dataobj)
    clean = entropy["clean"]
    assert np.unique(clean).size > 100
    for name in ("signed", "MONOCHROME1 signed", "MONOCHROME1 jpegls"):
        assert np.array_equal(entropy[name], clean), name
        assert np.array_equal(entropy[name, "mask"], entropy["clean", "mask"]), name
    assert not np.allclose(entropy["200 HU more"], clean, atol=1e-3)


#: Runs ``medseg`` in a grandchild under an address-space guard (so that a regression fails with an
#: allocation error instead of exhausting the machine) and records the grandchild's peak RSS (KiB).
_MEASURED = """
import resource, subprocess, sys
def guard():
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
code = subprocess.call([sys.executable, *sys.argv[2:]], preexec_fn=guard)  # -m pipelines.cli ARGS
with open(sys.argv[1], "w") as fh:
    fh.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def _run_cli_measured(rss_file: Path, *args: object) -> tuple[Result, int]:
    """:func:`run_cli` with the child's peak resident memory in bytes."""
    result = run_cli(*args, launcher=(sys.executable, "-c", _MEASURED, rss_file))
    return result, int(rss_file.read_text()) * 1024


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_AS"), reason="needs RLIMIT_AS")
def test_lying_size_is_refused_before_allocating(tmp_path, phantom, tiny_run):
    """2 slices declaring 65535 × 65535 int16 pixels (16 GiB) over 1 KiB of pixel data each: one error line,
    and the process stays at its usual size (about 0.5 GiB for the CLI with torch here)."""
    volume, affine = phantom
    _write(tmp_path / "in", volume[:, :, :2], affine, _lying_size)
    out = tmp_path / "out"
    result, peak = _run_cli_measured(
        tmp_path / "rss",
        "segment",
        "-i",
        tmp_path / "in",
        "-o",
        out,
        "-m",
        tiny_run / "best.pt",
        "--device",
        "cpu",
    )
    line = assert_one_error(
        result, tmp_path / "in", "(series PHANTOM001_20240101_1): 0001.dcm: ", cause=LYING_SIZE_CAUSE
    )
    assert result.code == 1 and "(and 1 more file(s) refused)" in line
    assert peak < 1.5 * 2**30, f"peak RSS {peak / 2**30:.2f} GiB"
    assert not (out / "PHANTOM001_20240101_1.nii.gz").exists()
    assert_no_temp_files(out)
