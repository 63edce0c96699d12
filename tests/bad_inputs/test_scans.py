"""Bad scans given to ``segment`` / ``evaluate``: refused from the header with one line naming the file.

Each class is built at test time (nibabel, or raw header bytes where nibabel refuses to write it) and
checked through :func:`medseg.io.load_volume` directly; then one real ``medseg segment`` batch runs over a
folder of them plus one good scan, a single bad file and an all-air scan go through ``medseg segment``
alone, and a complex-typed prediction goes through ``medseg evaluate``.
"""

from __future__ import annotations

import gzip
import struct
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.io import InputError, load_volume, voxel_spacing
from tests.bad_inputs.cli import assert_no_temp_files, run_cli

AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])
SHAPE = (40, 40, 20)
RGB = [("R", "u1"), ("G", "u1"), ("B", "u1")]


def _save(path: Path, data: np.ndarray, affine=AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _edit_header(path: Path, edit) -> Path:
    """Rewrite raw header bytes of a ``.nii``/``.nii.gz`` (``edit(bytearray)``): headers nibabel won't save."""
    gz = path.name.endswith(".gz")
    raw = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    edit(raw)
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
    return path


def _dims(*dims: int):
    """Header ``dim`` field (offset 40, eight int16) declaring ``dims``."""
    return lambda raw: struct.pack_into("<8h", raw, 40, len(dims), *dims, *[1] * (7 - len(dims)))


def _no_spacing(pixdim, qform_code: int):
    """pixdim[1:4] (offset 80) set, sform_code (offset 254) 0, qform_code (offset 252) as given."""

    def edit(raw: bytearray) -> None:
        struct.pack_into("<3f", raw, 80, *pixdim)
        struct.pack_into("<hh", raw, 252, qform_code, 0)

    return edit


def _bit_packed(raw: bytearray) -> None:
    struct.pack_into("<hh", raw, 70, 1, 1)  # datatype 1 (DT_BINARY), bitpix 1


def make_bad_scans(folder: Path) -> dict[str, tuple[Path, str]]:
    """name → (file, expected cause) for every class of bad scan."""
    folder.mkdir(parents=True, exist_ok=True)
    zeros = np.zeros(SHAPE, np.int16)

    def good(name: str) -> Path:
        return _save(folder / name, zeros)

    return {
        "complex": (
            _save(folder / "complex.nii.gz", zeros.astype(np.complex64)),
            "unsupported voxel type complex64",
        ),
        "rgb": (_save(folder / "rgb.nii.gz", np.zeros(SHAPE, RGB)), "unsupported voxel type RGB"),
        "bit_packed": (_edit_header(good("bits.nii"), _bit_packed), "unsupported voxel type binary"),
        "huge_nii": (
            _edit_header(good("huge.nii"), _dims(1024, 1024, 1024)),
            "header declares 1024×1024×1024 int16 voxels (2.0 GiB) but the file holds only 63 KiB",
        ),
        "huge_gz": (
            _edit_header(good("huge_gz.nii.gz"), _dims(1024, 1024, 1024)),
            "header declares 1024×1024×1024 int16 voxels (2.0 GiB) but the file holds only",
        ),
        "absurd": (
            _edit_header(good("absurd.nii.gz"), _dims(32767, 32767, 32767)),
            "32767×32767×32767 int16 voxels (64.0 TiB), more than medseg reads",
        ),
        "zero_pixdim": (
            _edit_header(good("zero_pixdim.nii.gz"), _no_spacing((0, 0, 0), 1)),
            "no voxel spacing (pixdim [0, 0, 0] not all positive and finite, and no usable sform)",
        ),
        "negative_pixdim": (
            _edit_header(good("negative_pixdim.nii"), _no_spacing((-1.5, 1.5, 3), 0)),
            "no voxel spacing (pixdim [-1.5, 1.5, 3]",
        ),
        "nan_pixdim": (
            _edit_header(good("nan_pixdim.nii.gz"), _no_spacing((np.nan, 1, 1), 1)),
            "no voxel spacing (pixdim [nan, 1, 1]",
        ),
    }


@pytest.fixture
def bad_scans(tmp_path) -> dict[str, tuple[Path, str]]:
    return make_bad_scans(tmp_path / "bad")


def test_each_bad_scan_is_refused_with_one_line(bad_scans):
    for key, (path, cause) in bad_scans.items():
        with pytest.raises(InputError) as info:
            load_volume(path)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and cause in message, (key, message)
        assert "\n" not in message


def test_lying_header_is_refused_before_allocating(bad_scans):
    """Without the header check nibabel allocates the declared 2 GiB for a ``.nii.gz`` before reading it."""
    path, _ = bad_scans["huge_gz"]
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="but the file holds only"):
            load_volume(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_byte_limit_is_a_parameter(tmp_path):
    path = _save(tmp_path / "ok.nii.gz", np.zeros(SHAPE, np.int16))
    assert load_volume(path).shape == SHAPE
    with pytest.raises(InputError, match=r"40×40×20 int16 voxels \(62 KiB\), more than medseg reads"):
        load_volume(path, max_bytes=2**10)


def test_good_headers_that_look_odd_still_load(tmp_path):
    """A valid sform with zero pixdim (the affine holds the spacing), a multi-member gzip (trailer smaller
    than the content), and an X×Y×Z×1 volume."""
    data = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    sform = _save(tmp_path / "sform.nii.gz", data)
    _edit_header(sform, lambda raw: struct.pack_into("<3f", raw, 80, 0, 0, 0))
    assert nib.load(sform).header["sform_code"] > 0
    img = load_volume(sform)
    assert np.allclose(voxel_spacing(img.affine), [1.5, 1.5, 3.0]) and (img.get_fdata() == data).all()

    raw = gzip.decompress(_save(tmp_path / "one.nii.gz", data).read_bytes())
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[: len(raw) // 3]) + gzip.compress(raw[len(raw) // 3 :]))
    assert (load_volume(multi).get_fdata() == data).all()

    assert load_volume(_save(tmp_path / "x1.nii", data[..., None])).shape == SHAPE


@pytest.fixture(scope="module")
def good_scan(tiny_dataset) -> Path:
    return sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]


def test_segment_batch_names_every_bad_scan_and_writes_the_good_one(tiny_run, good_scan, tmp_path):
    scans = make_bad_scans(tmp_path / "in")
    (tmp_path / "in" / "good.nii.gz").write_bytes(good_scan.read_bytes())
    out = tmp_path / "out"
    result = run_cli(
        "segment", "-i", tmp_path / "in", "-o", out, "-m", tiny_run / "best.pt", "--device", "cpu"
    )
    assert result.code == 1, result.output
    assert "Traceback" not in result.output and "MemoryError" not in result.output
    errors = result.error_lines()
    for key, (path, cause) in scans.items():
        assert [line for line in errors if path.name in line and cause in line], (key, errors)
    ref = nib.load(good_scan)
    mask = nib.load(out / "good.nii.gz")
    assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine)
    assert (out / "good.json").is_file()
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["good.nii.gz"]
    assert_no_temp_files(out)


