"""The OpenVINO back end: its logits against PyTorch fp32, its on-disk cache (reuse, invalidation, corruption),
the ``auto`` rule, the option and the batch identity; and the agreement bound of every fast path against exact
fp32 on a trained model's held-out phantoms."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks.speed import random_checkpoint
from medseg.batch.cases import run_identity
from medseg.batch.outputs import is_complete
from medseg.config.schema import ConfigError
from medseg.config.segment import OutputSpec, SegmentOptions
from medseg.inference import Predictor
from medseg.inference.backends import openvino_available, resolve_backend
from medseg.inference.loading import file_sha256, load_checkpoints
from medseg.metrics import dice_per_label

pytestmark = pytest.mark.skipif(not openvino_available(), reason="openvino / onnx not installed")

#: A small network and window: conversion and forwards take well under a second.
SMALL = ["model.filters=[4, 8, 16, 32, 64]", "augment.patch_size=[32, 32, 16]"]
WINDOW = (32, 32, 16)
#: OpenVINO fp32 vs PyTorch fp32 logits: both float32, summed in different orders (and OpenVINO may use
#: Winograd convolutions): the largest difference allowed, relative to the largest logit.
LOGIT_RTOL = 1e-4


def _network(checkpoint: Path, batch: int = 2, precision: str = "fp32"):
    from medseg.inference.openvino_backend import GraphKey, openvino_network, openvino_version

    loaded = load_checkpoints([checkpoint], torch.device("cpu"))
    key = GraphKey(loaded.sha256[0], WINDOW, batch, 1, precision, openvino_version())
    return loaded.models[0], key, lambda: openvino_network(loaded.models[0], key, checkpoint)


@pytest.fixture
def small(tmp_path) -> Path:
    return random_checkpoint(tmp_path / "small.pt", 4, overrides=SMALL)


def test_openvino_logits_match_pytorch_fp32(small):
    model, _, build = _network(small, batch=2)
    net = build()
    windows = torch.randn((3, 1, *WINDOW), generator=torch.Generator().manual_seed(0))  # 3: padded + split
    with torch.no_grad():
        reference = model(windows)
    logits = net(windows)
    assert logits.shape == reference.shape and logits.dtype == torch.float32
    scale = reference.abs().max().item()
    assert (logits - reference).abs().max().item() <= LOGIT_RTOL * scale
    assert torch.equal(net(windows[:1]), logits[:1])  # a batch of one is padded, its result unchanged
    with pytest.raises(ValueError, match="OpenVINO graph for windows"):
        net(torch.zeros((1, 1, 16, 16, 16)))


def test_cache_is_reused_and_a_changed_checkpoint_rebuilds(small):
    from medseg.inference.openvino_backend import CACHE_FOLDER

    _, key, build = _network(small)
    build()
    entry = small.parent / CACHE_FOLDER / key.name
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["key"]["sha256"] == file_sha256(small)
    stamp = (entry / "model.bin").stat().st_mtime_ns
    build()  # reused: nothing rewritten
    assert (entry / "model.bin").stat().st_mtime_ns == stamp

    random_checkpoint(small, 4, seed=1, overrides=SMALL)  # new weights in the same file
    model, key2, build2 = _network(small)
    net = build2()
    assert key2.name != key.name and (small.parent / CACHE_FOLDER / key2.name / "manifest.json").is_file()
    windows = torch.randn((2, 1, *WINDOW), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(windows)
    assert (net(windows) - reference).abs().max().item() <= LOGIT_RTOL * reference.abs().max().item()


@pytest.mark.parametrize("damage", ["truncate", "manifest", "garbage"])
def test_corrupt_cache_is_rebuilt_with_a_warning(small, damage):
    from medseg.inference.openvino_backend import CACHE_FOLDER

    model, key, build = _network(small)
    build()
    entry = small.parent / CACHE_FOLDER / key.name
    if damage == "truncate":
        data = (entry / "model.bin").read_bytes()
        (entry / "model.bin").write_bytes(data[: len(data) // 2])
        reason = "model.bin does not match"
    elif damage == "manifest":
        (entry / "manifest.json").unlink()
        reason = "incomplete"
    else:
        (entry / "manifest.json").write_text("{not json")
        reason = "unreadable manifest"
    with pytest.warns(RuntimeWarning, match=reason):
        net = build()
    windows = torch.randn((2, 1, *WINDOW), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(windows)
    assert (net(windows) - reference).abs().max().item() <= LOGIT_RTOL * reference.abs().max().item()
    assert json.loads((entry / "manifest.json").read_text())["key"]["window"] == list(WINDOW)


def test_cache_goes_to_the_user_cache_when_the_checkpoint_folder_is_not_writable(tmp_path, monkeypatch):
    from medseg.inference import openvino_backend

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    beside = openvino_backend.cache_root(tmp_path / "run" / "best.pt")
    assert beside == (tmp_path / "run" / openvino_backend.CACHE_FOLDER).resolve()
    blocked = tmp_path / "file"  # a file where the folder would be: nothing can be created under it
    blocked.write_text("")
    assert openvino_backend.cache_root(blocked / "best.pt") == tmp_path / "xdg" / "medseg" / "openvino"


def test_auto_backend_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, "auto", in_memory=False) == "openvino"
    assert resolve_backend("auto", cpu, "bf16", in_memory=False) == "openvino"
    assert resolve_backend("auto", cpu, "fp32", in_memory=False) == "torch"  # the exact reference path
    assert resolve_backend("auto", cpu, "auto", in_memory=True) == "torch"  # training's validation
    assert resolve_backend("auto", cuda, "auto", in_memory=False) == "torch"
    assert resolve_backend("openvino", cpu, "fp32", in_memory=False) == "openvino"  # asked for by name
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_backend("openvino", cuda, "auto", in_memory=False)
    with pytest.raises(ValueError, match="valid: auto, torch, openvino"):
        resolve_backend("onnx", cpu, "auto", in_memory=False)


def test_backend_option_is_checked_when_made():
    assert SegmentOptions().backend == "auto"
    with pytest.raises(ConfigError, match="--backend 'tensorrt' is not valid; valid values: auto, torch"):
        SegmentOptions(backend="tensorrt")


def test_backend_is_in_the_identity_and_older_sidecars_were_torch(tmp_path):
    predictor = SimpleNamespace(
        checkpoint_sha256=["ab"], overlap=0.5, precision="bf16", backend="openvino", float_parts=None
    )
    identity = run_identity(predictor, SegmentOptions(), OutputSpec())
    assert identity["backend"] == "openvino" and "int8_float_parts" not in identity
    int8 = {"precision": "int8", "float_parts": "bf16"}
    assert run_identity(SimpleNamespace(**{**vars(predictor), **int8}), SegmentOptions(), OutputSpec()) == {
        **identity,
        "precision": "int8",
        "int8_float_parts": "bf16",  # a mask made with f32 float parts is not this run's
    }
    mask = tmp_path / "case.nii.gz"
    mask.write_bytes(b"")
    older = {k: v for k, v in identity.items() if k != "backend"}
    (tmp_path / "case.json").write_text(json.dumps(older))
    assert not is_complete(mask, identity)  # a PyTorch mask is redone with OpenVINO
    assert is_complete(mask, {**identity, "backend": "torch"})
    (tmp_path / "case.json").write_text(json.dumps(identity))
    assert is_complete(mask, identity)


def _held_out(tiny_dataset: Path) -> list[Path]:
    return sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))


@pytest.mark.parametrize(
    ("backend", "precision"),
    [("openvino", "auto"), ("openvino", "fp32"), ("openvino", "bf16"), ("torch", "bf16")],
)
def test_fast_paths_agree_with_exact_fp32(segmenting_run, tiny_dataset, backend, precision):
    """Every fast path is held to the agreement bound: Dice ≥ 0.99 per label against exact fp32 (PyTorch
    eager, ``--precision fp32``) on a trained model's held-out phantoms."""
    checkpoint = segmenting_run / "best.pt"
    exact = Predictor(checkpoint, SegmentOptions(device="cpu", precision="fp32", postprocess="none"))
    fast = Predictor(
        checkpoint, SegmentOptions(device="cpu", precision=precision, backend=backend, postprocess="none")
    )
    assert exact.backend == "torch" and fast.backend == backend
    cases = _held_out(tiny_dataset)
    assert cases
    for case in cases:
        a, b = exact.predict(case), fast.predict(case)
        assert b.info["backend"] == backend and a.info["backend"] == "torch"
        labels = sorted((set(np.unique(a.labels)) | set(np.unique(b.labels))) - {0})
        assert labels, case  # the trained model segments something
        dice = dice_per_label(b.labels, a.labels, labels)
        assert min(dice.values()) >= 0.99, (case.name, dice)


def test_an_isa_cap_below_bf16_means_no_native_bf16(monkeypatch):
    from medseg.device import cpu_has_native_bf16, resolve_precision

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # the AVX2-only emulation of benchmarks.openvino_speed
    assert not cpu_has_native_bf16()
    assert resolve_precision("auto", torch.device("cpu")).name == "fp32"
