"""int8 (medseg.inference.quantize): NNCF quantization calibrated on training phantoms, the agreement check
against exact fp32 on held-out ones, storage in the checkpoint's OpenVINO cache, and when ``auto`` uses it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg.config.segment import SegmentOptions
from medseg.data.datasets import training_cases
from medseg.inference import Predictor
from medseg.inference.backends import openvino_available, resolve_backend
from medseg.io import InputError
from medseg.metrics import dice_per_label

pytestmark = [
    pytest.mark.skipif(not openvino_available(), reason="openvino / onnx not installed"),
    pytest.mark.slow,
]
nncf = pytest.importorskip("nncf", reason="NNCF (the openvino extra) not installed")


def _options(**fields) -> SegmentOptions:
    return SegmentOptions(device="cpu", postprocess="none", **fields)


@pytest.fixture(scope="module")
def quantized(segmenting_run, tiny_dataset, tmp_path_factory):
    """A copy of the trained test model (its own cache folder), quantized on two training phantoms and checked
    on the other two; returns ``(checkpoint, record)``."""
    from medseg.inference.quantize import quantize_checkpoint

    folder = tmp_path_factory.mktemp("int8")
    checkpoint = Path(shutil.copy(segmenting_run / "best.pt", folder / "best.pt"))
    cases = [c["image"] for c in training_cases(tiny_dataset)]
    record = quantize_checkpoint(checkpoint, cases[:2], cases[2:4], windows=8, log=lambda _: None)
    return checkpoint, record


def test_quantized_graph_is_stored_with_its_calibration_and_check(quantized):
    checkpoint, record = quantized
    manifests = list((checkpoint.parent / ".openvino-cache").glob("*-int8-*/manifest.json"))
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text())
    assert manifest["calibration"]["windows"] == 16 and len(manifest["calibration"]["cases"]) == 2
    agreement = manifest["agreement"]
    assert agreement == record["agreement"] and len(agreement["cases"]) == 2
    scores = [d for case in agreement["cases"].values() for d in case.values() if d is not None]
    assert scores and agreement["min_dice"] == min(scores)
    assert agreement["holds"] == (min(scores) >= 0.99)


def test_int8_agrees_with_exact_fp32_on_held_out_phantoms(quantized, tiny_dataset):
    """Measured independently of the stored check, on the test phantoms that neither calibration nor the
    check saw. The bound of the fast paths is Dice ≥ 0.99 (held here: 0.9926–0.9951 on an AVX-512 machine);
    the test allows 0.98 because this barely trained model (liver Dice ≈ 0.4) leaves much of its liver near
    probability 0.5, where int8 kernels of another CPU may round differently."""
    checkpoint, _ = quantized
    exact = Predictor(checkpoint, _options(precision="fp32"))
    fast = Predictor(checkpoint, _options(precision="int8"))
    assert fast.precision == "int8" and fast.backend == "openvino"
    for case in sorted((tiny_dataset / "imagesTs").glob("*.nii.gz")):
        a, b = exact.predict(case), fast.predict(case)
        assert b.info["precision"] == "int8" and b.info["int8_float_parts"] == fast.float_parts
        labels = sorted((set(np.unique(a.labels)) | set(np.unique(b.labels))) - {0})
        assert labels
        dice = dice_per_label(b.labels, a.labels, labels)
        assert min(dice.values()) >= 0.98, (case.name, dice)


def test_auto_takes_int8_only_where_its_check_held(quantized):
    from medseg.inference.openvino_backend import cache_root, update_manifest
    from medseg.inference.quantize import int8_key

    checkpoint, record = quantized
    net = Predictor(checkpoint, _options(precision="fp32"))
    key = int8_key(net.checkpoint_sha256[0], net.roi_size, net.sw_batch_size, 1)
    try:
        for agreement in (None, {**record["agreement"], "holds": False}):
            update_manifest(cache_root(checkpoint), key, {"agreement": agreement})
            assert Predictor(checkpoint, _options()).precision != "int8"
            assert Predictor(checkpoint, _options(precision="int8")).precision == "int8"  # asked for by name
        update_manifest(cache_root(checkpoint), key, {"agreement": {**record["agreement"], "holds": True}})
        auto = Predictor(checkpoint, _options())
        assert auto.precision == "int8" and auto.backend == "openvino"
    finally:
        update_manifest(cache_root(checkpoint), key, {"agreement": record["agreement"]})


def test_float_parts_run_in_bf16_only_where_checked_so_and_native(quantized, monkeypatch):
    """What NNCF left in float runs in bf16 only on a CPU with native bf16 and only when the check ran that way
    (the manifest's ``float_parts``); the compiled graph's precision hint and the sidecar say which."""
    from medseg.device import cpu_has_native_bf16
    from medseg.inference.openvino_backend import cache_root, update_manifest
    from medseg.inference.quantize import float_parts_here, int8_hint, int8_key

    checkpoint, record = quantized
    assert record["float_parts"] == float_parts_here() == ("bf16" if cpu_has_native_bf16() else "f32")
    net = Predictor(checkpoint, _options(precision="fp32"))
    key = int8_key(net.checkpoint_sha256[0], net.roi_size, net.sw_batch_size, 1)

    def compiled_hint(predictor: Predictor) -> str:
        compiled = predictor.networks[0].network.compiled
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # an openvino Type: f32, bf16
        return hint.get_type_name()

    try:
        for checked in ("f32", "bf16"):
            update_manifest(cache_root(checkpoint), key, {"float_parts": checked})
            fast = Predictor(checkpoint, _options(precision="int8"))
            want = "bf16" if checked == "bf16" and cpu_has_native_bf16() else "f32"
            assert fast.float_parts == want and compiled_hint(fast) == want
        assert int8_hint({}) == "f32"  # a graph stored before float_parts existed: checked with f32 parts
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # an AVX2-only CPU: never bf16 parts
        assert int8_hint({"float_parts": "bf16"}) == "f32" and float_parts_here() == "f32"
    finally:
        update_manifest(cache_root(checkpoint), key, {"float_parts": record["float_parts"]})


def test_int8_without_a_stored_graph_says_how_to_make_one(segmenting_run, tmp_path):
    checkpoint = Path(shutil.copy(segmenting_run / "best.pt", tmp_path / "best.pt"))
    with pytest.raises(InputError, match=r"no int8 graph .*medseg quantize"):
        Predictor(checkpoint, _options(precision="int8"))
    assert Predictor(checkpoint, _options()).precision in ("bf16", "fp32")


def test_int8_is_openvino_only():
    with pytest.raises(ValueError, match="int8"):
        resolve_backend("torch", torch.device("cpu"), "int8", in_memory=False)
    with pytest.raises(ValueError, match="int8"):
        resolve_backend("auto", torch.device("cpu"), "int8", in_memory=True)
    assert resolve_backend("auto", torch.device("cpu"), "int8", in_memory=False) == "openvino"


def test_quantize_command(segmenting_run, tiny_dataset, tmp_path):
    from pipelines.cli import app

    checkpoint = Path(shutil.copy(segmenting_run / "best.pt", tmp_path / "best.pt"))
    runner = CliRunner()
    bad = runner.invoke(app, ["quantize", str(checkpoint), "-d", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and bad.output.startswith("error: ") and "Traceback" not in bad.output
    many = runner.invoke(app, ["quantize", str(checkpoint), "-d", str(tiny_dataset), "--calibration", "5"])
    assert many.exit_code == 2 and "4 labelled case(s)" in many.output
    out = runner.invoke(
        app,
        ["quantize", str(checkpoint), "-d", str(tiny_dataset), "--calibration", "2", "--check", "1",
         "--windows", "4", "--control", "0"],
    )  # fmt: skip
    assert out.exit_code in (0, 1), out.output
    assert "int8 graph stored" in out.output and ("holds" in out.output) == (out.exit_code == 0)


def test_the_check_uses_held_out_cases(segmenting_run, tiny_dataset, tmp_path):
    """The run's validation cases and the dataset's test images are checked, never calibrated on nor used for
    accuracy control (here with an allowance that the first quantization meets: the wiring, not the search)."""
    from medseg.inference.openvino_backend import cache_root
    from pipelines.cli import app

    run = Path(
        shutil.copytree(segmenting_run, tmp_path / "run", ignore=shutil.ignore_patterns(".openvino-cache"))
    )
    validation = json.loads((run / "validation.json").read_text())["cases"]
    assert validation
    out = CliRunner().invoke(
        app,
        ["quantize", str(run / "best.pt"), "-d", str(tiny_dataset), "--calibration", "1", "--windows", "2",
         "--max-drop", "0.5"],
    )  # fmt: skip
    assert out.exit_code in (0, 1), out.output
    [manifest] = cache_root(run / "best.pt").glob("*-int8-*/manifest.json")
    record = json.loads(manifest.read_text())
    checked = {Path(p).name.split(".")[0] for p in record["agreement"]["cases"]}
    tests = {p.name.split(".")[0] for p in (tiny_dataset / "imagesTs").glob("*.nii.gz")}
    assert checked == set(validation) | tests
    calibrated = {Path(p).name.split(".")[0] for p in record["calibration"]["cases"]}
    assert len(calibrated) == 1 and not calibrated & checked
    controlled = {Path(p).name.split(".")[0] for p in record["control"]["cases"]}
    assert controlled and not controlled & (checked | calibrated)
    assert record["control"]["max_drop"] == 0.5 and record["convolutions"]["int8"] > 0
