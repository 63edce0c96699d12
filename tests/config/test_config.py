"""Config loading: YAML + overrides, unknown keys suggest the closest valid one."""

from __future__ import annotations

import pytest

from medseg.config import ConfigError, load_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  filters: [8, 16, 32, 64, 128]\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, ["train.epochs=7", "augment.patch_size=[32, 32, 16]", "model.bottleneck=pam"])
    assert cfg.model.filters == (8, 16, 32, 64, 128)
    assert cfg.train.epochs == 7 and cfg.augment.patch_size == (32, 32, 16)
    assert cfg.model.bottleneck == "pam" and cfg.optim.name == "adamw"


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(None, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="did you mean"):
        load_config(None, ["modle.name=unet"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
