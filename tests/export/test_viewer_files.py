"""Viewer files read back by the libraries that read them: the Slicer ``.seg.nrrd`` with SimpleITK (names,
label values, colours from its metadata; voxels; world coordinates of the volume corners equal the NIfTI's
after the LPS sign flip) and as raw NRRD header text; the ITK-SNAP label file parsed as its format says;
split masks with nibabel (exact geometry)."""

from __future__ import annotations

import shlex

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.data.phantoms import LABELS, generate_phantom
from medseg.export.viewers import write_itksnap_labels, write_slicer_seg_nrrd, write_split_masks
from medseg.io.nifti import save_volume

#: 3D Slicer GenericAnatomyColors, written out by hand.
SLICER_RGB = {"liver": (221, 130, 101), "spleen": (157, 108, 162), "kidney_right": (185, 102, 83)}
SHAPE = (36, 28, 12)


def _oblique_affine() -> np.ndarray:
    t = np.deg2rad(25.0)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) @ np.array(
        [[1, 0, 0], [0, np.cos(t / 2), -np.sin(t / 2)], [0, np.sin(t / 2), np.cos(t / 2)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-0.8, 1.1, -2.5])  # flipped i and k: neither RAS nor LPS storage
    affine[:3, 3] = [40.0, -12.5, 77.0]
    return affine


@pytest.fixture(scope="module", params=["RAS", "LPS", "oblique"])
def labelled(request):
    ph = generate_phantom(6, SHAPE, orientation="LPS" if request.param == "LPS" else "RAS", noise_hu=0.0)
    return ph.label, _oblique_affine() if request.param == "oblique" else ph.affine


def test_slicer_seg_nrrd_reads_back(labelled, tmp_path):
    labels, affine = labelled
    names = {**LABELS, "urinary_bladder": 8}
    path = write_slicer_seg_nrrd(labels, affine, names, tmp_path / "case.seg.nrrd")
    img = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), labels)
    shape = np.array(SHAPE)
    for ijk in [(0, 0, 0), tuple(shape - 1), (shape[0] - 1, 0, 0), (0, shape[1] - 1, shape[2] - 1)]:
        lps = np.array(img.TransformIndexToPhysicalPoint(tuple(int(v) for v in ijk)))
        ras = affine[:3, :3] @ np.array(ijk, float) + affine[:3, 3]
        np.testing.assert_allclose(lps * [-1, -1, 1], ras, atol=1e-6)

    meta = {key: img.GetMetaData(key) for key in img.GetMetaDataKeys()}
    segments = {}
    for i in range(len(names) - 1):
        segments[meta[f"Segment{i}_Name"]] = {
            k: meta[f"Segment{i}_{k}"] for k in ("ID", "Color", "LabelValue")
        }
        assert meta[f"Segment{i}_Layer"] == "0"
    assert {n: int(s["LabelValue"]) for n, s in segments.items()} == {n: v for n, v in names.items() if v}
    for name, rgb in SLICER_RGB.items():
        np.testing.assert_allclose(
            [float(c) for c in segments[name]["Color"].split()], np.array(rgb) / 255, atol=1e-6
        )
    assert len({s["ID"] for s in segments.values()}) == len(segments)
    assert meta["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert meta["Segmentation_ContainedRepresentationNames"] == "Binary labelmap|"

    index = {meta[f"Segment{i}_Name"]: i for i in range(len(segments))}
    for name, value in names.items():
        if not value:
            continue
        extent = [int(v) for v in meta[f"Segment{index[name]}_Extent"].split()]
        where = np.argwhere(labels == value)
        expected = (
            [int(f(where[:, a])) for a in range(3) for f in (np.min, np.max)] if where.size else [0, -1] * 3
        )
        assert extent == expected, name
    tags = meta[f"Segment{index['kidney_left']}_Tags"]
    assert "SCT^64033007^Kidney~SCT^7771000^Left" in tags

    raw = path.read_bytes()
    header = raw[: raw.index(b"\n\n")].decode()
    assert header.startswith("NRRD") and "space: left-posterior-superior" in header
    assert "encoding: gzip" in header and f"Segment{index['liver']}_Name:=liver" in header.splitlines()


def test_itksnap_label_file_parses(tmp_path):
    names = {"background": 0, "liver": 1, "kidney_left": 4, 'odd "name"': 9}
    path = write_itksnap_labels(names, tmp_path / "labels.txt")
    rows = [shlex.split(line) for line in path.read_text().splitlines() if line.strip() and line[0] != "#"]
    assert all(len(row) == 8 for row in rows)
    table = {
        int(r[0]): (tuple(int(v) for v in r[1:4]), float(r[4]), int(r[5]), int(r[6]), r[7]) for r in rows
    }
    assert table[0] == ((0, 0, 0), 0.0, 0, 0, "Clear Label")
    assert table[1] == (SLICER_RGB["liver"], 1.0, 1, 1, "liver")
    assert table[4][0] == SLICER_RGB["kidney_right"] and table[4][4] == "kidney_left"
    assert table[9][4] == "odd 'name'" and sorted(table) == [0, 1, 4, 9]


def test_split_masks_keep_the_exact_geometry(labelled, tmp_path):
    labels, affine = labelled
    reference = nib.load(save_volume(np.zeros(SHAPE, np.int16), affine, tmp_path / "ct_007.nii.gz", np.int16))
    names = {**LABELS, "small bowel/2": 9}
    files = write_split_masks(labels, reference, names, tmp_path / "split")
    assert sorted(p.name for p in files.values()) == sorted(
        ["ct_007_liver.nii.gz", "ct_007_spleen.nii.gz", "ct_007_kidney_right.nii.gz", "ct_007_kidney_left.nii.gz",
         "ct_007_aorta.nii.gz", "ct_007_pancreas.nii.gz", "ct_007_small_bowel_2.nii.gz"]
    )  # fmt: skip
    for name, path in files.items():
        img = nib.load(path)
        assert img.get_data_dtype() == np.uint8 and np.array_equal(img.affine, reference.affine)
        assert int(img.header["sform_code"]) == int(reference.header["sform_code"])
        np.testing.assert_array_equal(img.get_qform(), reference.get_qform())
        assert np.array_equal(np.asanyarray(img.dataobj), (labels == names[name]).astype(np.uint8))
    with pytest.raises(ValueError, match="does not name"):
        write_split_masks(labels, reference, {"liver": 1}, tmp_path / "x")
    with pytest.raises(ValueError, match="same file name"):
        write_split_masks(labels, reference, {**LABELS, "kidney right": 7}, tmp_path / "y")
