"""What a registered network name promises is what it builds: gates, parameter counts, configs checked."""

from __future__ import annotations

import pytest
import torch

from medseg.config import ConfigError, ModelConfig, load_config
from medseg.nets.blocks.grid_attention import GridAttentionGate3D
from medseg.nets.registry import NETWORKS, build_network
from medseg.nets.unet import count_parameters

#: name → (grid attention gates, exact parameters at the default width 16..256, 1 input, 7 classes — the
#: phantoms' background + 6 organs). Oktay et al. 2018: U-Net 5.88 M, Attention U-Net 6.40 M (the authors'
#: code stacks extra gate combinations). With 2 classes the counts are 5,885,976 and 6,189,691.
PROMISES = {"unet": (0, 5_887_196), "attention_unet": (3, 6_190_911)}


def test_every_registered_network_has_a_promise():
    assert set(NETWORKS) == set(PROMISES)


@pytest.mark.parametrize("name", sorted(PROMISES))
def test_name_decides_gates_and_parameter_count(name):
    """The ablation baseline must never silently carry attention: ``name: unet`` builds no gate."""
    gates, params = PROMISES[name]
    net = build_network(load_config(None, [f"model.name={name}"]).model, 1, 7)
    assert sum(isinstance(m, GridAttentionGate3D) for m in net.modules()) == gates
    assert count_parameters(net) == params


def test_skip_gate_key_is_gone_with_a_clear_message():
    with pytest.raises(ConfigError, match=r"skip_gate was removed.*model.name: unet \(no gates\)"):
        load_config(None, ["model.name=unet", "model.skip_gate=grid"])


@pytest.mark.parametrize(
    ("patch", "ok"), [((8, 8, 16), True), ((8, 8, 8), False), ((6, 8, 16), False)], ids=str
)
def test_patch_check_matches_what_the_network_can_run(patch, ok):
    """The load-time patch rule agrees with a real training forward (instance norm, poolings)."""
    overrides = ["model.filters=[4, 8, 16]", "model.scales=[1.0, 0.5]", f"augment.patch_size={list(patch)}"]
    if not ok:
        with pytest.raises(ConfigError, match="too small"):
            load_config(None, overrides)
        model = ModelConfig(filters=(4, 8, 16), scales=(1.0, 0.5))
    else:
        model = load_config(None, overrides).model
    net = build_network(model, 1, 2).train()
    if ok:
        assert net(torch.randn(1, 1, *patch))["logits"][0].shape == (1, 2, *patch)
    else:
        with pytest.raises((ValueError, RuntimeError)):
            net(torch.randn(1, 1, *patch))


def test_config_values_are_typed_and_frozen():
    cfg = load_config(None, ["optim.lr=3e-3", "augment.patch_size=[32, 32, 16]", "train.epochs=4"])
    assert cfg.optim.lr == 0.003 and cfg.augment.patch_size == (32, 32, 16) and cfg.train.epochs == 4
    with pytest.raises(AttributeError):
        cfg.train.epochs = 5  # type: ignore[misc]
    for bad, match in [
        ("train.epochs=0", "out of range"),
        ("infer.overlap=1.0", "out of range"),
        ("augment.patch_size=[32, 32]", "expected 3 numbers"),
        ("train.epochs=2.5", "expected an integer"),
        ("model.options={pamm: {}}", "Did you mean 'pam'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, [bad])


@pytest.mark.parametrize("old_name", ["unet", "attention_unet"])
def test_version_1_checkpoints_load_with_the_network_they_really_built(
    tiny_run, tiny_dataset, tmp_path, old_name
):
    """Version 1 wrote ``model.skip_gate`` (default ``grid``): ``name: unet`` + ``skip_gate: grid`` built a
    gated network. Such a checkpoint still loads, as the Attention U-Net its weights are, and segments the
    same as the current checkpoint."""
    from medseg.inference import Predictor
    from medseg.io.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_run / "best.pt")
    ckpt["version"] = 1
    ckpt["config"]["model"].update(name=old_name, skip_gate="grid")
    old = tmp_path / "v1.pt"
    torch.save(ckpt, old)
    src = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]
    migrated = Predictor(old, device="cpu")
    assert migrated.config.model.name == "attention_unet"
    assert (
        migrated.predict(src).labels == Predictor(tiny_run / "best.pt", device="cpu").predict(src).labels
    ).all()
