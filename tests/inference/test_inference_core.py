"""One inference core: the predictor built from files or from a network in memory, training's validation
through it (its Dice is ``medseg segment``'s Dice), one sliding window and one precision resolver."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import medseg.device
from medseg.config import checkpoint_config
from medseg.config.segment import SegmentOptions
from medseg.data.phantoms import generate_phantom
from medseg.engine.step import training_precision
from medseg.engine.validation import ValidationCases, decide_postprocessing, validation_predictor
from medseg.inference import Predictor
from medseg.inference.loading import checkpoint_plan, model_from_checkpoint
from medseg.io import InputError, save_volume
from medseg.io.checkpoint import load_checkpoint
from medseg.io.plan import Plan
from medseg.metrics import dice_per_label
from tests.bad_inputs.cli import run_cli

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def validation(segmenting_run, tiny_dataset, tmp_path_factory) -> dict:
    """The run's validation record, and what the real ``medseg segment`` writes for its validation scans,
    without (``none``) and with (``auto``, the default) the recorded postprocessing."""
    scores = json.loads((segmenting_run / "validation.json").read_text())
    scans = tmp_path_factory.mktemp("validation_scans")
    for case in scores["cases"]:
        (scans / f"{case}.nii.gz").symlink_to(tiny_dataset / "imagesTr" / f"{case}.nii.gz")
    masks = {}
    for mode in ("none", "auto"):
        out = tmp_path_factory.mktemp(f"validation_{mode}")
        result = run_cli(
            "segment",
            "-i",
            scans,
            "-o",
            out,
            "-m",
            segmenting_run,
            "--postprocess",
            mode,
            "--backend",
            "torch",
        )
        assert result.code == 0, result.output
        masks[mode] = {c: np.asanyarray(nib.load(out / f"{c}.nii.gz").dataobj) for c in scores["cases"]}
    refs = {
        c: np.asanyarray(nib.load(tiny_dataset / "labelsTr" / f"{c}.nii.gz").dataobj) for c in scores["cases"]
    }
    return {"scores": scores, "masks": masks, "refs": refs}


def test_validation_dice_is_the_dice_of_segment(segmenting_run, tiny_dataset, validation):
    """Every (case, label) Dice training recorded for best.pt (validation.json, validation.csv, and the epoch's
    row of metrics.csv) is the Dice of ``medseg segment --postprocess none``'s mask against the label file,
    computed by medseg's own metrics. Tolerance 1e-12: the same code path on the same weights and voxels
    gives the same masks (measured: identical, although training ran 2 threads and the CLI 1), so only the
    float summation of Dice may differ; the saved validation masks are compared voxel for voxel too."""
    scores, masks, refs = validation["scores"], validation["masks"], validation["refs"]
    orientations = {nib.aff2axcodes(nib.load(tiny_dataset / "imagesTr" / f"{c}.nii.gz").affine) for c in refs}
    assert orientations == {("R", "A", "S"), ("L", "P", "S")}  # one RAS and one LPS validation case
    labels = {int(i): n for n, i in scores["labels"].items() if int(i) > 0}
    recorded = {(r["case"], int(r["label"])): float(r["dice"]) for r in scores["rows"]}
    with open(segmenting_run / "validation.csv") as fh:
        in_csv = {(r["case"], int(r["label"])): float(r["dice"]) for r in csv.DictReader(fh)}
    assert in_csv.keys() == recorded.keys() and all(abs(in_csv[k] - recorded[k]) < 1e-12 for k in recorded)
    for case, ref in refs.items():
        dice = dice_per_label(masks["none"][case], ref, sorted(labels))
        for label in labels:
            assert abs(dice[label] - recorded[case, label]) <= 1e-12, (case, labels[label])
        with np.load(segmenting_run / "validation" / f"{case}.npz") as saved:
            assert np.array_equal(saved["prediction"], masks["none"][case])
            assert np.array_equal(saved["reference"], ref)
            assert np.allclose(saved["spacing"], scores["case_spacing"][case])
    assert any(recorded[key] > 0.2 for key in recorded)  # the masks are not empty: a test that could fail
    with open(segmenting_run / "metrics.csv") as fh:
        epoch = list(csv.DictReader(fh))[scores["epoch"] - 1]  # the epoch best.pt was saved at
    for label, name in labels.items():
        mean = np.mean([recorded[case, label] for case in refs])
        assert abs(float(epoch[f"val_dice_{name}"]) - mean) < 1e-6  # metrics.csv holds 6 digits


def test_postprocessed_validation_dice_is_the_dice_of_segment_by_default(validation):
    """The cleanup training chose is scored where ``medseg segment`` applies it (the scan's grid and
    spacing): its mean Dice per label in validation.json is that of the default segment's masks."""
    scores, masks, refs = validation["scores"], validation["masks"], validation["refs"]
    for name, index in scores["labels"].items():
        if int(index) == 0:
            continue
        report = scores["postprocess"][name]
        dice = [dice_per_label(masks["auto"][c], ref, [int(index)])[int(index)] for c, ref in refs.items()]
        assert abs(report["dice"][report["chosen"]] - float(np.mean(dice))) <= 1e-12, name


