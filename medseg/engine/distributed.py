"""Data-parallel training: one process per GPU (NCCL) or per CPU worker (gloo), started by torchrun.

PyTorch's recipe (``torch.nn.parallel.DistributedDataParallel`` and the "Getting Started with Distributed
Data Parallel" tutorial): every process holds a replica of the network, trains on its own share of the
batches, and DDP all-reduces (averages) the gradients during ``backward`` so every replica takes the same
optimizer step. Nothing here rendezvouses by itself: ``torchrun`` (or :func:`medseg.engine.launch.train_processes`,
which calls the same elastic launcher) sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``, and :func:`process_group` joins with ``init_process_group`` on the ``env://`` method.

What :class:`Replicas` adds for medseg's training loop:

* **devices**: ``cuda:LOCAL_RANK`` and NCCL when ``train.device`` is ``auto``/``cuda`` and CUDA is there,
  else the CPU and gloo; ``train.device: cuda:N`` names one GPU and is refused under torchrun;
* **batches**: a :class:`torch.utils.data.DistributedSampler` seeded with the epoch seed (each process a
  disjoint share of the training cases, reproducible per epoch, so ``--resume`` continues exactly); the
  augmentation seed is offset by the rank. ``train.batch_size`` is per process: the effective batch of one
  optimizer step is ``batch_size × WORLD_SIZE``;
* **normalisation state**: ``model.norm: batch`` becomes :class:`torch.nn.SyncBatchNorm` on CUDA (batch
  statistics over all processes). PyTorch's SyncBatchNorm needs GPU inputs, so on the CPU BatchNorm
  normalises each process's batch and its running statistics are averaged over the processes after every
  step — what timm's ``distribute_bn(reduce=True)`` does once per epoch. The EMA unit's bases
  (:class:`medseg.nets.blocks.ema.EMAUnit3D`, Li et al., "Expectation-Maximization Attention Networks",
  ICCV 2019, Sec. 3.3: ``μ ← α μ + (1 − α) mean_batch(μ_final)``) are averaged over the processes after every
  step and L2-normalised again. The update is linear in the batch mean and the old bases are equal on every
  process, so this is the paper's update on the whole batch of all processes, except that each process
  normalised its own update before the average (a difference of the order of the spread of the per-process
  norms). DDP's own per-forward buffer broadcast is switched off (``broadcast_buffers=False``): these
  averages keep the buffers equal instead, using every process's batch rather than only rank 0's;
* **one writer**: rank 0 alone writes files and logs; :meth:`Replicas.on_main` runs a step on rank 0 and
  hands its result (or its error) to every rank, :meth:`Replicas.barrier` makes the others wait;
* **sharded validation**: each rank predicts every ``WORLD_SIZE``-th validation case and the per-case
  scores are gathered (``all_gather_object``), so every rank computes the same mean Dice and agrees on
  the best epoch;
* **a check**: at the end, the SHA-256 of every rank's parameters and buffers (:func:`state_digest`) is
  gathered and written to ``replicas.json`` — equal digests mean the replicas really are replicas.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from medseg.config import ConfigError
from medseg.device import resolve_device
from medseg.nets.blocks.ema import EMAUnit3D, l2_normalise
from medseg.report.tables import write_json

T = TypeVar("T")

#: Written by rank 0 into the run folder after data-parallel training (:func:`record_replicas`).
REPLICAS_NAME = "replicas.json"


class PeerError(RuntimeError):
    """Raised on the other ranks when a step that rank 0 ran for everyone (:meth:`Replicas.on_main`) failed;
    rank 0 raises (and reports) the original error."""


@dataclass
class Replicas:
    """This process's place among the training processes (one process: rank 0 of 1, nothing shared)."""

    device: torch.device
    rank: int = 0
    world: int = 1
    _buffers: list[tuple[nn.Module, str]] | None = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def wrap(self, model: nn.Module, norm: str) -> tuple[nn.Module, nn.Module]:
        """``(model, net)``: the network to save, validate and step, and the one to train through.

        One process: both are ``model``. Several: BatchNorm → SyncBatchNorm on CUDA (``norm == "batch"``),
        and ``net`` is the DDP wrapper (its state dict keys carry a ``module.`` prefix; save ``model``'s).
        """
        if not self.distributed:
            return model, model
        if norm == "batch" and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel
        # no buffer broadcast before every forward (sync_buffers averages them); the newer keyword if known
        new = "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
        no_broadcast = {"forward_sync_buffers" if new else "broadcast_buffers": False}
        return model, ddp(model, device_ids=ids, **no_broadcast)

    def loader_options(self, dataset, generator: torch.Generator, seed: int) -> dict[str, Any]:
        """DataLoader keywords for one epoch: a shuffle from ``generator`` (one process), or this rank's
        share from a :class:`~torch.utils.data.DistributedSampler` shuffled with ``seed``."""
        if not self.distributed:
            return {"shuffle": True, "generator": generator}
        sampler = torch.utils.data.DistributedSampler(dataset, self.world, self.rank, shuffle=True, seed=seed)
        return {"sampler": sampler}

    def rank_seed(self, seed: int) -> int:
        """An augmentation seed of its own per rank (rank 0 keeps ``seed``: one process is unchanged)."""
        return seed + 7919 * self.rank

    def shard(self, n: int) -> list[int]:
        """The indices ``0..n-1`` this rank handles: every ``world``-th, starting at ``rank``."""
        return list(range(self.rank, n, self.world))

    def gather(self, items: list[T]) -> list[T]:
        """Every rank's ``items`` concatenated in rank order, on every rank (``all_gather_object``)."""
        if not self.distributed:
            return list(items)
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def gather_to_main(self, items: list[T]) -> list[T]:
        """Every rank's ``items`` concatenated on rank 0 (``gather_object``); an empty list elsewhere."""
        if not self.distributed:
            return list(items)
        parts: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(items, parts, dst=0)
        return [item for part in parts for item in part] if parts is not None else []

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def on_main(self, step: Callable[[], T]) -> T:
        """Run ``step`` on rank 0 only and return its result on every rank (``broadcast_object_list``).

        Raises:
            the error of ``step`` on rank 0, :class:`PeerError` with its message on the other ranks.
        """
        if not self.distributed:
            return step()
        box: list[Any] = [None]
        error: BaseException | None = None
        if self.is_main:
            try:
                box[0] = ("ok", step())
            except Exception as exc:  # every rank must hear about it, or they wait for ever
                error = exc
                box[0] = ("error", " ".join(str(exc).split()))
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        status, value = box[0]
        if status == "error":
            raise PeerError(f"rank 0 stopped: {value}")
        return value

    def _reduce(self, value: float, op) -> float:
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return float(tensor.item())

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks (e.g. the epoch's training loss, for the log)."""
        return self._reduce(value, dist.ReduceOp.SUM) / self.world if self.distributed else value

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (e.g. one rank's clock passed train.max_minutes)."""
        return self._reduce(float(flag), dist.ReduceOp.MAX) > 0 if self.distributed else flag

    def sync_buffers(self, model: nn.Module) -> None:
        """Average the running buffers that each process updates on its own batch (see the module docstring):
        EMA bases (then L2-normalised over channels) and BatchNorm running statistics (not SyncBatchNorm)."""
        if not self.distributed:
            return
        if self._buffers is None:
            self._buffers = synced_buffers(model)
        for module, name in self._buffers:
            buffer = getattr(module, name)
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(self.world)
            if isinstance(module, EMAUnit3D):
                buffer.copy_(l2_normalise(buffer, dim=1))

    def agreement(self, model: nn.Module) -> dict[str, Any]:
        """Every rank's :func:`state_digest` of ``model`` (gathered) and whether they are all equal."""
        digests = self.gather([state_digest(model.state_dict())])
        return {"world_size": self.world, "digests": digests, "agree": len(set(digests)) == 1}


def synced_buffers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, buffer name)`` of the EMA bases and of plain BatchNorm running mean and variance."""
    found: list[tuple[nn.Module, str]] = []
    for module in model.modules():
        if isinstance(module, EMAUnit3D):
            found.append((module, "mu"))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
            found += [(module, n) for n in ("running_mean", "running_var") if getattr(module, n) is not None]
    return found


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict: for every key in sorted order, the key, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def torchrun_world() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when not started by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(
            f"environment variable WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer"
        ) from None


def _process_device(name: str, local_rank: int) -> torch.device:
    """``cuda:LOCAL_RANK`` for ``auto`` (with CUDA) and ``cuda``; the CPU for ``cpu`` and ``auto`` without."""
    if name.startswith("cuda:"):
        raise ConfigError(
            f"train.device: {name!r} names one GPU, but under torchrun each process uses cuda:LOCAL_RANK; "
            "use auto or cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)"
        )
    device = resolve_device(name)  # "cuda" without a GPU fails here
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[Replicas]:
    """This process's :class:`Replicas`: joins torchrun's process group when ``WORLD_SIZE > 1`` (and leaves it
    at the end), else one process on ``resolve_device(device_name)``. A process group that the caller already
    initialised is used as it is and left open."""
    world = torchrun_world()
    if world <= 1 and not dist.is_initialized():
        yield Replicas(resolve_device(device_name))
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _process_device(device_name, local_rank)
    owner = not dist.is_initialized()
    if owner:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    try:
        yield Replicas(device, dist.get_rank(), dist.get_world_size())
        if owner:
            # every rank's last collective (e.g. gather_object of the validation scores) has completed
            # before any rank tears gloo down: a rank leaving early aborted with "terminate called without
            # an active exception" while its peer was still writing files
            dist.barrier()
    finally:
        if owner:
            dist.destroy_process_group()


def record_replicas(replicas: Replicas, model: nn.Module, out, log) -> dict[str, Any]:
    """Gather every rank's :func:`state_digest` after training; rank 0 writes ``out/replicas.json``
    (``world_size``, ``digests`` in rank order, ``agree``) and warns when the replicas differ."""
    report = replicas.agreement(model)
    if replicas.is_main:
        write_json(Path(out) / REPLICAS_NAME, report)
        if not report["agree"]:
            log(f"warning: the {replicas.world} processes ended with different weights (see {REPLICAS_NAME})")
    return report
