"""Previews (orientation, aspect, outlines), attention maps restored to the scan, QA flags, the review page.

Conventions are checked against world coordinates computed here from the affine (``nib.affines``), not
against the code under test: a volume whose value *is* a patient coordinate must read right-to-left,
anterior-to-posterior and superior-to-inferior across the panels, whatever the storage order.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.batch.review import CaseReview, collect_cases, write_review_page
from medseg.inference.attention import NO_GATES_NOTE, attention_maps, attention_on_grid, upsample_alpha
from medseg.inference.maps import entropy_map, label_means, restore_map
from medseg.report.preview import (
    RADIOLOGICAL_NOTE,
    outline,
    preview_figure,
    preview_panels,
    write_attention_overlay,
    write_preview,
    write_thumbnail,
)
from medseg.report.qa import Flag, ImageInfo, QAConfig, describe_rules, image_info, qa_flags
from medseg.report.reference_ranges import reference_range

SHAPE = (20, 16, 10)  # RAS-ordered grid of the synthetic scans: x (to patient right), y (anterior), z


def _rotation(deg: float) -> np.ndarray:
    t = np.radians(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


def _stored(data_ras: np.ndarray, spacing=(1.0, 1.0, 5.0), storage: str = "RAS", tilt: float = 0.0):
    """The same RAS-ordered voxels stored as ``storage``: RAS, LPS (axes 0 and 1 reversed) or SLP (the LPS
    array with its axes permuted to z, x, y); the affine keeps every voxel's world position."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(tilt) @ np.diag(spacing)
    affine[:3, 3] = [-30.0, -20.0, 10.0]
    n = np.array(data_ras.shape)
    if storage == "RAS":
        return nib.Nifti1Image(data_ras, affine)
    flip = np.eye(4)  # stored index → RAS-ordered index, axes 0 and 1 reversed
    flip[0, 0], flip[1, 1], flip[0, 3], flip[1, 3] = -1, -1, n[0] - 1, n[1] - 1
    lps = np.ascontiguousarray(data_ras[::-1, ::-1, :])
    if storage == "LPS":
        return nib.Nifti1Image(lps, affine @ flip)
    perm = np.zeros((4, 4))  # stored (a, b, c) = LPS-ordered (c, a, b) → transpose (2, 0, 1)
    perm[0, 1] = perm[1, 2] = perm[2, 0] = perm[3, 3] = 1
    return nib.Nifti1Image(np.ascontiguousarray(lps.transpose(2, 0, 1)), affine @ flip @ perm)


def _world(img: nib.Nifti1Image, axis: int) -> nib.Nifti1Image:
    """An image of the same grid whose voxel value is its world (RAS) coordinate along ``axis``."""
    idx = np.indices(img.shape[:3]).reshape(3, -1).T
    coords = nib.affines.apply_affine(img.affine, idx)[:, axis].reshape(img.shape[:3])
    return nib.Nifti1Image(coords.astype(np.float32), img.affine)


STORAGES = [("RAS", 0.0), ("LPS", 0.0), ("SLP", 0.0), ("LPS", 8.0)]


@pytest.mark.parametrize(("storage", "tilt"), STORAGES)
def test_panels_follow_the_radiological_convention(storage, tilt):
    """Axial/coronal: patient right (world x larger) on the image's left; axial: anterior up; coronal and
    sagittal: superior up; sagittal: anterior on the left. Oblique grids: closest canonical axes."""
    grid = _stored(np.zeros(SHAPE, np.float32), storage=storage, tilt=tilt)
    x, y, z = (preview_panels(_world(grid, a)) for a in range(3))
    for plane in ("axial", "coronal"):
        assert np.all(np.diff(x[plane].image, axis=1) < 0), plane  # columns run right → left
    assert np.all(np.diff(y["axial"].image, axis=0) < 0)  # rows run anterior → posterior
    assert np.all(np.diff(z["coronal"].image, axis=0) < 0)  # rows run superior → inferior
    assert np.all(np.diff(z["sagittal"].image, axis=0) < 0)
    assert np.all(np.diff(y["sagittal"].image, axis=1) < 0)  # columns run anterior → posterior
    assert x["axial"].edges == ("R", "L", "A", "P") and x["sagittal"].edges == ("A", "P", "S", "I")