@pytest.fixture(scope="module")
def lps_scan(tmp_path_factory) -> Path:
    ph = generate_phantom(43, (48, 44, 22), orientation="LPS")
    return save_volume(ph.image, ph.affine, tmp_path_factory.mktemp("core") / "lps.nii.gz", np.int16)


def test_a_network_in_memory_predicts_as_its_checkpoint(segmenting_run, lps_scan):
    ckpt = load_checkpoint(segmenting_run / "best.pt")
    from_file = Predictor(
        segmenting_run / "best.pt", SegmentOptions(backend="torch"), device="cpu", postprocess="none"
    )
    in_memory = Predictor.from_network(
        model_from_checkpoint(ckpt, CPU), ckpt["plan"], ckpt["labels"], device="cpu",
        config=checkpoint_config(ckpt),
    )  # fmt: skip
    a, b = from_file.predict(lps_scan), in_memory.predict(lps_scan)
    assert a.labels.any() and np.array_equal(a.labels, b.labels)
    assert (in_memory.precision, in_memory.roi_size, in_memory.overlap) == (
        from_file.precision,
        from_file.roi_size,
        from_file.overlap,
    )
    assert b.info["checkpoints"] == [] and a.info["checkpoints"] == [str(segmenting_run / "best.pt")]
    with pytest.raises(TypeError, match=r"got ndarray; an array needs its affine: medseg\.segment\("):
        from_file.predict(np.zeros((8, 8, 8), np.int16))
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        Predictor.from_network("best.pt", ckpt["plan"], ckpt["labels"])
    with pytest.raises(ValueError, match="plan: missing spacing"):
        Predictor.from_network(in_memory.model, {"orientation": "RAS"}, ckpt["labels"])


def test_validation_keeps_each_case_once_read(segmenting_run, tiny_dataset):
    ckpt = load_checkpoint(segmenting_run / "best.pt")
    cfg, plan = checkpoint_config(ckpt), checkpoint_plan(ckpt)
    cases = [{"image": str(tiny_dataset / "imagesTr" / "phantom_002.nii.gz"), "case": "phantom_002",
              "label": str(tiny_dataset / "labelsTr" / "phantom_002.nii.gz")}]  # fmt: skip
    predictor = validation_predictor(model_from_checkpoint(ckpt, CPU), cfg, plan, CPU)
    assert predictor.flips == [()] and predictor.postprocess_rules == {}
    kept = ValidationCases(cases, keep=True)
    first, ref = kept.load(0, predictor)
    labels = predictor.predict(first).labels  # releases the copy's image, not the kept one
    again, _ = kept.load(0, predictor)
    assert first.image is None and again.image is not None
    assert np.array_equal(predictor.predict(again).labels, labels) and ref.shape == labels.shape
    streamed = ValidationCases(cases, keep=False)
    assert streamed.load(0, predictor)[0] is not streamed.load(0, predictor)[0] and not streamed._kept
    bad = [{**cases[0], "label": str(tiny_dataset / "labelsTr" / "nowhere.nii.gz")}]
    with pytest.raises(InputError, match=r"nowhere\.nii\.gz: file not found"):
        ValidationCases(bad).load(0, predictor)


