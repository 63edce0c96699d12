"""The nnU-Net v2 raw layout next to MSD: detection, every problem at once, training with 1 and 2 channels,
segmenting with a 1-channel model and a clear refusal for a 2-channel one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medseg.data.check import check_dataset, inspect_dataset
from medseg.data.datasets import training_cases
from medseg.data.phantoms import LABELS, write_msd_dataset, write_nnunet_dataset
from medseg.io.checkpoint import load_checkpoint
from pipelines.cli import app
from tests.bad_inputs.cli import run_cli
from tests.conftest import TINY_TRAIN

SHAPE = (32, 32, 16)
runner = CliRunner()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    """The same 3 + 1 phantoms in the MSD layout and the nnU-Net layout (1 and 2 channels)."""
    base = tmp_path_factory.mktemp("layouts")
    write_msd_dataset(base / "msd", 3, 1, shape=SHAPE, seed=21)
    write_nnunet_dataset(base / "Dataset001_Phantoms", 3, 1, shape=SHAPE, seed=21)
    write_nnunet_dataset(base / "Dataset002_TwoPhases", 3, 1, shape=SHAPE, seed=21, channels=2)
    return {"msd": base / "msd", "nnunet": base / "Dataset001_Phantoms", "two": base / "Dataset002_TwoPhases"}


def test_nnunet_layout_on_disk(layouts):
    meta = json.loads((layouts["two"] / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT", "1": "CT"} and meta["file_ending"] == ".nii.gz"
    assert meta["labels"]["pancreas"] == 6 and meta["numTraining"] == 3 and "training" not in meta
    native = nib.load(layouts["two"] / "imagesTr" / "phantom_000_0001.nii.gz")
    venous = nib.load(layouts["two"] / "imagesTr" / "phantom_000_0000.nii.gz")
    label = np.asarray(nib.load(layouts["two"] / "labelsTr" / "phantom_000.nii.gz").dataobj)
    assert np.array_equal(native.affine, venous.affine) and native.shape == venous.shape == SHAPE
    # the native phase is darker where contrast enhances (the aorta most), unchanged outside the organs
    diff = np.asarray(venous.dataobj, float) - np.asarray(native.dataobj, float)
    assert diff[label == LABELS["aorta"]].mean() > 150 and abs(diff[label == 0].mean()) < 3
    # same phantoms as the MSD layout of the same seed
    msd = nib.load(layouts["msd"] / "imagesTr" / "phantom_000.nii.gz")
    assert np.array_equal(np.asarray(msd.dataobj), np.asarray(venous.dataobj))


@pytest.mark.parametrize("layout", ["msd", "nnunet", "two"])
def test_clean_datasets_pass_in_both_layouts(layouts, layout):
    assert check_dataset(layouts[layout], workers=1) == []
    result = runner.invoke(app, ["check-dataset", str(layouts[layout])])
    assert result.exit_code == 0, result.output
    expected = {
        "msd": "dataset OK: 3 cases, 7 labels (headers",
        "nnunet": "dataset OK: 3 cases, 7 labels (nnU-Net v2 layout, 1 channel;",
        "two": "dataset OK: 3 cases, 7 labels (nnU-Net v2 layout, 2 channels;",
    }[layout]
    assert expected in result.output
    cases = training_cases(layouts[layout])
    assert [c["case"] for c in cases] == ["phantom_000", "phantom_001", "phantom_002"]
    image = cases[0]["image"]
    assert (len(image) == 2) if layout == "two" else isinstance(image, str)


def _resave(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> tuple[Path, list[tuple[tuple[str, ...], bool]]]:
    """A 2-channel nnU-Net dataset broken in every way its layout can be, and the expected problems
    (fragments of one error line, found by the header check?)."""
    root = tmp_path_factory.mktemp("broken") / "Dataset003_Broken"
    write_nnunet_dataset(root, 6, 0, shape=SHAPE, seed=22, channels=2)
    images, labels = root / "imagesTr", root / "labelsTr"
    expected = []
    (images / "phantom_000_0001.nii.gz").unlink()
    expected.append(
        (("phantom_000_0001.nii.gz", "file not found: channel 0001 (CT) of case 'phantom_000'"), True)
    )
    shutil.copy(images / "phantom_001_0000.nii.gz", images / "phantom_001_0002.nii.gz")
    expected.append(
        (("phantom_001_0002.nii.gz", "channel 0002 is not declared", "2 channels: 0000, 0001"), True)
    )
    img = nib.load(labels / "phantom_002.nii.gz")  # a label with another ending: not a case of file_ending
    nib.save(img, str(labels / "phantom_002.nii"))
    (labels / "phantom_002.nii.gz").unlink()
    expected.append(
        (("phantom_002.nii", "file ending does not match dataset.json file_ending '.nii.gz'"), True)
    )
    expected.append((("dataset.json", "numTraining is 6 but labelsTr holds 5 case(s)"), True))
    img = nib.load(images / "phantom_003_0001.nii.gz")
    _resave(images / "phantom_003_0001.nii.gz", np.asarray(img.dataobj)[:, :, :-1], img.affine)
    expected.append(
        (("phantom_003_0001.nii.gz", "channel 0001 and label differ in shape: 32×32×15 vs 32×32×16"), True)
    )
    img = nib.load(images / "phantom_004_0000.nii.gz")
    shifted = img.affine.copy()
    shifted[0, 3] += 0.5
    _resave(images / "phantom_004_0000.nii.gz", np.asarray(img.dataobj), shifted)
    expected.append((("phantom_004_0000.nii.gz", "channel 0000 and label differ in affine", "0.5"), True))
    img = nib.load(labels / "phantom_005.nii.gz")
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 9
    _resave(labels / "phantom_005.nii.gz", data.astype(np.uint8), img.affine)
    expected.append((("phantom_005.nii.gz", "label value 9 not declared"), False))
    shutil.copy(images / "phantom_005_0000.nii.gz", images / "extra_0000.nii.gz")  # no label: a warning
    return root, expected


def _matching(lines: list[str], fragments: tuple[str, ...]) -> list[str]:
    return [line for line in lines if all(f in line for f in fragments)]


def test_check_dataset_lists_every_nnunet_problem_once(broken):
    root, expected = broken
    result = run_cli("check-dataset", root)
    assert result.code == 1, result.output
    lines = result.error_lines()
    for fragments, _ in expected:
        assert len(_matching(lines, fragments)) == 1, f"{fragments} not on exactly one line:\n{result.output}"
    assert len(lines) == len(expected), result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert any("extra_0000.nii.gz" in w and "phantom_002_0000.nii.gz" in w for w in warnings), result.output
    quick = [p.line() for p in check_dataset(root, full=False)]  # what `medseg train` runs first
    for fragments, in_header in expected:
        assert len(_matching(quick, fragments)) == int(in_header), (fragments, quick)


def test_train_refuses_a_broken_nnunet_dataset_before_writing(broken, tmp_path):
    root, expected = broken
    run = tmp_path / "run"
    sets = [a for s in [*TINY_TRAIN, f"data.root={root}", f"train.output={run}"] for a in ("--set", s)]
    result = runner.invoke(
        app, ["train", str(Path(__file__).parents[2] / "configs" / "phantoms.yaml"), *sets]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == sum(h for _, h in expected), result.output
    assert "training not started" in result.output and not run.exists()


@pytest.mark.parametrize(
    ("change", "cause"),
    [
        ({"labels": {"background": 0, "liver": [1, 2]}}, "label 'liver' is a region"),
        ({"file_ending": ".mha"}, "file_ending '.mha' is not supported; medseg reads NIfTI"),
        ({"channel_names": {"1": "CT"}}, "'channel_names' keys must be '0'"),
        ({"file_ending": None}, "needs 'file_ending'"),
    ],
)
def test_dataset_json_problems_of_the_nnunet_layout(layouts, tmp_path, change, cause):
    root = tmp_path / "data"
    shutil.copytree(layouts["nnunet"], root)
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(change)
    meta = {k: v for k, v in meta.items() if v is not None}
    (root / "dataset.json").write_text(json.dumps(meta))
    lines = [p.line() for p in check_dataset(root)]
    assert any(cause in line for line in lines), lines


def test_nnunet_one_channel_trains_and_segments(layouts, tmp_path):
    root, run, pred = layouts["nnunet"], tmp_path / "run", tmp_path / "pred"
    overrides = [
        *TINY_TRAIN,
        f"data.root={root}",
        f"train.output={run}",
        "train.epochs=1",
        "data.val_fraction=0",
    ]
    sets = [a for s in overrides for a in ("--set", s)]
    result = runner.invoke(
        app, ["train", str(Path(__file__).parents[2] / "configs" / "phantoms.yaml"), *sets]
    )
    assert result.exit_code == 0, result.output
    plan = load_checkpoint(run / "best.pt")["plan"]
    assert (
        plan["in_channels"] == 1 and plan["channel_names"] == ["CT"] and isinstance(plan["intensity"], dict)
    )
    result = runner.invoke(
        app, ["segment", "-i", str(root / "imagesTs"), "-o", str(pred), "-m", str(run), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    scan = nib.load(root / "imagesTs" / "phantom_003_0000.nii.gz")
    mask = nib.load(pred / "phantom_003_0000.nii.gz")
    assert mask.shape == scan.shape and np.array_equal(mask.affine, scan.affine)


def test_two_channels_train_with_a_planned_patch_and_segment_refuses_one_image(layouts, tmp_path):
    """A 2-channel dataset trains (both channel files stacked as the network's two input channels, each
    normalised with its own statistics); segmenting one image with that model is one clear error."""
    from medseg.config import load_config
    from medseg.engine import train
    from medseg.inference.predictor import model_from_checkpoint

    root, run = layouts["two"], tmp_path / "run"
    overrides = [
        *TINY_TRAIN,
        "augment.patch_size=auto",
        "train.batch_size=auto",
        "train.epochs=1",
        "data.val_fraction=0",
    ]
    cfg = load_config(
        None, [*overrides, "preprocess.intensity.mode=zscore", f"data.root={root}", f"train.output={run}"]
    )
    train(cfg, log=lambda *_: None)
    ckpt = load_checkpoint(run / "best.pt")
    plan = ckpt["plan"]
    assert plan["in_channels"] == 2 and len(plan["intensity"]) == 2
    assert plan["intensity"][0]["mean"] != plan["intensity"][1]["mean"]  # venous vs native foreground
    assert plan["batch_size"] >= 2 and ckpt["config"]["augment"]["patch_size"] == "auto"
    assert ckpt["model"]["encoder.0.0.0.weight"].shape[1] == 2
    model_from_checkpoint(ckpt, __import__("torch").device("cpu"), run / "best.pt")
    result = runner.invoke(
        app,
        [
            "segment",
            "-i",
            str(root / "imagesTs"),
            "-o",
            str(tmp_path / "pred"),
            "-m",
            str(run),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "trained on 2 input channels (CT, CT)" in lines[0], result.output


def test_layout_is_reported(layouts):
    assert inspect_dataset(layouts["two"], full=False).layout == "nnunet"
    assert inspect_dataset(layouts["msd"], full=False).layout == "msd"
