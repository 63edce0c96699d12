"""``medseg train CONFIG --nproc N``: N data-parallel training processes on this machine, started by PyTorch's
elastic launcher — the one ``torchrun`` runs (``torch.distributed.launcher.api.elastic_launch``), with the
rendezvous of ``torchrun --standalone``: a c10d store on a free local port.

>>> train_processes(load_config("configs/demo.yaml"), nproc=2)   # doctest: +SKIP

This is ``torchrun --standalone --nproc-per-node N -m pipelines.cli train CONFIG``, without leaving Python; for
several machines run torchrun itself on each (README, "Multi-process / multi-node training"). Each process runs
:func:`medseg.engine.train` (:mod:`medseg.engine.distributed` explains what is shared and how). On the CPU each
process gets ``cpu_count // N`` threads, as torchrun's ``OMP_NUM_THREADS`` advice intends.

Errors: a worker's :class:`medseg.io.InputError` or :class:`medseg.config.ConfigError` comes back as the same
kind of error with the same one-line message (rank 0's, when the others only stopped because of it); any other
failure as :class:`TrainingFailed`, with the worker's traceback in ``callstack``.
"""

from __future__ import annotations

import functools
import logging
import os
import uuid
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from medseg.config import Config, ConfigError, config_from_dict, config_to_dict
from medseg.data.check import require_trainable_dataset
from medseg.data.folds import parse_fold
from medseg.data.voxels import LABEL_SCAN_NAME, remember_label_scan
from medseg.engine.distributed import PeerError, torchrun_world
from medseg.engine.trainer import train
from medseg.io import InputError


class TrainingFailed(RuntimeError):
    """A training process failed for an unexpected reason; ``callstack`` holds its traceback (may be empty)."""

    def __init__(self, message: str, callstack: str = "") -> None:
        super().__init__(message)
        self.callstack = callstack


#: Error kinds a worker passes back by name (the elastic launcher records ``"Kind: message"``).
_PASSED_BACK = {"InputError": InputError, "ConfigError": ConfigError}


@record
def _worker(
    raw_config: dict,
    resume: bool,
    fold: int | str | None,
    threads: int,
    plan_path: str | None = None,
    label_facts: dict | None = None,
) -> str:
    """One training process (spawned by the elastic launcher, rank and rendezvous in its environment).

    ``label_facts``: the label files the launcher found clean (rank 0 does not read them again).
    """
    if threads:
        torch.set_num_threads(threads)
    remember_label_scan(label_facts or {})
    try:
        cfg = config_from_dict(raw_config, "config")
        return str(
            train(
                cfg, resume=resume, log=functools.partial(print, flush=True), fold=fold, plan_path=plan_path
            )
        )
    except PeerError:
        raise
    except InputError as exc:  # subclasses (DatasetError, EntryError) travel as their one-line message
        raise InputError(str(exc)) from None
    except ConfigError as exc:
        raise ConfigError(str(exc)) from None


def _failure(exc: ChildFailedError) -> Exception:
    """The error to raise for failed workers: the first that is not a :class:`PeerError` decides."""
    failures = sorted(exc.failures.items())
    chosen = []
    for rank, failure in failures:
        message = failure.message
        callstack = ""
        if isinstance(message, dict):
            callstack = str(message.get("extraInfo", {}).get("py_callstack", ""))
            message = message.get("message", "")
        message = " ".join(str(message).split()) or f"exit code {failure.exitcode}"
        chosen.append((message.startswith("PeerError"), rank, message, callstack))
    _, rank, message, callstack = min(chosen)
    kind, _, text = message.partition(": ")
    if kind in _PASSED_BACK and text:
        return _PASSED_BACK[kind](text)
    return TrainingFailed(f"training process {rank} failed: {message}", callstack)


def train_processes(
    cfg: Config,
    nproc: int,
    resume: bool = False,
    log=print,
    fold: int | str | None = None,
    plan_path: str | os.PathLike | None = None,
) -> Path:
    """Train with ``nproc`` local processes (one per GPU, or gloo processes on the CPU); return the run folder.

    ``nproc == 1`` trains in this process. Arguments as :func:`medseg.engine.train`.

    Raises:
        ConfigError: ``nproc`` below 1, more processes than GPUs, ``train.device: cuda:N``, already inside
            torchrun, an invalid ``fold``; or a worker's config error.
        DatasetError: the dataset check, headers and label values (before any process starts).
        InputError: a worker's input error (one line).
        TrainingFailed: a worker failed otherwise.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    if torchrun_world() > 1:
        raise ConfigError("--nproc starts its own processes; under torchrun leave it out")
    device = cfg.train.device
    if device.startswith("cuda:"):
        raise ConfigError(f"train.device: {device!r} names one GPU; with --nproc use auto or cuda")
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if on_gpu and nproc > torch.cuda.device_count():
        raise ConfigError(
            f"--nproc {nproc}: only {torch.cuda.device_count()} GPU(s) visible (one process each)"
        )
    if nproc == 1:
        return train(cfg, resume=resume, log=log, fold=fold, plan_path=plan_path)
    if fold is not None:
        try:
            parse_fold(fold, cfg.data.folds)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    label_facts = {}
    if cfg.data.root is not None:  # before N processes start, one line per problem: headers, label values
        scan_file = Path(cfg.train.output) / LABEL_SCAN_NAME
        label_facts = require_trainable_dataset(cfg.data.root, scan_file=scan_file).label_facts
    threads = 0 if on_gpu else max(1, (os.cpu_count() or 1) // nproc)
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"medseg-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # torchrun --standalone: a free port
        max_restarts=0,
    )
    # a failure is reported once, by the error raised below, without the launcher's traceback and notices
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(launch, _worker)(
            config_to_dict(cfg),
            resume,
            fold,
            threads,
            None if plan_path is None else str(plan_path),
            label_facts,
        )
    except ChildFailedError as exc:
        raise _failure(exc) from None
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    return Path(results[0])
