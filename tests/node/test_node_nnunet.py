"""The DICOM node runs an nnU-Net v2 model folder as ``medseg segment -m`` does: a CT series in by C-STORE, the
SEG of the folder's labels out to the PACS; a broken folder stops the node at start, in one line."""

from __future__ import annotations

import json
import subprocess

import pydicom
import pytest

from tests.nnunet.folders import dataset_json, write_model_folder

from .conftest import NODE_CMD, ROOT, NodeProcess, job_states, phantom_ct, send

pytestmark = pytest.mark.slow


def test_node_segments_with_an_nnunet_folder(tmp_path, tiny_dataset, pacs):
    folder = write_model_folder(tmp_path / "model", "iso", folds=(0, 1))
    workdir = tmp_path / "node"
    written = phantom_ct(tiny_dataset, tmp_path / "ct")  # before the node: --once exits after 1 s idle
    node = NodeProcess(workdir, folder, "--folds", "1", "--stable-seconds", "1", "--once", "--send", pacs.url)
    assert set(send(node.port, written.files)) == {0}
    assert node.wait() == 0, node.err.read_text()
    assert job_states(workdir) == [(1, "done")]
    [seg] = [pydicom.dcmread(p) for p in pacs.folder.glob("*.dcm")]
    names = {s.SegmentLabel for s in seg.SegmentSequence}
    assert names and names <= set(dataset_json()["labels"]) - {"background"}
    sidecar = json.loads(next((workdir / "outputs").glob("*.json")).read_text())
    [used] = sidecar["inference"]["checkpoints"]  # --folds 1: that fold only
    assert used.startswith(str(folder)) and "fold_1" in used


def test_a_missing_fold_stops_the_node_at_start(tmp_path):
    folder = write_model_folder(tmp_path / "model", "iso", folds=(0,))
    out = subprocess.run(
        [*NODE_CMD, "serve", "-m", str(folder), "--folds", "3", "--workdir", str(tmp_path / "node"), "--port", "0"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "fold_3" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_broken_nnunet_folder_stops_the_node_at_start(tmp_path):
    folder = write_model_folder(tmp_path / "model", "iso", folds=(0,))
    (folder / "plans.json").write_text("{not json")
    out = subprocess.run(
        [*NODE_CMD, "serve", "-m", str(folder), "--workdir", str(tmp_path / "node"), "--port", "0"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "plans.json" in out.stderr
    assert "Traceback" not in out.stderr