def test_patient_left_half_is_bright_on_the_image_right_in_the_written_png(tmp_path):
    """Patient left is world x < 0 in RAS (+x points to the patient's right). Stored LPS; the rendered axial
    panel's right half is white, its left half black (window -160…240 HU)."""
    grid = _stored(np.zeros(SHAPE, np.float32), storage="LPS")
    x_world = _world(grid, 0).get_fdata()
    data = np.where(x_world < np.median(x_world), 1000.0, -1000.0).astype(np.float32)
    image = nib.Nifti1Image(data, grid.affine)
    fig, axes = preview_figure(image, np.zeros(SHAPE, np.uint8), {"liver": 1}, title="t")
    png = tmp_path / "p.png"
    fig.savefig(png, dpi=fig.dpi)
    pixels = mpimg.imread(png)[..., :3].mean(axis=2)
    box = axes[0].get_window_extent()
    rows = slice(int(pixels.shape[0] - box.y1) + 3, int(pixels.shape[0] - box.y0) - 3)
    cols = int(box.x0) + 3, int(box.x1) - 3
    mid = (cols[0] + cols[1]) // 2
    assert pixels[rows, cols[0] : mid - 3].mean() < 0.1  # patient right: dark
    assert pixels[rows, mid + 3 : cols[1]].mean() > 0.9  # patient left: bright, on the image's right
    assert RADIOLOGICAL_NOTE in fig._suptitle.get_text()
    plt.close(fig)


def test_anisotropic_voxels_keep_their_physical_aspect():
    """1×1×5 mm voxels: a coronal/sagittal pixel is 5× taller than wide, in the extent and on the canvas."""
    image = _stored(np.zeros(SHAPE, np.float32), spacing=(1.0, 1.0, 5.0))
    panels = preview_panels(image)
    cor = panels["coronal"]
    rows, cols = cor.image.shape
    assert (rows, cols) == (SHAPE[2], SHAPE[0])
    assert cor.pixel_mm == pytest.approx((5.0, 1.0)) and cor.aspect == pytest.approx(5.0)
    height, width = cor.extent[2] - cor.extent[3], cor.extent[1] - cor.extent[0]
    assert (height / rows) / (width / cols) == pytest.approx(5.0)
    assert panels["axial"].aspect == pytest.approx(1.0)
    fig, axes = preview_figure(image, None, {})
    fig.canvas.draw()
    box = axes[1].get_window_extent()
    assert box.height / box.width == pytest.approx(SHAPE[2] * 5.0 / SHAPE[0], rel=0.03)
    plt.close(fig)


