"""The plan a training run uses: made from the fingerprint (the planner of ``medseg plan``) or read from a
plan file the user edited (``medseg train --plan plan.json``), checked against the network either way.

The memory budget of the planner is the training device's memory (the CUDA device's total memory) or, on
the CPU, :data:`medseg.planning.planner.CPU_DEFAULT_MEMORY_GB` (:func:`medseg.device.device_memory_gb`); ``medseg
plan --gpu-memory-gb X`` plans for another budget.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from medseg.config import Config
from medseg.config.schema import check_patch_fits_network
from medseg.data.check import require_valid_dataset
from medseg.device import device_memory_gb
from medseg.io.plan import Plan
from medseg.planning.fingerprint import make_plan, plan_dataset
from medseg.planning.plan_file import format_plan, read_plan
from medseg.planning.planner import CPU_DEFAULT_MEMORY_GB


def memory_budget(cfg: Config, gpu_memory_gb: float | None = None) -> tuple[float, str]:
    """``(GB, where it comes from)``: ``gpu_memory_gb`` when given, else the training device's memory."""
    if gpu_memory_gb is not None:
        return float(gpu_memory_gb), "--gpu-memory-gb"
    return device_memory_gb(cfg.train.device, CPU_DEFAULT_MEMORY_GB)


def resolve_plan(
    cfg: Config,
    train_cases: list[dict],
    labels: dict[str, int],
    channels: list[str],
    plan_path: str | os.PathLike | None = None,
    log: Callable[[str], object] = print,
) -> Plan:
    """The plan for this run: ``plan_path`` checked (:func:`medseg.planning.plan_file.read_plan`), or a new plan
    from the fingerprint of ``train_cases`` (:func:`medseg.planning.fingerprint.make_plan`). With a plan file, its
    patch, pool kernels and batch size are used even where the config has explicit values (a note says so).

    Raises:
        InputError: an unreadable or invalid plan file (every problem in one line).
        ConfigError: the plan's patch does not fit the network's poolings at its smallest input scale.
    """
    if plan_path is not None:
        plan = read_plan(plan_path, len(cfg.model.filters) - 1, labels, len(channels))
        for key, value in (
            ("augment.patch_size", cfg.augment.patch_size),
            ("train.batch_size", cfg.train.batch_size),
        ):
            planned = plan.patch_size if key.startswith("augment") else (plan.batch_size,)
            if value != "auto" and tuple(value if isinstance(value, tuple) else [value]) != planned:
                shown = list(planned) if len(planned) > 1 else planned[0]
                log(f"note: {key}={value} in the config; the plan {plan_path} decides: {shown}")
        where = f"{plan_path}: patch_size"
    else:
        memory, source = memory_budget(cfg)
        plan = make_plan(cfg, train_cases, labels, channels, memory, source)
        where = "planned patch_size"
    check_patch_fits_network(plan.patch_size, cfg.model, where, plan.pool_kernels)
    log(format_plan(plan))
    return plan


def plan_for_dataset(cfg: Config, root: str | os.PathLike, gpu_memory_gb: float | None = None) -> Plan:
    """What ``medseg plan DATASET`` computes: the header check, then the plan ``medseg train`` would make
    for ``root`` with ``cfg`` (same split, same planner), for ``gpu_memory_gb`` or the device's memory.

    Raises:
        DatasetError: the dataset's header check found problems (every one listed).
        ConfigError: the planned patch does not fit the network.
    """
    require_valid_dataset(root)
    memory, source = memory_budget(cfg, gpu_memory_gb)
    plan, _, _ = plan_dataset(cfg, root, memory, source)
    check_patch_fits_network(plan.patch_size, cfg.model, "planned patch_size", plan.pool_kernels)
    return plan
