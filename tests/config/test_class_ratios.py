"""``augment.class_ratios``: patch centres drawn per class (MONAI ``RandCropByLabelClassesd``), checked config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.config import ConfigError, load_config
from medseg.transforms.presets import _patch_sampler


def test_class_ratios_are_checked():
    cfg = load_config(None, ["augment.class_ratios=[1, 0, 3]"])
    assert cfg.augment.class_ratios == (1.0, 0.0, 3.0)
    for bad in ("[0, 0]", "[1, -1]", "[]", "[1, x]"):
        with pytest.raises(ConfigError, match=r"augment\.class_ratios"):
            load_config(None, [f"augment.class_ratios={bad}"])


def test_only_the_small_organ_as_centre_puts_it_in_every_patch():
    label = np.zeros((1, 64, 64, 32), np.int64)
    label[0, 5:60, 5:60, 2:30] = 1  # a large organ
    label[0, 50:54, 8:12, 26:29] = 6  # a small one in a corner of it
    image = torch.randn(1, 64, 64, 32)
    augment = load_config(
        None, ["augment.class_ratios=[0, 0, 0, 0, 0, 0, 1]", "augment.samples_per_volume=8"]
    ).augment
    sampler = _patch_sampler(["image", "label"], [16, 16, 8], augment)
    sampler.set_random_state(0)
    patches = sampler({"image": image, "label": torch.as_tensor(label)})
    assert len(patches) == 8 and all((np.asarray(p["label"]) == 6).any() for p in patches)
    plain = load_config(
        None, ["augment.samples_per_volume=8"]
    ).augment  # pos_neg: foreground is mostly organ 1
    patches = _patch_sampler(["image", "label"], [16, 16, 8], plain)(
        {"image": image, "label": torch.as_tensor(label)}
    )
    assert sum((np.asarray(p["label"]) == 6).any() for p in patches) < 8


def test_class_ratios_must_match_the_dataset_labels(tmp_path, tiny_dataset):
    from medseg.engine import train

    cfg = load_config(
        None, [f"data.root={tiny_dataset}", f"train.output={tmp_path / 'run'}", "augment.class_ratios=[1, 1]"]
    )
    with pytest.raises(ConfigError, match="2 ratios for"):
        train(cfg, log=lambda *_: None)