def test_ras_and_lps_storage_give_the_same_picture(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(-200, 300, SHAPE).astype(np.int16)
    labels = np.zeros(SHAPE, np.uint8)
    labels[3:9, 4:12, 2:8] = 1
    labels[12:17, 5:9, 3:6] = 2
    names = {"liver": 1, "spleen": 2}
    pictures = []
    for storage in ("RAS", "LPS", "SLP"):
        img = _stored(data, storage=storage)
        lab = np.asarray(_stored(labels, storage=storage).dataobj)
        panels = preview_panels(img, lab)
        pictures.append(
            mpimg.imread(write_preview(img, lab, names, tmp_path / f"{storage}.png", title="same"))
        )
        if storage == "RAS":
            reference = panels
        for plane, panel in panels.items():
            assert np.array_equal(panel.image, reference[plane].image)
            assert np.array_equal(panel.labels, reference[plane].labels)
    assert pictures[0].shape[0] > 400 and pictures[0].shape[1] > pictures[0].shape[0]
    assert np.array_equal(pictures[0], pictures[1]) and np.array_equal(pictures[0], pictures[2])


def test_outlines_are_borders_not_filled_areas(tmp_path):
    labels = np.zeros((20, 20), np.uint8)
    labels[5:15, 5:15] = 3
    border = outline(labels)
    assert np.count_nonzero(border) == 36 and set(np.unique(border)) == {0, 3}
    assert not border[6:14, 6:14].any() and np.all(border[5, 5:15] == 3)
    assert np.count_nonzero(outline(labels, thickness=2)) == 100 - 36
    img = _stored(np.zeros(SHAPE, np.int16))
    thumb = mpimg.imread(write_thumbnail(img, np.zeros(SHAPE, np.uint8), {"liver": 1}, tmp_path / "t.png"))
    assert max(thumb.shape[:2]) == pytest.approx(200, abs=2)


# ----------------------------------------------------------------------------------- attention and maps


def test_upsampled_alpha_sits_on_the_voxels_it_gates():
    """Coarse voxel i of level 3 (factor 4) is centred on fine voxels 4i..4i+3: a coarse ramp i becomes the
    fine ramp (j + 0.5) / 4 - 0.5, clamped at the ends; an odd size is completed by the last plane."""
    coarse = torch.arange(5, dtype=torch.float32).view(1, 1, 5, 1, 1).expand(1, 1, 5, 2, 2)
    fine = upsample_alpha(coarse, 3, (22, 8, 8))[0, 0, :, 0, 0].numpy()
    expected = np.clip((np.arange(22) + 0.5) / 4 - 0.5, 0, 4)
    assert np.allclose(fine, expected)


def test_one_window_gives_the_networks_own_alpha(one_thread):
    from medseg.nets.unet import AttentionUNet3D

    torch.manual_seed(0)
    net = AttentionUNet3D(1, 3, filters=(4, 8, 16, 32)).eval()
    x = torch.randn(1, 16, 16, 8)
    stitched = attention_on_grid(net, x, (16, 16, 8), overlap=0.5)
    with torch.no_grad():
        _, alphas = net(x[None], return_attention=True)
    assert stitched.shape == (2, 16, 16, 8)
    for i, (a, level) in enumerate(zip(alphas, (2, 3), strict=True)):
        assert torch.allclose(stitched[i], upsample_alpha(a, level, (16, 16, 8))[0, 0], atol=1e-5)


def test_attention_maps_are_restored_to_the_scan(tiny_run, tiny_dataset, tmp_path, one_thread):
    from medseg.inference import Predictor
    from medseg.nets.unet import UNet3D

    predictor = Predictor(tiny_run / "best.pt", device="cpu")
    path = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]
    image = nib.load(path)
    maps = attention_maps(predictor, image)
    assert sorted(maps) == ["alpha_level2", "alpha_level3", "alpha_level4"]
    for name, alpha in maps.items():
        nib.save(alpha, tmp_path / f"{name}.nii.gz")
        back = nib.load(tmp_path / f"{name}.nii.gz")
        values = np.asarray(back.dataobj)
        assert back.shape == image.shape and np.array_equal(back.affine, image.affine)
        assert back.get_data_dtype() == np.float32
        assert values.min() >= 0.0 and values.max() <= 1.0 and values.max() > 0.0
    # the same voxels stored with axes 0 and 1 reversed: the maps follow the voxels through patient space
    n = np.array(image.shape)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = n[:2] - 1
    data = np.asanyarray(image.dataobj)
    flipped = nib.Nifti1Image(np.ascontiguousarray(data[::-1, ::-1, :]), image.affine @ flip)
    for name, alpha in attention_maps(predictor, flipped).items():
        assert np.array_equal(alpha.affine, flipped.affine)
        assert np.allclose(np.asarray(alpha.dataobj)[::-1, ::-1, :], maps[name].dataobj, atol=1e-4), name
    overlay = write_attention_overlay(image, maps["alpha_level2"], tmp_path / "a.png", title="α2")
    assert mpimg.imread(overlay).shape[0] > 300
    notes: list[str] = []
    plain = UNet3D(1, 3, filters=(4, 8, 16, 32, 64)).eval()
    assert attention_maps(plain, image, roi_size=(32, 32, 16), notes=notes) == {}
    assert notes == [NO_GATES_NOTE.format(name="UNet3D")]


def test_restore_map_goes_through_patient_space():
    """Values on an RAS model grid restored onto the LPS-stored input grid of the same voxels: flipped."""
    rng = np.random.default_rng(1)
    values = rng.random((2, *SHAPE)).astype(np.float32)
    ras = _stored(np.zeros(SHAPE, np.float32), storage="RAS")
    lps = _stored(np.zeros(SHAPE, np.float32), storage="LPS")
    out = restore_map(
        torch.from_numpy(values), ras.affine, lps.affine, SHAPE, slab_voxels=SHAPE[0] * SHAPE[1]
    )
    assert np.allclose(out, values[:, ::-1, ::-1, :], atol=1e-5)


def test_entropy_and_label_means_by_hand():
    p = np.array([[1.0, 0.5, 1 / 3], [0.0, 0.5, 1 / 3], [0.0, 0.0, 1 / 3]])
    assert np.allclose(entropy_map(p), [0.0, np.log(2) / np.log(3), 1.0])
    assert np.allclose(entropy_map(p, normalise=False), [0.0, np.log(2), np.log(3)])
    labels = np.array([1, 1, 2, 0])
    means = label_means(np.array([0.2, 0.4, 0.9, 5.0]), labels, {"liver": 1, "spleen": 2, "aorta": 3})
    assert means == pytest.approx({"liver": 0.3, "spleen": 0.9, "aorta": None})


# ----------------------------------------------------------------------------------------------- QA flags


def _row(name: str, volume: float, components: int = 1, border: bool = False) -> dict:
    voxels = int(volume * 1000)
    return {
        "name": name,
        "voxels": voxels,
        "volume_ml": volume,
        "components": components,
        "touches_border": border,
    }


