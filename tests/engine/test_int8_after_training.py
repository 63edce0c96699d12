"""``train.quantize``: the end of training stores best.pt's int8 graph, checked on the run's own held-out cases
(medseg.engine.int8); ``on`` without the extra is refused before training; YAML's bare on / off are read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from medseg.config import ConfigError, load_config
from medseg.engine.int8 import quantizer_installed
from tests.conftest import TINY_SHAPE, TINY_TRAIN


def test_quantize_on_needs_the_extra_before_training(tmp_path, monkeypatch):
    import medseg.engine.int8 as int8
    from medseg.engine import train

    monkeypatch.setattr(int8, "quantizer_installed", lambda: False)  # as on an install without the extra
    cfg = load_config(None, [*TINY_TRAIN, "train.quantize=on", f"train.output={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"train\.quantize=on needs OpenVINO and NNCF"):
        train(cfg, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_yaml_on_and_off_are_the_words(tmp_path):
    for word, value in (("off", "off"), ("on", "on"), ("auto", "auto")):
        path = tmp_path / f"{word}.yaml"
        path.write_text(f"train:\n  quantize: {word}\n")
        assert load_config(path).train.quantize == value
    with pytest.raises(ConfigError, match=r"train\.quantize"):
        load_config(None, ["train.quantize=int8"])


@pytest.mark.slow
@pytest.mark.skipif(not quantizer_installed(), reason="OpenVINO / NNCF (the openvino extra) not installed")
def test_training_ends_with_a_checked_int8_graph(tmp_path):
    """`medseg train` as a user runs it, in its own process (OpenVINO and NNCF state stays out of the test
    worker)."""
    from medseg.data.phantoms import write_msd_dataset

    data = tmp_path / "data"
    write_msd_dataset(data, num_train=8, num_test=1, shape=TINY_SHAPE, seed=3)
    run = tmp_path / "run"
    overrides = [*TINY_TRAIN, "train.quantize=auto", f"data.root={data}", f"train.output={run}"]
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  quantize: auto\n")
    sets = [a for o in overrides for a in ("--set", o)]
    command = [sys.executable, "-m", "pipelines.cli", "train", str(config), *sets]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (done.stdout + done.stderr).splitlines()
    manifests = list((run / ".openvino-cache").glob("*-int8-*/manifest.json"))
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text())
    validation = json.loads((run / "validation.json").read_text())["cases"]
    checked = {c.split("/")[-1].removesuffix(".nii.gz") for c in manifest["agreement"]["cases"]}
    assert checked == {*validation, *(p.name.removesuffix(".nii.gz") for p in (data / "imagesTs").iterdir())}
    used = {c.split("/")[-1].removesuffix(".nii.gz") for c in manifest["calibration"]["cases"]}
    used |= {c.split("/")[-1].removesuffix(".nii.gz") for c in manifest["control"]["cases"]}
    assert len(manifest["calibration"]["cases"]) == 4 and len(manifest["control"]["cases"]) == 2
    assert not used & checked
    assert any(line.startswith("int8: ") and "held-out case(s)" in line for line in lines)
