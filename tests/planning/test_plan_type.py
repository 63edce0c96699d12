"""The typed, frozen plan: today's JSON form round-trips exactly, older plans (without the newer keys) load
with the defaults, bad values fail in one line naming the key, nothing can change a plan once made."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import pytest

from medseg.io import InputError
from medseg.io.plan import Intensity, Plan, PlanError
from medseg.planning.plan_file import dump_plan

#: A plan as ``medseg plan`` writes it today (make_plan's keys, in its order).
TODAY = {
    "orientation": "RAS",
    "spacing": [1.5, 1.5, 2.0],
    "intensity": {"mode": "zscore", "a_min": -120.5, "a_max": 310.0, "mean": 95.25, "std": 48.5},
    "crop_foreground": True,
    "patch_size": [96, 96, 64],
    "pool_kernels": [[2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
    "batch_size": 2,
    "labels": {"background": 0, "liver": 1, "spleen": 2},
    "in_channels": 1,
    "channel_names": ["CT"],
    "mirror_axes": [0, 1, 2],
    "planner": {
        "spacing_rule": "median spacing",
        "median_shape": [180, 160, 90],
        "num_cases": 12,
        "patch_size": "planned",
        "batch_size": "planned",
        "memory_gb": 8.0,
        "memory_source": "--gpu-memory-gb",
        "estimated_memory_gb": 6.42,
    },
    "fingerprint": {
        "median_spacing": [0.8, 0.8, 2.5],
        "foreground": {"p00_5": -120.5, "p99_5": 310.0, "mean": 95.25, "std": 48.5},
        "class_fractions": [0.9, 0.07, 0.03],
    },
}
#: The first plans (before pool kernels, batch size, mirror axes, channel names and the planner record).
SPINE = {
    "orientation": "RAS",
    "spacing": [1.5, 1.5, 1.5],
    "intensity": {"mode": "window", "a_min": -200.0, "a_max": 300.0},
    "crop_foreground": True,
    "patch_size": [96, 96, 64],
    "labels": {"background": 0, "liver": 1},
    "in_channels": 1,
    "fingerprint": {"median_spacing": [0.8, 0.8, 2.5], "foreground": {"mean": 90.0}},
}
#: What a checkpoint must hold at the least (the keys inference reads).
MINIMAL = {
    "orientation": "LPS",
    "spacing": [2.0, 2.0, 3.0],
    "intensity": {"mode": "window", "a_min": -100.0, "a_max": 200.0},
    "patch_size": [32, 32, 16],
}


def test_todays_form_round_trips_exactly():
    plan = Plan.from_dict(copy.deepcopy(TODAY))
    assert plan.to_dict() == TODAY
    assert list(plan.to_dict()) == list(TODAY)  # same key order: plan.json reads the same
    assert json.loads(dump_plan(plan)) == TODAY
    assert Plan.from_dict(plan.to_dict()) == plan
    assert plan.intensity == Intensity("zscore", -120.5, 310.0, 95.25, 48.5)
    assert plan.pool_kernels[0] == (2, 2, 1) and plan.labels["spleen"] == 2
    assert plan.class_fractions() == (0.9, 0.07, 0.03) and plan.channels() == ("CT",)


def test_a_multi_channel_plan_round_trips():
    window = {"mode": "window", "a_min": -200.0, "a_max": 300.0}
    given = {
        **TODAY,
        "intensity": [TODAY["intensity"], window],
        "in_channels": 2,
        "channel_names": ["CT", "PET"],
    }
    plan = Plan.from_dict(given)
    assert plan.to_dict() == given
    assert [it.mode for it in plan.channel_intensities()] == ["zscore", "window"]


@pytest.mark.parametrize("old", [SPINE, MINIMAL], ids=["spine", "minimal"])
def test_older_plans_load_with_the_defaults(old):
    plan = Plan.from_dict(copy.deepcopy(old))
    assert (plan.crop_foreground, plan.in_channels, plan.mirror_axes) == (True, 1, ())
    assert plan.pool_kernels is None and plan.batch_size is None and plan.planner is None
    assert plan.channels() == ("CT",)
    written = plan.to_dict()
    # keys with a default are written from now on; the absent optional ones stay absent
    assert written == {**old, "crop_foreground": True, "in_channels": 1, "mirror_axes": []}
    assert Plan.from_dict(written) == plan


def test_every_key_missing_in_an_old_plan_has_its_default_on_the_class():
    """Each default lives on the dataclass field, nowhere else (one switch, one default, one place)."""
    defaults = {f.name: f.default for f in dataclasses.fields(Plan) if f.default is not dataclasses.MISSING}
    assert defaults == {
        "crop_foreground": True,
        "in_channels": 1,
        "mirror_axes": (),
        "pool_kernels": None,
        "batch_size": None,
        "labels": None,
        "channel_names": None,
        "planner": None,
        "fingerprint": None,
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"spacing": [1.5, 0.0, 1.5]},
            "plan.json: spacing: expected three numbers > 0 (mm), found [1.5, 0.0, 1.5]",
        ),
        ({"spacing": [1.5, 1.5]}, "plan.json: spacing: expected three numbers > 0 (mm)"),
        (
            {"orientation": "RAR"},
            "plan.json: orientation: expected three axis codes like RAS or LPS, found 'RAR'",
        ),
        ({"patch_size": [96, 96, 64.5]}, "plan.json: patch_size: expected three integers ≥ 1"),
        ({"crop_foreground": "yes"}, "plan.json: crop_foreground: expected true or false, found 'yes'"),
        ({"in_channels": 0}, "plan.json: in_channels: expected an integer ≥ 1, found 0"),
        ({"batch_size": True}, "plan.json: batch_size: expected an integer ≥ 1, found True"),
        ({"mirror_axes": [3]}, "plan.json: mirror_axes: expected a list of axes 0, 1, 2, found [3]"),
        (
            {"pool_kernels": [[2, 2, 3]]},
            "plan.json: pool_kernels: expected a list of kernels of three values 1 or 2",
        ),
        ({"labels": {"liver": -1}}, "plan.json: labels: expected a mapping of label names to values ≥ 0"),
        ({"channel_names": ["CT", "PET"]}, "plan.json: channel_names: expected 1 channel name(s)"),
        (
            {"intensity": {"mode": "gamma"}},
            "plan.json: intensity: expected a mapping with mode window or zscore",
        ),
        (
            {"intensity": {"mode": "zscore", "a_min": 0.0, "a_max": 1.0}},
            "plan.json: intensity.mean: expected a number",
        ),
        (
            {"intensity": [TODAY["intensity"]] * 2},
            "plan.json: intensity: expected one mapping per input channel (1)",
        ),
        ({"planner": [1]}, "plan.json: planner: expected a mapping, found [1]"),
        ({"patch_sise": [1, 2, 3]}, "plan.json: unknown plan key 'patch_sise' (did you mean patch_size?)"),
    ],
)
def test_bad_values_fail_in_one_line_naming_the_key(change, message):
    with pytest.raises(PlanError) as info:
        Plan.from_dict({**TODAY, **change}, where="plan.json")
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text, text
    assert isinstance(info.value, InputError)  # the CLI reports it like any other unusable input


def test_missing_keys_and_non_mappings_are_named():
    with pytest.raises(PlanError, match=r"^plan: missing spacing, intensity, patch_size"):
        Plan.from_dict({"orientation": "RAS"})
    with pytest.raises(PlanError, match=r"^best\.pt: checkpoint plan: expected a mapping, found list"):
        Plan.from_dict([1, 2], where="best.pt: checkpoint plan")


def test_a_plan_is_frozen_all_the_way_down():
    plan = Plan.from_dict(copy.deepcopy(TODAY))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.spacing = (1.0, 1.0, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.intensity.a_min = 0.0
    with pytest.raises(TypeError):
        plan.labels["kidney"] = 3
    with pytest.raises(TypeError):
        plan.planner["num_cases"] = 1
    assert isinstance(plan.spacing, tuple) and isinstance(plan.fingerprint["median_spacing"], tuple)
    assert plan.to_dict() == TODAY  # the JSON form is a fresh copy: editing it leaves the plan alone
    plan.to_dict()["labels"]["kidney"] = 3
    assert "kidney" not in plan.labels


def test_a_plan_pickles_for_the_training_processes():
    """Rank 0 sends the plan to the other ranks with ``broadcast_object_list`` (pickle)."""
    plan = Plan.from_dict(copy.deepcopy(TODAY))
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert copy.deepcopy(plan) == plan


@pytest.mark.parametrize("old", [TODAY, SPINE, MINIMAL], ids=["today", "spine", "minimal"])
def test_checkpoints_check_their_plan_with_the_plan_type(old):
    """A checkpoint keeps the plan's dict form; reading one checks it with ``Plan.from_dict``."""
    import torch

    from medseg.io.checkpoint import FORMAT, VERSION, check_contents

    ckpt = {"format": FORMAT, "version": VERSION, "model": {"w": torch.zeros(1)}, "config": {}}
    check_contents({**ckpt, "plan": copy.deepcopy(old), "labels": {"background": 0}}, "old.pt")
    bad = {**old, "in_channels": 0}
    with pytest.raises(InputError, match=r"^old\.pt: checkpoint plan: in_channels: expected an integer ≥ 1"):
        check_contents({**ckpt, "plan": bad, "labels": {"background": 0}}, "old.pt")
