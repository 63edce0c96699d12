"""Bad nnU-Net model folders: each refused in one line naming the file and the cause (library and CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medseg.io import InputError
from medseg.nnunet import read_model_folder
from medseg.nnunet.network import build_network
from medseg.nnunet.weights import load_fold
from tests.nnunet.folders import checkpoint_dict, fold_weights, plans_json, write_model_folder

ROOT = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this would run ``Path(marker).touch()``: the test checks it never happens."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("model"), "aniso", folds=(0,))


def test_folder_without_plans(tmp_path, folder):
    bare = tmp_path / "Dataset1_X" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (bare / "fold_0").mkdir(parents=True)
    (bare / "dataset.json").write_text((folder / "dataset.json").read_text())
    with pytest.raises(InputError, match=r"plans\.json: not found"):
        read_model_folder(bare)


def test_missing_fold(folder):
    with pytest.raises(InputError, match=r"fold_3/checkpoint_final\.pth: fold folder not found"):
        read_model_folder(folder, ["0", "3"])


def test_unknown_architecture_class(folder):
    arch = dict(plans_json("aniso")["configurations"]["3d_fullres"]["architecture"])
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.NoSuchUNet"
    with pytest.raises(
        InputError, match=r"'dynamic_network_architectures\.architectures\.unet\.NoSuchUNet' is not one"
    ):
        build_network(arch, 1, 7, "plans.json")


def test_import_outside_the_network_package_is_not_resolved():
    arch = dict(plans_json("aniso")["configurations"]["3d_fullres"]["architecture"])
    arch["arch_kwargs"] = {**arch["arch_kwargs"], "nonlin": "os.system"}
    with pytest.raises(
        InputError, match=r"'os\.system' is not a torch\.nn or dynamic_network_architectures name"
    ):
        build_network(arch, 1, 7, "plans.json")


def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    ckpt = checkpoint_dict(plans_json("aniso"), 0, fold_weights("aniso", 1)[0])
    ckpt["logging"]["extra"] = Payload(str(marker))
    path = tmp_path / "checkpoint_final.pth"
    torch.save(ckpt, path)
    with pytest.raises(
        InputError, match=r"contains pickled code \(pathlib\.Path\.touch|contains pickled code \(.*Path"
    ):
        load_fold(path)
    assert not marker.exists()


def test_checkpoint_with_numpy_logging_loads(folder):
    fold = load_fold(folder / "fold_0" / "checkpoint_final.pth")
    assert fold["configuration"] == "3d_fullres" and fold["mirror_axes"] == (0, 1, 2)


def test_region_based_labels_are_refused(tmp_path, folder):
    copy = tmp_path / "Dataset2_R" / folder.name
    copy.mkdir(parents=True)
    (copy / "plans.json").write_text((folder / "plans.json").read_text())
    data = json.loads((folder / "dataset.json").read_text())
    data["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
    (copy / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="region-based labels"):
        read_model_folder(copy)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )


@pytest.mark.slow
def test_models_command_lists_and_checks(folder, tmp_path):
    out = _cli("models", folder)
    assert out.returncode == 0, out.stderr
    assert "labels (6 + background): 0=background, 1=liver" in out.stdout and out.stdout.strip().endswith(
        "ok"
    )
    assert "patch: 16 x 48 x 48" in out.stdout and "fold_0/checkpoint_final.pth: ok" in out.stdout
    bad = [
        (_cli("models", tmp_path), "plans.json: not found"),
        (_cli("models", folder, "--folds", "0", "2"), "fold_2/checkpoint_final.pth: fold folder not found"),
    ]
    for result, text in bad:
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith("error: ") and text in lines[0] and "Traceback" not in result.stderr


def test_int8_is_refused_for_nnunet_folders(folder):
    from medseg.config.segment import SegmentOptions
    from medseg.nnunet.predict import NnunetPredictor

    with pytest.raises(InputError, match="int8 is for medseg checkpoints"):
        NnunetPredictor(read_model_folder(folder), SegmentOptions(device="cpu", precision="int8"))