GOOD = ImageInfo(spacing_mm=(0.8, 0.8, 1.5), obliquity_deg=0.0, axcodes="LPS", hu_min=-1024, hu_max=1800)


def _codes(flags: list[Flag]) -> list[tuple[str, str | None]]:
    return [(f.code, f.label) for f in flags]


def test_a_plausible_case_has_no_flags():
    rows = [_row("liver", 1600), _row("spleen", 220), _row("kidney_left", 160), _row("aorta", 90)]
    assert qa_flags(rows, entropy={"liver": 0.03}, image_info=GOOD) == []


@pytest.mark.parametrize(
    ("rows", "kwargs", "expected"),
    [
        ([_row("liver", 1600), {**_row("spleen", 0), "voxels": 0}], {}, [("missing", "spleen")]),
        ([_row("liver", 1600)], {"config": QAConfig(expected_labels=("liver", "pancreas"))}, [("missing", "pancreas")]),
        ([_row("liver", 3100)], {}, [("volume_range", "liver")]),
        ([_row("kidney_right", 40)], {}, [("volume_range", "kidney_right")]),
        ([_row("pancreas", 70, components=5)], {}, [("fragmented", "pancreas")]),
        ([_row("pancreas", 70, components=5)], {"config": QAConfig(max_components=5)}, []),
        ([_row("liver", 1500, border=True)], {}, [("truncated", "liver")]),
        ([_row("liver", 1500, border=True)], {"config": QAConfig(check_border=False)}, []),
        ([_row("pancreas", 70)], {"entropy": {"pancreas": 0.4}}, [("low_confidence", "pancreas")]),
        ([_row("pancreas", 70)], {"entropy": {"pancreas": 0.4}, "config": QAConfig(entropy_threshold=0.5)}, []),
    ],
)  # fmt: skip
def test_each_organ_rule(rows, kwargs, expected):
    assert _codes(qa_flags(rows, image_info=GOOD, **kwargs)) == expected


@pytest.mark.parametrize(
    ("change", "code", "severity"),
    [
        ({"obliquity_deg": 10.0}, "oblique", "info"),
        ({"spacing_mm": (0.7, 0.7, 7.5)}, "spacing", "info"),
        ({"spacing_mm": (0.2, 0.2, 1.0)}, "spacing", "info"),
        ({"hu_min": 0.0, "hu_max": 900.0}, "not_ct", "error"),
        ({"hu_min": -1000.0, "hu_max": 120.0}, "not_ct", "error"),
        ({"hu_min": -3024.0}, "hu_out_of_range", "info"),
    ],
)
def test_each_input_rule(change, code, severity):
    info = ImageInfo(**{**GOOD.to_dict(), **change})
    flags = qa_flags([_row("liver", 1500)], image_info=info)
    assert [(f.code, f.severity) for f in flags] == [(code, severity)]
    assert ImageInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info


def test_image_info_and_reference_names():
    image = _stored(np.full(SHAPE, 40, np.int16), tilt=8.0, storage="LPS")
    info = image_info(nib.Nifti1Image(np.where(np.arange(20)[:, None, None] < 2, -1000, 300) * np.ones(SHAPE),
                                      image.affine))  # fmt: skip
    assert info.obliquity_deg == pytest.approx(8.0, abs=1e-3) and info.spacing_mm == pytest.approx((1, 1, 5))
    assert (info.hu_min, info.hu_max, info.axcodes) == (-1000, 300, "LPS")
    assert [f.code for f in qa_flags([], image_info=info)] == ["oblique"]
    assert reference_range("Kidney_L").high_ml == 300 and reference_range("kidneys").low_ml == 160
    assert reference_range("aorta") is None and reference_range("LIVER").source.startswith("Vauthey")
    assert {code for code, _, _ in describe_rules()} >= {
        "missing",
        "volume_range",
        "low_confidence",
        "not_ct",
    }


# ------------------------------------------------------------------------------------------- review page


