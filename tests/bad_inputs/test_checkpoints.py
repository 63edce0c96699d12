"""Bad checkpoints given to ``medseg segment``: one ``error:`` line naming the ``.pt`` file and the cause.

Every bad checkpoint is built at test time from the tiny trained run (``tiny_run / "best.pt"``): cut short,
carrying pickled code, from a newer medseg, with an incomplete or invalid recorded config, without a
required key, or with weights that do not fit the recorded network. Each class runs through the real CLI
once; the finer cases are checked on the library functions directly.
"""

from __future__ import annotations

import ast
import copy
import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from medseg.config import ConfigError, checkpoint_config
from medseg.inference.predictor import model_from_checkpoint, state_dict_differences
from medseg.io import InputError
from medseg.io.checkpoint import load_checkpoint, pickle_globals, unsafe_globals
from medseg.nets.registry import build_network
from tests.bad_inputs.cli import REPO, assert_one_error, run_cli


class Payload:
    """Pickles as a call of ``os.system`` — what a hostile checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _edited(ckpt: dict, edit) -> dict:
    out = copy.deepcopy(ckpt)
    edit(out)
    return out


def _wider(ckpt: dict) -> None:
    ckpt["config"]["model"]["filters"] = [2 * f for f in ckpt["config"]["model"]["filters"]]


@pytest.fixture(scope="module")
def bad_checkpoints(tiny_run, tmp_path_factory) -> dict[str, Path]:
    """One file per class of bad checkpoint (name → path), plus ``good`` and the ``marker`` path."""
    folder = tmp_path_factory.mktemp("bad_ckpt")
    good = tiny_run / "best.pt"
    ckpt = load_checkpoint(good)
    data = good.read_bytes()
    files = {"good": good, "marker": folder / "pwned"}
    files["truncated"] = folder / "truncated.pt"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["pickled_code"] = folder / "pickled_code.pt"
    torch.save({**ckpt, "extra": Payload(files["marker"])}, files["pickled_code"])
    edits = {
        "newer_version": lambda c: c.update(version=99),
        "no_model_section": lambda c: c["config"].pop("model"),
        "invalid_model_name": lambda c: c["config"]["model"].update(name="foo"),
        "no_plan": lambda c: c.pop("plan"),
        "wider_filters": _wider,
    }
    for name, edit in edits.items():
        files[name] = folder / f"{name}.pt"
        torch.save(_edited(ckpt, edit), files[name])
    return files


@pytest.fixture(scope="module")
def scan(tiny_dataset) -> Path:
    return sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]


def _expected_mismatch(ckpt: dict) -> tuple[int, str]:
    """Count of tensors whose shape differs between the trained and the widened network, computed here by
    building both networks (independently of medseg's message code)."""
    narrow = checkpoint_config(ckpt, "x").model
    wide = checkpoint_config(_edited(ckpt, _wider), "x").model
    n_classes = len(ckpt["labels"])
    a = build_network(narrow, 1, n_classes).state_dict()
    b = build_network(wide, 1, n_classes).state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in b if a[k].shape != b[k].shape]
    first = differ[0]
    return len(
        differ
    ), f"{first} [{','.join(map(str, a[first].shape))}] vs [{','.join(map(str, b[first].shape))}]"


CLI_CASES = {
    "truncated": "truncated or corrupt checkpoint (zip archive without its central directory",
    "pickled_code": "contains pickled code (posix.system); refused",
    "newer_version": "checkpoint version 99 is newer than this medseg",
    "no_model_section": "(recorded config): missing section model",
    "invalid_model_name": "(recorded config): model.name: 'foo' is not valid",
    "no_plan": "medseg checkpoint misses ['plan']",
    "wider_filters": "weights do not match the recorded network:",
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_segment_with_bad_checkpoint_prints_one_line(case, bad_checkpoints, scan, tmp_path):
    model = bad_checkpoints[case]
    out = tmp_path / "out"
    result = run_cli("segment", "-i", scan, "-o", out, "-m", model, "--device", "cpu")
    line = assert_one_error(result, model, cause=CLI_CASES[case])
    assert result.code == 2, result.output
    assert not out.exists() or not list(out.rglob("*.nii*")), "a mask was written"
    assert "weights_only" not in result.output and "Traceback" not in result.output
    if case == "pickled_code":
        assert not bad_checkpoints["marker"].exists(), "the pickled payload was executed"
    if case == "wider_filters":
        count, first = _expected_mismatch(load_checkpoint(bad_checkpoints["good"]))
        assert f"{count} tensors differ, first {first}" in line, line


def test_pickle_scan_names_globals_of_every_protocol(tmp_path):
    """GLOBAL (protocol 2, Python 2 names mapped back) and STACK_GLOBAL with memo reuse (protocols 4, 5)."""
    marker = tmp_path / "never"
    for protocol in (2, 4, 5):
        blob = pickle.dumps([Payload(marker), Payload(marker), OrderedDict(a=1)], protocol=protocol)
        found = pickle_globals(io.BytesIO(blob))
        assert found == {"posix.system", "collections.OrderedDict"}, (protocol, found)
        assert unsafe_globals(found) == ["posix.system"]
    assert pickle_globals(io.BytesIO(pickle.dumps({1, 2}, protocol=2))) == {"builtins.set"}
    assert unsafe_globals({"builtins.set"}) == []  # __builtin__.set in the file, on PyTorch's allowlist
    assert not marker.exists()


def test_real_checkpoint_pickle_is_on_the_allowlist(bad_checkpoints):
    with zipfile.ZipFile(bad_checkpoints["good"]) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        found = pickle_globals(io.BytesIO(archive.read(name)))
    assert "torch._utils._rebuild_tensor_v2" in found and unsafe_globals(found) == []


def test_flipped_byte_fails_the_crc(bad_checkpoints, tmp_path):
    """PyTorch loads a tensor with a flipped byte silently; the archive's CRC-32 catches it."""
    good = bad_checkpoints["good"]
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 64)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 5] ^= 0xFF
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"flipped.pt: truncated or corrupt checkpoint \(Bad CRC-32"):
        load_checkpoint(flipped)


