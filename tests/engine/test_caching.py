"""``data.cache``: memory, disk and none train identically and resume exactly; the disk cache is reused,
keyed by the plan, written atomically, read only with ``weights_only=True``, and rebuilt when unusable."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from medseg.config import ConfigError, load_config
from tests.conftest import TINY_TRAIN

MODES = ("memory", "disk", "none")
#: 2 epochs × 2 iterations, no validation split (validation items are compared on their own, below)
RUN = [*TINY_TRAIN, "data.val_fraction=0.0"]


def _cfg(data: Path, out: Path, *extra: str):
    return load_config(None, [*RUN, f"data.root={data}", f"train.output={out}", *extra])


def _losses(run: Path) -> list[str]:
    return [row["train_loss"] for row in csv.DictReader((run / "metrics.csv").open())]


def _weights(run: Path) -> dict:
    from medseg.io.checkpoint import load_checkpoint

    return load_checkpoint(run / "last.pt")["model"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in folder.rglob("*.pt")}


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory) -> dict:
    """Per mode: a run stopped after its first epoch (1 epoch of 2 iterations), then resumed to 2 epochs;
    and one uninterrupted 2-epoch run. The disk runs share one cache: the resumed run reads what the first
    one wrote."""
    from medseg.engine import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("cache_runs")
    quiet = lambda *_: None  # noqa: E731
    out: dict = {"base": base}
    try:
        train(_cfg(tiny_dataset, base / "straight"), log=quiet)
        out["straight"] = _weights(base / "straight")
        for mode in MODES:
            run = base / mode
            cfg = _cfg(tiny_dataset, run, f"data.cache={mode}")
            train(replace(cfg, train=replace(cfg.train, max_minutes=0.0)), log=quiet)  # stops after epoch 1
            out[mode, "first"] = (_losses(run), _weights(run))
            out[mode, "cache_before"] = _files(base / ".medseg_cache")
            train(cfg, resume=True, log=quiet)
            out[mode, "cache_after"] = _files(base / ".medseg_cache")
            out[mode, "resumed"] = (_losses(run), _weights(run))
    finally:
        torch.set_num_threads(threads)
    return out


def test_every_mode_gives_the_same_first_epoch(runs):
    """Same seed, same deterministic preprocessing → the same batches: identical loss and weights after the
    first epoch in memory, disk (cache written in this epoch) and none (streamed)."""
    losses, weights = runs["memory", "first"]
    assert len(losses) == 1
    for mode in ("disk", "none"):
        assert runs[mode, "first"][0] == losses, mode
        assert _same(runs[mode, "first"][1], weights), mode


def test_every_mode_resumes_exactly(runs):
    """Interrupted after epoch 1 and resumed (num_workers 0): the weights equal the uninterrupted run's."""
    for mode in MODES:
        losses, weights = runs[mode, "resumed"]
        assert len(losses) == 2, mode
        assert _same(weights, runs["straight"]), mode


def test_disk_cache_is_written_once_and_reused(runs):
    """Only the disk mode writes cache files; the resumed run reads them without rewriting one (mtimes and
    inodes unchanged), and adds only the cases the first epoch had not drawn."""
    assert runs["memory", "cache_after"] == {}
    before, after = runs["disk", "cache_before"], runs["disk", "cache_after"]
    assert before and all(after[name] == stamp for name, stamp in before.items())
    assert runs["none", "cache_after"] == after  # streaming writes nothing
    folders = [p for p in (runs["base"] / ".medseg_cache").iterdir()]
    assert len(folders) == 1 and (folders[0] / "key.json").is_file()
    assert not list(folders[0].rglob(".tmp-*"))


def _tiny(data: Path, out: Path, *extra: str):
    """Config, plan and cases of the tiny dataset, as the trainer makes them."""
    from medseg.data.datasets import label_names, read_dataset_json, training_cases
    from medseg.planning.fingerprint import make_plan

    cfg = _cfg(data, out, *extra)
    cases = training_cases(data)
    return cfg, make_plan(cfg, cases, label_names(read_dataset_json(data))), cases