def test_segment_single_bad_scan_fails_naming_it(tiny_run, tmp_path):
    path, cause = make_bad_scans(tmp_path / "in")["complex"]
    out = tmp_path / "mask.nii.gz"
    result = run_cli("segment", "-i", path, "-o", out, "-m", tiny_run / "best.pt", "--device", "cpu")
    assert result.code != 0 and not out.exists()
    assert "Traceback" not in result.output
    assert [line for line in result.stderr.splitlines() if str(path) in line and cause in line], result.output


def test_evaluate_complex_prediction_names_it(tmp_path):
    labels = np.zeros(SHAPE, np.uint8)
    labels[10:20, 10:20, 5:10] = 1
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    ref = _save(tmp_path / "ref" / "case.nii.gz", labels)
    pred = _save(tmp_path / "pred" / "case.nii.gz", labels.astype(np.complex64))
    result = run_cli("evaluate", "--pred", pred.parent, "--ref", ref.parent, "-o", tmp_path / "m.csv")
    assert result.code != 0 and "Traceback" not in result.output
    naming = [line for line in result.error_lines() if str(pred) in line]
    assert len(naming) == 1 and "unsupported voxel type complex64" in naming[0], result.output


def test_all_air_scan_gives_an_empty_mask_and_a_warning(tiny_run, tmp_path):
    """No voxel above -500 HU: the body crop would leave nothing (MONAI crops to a 0-size image)."""
    affine = np.array([[-1.2, 0.1, 0, 30], [0, 1.2, 0, -20], [0, 0, 2.5, 7], [0, 0, 0, 1]])
    scan = _save(tmp_path / "air.nii.gz", np.full((37, 41, 19), -1000, np.int16), affine)
    out = tmp_path / "air_mask.nii.gz"
    result = run_cli("segment", "-i", scan, "-o", out, "-m", tiny_run / "best.pt", "--device", "cpu")
    assert result.code == 0, result.output
    mask = nib.load(out)
    assert mask.shape == (37, 41, 19) and np.allclose(mask.affine, affine)
    assert not np.asanyarray(mask.dataobj).any()
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {scan}: no body found (no voxel above -500 HU): empty mask written"], (
        result.output
    )


def test_predictor_warns_when_the_crop_leaves_nothing(tiny_run, tmp_path):
    """One dense voxel in air vanishes on the coarse model grid: empty mask, a warning, no grid_sampler
    error (checked through the Python API, no CLI start-up)."""
    from medseg.inference import Predictor

    predictor = Predictor(tiny_run / "best.pt", device="cpu")
    assert min(predictor.plan.spacing) > 3 * 1.5  # the model grid is coarse: a lone voxel is lost
    data = np.full(SHAPE, -1000, np.int16)
    data[20, 20, 10] = 0
    pred = predictor.predict(_save(tmp_path / "speck.nii.gz", data))
    assert pred.labels.shape == SHAPE and not pred.labels.any()
    assert pred.warnings == [
        "no body left on the model grid (voxels above -500 HU vanish when resampled): empty mask written"
    ]