def test_postprocessing_is_decided_with_each_cases_own_spacing():
    """Triples carry their spacing; a pair without one takes the default (folders saved before)."""
    pred = np.zeros((10, 10, 10), np.uint8)
    pred[1:5, 1:5, 1:5] = 1
    pred[8, 8, 8] = 1  # a one-voxel blob
    ref = pred.copy()
    ref[8, 8, 8] = 0
    triples = [(pred, ref, (1.0, 1.0, 1.0)), (pred, ref, (2.0, 2.0, 2.0))]
    rules, report = decide_postprocessing(triples, {"organ": 1})
    assert report["organ"]["chosen"] == "largest_only" and rules == {
        "1": {"largest_only": True, "min_ml": 0.0}
    }
    legacy = decide_postprocessing([(pred, ref), (pred, ref, None)], {"organ": 1}, spacing=(1.0, 1.0, 1.0))
    assert legacy == decide_postprocessing([(pred, ref, (1.0, 1.0, 1.0))] * 2, {"organ": 1})


def test_a_multi_channel_model_takes_its_channel_files(tmp_path):
    ph = generate_phantom(44, (40, 36, 18), orientation="LPS")
    files = [save_volume(ph.image, ph.affine, tmp_path / f"ct_000{c}.nii.gz", np.int16) for c in range(2)]
    window = {"mode": "window", "a_min": -200.0, "a_max": 300.0}
    plan = {"orientation": "RAS", "spacing": [8.0, 8.0, 10.0], "intensity": [window, window],
            "crop_foreground": True, "in_channels": 2, "patch_size": [16, 16, 8]}  # fmt: skip
    net = torch.nn.Conv3d(2, 3, 1)
    predictor = Predictor.from_network(net, plan, {"background": 0, "a": 1, "b": 2}, device="cpu")
    prepared = predictor.prepare(files)
    assert prepared.image.shape[0] == 2
    result = predictor.predict(files)
    assert result.labels.shape == ph.image.shape and np.array_equal(
        result.reference.affine, nib.load(files[0]).affine
    )
    with pytest.raises(InputError, match="trained on 2 input channels"):
        predictor.predict(files[0])
    with pytest.raises(InputError, match="3 channel files given, network takes 2"):
        predictor.predict([*files, files[0]])


def test_one_sliding_window_in_the_library():
    """MONAI's sliding window is called in one module: the predictor, validation and attention maps share it."""
    found = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "medseg").rglob("*.py")
        if "sliding_window_inference" in p.read_text()
    )
    assert found == ["medseg/inference/sliding.py"]


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_training_inference_and_validation_resolve_precision_alike(monkeypatch, native, expected):
    monkeypatch.setattr(medseg.device, "cpu_has_native_bf16", lambda: native)
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)
    plan = {"orientation": "RAS", "spacing": [1.0] * 3, "intensity": {"mode": "window", "a_min": 0, "a_max": 1},
            "patch_size": [8, 8, 8], "labels": {"background": 0, "organ": 1}}  # fmt: skip
    assert medseg.device.resolve_precision("auto", CPU).name == expected
    assert training_precision("auto", CPU, conv, 1, (8, 8, 8)).name == expected
    assert Predictor.from_network(conv, plan, plan["labels"], device="cpu").precision == expected
    from medseg.config import load_config

    assert validation_predictor(conv, load_config(None, []), Plan.from_dict(plan), CPU).precision == expected
    fp32 = replace(medseg.device.resolve_precision("fp32", CPU))
    assert fp32.dtype is None and not fp32.scaled