def test_validation_cases_are_the_same_in_every_mode(tiny_dataset, tmp_path):
    from medseg.engine.caching import build_dataset
    from medseg.transforms import val_transforms

    items = {}
    for mode in ("memory", "disk", "disk", "none"):  # the second disk pass reads the files
        cfg, plan, cases = _tiny(tiny_dataset, tmp_path / "run", f"data.cache={mode}")
        items.setdefault(mode, []).append(
            list(build_dataset(cfg, plan, cases[:2], val_transforms(plan), "val"))
        )
    reference = items["memory"][0]
    for got in [*items["disk"], *items["none"]]:
        for a, b in zip(reference, got, strict=True):
            for key in ("image", "label"):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key].as_tensor(), b[key].as_tensor())
                assert torch.equal(a[key].affine, b[key].affine)
    assert len(list((tmp_path / ".medseg_cache").rglob("*.pt"))) == 2


def test_cache_folder_is_keyed_by_the_plan_and_files_by_the_sources(tiny_dataset, tmp_path):
    from medseg.data.persistent import cache_file_name
    from medseg.engine.caching import cache_folder

    cfg, plan, cases = _tiny(tiny_dataset, tmp_path / "runs" / "a", "data.cache=disk")
    folder = cache_folder(cfg, plan)
    assert folder.parent == tmp_path / "runs" / ".medseg_cache"  # next to the run folder
    # statistics and test-time mirroring are not read by the preprocessing: same folder
    assert cache_folder(cfg, replace(plan, fingerprint={}, mirror_axes=(0, 1, 2))) == folder
    for changed in (
        {"spacing": tuple(s * 1.01 for s in plan.spacing)},
        {"intensity": replace(plan.intensity, a_max=300.0)},
        {"patch_size": (40, 40, 16)},  # the cached training prefix pads to the patch
        {"orientation": "LPS"},
        {"crop_foreground": False},
    ):
        assert cache_folder(cfg, replace(plan, **changed)).parent == folder.parent
        assert cache_folder(cfg, replace(plan, **changed)) != folder, changed
    other = _cfg(tiny_dataset, tmp_path / "run", "data.cache=disk", f"data.cache_dir={tmp_path / 'c'}")
    assert cache_folder(other, plan) == tmp_path / "c" / folder.name

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    case = {k: v.replace(str(tiny_dataset), str(data)) for k, v in cases[0].items()}
    name = cache_file_name(case)
    assert name.startswith(f"{case['case']}-") and name.endswith(".pt")
    image = Path(case["image"])
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # replaced in place
    assert cache_file_name(case) != name


def _disk_dataset(data: Path, tmp_path: Path, n: int = 1):
    from medseg.engine.caching import build_dataset
    from medseg.transforms import val_transforms

    cfg, plan, cases = _tiny(data, tmp_path / "run", "data.cache=disk")
    return build_dataset(cfg, plan, cases[:n], val_transforms(plan), "val")


def test_cache_is_only_ever_loaded_with_weights_only(tiny_dataset, tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    first = list(_disk_dataset(tiny_dataset, tmp_path, n=2))  # writes
    assert calls == []
    second = list(_disk_dataset(tiny_dataset, tmp_path, n=2))  # a new dataset, as a later run: reads
    assert calls == [True, True]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, second, strict=True))


