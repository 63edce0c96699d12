"""Shared synthetic fixtures: a tiny phantom dataset and a tiny trained checkpoint (session-scoped)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_SHAPE = (48, 48, 24)
REAL_CT_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_ct"

#: Overrides that make training take seconds: small filters, small patches, a few iterations.
TINY_TRAIN = [
    "model.filters=[4, 8, 16, 32, 64]",
    "augment.patch_size=[32, 32, 16]",
    "augment.samples_per_volume=1",
    "train.epochs=2",
    "train.iters_per_epoch=2",
    "train.batch_size=1",
    "train.val_every=1",
    "train.progress=false",
    "train.quantize=off",
    "infer.overlap=0.25",
    "data.val_fraction=0.25",
]


@pytest.fixture(autouse=True)
def default_sigchld():
    """Each test starts with SIGCHLD's default disposition and leaves it so.

    PyTorch's ``DataLoader`` installs a Python SIGCHLD handler the first time it starts worker processes and
    never removes it; in a long-lived pytest worker every later child exit (Orthanc, a node, Chromium) then
    runs that handler on the alternate signal stack faulthandler set up, and on this machine the kernel failed
    to deliver it there (SIGSEGV with ``si_code`` SI_KERNEL in the worker, seen under gdb, during
    ``test_orthanc_fixture`` after ``test_caching``'s 2-worker loaders in the same worker).
    """
    if signal.getsignal(signal.SIGCHLD) not in (signal.SIG_DFL, None):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    yield
    if signal.getsignal(signal.SIGCHLD) not in (signal.SIG_DFL, None):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


@pytest.fixture
def one_thread():
    """Tiny inputs: with one thread no time goes into OpenMP synchronisation (dominant on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """4 training + 2 test phantoms, 48×48×24 voxels (RAS and LPS both occur)."""
    from medseg.data.phantoms import write_msd_dataset

    root = tmp_path_factory.mktemp("phantoms")
    write_msd_dataset(root, num_train=4, num_test=2, shape=TINY_SHAPE, seed=7)
    return root


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, tmp_path_factory) -> Path:
    """A run folder with best.pt/last.pt trained for a few iterations on the tiny dataset."""
    from medseg.config import load_config
    from medseg.engine import train

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [*TINY_TRAIN, f"data.root={tiny_dataset}", f"train.output={out}"])
    train(cfg, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def segmenting_run(tiny_dataset, tmp_path_factory) -> Path:
    """Like ``tiny_run`` but trained until it segments (liver Dice ≈ 0.4 on its 2 validation cases, one RAS and
    one LPS; ~10 s): what compares masks and Dice needs non-empty masks. Trained with 2 validation cases."""
    from medseg.config import load_config
    from medseg.engine import train

    out = tmp_path_factory.mktemp("segmenting_run")
    overrides = ["train.epochs=1", "train.iters_per_epoch=12", "optim.lr=0.02", "data.val_fraction=0.5"]
    cfg = load_config(None, [*TINY_TRAIN, *overrides, f"data.root={tiny_dataset}", f"train.output={out}"])
    train(cfg, log=lambda *_: None)
    return out


#: Fixtures that train a model or build a wheel: a test that uses one is slow (seconds to tens of seconds).
SLOW_FIXTURES = {"tiny_run", "segmenting_run", "installed"}
#: Suites that run the real CLI in subprocesses (each start imports torch: ~2 s) or several processes.
SLOW_FOLDERS = {"bad_inputs", "batch", "cli"}
#: Modules that train several processes or several variants (10-13 s a test).
SLOW_MODULES = {"test_distributed", "test_ablation"}


def pytest_collection_modifyitems(config, items):
    """Mark the slow tests, so that ``pytest -m "not slow"`` is the fast lane for everyday work (CI runs all):
    every test that uses a :data:`SLOW_FIXTURES` fixture or lives in a :data:`SLOW_FOLDERS` folder or a
    :data:`SLOW_MODULES` module, besides those marked ``@pytest.mark.slow`` by hand."""
    for item in items:
        path = Path(str(item.fspath))
        slow_place = path.parent.name in SLOW_FOLDERS or path.stem in SLOW_MODULES
        if slow_place or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