def test_checkpoint_written_without_crc_still_loads(bad_checkpoints, tmp_path):
    ckpt = load_checkpoint(bad_checkpoints["good"])
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(ckpt, tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(before)
    with zipfile.ZipFile(tmp_path / "nocrc.pt") as archive:
        assert {i.CRC for i in archive.infolist()} == {0}
    assert load_checkpoint(tmp_path / "nocrc.pt")["labels"] == ckpt["labels"]


@pytest.mark.parametrize(
    ("edit", "cause"),
    [
        (lambda c: ["a", "list"], "not a medseg checkpoint (holds a list, not a dict)"),
        (lambda c: {k: v for k, v in c.items() if k != "format"}, "missing format tag"),
        (lambda c: {**c, "version": "2"}, "no valid format version (found '2')"),
        (lambda c: {k: v for k, v in c.items() if k != "labels"}, "misses ['labels']"),
        (lambda c: {k: v for k, v in c.items() if k != "model"}, "misses ['model']"),
        (lambda c: {**c, "model": {"w": [1.0]}}, "key 'model' is not a mapping of names to tensors"),
        (lambda c: {**c, "labels": ["liver"]}, "key 'labels' is not a mapping"),
        (
            lambda c: {**c, "plan": {**c["plan"], "spacing": [1.0, 0.0, 1.0]}},
            "checkpoint plan: spacing: expected three numbers > 0 (mm), found [1.0, 0.0, 1.0]",
        ),
        (
            lambda c: {**c, "plan": {k: v for k, v in c["plan"].items() if k != "intensity"}},
            "checkpoint plan: missing intensity",
        ),
    ],
)
def test_malformed_checkpoints_name_file_and_key(bad_checkpoints, tmp_path, edit, cause):
    path = tmp_path / "bad.pt"
    torch.save(edit(load_checkpoint(bad_checkpoints["good"])), path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path}: ") and cause in str(info.value), str(info.value)


def test_foreign_files_are_named_for_what_they_are(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match=r"legacy\.pt: not a medseg checkpoint \(a legacy pickle"):
        load_checkpoint(legacy)
    script = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)
    with pytest.raises(InputError, match=r"script\.pt: a TorchScript archive"):
        load_checkpoint(script)


def test_recorded_config_errors_name_file_and_key(bad_checkpoints):
    ckpt = load_checkpoint(bad_checkpoints["good"])
    for edit, cause in [
        (lambda c: c["config"].pop("infer"), "best.pt (recorded config): missing section infer"),
        (lambda c: c["config"]["model"].update(filters=[4]), "best.pt (recorded config): model.filters"),
        (lambda c: c.update(config=[1]), "best.pt (recorded config): not a mapping (found list)"),
    ]:
        with pytest.raises(ConfigError) as info:
            checkpoint_config(_edited(ckpt, edit), bad_checkpoints["good"])
        assert cause in str(info.value), str(info.value)
    assert list(checkpoint_config(ckpt, "x").model.filters) == ckpt["config"]["model"]["filters"]


def test_state_dict_differences_counts_shapes_missing_and_extra():
    net = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}
    saved = {"a": torch.zeros(2, 3), "b": torch.zeros(5), "d": torch.zeros(1)}
    assert state_dict_differences(saved, net) == [
        "b [5] vs [4]",
        "c [1] missing from the file",
        "d [1] not in the network",
    ]
    assert state_dict_differences(net, net) == []


def test_one_extra_tensor_is_one_difference(bad_checkpoints):
    ckpt = load_checkpoint(bad_checkpoints["good"])
    ckpt["model"]["stray.weight"] = torch.zeros(3)
    with pytest.raises(InputError, match=r"1 tensor differs, first stray.weight \[3\] not in the network"):
        model_from_checkpoint(ckpt, torch.device("cpu"), "x.pt")


def test_no_weights_only_false_anywhere():
    """No call in the library or the CLI passes ``weights_only=False`` (to ``torch.load`` or anything)."""
    offenders = []
    for folder in ("medseg", "pipelines"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and any(
                    kw.arg == "weights_only"
                    and not (isinstance(kw.value, ast.Constant) and kw.value.value is True)
                    for kw in node.keywords
                ):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