class _Payload:
    """Pickles as a call to ``os.mkdir(marker)``: what an attacker's cache file would run on a plain load."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _damage(path: Path, how: str, marker: Path) -> None:
    blob = path.read_bytes()
    if how == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif how == "flipped byte":  # inside the stored voxels: only the archive's CRC-32 notices
        mid = len(blob) // 2
        path.write_bytes(blob[:mid] + bytes([blob[mid] ^ 0xFF]) + blob[mid + 1 :])
    elif how == "not a zip":
        path.write_bytes(b"garbage" * 100)
    elif how == "pickled code":
        torch.save({"image": _Payload(str(marker))}, path)
    elif how == "foreign layout":  # loads with weights_only=True, but is not a medseg record
        torch.save({"image": torch.zeros(2, 2)}, path)


@pytest.mark.parametrize("how", ["truncated", "flipped byte", "not a zip", "pickled code", "foreign layout"])
def test_unusable_cache_file_is_rebuilt(tiny_dataset, tmp_path, how):
    """A damaged or foreign file is never trusted or run: a warning names it, the case is preprocessed again
    from its source volumes and the file rewritten."""
    from medseg.data.persistent import read_cache_file

    expected = _disk_dataset(tiny_dataset, tmp_path)[0]
    (path,) = (tmp_path / ".medseg_cache").rglob("*.pt")
    marker = tmp_path / "payload-ran"
    _damage(path, how, marker)
    with pytest.warns(UserWarning, match=rf"{path.name}: rebuilding an unusable cache file \(.+\)"):
        item = _disk_dataset(tiny_dataset, tmp_path)[0]
    assert not marker.exists()
    assert torch.equal(item["image"], expected["image"]) and torch.equal(item["label"], expected["label"])
    assert torch.equal(read_cache_file(path)["image"], expected["image"])  # the rebuilt file is sound


def test_a_killed_write_leaves_nothing_a_later_run_trusts(tiny_dataset, tmp_path, monkeypatch):
    import medseg.data.persistent as persistent
    from medseg.io.atomic import temp_prefix

    def killed(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(persistent.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        _disk_dataset(tiny_dataset, tmp_path)[0]
    monkeypatch.undo()
    folder = next((tmp_path / ".medseg_cache").iterdir()) / "val"
    assert list(folder.iterdir()) == []  # no cache file, no temporary file
    # kill -9 mid-write leaves the temporary file: the next run removes it (its writer is dead)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    pid = int(dead.stdout)
    stray = folder / temp_prefix(folder / "phantom_000-x.pt").replace(f"-{os.getpid()}-", f"-{pid}-", 1)
    stray = stray.with_name(stray.name + "abcdefgh.pt")
    stray.write_bytes(b"PK\x03\x04 half a file")
    _disk_dataset(tiny_dataset, tmp_path)[0]
    assert not stray.exists() and len(list(folder.glob("*.pt"))) == 1


def test_cache_mode_is_checked_when_the_config_loads():
    with pytest.raises(
        ConfigError, match=r"data.cache: 'disc' is not valid; valid values: memory, disk, none"
    ):
        load_config(None, ["data.cache=disc"])
    assert load_config(None, []).data.cache == "memory"


def test_workers_give_the_same_batches_in_every_mode_resume_and_name_a_broken_case(
    tiny_dataset, tmp_path, one_thread
):
    """With 2 DataLoader workers (augmentation in the workers; a different random stream than without, but
    the same in every mode): the first epoch is the same in every mode, a disk run interrupted and resumed
    equals an uninterrupted memory run, and a case a worker cannot read ends in the one-line error naming
    the file."""
    from medseg.engine import train
    from medseg.io import InputError

    quiet = lambda *_: None  # noqa: E731

    def cfg(mode: str, out: Path, data: Path = tiny_dataset):
        return _cfg(data, out, f"data.cache={mode}", "data.num_workers=2")

    train(cfg("memory", tmp_path / "memory"), log=quiet)
    for mode in ("disk", "none"):
        first = cfg(mode, tmp_path / mode)
        train(replace(first, train=replace(first.train, max_minutes=0.0)), log=quiet)  # stops after epoch 1
        assert _losses(tmp_path / mode) == _losses(tmp_path / "memory")[:1], mode
    train(cfg("disk", tmp_path / "disk"), resume=True, log=quiet)
    assert _losses(tmp_path / "disk") == _losses(tmp_path / "memory")
    assert _same(_weights(tmp_path / "memory"), _weights(tmp_path / "disk"))

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    broken = sorted((data / "imagesTr").glob("*.nii.gz"))[1]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size * 6 // 10])  # header fine, voxels cut
    broken_cfg = cfg("none", tmp_path / "broken", data)
    with pytest.raises(InputError) as info:
        train(replace(broken_cfg, train=replace(broken_cfg.train, iters_per_epoch=4)), log=quiet)
    assert str(info.value).startswith(f"{broken}: truncated") and "Traceback" not in str(info.value)