class _Page(HTMLParser):
    """Rows (data-case, severity), images, links, flags and every start tag of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, str]] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.flags: list[tuple[str, str]] = []
        self.tags: list[str] = []
        self._flag: str | None = None
        self._text = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "tr" and "data-case" in a:
            self.rows.append((a["data-case"], a["data-severity"]))
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "a":
            self.links.append(a["href"])
        elif tag == "li" and "data-code" in a:
            self._flag, self._text = a["class"], ""

    def handle_data(self, data):
        if self._flag is not None:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "li" and self._flag is not None:
            self.flags.append((self._flag, self._text))
            self._flag = None


def _case_folder(out: Path, case: str, volumes: dict[str, float], *, preview: bool = True) -> None:
    """A case as ``medseg segment`` leaves it: mask, sidecar, statistics, optional pictures and α map."""
    names = {"liver": 1, "spleen": 2}
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:10, 2:10, 2:8] = 1
    img = _stored(np.zeros(SHAPE, np.int16))
    nib.save(nib.Nifti1Image(labels, img.affine), out / f"{case}.nii.gz")
    side = {"case": case, "labels": {"background": 0, **names}, "warnings": [f"note for {case}"],
            "image_info": GOOD.to_dict()}  # fmt: skip
    (out / f"{case}.json").write_text(json.dumps(side))
    rows = [{**_row(n, v), "label": names[n], "hu_mean": 100.0} for n, v in volumes.items()]
    (out / f"{case}_stats.json").write_text(json.dumps({"case": case, "rows": rows}))
    if preview:
        write_thumbnail(img, labels, names, out / f"{case}_thumb.png")
        write_preview(img, labels, names, out / f"{case}_preview.png")
        nib.save(
            nib.Nifti1Image(np.zeros(SHAPE, np.float32), img.affine), out / f"{case}_alpha_level2.nii.gz"
        )


def test_review_page_from_an_output_folder(tmp_path):
    out = tmp_path / "out dir"
    out.mkdir()
    odd = 'odd <b>&"name'  # legal in a file name; must be escaped in HTML and quoted in URLs
    _case_folder(out, "case_clean", {"liver": 1500, "spleen": 200})
    _case_folder(out, "case_big", {"liver": 3200, "spleen": 200})
    _case_folder(out, "case_big_2", {"liver": 1500, "spleen": 0}, preview=False)  # prefix of another case
    _case_folder(out, odd, {"liver": 1500, "spleen": 200})
    _case_folder(out, "case_nostats", {"liver": 1500, "spleen": 0}, preview=False)
    (out / "case_nostats_stats.json").unlink()  # measured on the mask: liver 8·8·6 voxels of 5 mm³, no spleen
    (out / "manifest.jsonl").write_text(
        '{"case": "case_bad", "status": "failed", "error": "ct.nii.gz: truncated file"}\nnot json\n'
    )
    cases = collect_cases(out)
    by_name = {c.name: c for c in cases}
    assert set(by_name) == {"case_clean", "case_big", "case_big_2", odd, "case_bad", "case_nostats"}
    assert by_name["case_nostats"].rows[0]["volume_ml"] == pytest.approx(8 * 8 * 6 * 5 / 1000)
    assert by_name["case_nostats"].rows[0]["hu_mean"] is None
    # every file goes to the longest case name it starts with: case_big_2.json is not case_big's
    assert by_name["case_big"].files["sidecar"].name == "case_big.json"
    assert sorted(by_name["case_big_2"].files) == ["mask", "sidecar", "statistics"]
    assert "α level 2" in by_name["case_big"].files
    assert by_name["case_big"].thumbnail.name == "case_big_thumb.png"
    page = write_review_page(out, cases)
    parser = _Page()
    parser.feed(page.read_text())
    order = [name for name, _ in parser.rows]
    # errors (more flags first, then by name), warnings, clean cases
    assert order == ["case_nostats", "case_bad", "case_big_2", "case_big", "case_clean", odd]
    assert [severity for _, severity in parser.rows] == ["error"] * 3 + ["warning"] + ["clean"] * 2
    assert len(parser.images) == 3
    for ref in parser.images + [link for link in parser.links if not link.startswith("#")]:
        assert not ref.startswith(("/", "http")) and (out / unquote(ref)).is_file(), ref
    flags = dict((text.split(":")[0], cls) for cls, text in parser.flags)
    assert flags["liver"] == "sev-warning" and flags["spleen"] == "sev-error"
    assert any("truncated file" in text for _, text in parser.flags)
    assert "b" not in parser.tags and "Prassopoulos" in page.read_text()  # the odd name stayed text


def test_review_page_escapes_untrusted_names(tmp_path):
    evil = "<script>alert(1)</script>"
    cases = [
        CaseReview(name=evil, rows=[{**_row("liver", 1500), "label": 1, "hu_mean": 90.0}],
                   flags=[Flag("missing", "error", f"{evil}: expected but not found", evil)],
                   warnings=[f"{evil} warning"]),
        CaseReview(name="plain"),
    ]  # fmt: skip
    page = write_review_page(tmp_path, cases).read_text()
    parser = _Page()
    parser.feed(page)
    assert "script" not in parser.tags and "<script>" not in page
    assert parser.rows[0] == (evil, "error") and parser.flags[0][1].startswith(evil)
